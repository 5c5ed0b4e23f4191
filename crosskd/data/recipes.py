"""Training recipes: the augmentation settings a model family trains with where the user does not give them.

A model YAML names its recipe (`recipe: ultralytics`); the dense heads (GFL, RetinaNet, FCOS, ATSS) default to
`paper`, the CrossKD paper's 1x COCO student recipe: keep-ratio resize and a horizontal flip, nothing else.
`ultralytics` is Ultralytics 8.4's default.yaml (mosaic, random affine, HSV jitter, flips, mosaic off for the last
10 epochs), the recipe of the real-time family. Keys a user gives (command line, Python or cfg=) always win.
"""

ULTRALYTICS = {
    "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0,
    "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0, "cutmix": 0.0,
    "close_mosaic": 10, "multi_scale": 0.0,
}
PAPER = {**dict.fromkeys(ULTRALYTICS, 0.0), "fliplr": 0.5, "close_mosaic": 0}
RECIPES: dict[str, dict[str, float | int]] = {"paper": PAPER, "ultralytics": ULTRALYTICS}
DEFAULT_RECIPE = "paper"  # a model YAML without `recipe:`
