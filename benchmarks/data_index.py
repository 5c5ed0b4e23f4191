"""COCO scale on the data side: index time (cold and cached) and the memory of a loader with 8 workers.

    python benchmarks/data_index.py                      # 118,000 images, ~826,000 boxes, 8 workers
    python benchmarks/data_index.py --quick              # CI smoke: 2,000 images, 2 workers
    python benchmarks/data_index.py --before /tmp/h12_before   # also the old code path, from a git worktree

A synthetic COCO train split is written once under --root: one JSON (bbox, a 6-point polygon, area, iscrowd 1 %
of boxes, COCO's 80 category ids) and one file per image. The image files are real PNGs, but hard links to a few
templates (one per image size), so 118,000 of them cost no disk space and the dataset's image check (a header
read per file) and the cache fingerprint (a stat per file) run on real files.

Each measurement runs in a fresh process importing crosskd from the given checkout: it builds
`DetectionDataset(info, "train", ...)` (the index; cold = cache file deleted first, cached = the cache left by the
cold run; peak RSS = VmHWM), then one pass of a DataLoader with `--workers` forked workers over a dataset whose
`__getitem__` only reads the image's index record (`dataset.records[i]`: width, height, boxes, labels; no image is
decoded), and sums the memory of the main process and the workers read from /proc/<pid>/smaps_rollup while the
workers are alive: Pss (shared pages split between the processes sharing them), Rss, and the workers' private
(copied) pages.
Old and new code are called alternately; the median of --repeats runs is written to
benchmarks/results/speed/data_index.json.
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "speed" / "data_index.json"
COCO_IDS = sorted(set(range(1, 91)) - {12, 26, 29, 30, 45, 66, 68, 69, 71, 83})  # COCO's 80 category ids
SIZES = [(width, height) for width in (320, 427, 480, 500, 640) for height in (240, 333, 375, 427, 480, 640)]


# ---------------------------------------------------------------------------------------------- synthetic data
def generate(root: Path, num_images: int, boxes_per_image: float, seed: int = 0) -> Path:
    """Write the synthetic COCO split under `root` (kept when it exists with the same size); returns its YAML."""
    yaml_file = root / f"synthetic_{num_images}.yaml"
    if yaml_file.is_file():
        return yaml_file
    rng = np.random.default_rng(seed)
    images_dir = root / f"train_{num_images}"
    templates = write_templates(root / "templates")
    size_index = rng.integers(len(SIZES), size=num_images)
    images_dir.mkdir(parents=True, exist_ok=True)
    for i, k in enumerate(size_index.tolist()):
        target = images_dir / f"{i + 1:012d}.png"
        if not target.exists():
            os.link(templates[k], target)
    annotations = synthetic_annotations(rng, size_index, boxes_per_image)
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.png", "width": SIZES[k][0], "height": SIZES[k][1]}
              for i, k in enumerate(size_index.tolist())]
    categories = [{"id": category_id, "name": f"c{category_id}"} for category_id in COCO_IDS]
    (root / "annotations").mkdir(exist_ok=True)
    json_file = root / "annotations" / f"instances_train_{num_images}.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    names = "\n".join(f"  - c{category_id}" for category_id in COCO_IDS)
    yaml_file.write_text(f"# {len(annotations)} boxes\npath: {root}\ntrain: annotations/{json_file.name}\n"
                         f"val: annotations/{json_file.name}\nnames:\n{names}\n")
    return yaml_file


def write_templates(folder: Path) -> list[Path]:
    """One black PNG per size in SIZES."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for width, height in SIZES:
        path = folder / f"{width}x{height}.png"
        if not path.exists():
            cv2.imwrite(str(path), np.zeros((height, width, 3), np.uint8))
        paths.append(path)
    return paths


def synthetic_annotations(rng: np.random.Generator, size_index: np.ndarray, boxes_per_image: float) -> list[dict]:
    """Boxes inside their image (Poisson count per image), COCO fields with a 6-point polygon each."""
    counts = rng.poisson(boxes_per_image, size=len(size_index))
    image_of = np.repeat(np.arange(len(size_index)), counts)  # [A]
    wh = np.array(SIZES, dtype=np.float64)[size_index[image_of]]  # [A, 2]
    box_wh = wh * rng.uniform(0.05, 0.6, size=(len(image_of), 2))
    xy = (wh - box_wh) * rng.uniform(0, 1, size=(len(image_of), 2))
    labels = rng.integers(len(COCO_IDS), size=len(image_of))
    crowd = rng.uniform(size=len(image_of)) < 0.01
    annotations = []
    for i, (image, (x, y), (w, h), label, is_crowd) in enumerate(
        zip(image_of.tolist(), xy.round(2).tolist(), box_wh.round(2).tolist(), labels.tolist(), crowd.tolist())
    ):
        polygon = [x, y, x + w, y, x + w, y + h / 2, x + w, y + h, x, y + h, x, y + h / 2]
        annotations.append({"id": i + 1, "image_id": image + 1, "category_id": COCO_IDS[label],
                            "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": int(is_crowd),
                            "segmentation": [[round(v, 2) for v in polygon]]})
    return annotations


# ---------------------------------------------------------------------------------------------- one measurement
class IndexOnly:
    """A map-style dataset that reads only the index record of each image (no image is decoded)."""

    def __init__(self, records: object):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> float:
        record = self.records[i]
        return record.width + record.height + float(record.boxes.sum()) + int(record.labels.sum())


def memory(pid: int) -> dict[str, int]:
    """Pss, Rss and private pages (kB) of a process from /proc/<pid>/smaps_rollup."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0])
    return {"pss": values["Pss"], "rss": values["Rss"],
            "private": values["Private_Clean"] + values["Private_Dirty"]}


def peak_rss_kb() -> int:
    """This process's peak RSS (VmHWM; ru_maxrss would include the parent's peak, kept across exec)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1])


def child(yaml_file: Path, cache: str, workers: int) -> dict[str, float]:
    """Build the index (`cache`: cold deletes the cache first), then one loader pass; figures in s and MB.

    `cache="floor"` builds no index: the loader reads one shared record N times (the workers' own memory).
    """
    import torch
    from torch.utils.data import DataLoader

    import crosskd
    from crosskd.data import DetectionDataset, load_data_yaml

    info = load_data_yaml(yaml_file)
    has_cache = importlib.util.find_spec("crosskd.data.cache") is not None  # False in the old code
    cache_file = info.source("train").annotations.with_suffix(".cache")
    if cache == "cold" and has_cache:
        cache_file.unlink(missing_ok=True)
    stamp = cache_file.stat().st_mtime_ns if has_cache and cache_file.is_file() else None
    start = time.perf_counter()
    if cache == "floor":
        one = SimpleNamespace(width=640, height=480, boxes=np.ones((7, 4), np.float32), labels=np.ones(7, np.int64))
        records = [one] * int(yaml_file.stem.split("_")[-1])
    else:
        records = DetectionDataset(info, "train", imgsz=640, augment=False).records
    index_s = time.perf_counter() - start
    peak_mb = peak_rss_kb() / 1024
    torch.set_num_threads(1)
    loader = DataLoader(IndexOnly(records), batch_size=256, num_workers=workers, persistent_workers=True,
                        collate_fn=sum)
    start = time.perf_counter()
    total = sum(batch for batch in loader)
    pass_s = time.perf_counter() - start
    pids = [os.getpid(), *(worker.pid for worker in loader._iterator._workers)]
    usage = [memory(pid) for pid in pids]
    return {
        "code": str(Path(crosskd.__file__).parents[1]), "images": len(records), "checksum": total,
        "index_s": index_s, "index_peak_rss_mb": peak_mb, "pass_s": pass_s,
        "pss_total_mb": sum(u["pss"] for u in usage) / 1024, "rss_total_mb": sum(u["rss"] for u in usage) / 1024,
        "main_pss_mb": usage[0]["pss"] / 1024, "workers_private_mb": sum(u["private"] for u in usage[1:]) / 1024,
        "cache_mb": cache_file.stat().st_size / 2**20 if has_cache else 0.0,
        "cache_reused": stamp is not None and cache_file.stat().st_mtime_ns == stamp,
    }


def run_child(code: Path, yaml_file: Path, cache: str, workers: int) -> dict[str, float]:
    """`child` in a fresh interpreter importing crosskd from the checkout at `code`."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--child", cache, "--data", str(yaml_file), "--workers", str(workers)]
    output = subprocess.run(command, env=env, cwd=code, check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    if Path(result["code"]).resolve() != code.resolve():
        raise RuntimeError(f"imported crosskd from {result['code']}, expected {code}")
    return result


def median_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = [key for key, value in runs[0].items() if isinstance(value, int | float) and not isinstance(value, bool)]
    return {**{key: statistics.median(run[key] for run in runs) for key in keys},
            "cache_reused": all(run["cache_reused"] for run in runs)}


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=118_000)
    parser.add_argument("--boxes-per-image", type=float, default=7.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--root", type=Path, default=Path("/tmp/crosskd_data_index"))
    parser.add_argument("--before", type=Path, help="a checkout of the old code (git worktree add DIR COMMIT)")
    parser.add_argument("--quick", action="store_true", help="CI smoke: 2,000 images, 2 workers, no JSON written")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--child", choices=["cold", "cached", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.data, args.child, args.workers)))
        return
    if args.quick:
        args.images, args.workers = 2_000, 2
    start = time.perf_counter()
    yaml_file = generate(args.root, args.images, args.boxes_per_image)
    generate_s = time.perf_counter() - start
    sides = {"after": REPO, **({"before": args.before} if args.before else {})}
    runs: dict[str, list] = {f"{side}_{cache}": [] for side in sides for cache in ("cold", "cached")}
    for _ in range(args.repeats):
        for cache in ("cold", "cached"):
            for side, code in sides.items():  # alternate old and new so machine noise falls on both
                runs[f"{side}_{cache}"].append(run_child(code, yaml_file, cache, args.workers))
                print(f"{side} {cache}: {json.dumps(runs[f'{side}_{cache}'][-1])}", flush=True)
    runs["floor"] = [run_child(REPO, yaml_file, "floor", args.workers)]
    report = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "images": args.images, "boxes": int(yaml_file.read_text().split()[1]),
        "workers": args.workers, "repeats": args.repeats, "generate_s": generate_s,
        "json_mb": (args.root / "annotations" / f"instances_train_{args.images}.json").stat().st_size / 2**20,
        "notes": "images: real PNGs hard-linked to one template per size (the header check and the cache stat run on "
                 "real files); loader __getitem__ reads only the index record, no image; memory summed over the main "
                 "process and the workers after one pass (smaps_rollup); floor: no index, one shared record",
        **{name: median_runs(side_runs) for name, side_runs in runs.items()},
    }
    if args.before:
        report["before_over_after"] = {
            "index_s_cold": report["before_cold"]["index_s"] / report["after_cold"]["index_s"],
            "index_s_cached": report["before_cached"]["index_s"] / report["after_cached"]["index_s"],
            "pss_total_mb_cold": report["before_cold"]["pss_total_mb"] / report["after_cold"]["pss_total_mb"],
            "pss_total_mb_cached": report["before_cached"]["pss_total_mb"] / report["after_cached"]["pss_total_mb"],
        }
    print(json.dumps(report, indent=2))
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
