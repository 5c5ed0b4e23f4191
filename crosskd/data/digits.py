"""Demo detection data made offline: real handwritten digits pasted onto real textures and photos.

Glyphs are scikit-learn's 1,797 8×8 `load_digits` images, split into disjoint train and val pools (no glyph is in
both splits). Each glyph is upscaled, drawn as ink through an alpha mask taken from its intensity, at a
non-overlapping position; its box is the tight box of the drawn ink. Two looks (`background=`):

  closeup (the default, digits.yaml) close-up crops of scikit-image's textures and photos, at most 1.5× the image,
          so most backgrounds are smooth; opaque ink, near-black on light backgrounds and near-white on dark ones.
  photos  (harder) wide crops of whole photos (scikit-image's and scikit-learn's `load_sample_images`), flipped at
          random, with brightness and contrast jitter, so backgrounds are cluttered; ink of any colour (pushed away in
          brightness from the background under it when closer than MIN_INK_CONTRAST), 60-100% opaque.

Layout under `root` (both label formats describe the same images; file stems are the COCO image ids):
  images/{train,val}/000001.jpg          JPEG, quality 95
  labels/{train,val}/000001.txt          YOLO txt (class xc yc w h, normalised)
  annotations/instances_{train,val}.json COCO (category id = digit; annotations carry `glyph_index`)
  .done                                  the generation parameters; data is regenerated only when they differ
"""

import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from crosskd.errors import DataError
from crosskd.utils import LOGGER

FORMAT_VERSION = 1  # bump when the generator's output changes, so old data is regenerated
BACKGROUNDS = (
    "brick", "grass", "gravel", "camera", "coins", "moon",
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass", "gravel")  # skimage.data
SAMPLE_IMAGES = ("china.jpg", "flower.jpg")  # sklearn.datasets.load_sample_images
BACKGROUND_STYLES = ("closeup", "photos")
PHOTO_CROP = (0.35, 1.0)  # photos: crop side as a fraction of the largest crop of the image's shape
PHOTO_GAIN, PHOTO_BIAS = (0.7, 1.3), (-30.0, 30.0)  # photos: contrast and brightness jitter of the background
MIN_INK_CONTRAST = 40.0  # photos: least luminance difference between ink and the background under it (0..255)
INK_OPACITY = (0.6, 1.0)  # photos
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
VAL_GLYPH_FRACTION = 0.2  # share of the glyphs reserved for the val split
GLYPH_SIDE = (0.1, 0.3)  # glyph height as a fraction of imgsz (12–38 px at 128)
INK_THRESHOLD = 0.15  # alpha below this is not drawn, so the box is tight around visible ink
PLACEMENT_TRIES = 30
JPEG_QUALITY = 95


def generate_digits(
    root: Path, num_train: int = 512, num_val: int = 128, imgsz: int = 128, objects: tuple[int, int] = (1, 4),
    seed: int = 0, background: str = "closeup",
) -> Path:
    """Write the digits detection set under `root` (deterministic per seed); a no-op when it exists already.

    `background`: 'closeup' (the original look) or 'photos' (cluttered photo backgrounds, varied ink; see above).
    """
    if background not in BACKGROUND_STYLES:
        raise DataError(f"digits: background={background!r} is not known; use {' or '.join(BACKGROUND_STYLES)}")
    root = Path(root)
    params = {"num_train": num_train, "num_val": num_val, "imgsz": imgsz, "objects": list(objects), "seed": seed,
              "version": FORMAT_VERSION}
    if background != "closeup":  # data written before the option existed stays valid
        params["background"] = background
    marker = root / ".done"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    LOGGER.info(f"digits: generating {num_train} train and {num_val} val images ({imgsz}px, {background} "
                f"backgrounds) in {root}")
    load_digits, skdata = _demo_libraries()
    _clear(root)
    digits = load_digits()
    glyphs = (digits.images / 16.0).astype(np.float32)  # [1797, 8, 8] ink intensity 0..1
    pool_rng, train_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    order = pool_rng.permutation(len(glyphs))
    num_val_glyphs = round(len(glyphs) * VAL_GLYPH_FRACTION)
    pools = {"train": np.sort(order[num_val_glyphs:]), "val": np.sort(order[:num_val_glyphs])}
    backgrounds = _photos(skdata) if background == "photos" else [_as_rgb(getattr(skdata, n)()) for n in BACKGROUNDS]
    maker = _PhotoSceneMaker if background == "photos" else _SceneMaker
    for split, count, rng in (("train", num_train, train_rng), ("val", num_val, val_rng)):
        scene = maker(rng, glyphs, digits.target, pools[split], backgrounds, imgsz, objects)
        _write_split(root, split, [scene.make() for _ in range(count)])
    marker.write_text(json.dumps(params))
    return root


def _demo_libraries() -> tuple[Any, Any]:
    """scikit-learn's `load_digits` and scikit-image's `data` module: the `demo` extra, imported only to generate."""
    try:
        from skimage import data as skdata
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise DataError(f"the digits demo data needs scikit-learn and scikit-image ({error.name} is missing); "
                        "install them with: pip install 'crosskd[demo]'") from None
    return load_digits, skdata


def _photos(skdata: Any) -> list[np.ndarray]:
    """The photos and textures of the photos look, RGB uint8: scikit-image's, then scikit-learn's two."""
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    by_name = {Path(name).name: image for name, image in zip(sample.filenames, sample.images)}
    return [_as_rgb(getattr(skdata, name)()) for name in PHOTOS] + [by_name[name] for name in SAMPLE_IMAGES]


def _clear(root: Path) -> None:
    """Remove what an earlier generation wrote (and only that)."""
    (root / ".done").unlink(missing_ok=True)
    for split in ("train", "val"):
        shutil.rmtree(root / "images" / split, ignore_errors=True)
        shutil.rmtree(root / "labels" / split, ignore_errors=True)
        (root / "annotations" / f"instances_{split}.json").unlink(missing_ok=True)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image[..., :3]


class _SceneMaker:
    """Makes one image at a time: a background crop with non-overlapping glyphs drawn on it."""

    def __init__(
        self, rng: np.random.Generator, glyphs: np.ndarray, digit_labels: np.ndarray, pool: np.ndarray,
        backgrounds: list[np.ndarray], imgsz: int, objects: tuple[int, int],
    ) -> None:
        self.rng, self.glyphs, self.digit_labels, self.pool = rng, glyphs, digit_labels, pool
        self.backgrounds, self.imgsz, self.objects = backgrounds, imgsz, objects

    def make(self) -> tuple[np.ndarray, list[dict]]:
        """An RGB image `[H, W, 3]` (long side imgsz) and its objects (`box` xyxy ints, `label`, `glyph`)."""
        short = int(self.rng.integers(round(0.75 * self.imgsz), self.imgsz + 1))
        height, width = (self.imgsz, short) if self.rng.random() < 0.5 else (short, self.imgsz)
        image = self._background(height, width)
        placed = []
        for _ in range(int(self.rng.integers(self.objects[0], self.objects[1] + 1))):
            glyph = int(self.pool[self.rng.integers(len(self.pool))])
            alpha = self._glyph_alpha(glyph)
            box = self._place(alpha.shape, placed, height, width)
            if box is not None:
                self._draw(image, alpha, box)
                placed.append({"box": box, "label": int(self.digit_labels[glyph]), "glyph": glyph})
        return image, placed

    def _background(self, height: int, width: int) -> np.ndarray:
        """A random crop of a random texture or photo, at a random scale, resized to `height` × `width`."""
        source = self.backgrounds[self.rng.integers(len(self.backgrounds))]
        scale = min(self.rng.uniform(0.5, 1.5), source.shape[0] / height, source.shape[1] / width)
        crop_h, crop_w = max(1, int(height * scale)), max(1, int(width * scale))
        y = int(self.rng.integers(source.shape[0] - crop_h + 1))
        x = int(self.rng.integers(source.shape[1] - crop_w + 1))
        crop = source[y : y + crop_h, x : x + crop_w]
        return cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)

    def _glyph_alpha(self, glyph: int) -> np.ndarray:
        """The glyph upscaled to a random size and aspect, cropped to its visible ink: alpha `[h, w]` in 0..1."""
        side = self.rng.uniform(*GLYPH_SIDE) * self.imgsz
        size = (max(4, round(side * self.rng.uniform(0.7, 1.0))), max(4, round(side)))  # cv2 takes (w, h)
        alpha = cv2.resize(self.glyphs[glyph], size, interpolation=cv2.INTER_LINEAR)
        alpha[alpha < INK_THRESHOLD] = 0
        rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
        return alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    def _place(self, shape: tuple[int, int], placed: list[dict], height: int, width: int) -> list[int] | None:
        """A random xyxy box of `shape` inside the image that overlaps no placed box, or None."""
        glyph_h, glyph_w = shape
        if glyph_h > height or glyph_w > width:
            return None
        taken = np.array([obj["box"] for obj in placed], dtype=np.int64).reshape(-1, 4)
        for _ in range(PLACEMENT_TRIES):
            x, y = int(self.rng.integers(width - glyph_w + 1)), int(self.rng.integers(height - glyph_h + 1))
            box = [x, y, x + glyph_w, y + glyph_h]
            overlaps_x = (taken[:, 0] < box[2]) & (box[0] < taken[:, 2])
            overlaps = overlaps_x & (taken[:, 1] < box[3]) & (box[1] < taken[:, 3])
            if not overlaps.any():
                return box
        return None

    def _draw(self, image: np.ndarray, alpha: np.ndarray, box: list[int]) -> None:
        """Blend ink into `image` in place; dark ink on light backgrounds, light ink on dark ones."""
        x1, y1, x2, y2 = box
        patch = image[y1:y2, x1:x2].astype(np.float32)
        luminance = float((patch @ LUMA).mean())
        low, high = (0, 70) if luminance >= 128 else (185, 256)
        ink = self.rng.integers(low, high, size=3).astype(np.float32)
        blended = patch * (1 - alpha[..., None]) + ink * alpha[..., None]
        image[y1:y2, x1:x2] = blended.round().astype(np.uint8)


class _PhotoSceneMaker(_SceneMaker):
    """The photos look: wide, jittered crops of whole photos; ink of varied colour, contrast and opacity."""

    def _background(self, height: int, width: int) -> np.ndarray:
        source = self.backgrounds[self.rng.integers(len(self.backgrounds))]
        scale = min(source.shape[0] / height, source.shape[1] / width) * self.rng.uniform(*PHOTO_CROP)
        crop_h, crop_w = max(1, int(height * scale)), max(1, int(width * scale))
        y = int(self.rng.integers(source.shape[0] - crop_h + 1))
        x = int(self.rng.integers(source.shape[1] - crop_w + 1))
        crop = source[y : y + crop_h, x : x + crop_w]
        if self.rng.random() < 0.5:
            crop = crop[:, ::-1]  # the background may be mirrored, the digits never are
        shrink = crop_h > height
        image = cv2.resize(np.ascontiguousarray(crop), (width, height),
                           interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        gain, bias = self.rng.uniform(*PHOTO_GAIN), self.rng.uniform(*PHOTO_BIAS)
        return (image.astype(np.float32) * gain + bias).clip(0, 255).round().astype(np.uint8)

    def _draw(self, image: np.ndarray, alpha: np.ndarray, box: list[int]) -> None:
        x1, y1, x2, y2 = box
        patch = image[y1:y2, x1:x2].astype(np.float32)
        luminance = float((patch @ LUMA).mean())
        ink = self.rng.integers(0, 256, size=3).astype(np.float32)
        if abs(float(ink @ LUMA) - luminance) < MIN_INK_CONTRAST:  # push the ink's brightness away from the patch
            ink = (ink + (MIN_INK_CONTRAST * 2 if luminance < 128 else -MIN_INK_CONTRAST * 2)).clip(0, 255)
        weight = alpha[..., None] * self.rng.uniform(*INK_OPACITY)  # [h, w, 1]
        image[y1:y2, x1:x2] = (patch * (1 - weight) + ink * weight).round().astype(np.uint8)


def _write_split(root: Path, split: str, scenes: list[tuple[np.ndarray, list[dict]]]) -> None:
    """Write the images, the YOLO txt labels and the COCO JSON of one split."""
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    for directory in (image_dir, label_dir, root / "annotations"):
        directory.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, (image, objects) in enumerate(scenes, start=1):
        height, width = image.shape[:2]
        name = f"{image_id:06d}"
        cv2.imwrite(str(image_dir / f"{name}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        (label_dir / f"{name}.txt").write_text("".join(_yolo_line(obj["box"], obj["label"], width, height)
                                                        for obj in objects))
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": width, "height": height})
        for obj in objects:
            x1, y1, x2, y2 = obj["box"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": obj["label"],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                "glyph_index": obj["glyph"],
            })
    categories = [{"id": digit, "name": str(digit)} for digit in range(10)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def _yolo_line(box: list[int], label: int, width: int, height: int) -> str:
    x1, y1, x2, y2 = box
    return f"{label} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} {(x2 - x1) / width:.6f} " \
           f"{(y2 - y1) / height:.6f}\n"
