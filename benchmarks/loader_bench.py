"""Training data loading at COCO image size: crosskd's loader next to Ultralytics' own, on the same images.

Run through speed.py (`python benchmarks/speed.py --sections loader`); `run_loader_benchmark` is the whole of it.

- Data: 1024 images of the digits set with photo backgrounds (crosskd/data/digits.py, background=photos) at 640 px
  long side (short side 480-640), 5-15 digits per image, JPEG quality 95 (~95 KB each), generated once under
  <out>/data/, with COCO JSON labels (crosskd's side) and YOLO txt labels (Ultralytics' side) of the same images.
- Loader: the training loader at imgsz 640, batch 16, mosaic 1.0 and Ultralytics 8.4's default augmentation
  strengths (HYP), with workers=1 (images/s per worker) and workers=2 (total: this machine has 2 cores), with no
  cache, cache=ram and cache=disk. Images/s of a whole epoch, the median of `rounds` epochs after a warm-up epoch
  that also starts the workers; `*_build_s` is the dataset's construction (labels, and filling the cache).
- Fairness: both sides run a torch DataLoader with persistent workers and prefetch 2 (crosskd: `build_dataloader`;
  Ultralytics: its YOLODataset from `build_yolo_dataset` with its collate_fn and worker seeding). Ultralytics' own
  InfiniteDataLoader goes on producing 4 batches per worker past the end of an epoch: alternated, that work would
  run during crosskd's turn and give Ultralytics' next epoch a head start, so it is timed on its own over 3
  back-to-back epochs (`ultralytics_infinite_ips`, no cache only). Epochs alternate crosskd, Ultralytics, crosskd, ...
  so machine noise falls on both sides.
- Dataset size: each Ultralytics worker keeps its last min(n, 8 × batch, 1000) = 128 decoded images (its buffer,
  where mosaic partners come from) and returns a buffered image without decoding it again. On a set of 256 images
  half of all loads are such hits, which COCO's 118k images never give (about 0.1 %); 1024 images bring it to 1/8.
  crosskd draws mosaic partners from the batch (`augment.ImagePool`): one decode per image at any dataset size.
- Ultralytics (AGPL) is never imported here: it runs in its own Python (a separate venv, or crosskd's with the
  `compare` extra) as a subprocess, `ultralytics_loader.py`, found through --ultralytics-python, $ULTRALYTICS_PYTHON
  or this Python. Without it the Ultralytics columns are empty.
"""

from __future__ import annotations

import gc
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from crosskd.data import DetectionDataset, build_dataloader, generate_digits, load_data_yaml
from crosskd.data.loader import stop_workers
from crosskd.data.pipeline import build_transforms

HERE = Path(__file__).resolve().parent
HYP = {  # Ultralytics 8.4 cfg/default.yaml: the augmentation a plain `yolo train` uses
    "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0,
    "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0, "cutmix": 0.0,
}
PAD_MULTIPLE = 128  # the GFL/FCOS/RetinaNet models' largest stride (P7): batches pad to it, as in training


@dataclass(frozen=True)
class LoaderPlan:
    """What the loader benchmark measures. `ultralytics`: 'auto' (find a Python with it), a Python path, or None."""

    images: int = 1024
    imgsz: int = 640
    batch: int = 16
    workers: tuple[int, ...] = (1, 2)
    caches: tuple[str, ...] = ("none", "ram", "disk")
    rounds: int = 3
    warmup: int = 1
    objects: tuple[int, int] = (5, 15)
    hyp: dict = field(default_factory=lambda: dict(HYP))
    ultralytics: str | None = "auto"
    infinite_epochs: int = 3


def require_augmentations(hyp: dict) -> None:
    """Stop with one clear line when crosskd's build_transforms does not take the augmentation keywords of `hyp`."""
    accepted = inspect.signature(build_transforms).parameters
    missing = [key for key in hyp if key not in accepted]
    if missing:
        raise SystemExit(f"loader benchmark: crosskd's build_transforms takes no {', '.join(missing)}; this "
                         "crosskd predates its augmentations (crosskd/data/augment.py): update it, then run this again")


def loader_data(folder: Path, plan: LoaderPlan) -> Path:
    """The benchmark's images (generated once) and a dataset YAML of them; returns the YAML."""
    root = generate_digits(folder / f"digits_photos{plan.imgsz}_{plan.images}", num_train=plan.images, num_val=1,
                           imgsz=plan.imgsz, objects=plan.objects, background="photos")
    yaml_file = root / "loader.yaml"  # no fliplr: the run setting applies, as in Ultralytics
    names = "\n".join(f"  {i}: '{i}'" for i in range(10))
    yaml_file.write_text(f"path: {root}\ntrain: annotations/instances_train.json\n"
                         f"val: annotations/instances_val.json\nnames:\n{names}\n")
    return yaml_file


def remove_arrays(root: Path) -> None:
    """Delete both tools' .npy disk caches (crosskd: 000001.jpg.npy, Ultralytics: 000001.npy), so both fill anew."""
    for path in (root / "images").rglob("*.npy"):
        path.unlink()


def epoch(loader: object, count: Callable[[object], int]) -> dict:
    """One timed pass over `loader`: seconds and images."""
    images, start = 0, time.perf_counter()
    for batch in loader:
        images += count(batch)
    return {"seconds": time.perf_counter() - start, "images": images}


class CrosskdSide:
    """crosskd's training loader over the benchmark data at one cache setting and worker count."""

    def __init__(self, data_yaml: Path, plan: LoaderPlan, cache: str, workers: int) -> None:
        start = time.perf_counter()
        info = load_data_yaml(str(data_yaml), data_yaml.parent)
        dataset = DetectionDataset(info, "train", plan.imgsz, augment=True, pad_multiple=PAD_MULTIPLE,
                                   cache=False if cache == "none" else cache, **plan.hyp)
        self.build_s = time.perf_counter() - start
        self.loader = build_dataloader(dataset, plan.batch, workers, shuffle=True, seed=0, pin_memory=False)
        self.epochs = 0

    def epoch(self) -> dict:
        """One timed epoch, with a new order and new augmentation draws each time, as the trainer's epochs."""
        self.loader.sampler.set_epoch(self.epochs)
        self.epochs += 1
        return epoch(self.loader, len)

    def close(self) -> None:
        stop_workers(getattr(self.loader, "_iterator", None))


class UltralyticsSide:
    """Ultralytics' side in a subprocess of the Python that has it (`script`: ultralytics_loader.py here), one JSON
    command at a time; `python` is its path or a command prefix running it."""

    def __init__(self, python: str | list[str], log_file: Path, script: Path = HERE / "ultralytics_loader.py") -> None:
        self.log_file = log_file
        env = {**os.environ, "YOLO_CONFIG_DIR": str(log_file.parent / "ultralytics_config")}
        prefix = [python] if isinstance(python, str) else python
        with open(log_file, "w") as log:
            self.process = subprocess.Popen([*prefix, str(script)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)

    def ask(self, **command: object) -> dict:
        """Send one command, return its answer; a failure on that side stops the benchmark with its message."""
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait(timeout=60)
            killed = " (killed: out of memory?)" if code == -9 else ""
            tail = self.log_file.read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"the Ultralytics side stopped with exit code {code}{killed}; the end of "
                               f"{self.log_file}: " + " | ".join(tail))
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the Ultralytics side failed: {answer['error']} (log: {self.log_file})")
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)


def find_ultralytics(choice: str | None) -> str | None:
    """The Python to run Ultralytics' side with: `choice` itself (it must import ultralytics), or for 'auto'
    $ULTRALYTICS_PYTHON or this Python when they can; None when there is none."""
    if choice is None:
        return None
    candidates = [os.environ.get("ULTRALYTICS_PYTHON"), sys.executable] if choice == "auto" else [choice]
    for python in filter(None, candidates):
        try:
            probe = subprocess.run([python, "-c", "import ultralytics"], capture_output=True,
                                   env={**os.environ, "YOLO_OFFLINE": "1"})
        except OSError:  # no such program
            continue
        if probe.returncode == 0:
            return python
    if choice != "auto":
        raise SystemExit(f"loader benchmark: {choice} cannot import ultralytics; install it there (pip install "
                         "ultralytics, or crosskd[compare]) or leave --ultralytics-python out")
    return None


def median_ips(results: list[dict]) -> float:
    return statistics.median(r["images"] / r["seconds"] for r in results)


def alternate_epochs(sides: dict[str, Callable[[], dict]], warmup: int, rounds: int) -> dict[str, list[dict]]:
    """`warmup` untimed epochs of every side, then `rounds` rounds of one epoch per side in turn."""
    for _ in range(warmup):
        for run in sides.values():
            run()
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, run in sides.items():
            results[name].append(run())
    return results


def measure(data_yaml: Path, plan: LoaderPlan, cache: str, workers: int, theirs: UltralyticsSide | None) -> dict:
    """One (cache, workers) setting: build both loaders, a warm-up epoch each, then `rounds` alternating epochs."""
    if cache == "disk":
        remove_arrays(data_yaml.parent)
    ours = CrosskdSide(data_yaml, plan, cache, workers)
    sides: dict[str, Callable[[], dict]] = {"crosskd": ours.epoch}
    row = {"cache": cache, "workers": ours.loader.num_workers, "images": len(ours.loader.dataset),
           "imgsz": plan.imgsz, "batch": plan.batch, "crosskd_build_s": ours.build_s}
    if theirs is not None:
        start = time.perf_counter()
        built = theirs.ask(op="build", root=str(data_yaml.parent), imgsz=plan.imgsz, batch=plan.batch,
                           workers=workers, cache=False if cache == "none" else cache, hyp=plan.hyp)
        row.update(ultralytics_build_s=time.perf_counter() - start, ultralytics_workers=built["workers"],
                   ultralytics_version=built["version"])
        sides["ultralytics"] = lambda: theirs.ask(op="pass")
    try:
        results = alternate_epochs(sides, plan.warmup, plan.rounds)
    finally:
        ours.close()
        sides.clear()  # with `ours`, the last reference to its dataset: its cache goes before the next is filled
        del ours
        gc.collect()
    for name, runs in results.items():
        row[f"{name}_ips"] = median_ips(runs)
        row[f"{name}_ips_runs"] = [r["images"] / r["seconds"] for r in runs]
    if theirs is not None:
        row["ratio"] = row["crosskd_ips"] / row["ultralytics_ips"]
        if cache == "none":
            row["ultralytics_infinite_ips"] = median_ips([theirs.ask(op="infinite", epochs=plan.infinite_epochs)])
    return row


def run_loader_benchmark(plan: LoaderPlan, folder: Path) -> list[dict]:
    """One row per (cache, workers): crosskd's and (when found) Ultralytics' training-loader images/s."""
    require_augmentations(plan.hyp)
    folder.mkdir(parents=True, exist_ok=True)
    data_yaml = loader_data(folder, plan)
    python = find_ultralytics(plan.ultralytics)
    theirs = UltralyticsSide(python, folder / "ultralytics_loader.log") if python else None
    try:
        rows = [measure(data_yaml, plan, cache, workers, theirs) for cache in plan.caches for workers in plan.workers]
    finally:
        if theirs is not None:
            theirs.close()
    if theirs is None:
        for row in rows:
            row["ultralytics"] = "not measured: no Python with ultralytics (--ultralytics-python, $ULTRALYTICS_PYTHON)"
    return rows
