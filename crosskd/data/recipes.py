"""Training recipes: the augmentation and optimisation settings a model family trains with where the user does not
give them.

A model YAML names its recipe (`recipe: ultralytics`); the dense heads (GFL, RetinaNet, FCOS, ATSS) default to
`paper`, the CrossKD paper's 1x COCO student recipe: keep-ratio resize and a horizontal flip, nothing else, and the
MMDetection optimisation the run settings' defaults describe. `ultralytics` is Ultralytics 8.4's default.yaml (mosaic,
random affine, HSV jitter, flips, mosaic off for the last 10 epochs) and its trainer (nominal batch 64, three parameter
groups, epoch-wise warm-up and linear decay, EMA, gradient clipping at 10), the recipe of the real-time family. Keys a
user gives (command line, Python or cfg=) always win.
"""

ULTRALYTICS_AUGMENTATION = {
    "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0,
    "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0, "cutmix": 0.0,
    "close_mosaic": 10, "multi_scale": 0.0,
}
ULTRALYTICS_OPTIMIZATION = {
    "lr0": 0.01, "momentum": 0.937, "nesterov": True, "weight_decay": 0.0005, "norm_bias_decay": False, "nbs": 64,
    "lr_schedule": "ultralytics", "warmup_epochs": 3.0, "warmup_bias_lr": 0.1, "warmup_momentum": 0.8,
    "ema": True, "ema_decay": 0.9999, "clip_grad": 10.0,
}
PAPER_OPTIMIZATION = {  # the run settings' defaults: what every dense-head run trained with before recipes had them
    "lr0": None, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0001, "norm_bias_decay": True, "nbs": 0,
    "lr_schedule": "mmdet", "warmup_epochs": 0.0, "warmup_bias_lr": 0.0, "warmup_momentum": None,
    "ema": False, "ema_decay": 0.9998, "clip_grad": 0.0,
}
ULTRALYTICS = {**ULTRALYTICS_AUGMENTATION, **ULTRALYTICS_OPTIMIZATION}
PAPER = {**dict.fromkeys(ULTRALYTICS_AUGMENTATION, 0.0), "fliplr": 0.5, "close_mosaic": 0, **PAPER_OPTIMIZATION}
RECIPES: dict[str, dict[str, float | int | bool | str | None]] = {"paper": PAPER, "ultralytics": ULTRALYTICS}
DEFAULT_RECIPE = "paper"  # a model YAML without `recipe:`
