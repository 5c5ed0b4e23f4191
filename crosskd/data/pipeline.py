"""The one place that turns the run settings into a dataset's pipeline: the train pipeline of the augmentation keys
(steps from `augment.py`), or resize alone for evaluation."""

from collections.abc import Sequence
from typing import Any

from crosskd.data import augment as steps
from crosskd.data.transforms import Compose, RandomHFlip, Resize

AUGMENTATION_KEYS = (  # the run settings that build_transforms takes by name (the trainer passes them; it adds
    # ms_sizes and ms_mode, which it resolves from the settings ms_scales and ms_mode with the head's mstrain sizes)
    "fliplr", "flipud", "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
    "mosaic", "mixup", "cutmix",
)


def augmentation_settings(settings: Any) -> dict[str, Any]:
    """The augmentation keys of the run settings `settings` (any object with them as attributes), by name."""
    return {key: getattr(settings, key) for key in AUGMENTATION_KEYS}


def build_transforms(
    imgsz: int, augment: bool, *, pool: steps.ImagePool | None = None,
    fliplr: float = 0.5, flipud: float = 0.0, hsv_h: float = 0.0, hsv_s: float = 0.0, hsv_v: float = 0.0,
    degrees: float = 0.0, translate: float = 0.0, scale: float = 0.0, shear: float = 0.0, perspective: float = 0.0,
    mosaic: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0, ms_sizes: Sequence[int] = (),
    ms_mode: str = "range",
) -> Compose:
    """The pipeline of a dataset: resize the long side to `imgsz`, then (`augment`) the augmentations turned on.

    Train order, as Ultralytics: resize (RandomResize over `ms_sizes` when given) → mosaic → affine (when mosaic or
    an affine gain is on) → mixup → cutmix → HSV → flipud → fliplr; a step whose setting is 0 is left out, except
    fliplr. Mosaic, mixup and cutmix mix in other images drawn from `pool` (the dataset's, or its batch's). MixUp's
    and CutMix's image goes through the same resize → mosaic → affine, with the same generator and the same disabled
    steps. Every keyword but `pool` is a run setting named in AUGMENTATION_KEYS (docs/training.md, "Augmentations"),
    so a new augmentation is its Transform, its keyword here and its setting in crosskd/settings.py.
    """
    if not augment:
        return Compose([Resize(imgsz)])
    if (mosaic or mixup or cutmix) and pool is None:
        raise ValueError(f"mosaic={mosaic}, mixup={mixup}, cutmix={cutmix} mix in other images of the dataset: "
                         "build_transforms needs their pool")
    pipeline = Compose([steps.RandomResize(ms_sizes, ms_mode) if ms_sizes else Resize(imgsz)])
    add = pipeline.transforms.append
    if mosaic:
        add(steps.Mosaic(steps.SampleSource(pool, Compose([Resize(imgsz)])), imgsz, mosaic))
    if mosaic or any((degrees, translate, scale, shear, perspective)):
        add(steps.RandomAffine(degrees, translate, scale, shear, perspective))
    if mixup or cutmix:
        mixed = steps.SampleSource(pool, pipeline.head(len(pipeline.transforms)))  # resize → mosaic → affine
        if mixup:
            add(steps.MixUp(mixed, mixup))
        if cutmix:
            add(steps.CutMix(mixed, cutmix))
    if any((hsv_h, hsv_s, hsv_v)):
        add(steps.RandomHSV(hsv_h, hsv_s, hsv_v))
    if flipud:
        add(steps.RandomVFlip(flipud))
    add(RandomHFlip(fliplr))
    return pipeline
