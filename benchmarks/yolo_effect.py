"""Issue 22 point 6: YOLO11 in crosskd next to Ultralytics' own training, alone and distilled, at CPU scale.

    nohup python benchmarks/yolo_effect.py > yolo.log 2>&1 &    # everything, in the background; rerun to resume
    python benchmarks/yolo_effect.py --summary                  # the tables of what has finished, and the targets
    python benchmarks/yolo_effect.py --sections step            # the train-step timing only
    python benchmarks/yolo_effect.py --scale cpu-1k             # the study on 1,024 training images
    python benchmarks/yolo_effect.py --scale coco               # the COCO commands for a GPU, and the numbers to beat

Data: the digits on real-photo backgrounds (crosskd/data/digits.py, `background: photos`), 256 train and 128 val
images at 128 px (cpu-1k: 1,024 and 256, in results/yolo-effect-1k), generated once under <out>/data with COCO JSON
labels (crosskd's side) and YOLO txt labels of the same images (Ultralytics' side). For seeds 0, 1, 2:

  crosskd      teacher (YOLO11s), student (YOLO11n alone), sl2 (YOLO11n with kd=sl2, Ultralytics' feature KD
               reimplemented) and crosskd (YOLO11n with kd=crosskd), both from that seed's crosskd teacher
  ultralytics  teacher (YOLO11s), student (YOLO11n alone) and distill_model (YOLO11n with Ultralytics' own feature
               KD from that seed's Ultralytics teacher), trained by Ultralytics itself

Every training: EPOCHS epochs, imgsz 128, batch 16, from scratch (no pretrained weights), each tool's own YOLO recipe
(crosskd's `recipe: ultralytics` is Ultralytics' default augmentation) with fliplr 0 (digits) and close_mosaic at
a tenth of the epochs on both, workers 0 (Ultralytics forces 0 on a CPU), device cpu, AMP off, validation after the
last epoch only (val=false). Schedule: see EPOCHS.

Each training is a subprocess: `python -m crosskd train|distill ...`, or `ultralytics_yolo.py train` in the Python
that has Ultralytics (--ultralytics-python, $ULTRALYTICS_PYTHON; AGPL, never imported here), in
`<out>/<side>/<run>/seed<k>/` with its output in train.log; a finished one (results.csv at its last epoch, a best.pt)
is skipped, an unfinished one resumes from its last.pt. Two run at a time, a crosskd run beside the matching
Ultralytics one, teachers first. Per run, `<out>/<side>-<run>-seed<k>.json`: the COCO AP of its best.pt by crosskd's
validator on the same val images for both sides (`crosskd val model=<best.pt>`: crosskd reads Ultralytics
checkpoints), the tool's own final mAP50-95 for reference, and the median seconds of a training epoch from the
run's results.csv (its cumulative `time`; the last epoch, which validates, left out). `<out>/summary.md`: the table
and whether the targets are met.

`--sections step`: one YOLO11n train step (x/255, loss, backward, SGD step) on the same batch of 16 at 640 px,
crosskd's in this process and Ultralytics' in its own, alternated, median of the repeats, same thread count on both
sides; the target is crosskd ≤ 1.0× Ultralytics.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from augment_effect import final_epochs, format_value  # benchmarks/ is on sys.path when run as a script
from loader_bench import UltralyticsSide, alternate_epochs, find_ultralytics
from reproduce import format_cell, mean_std
from step_cost import synthetic_batch

from crosskd.api import Detector
from crosskd.data import generate_digits
from crosskd.models import build_detector, load_model_yaml

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "yolo-effect"
PEER_SCRIPT = ROOT / "ultralytics_yolo.py"
SEEDS = (0, 1, 2)
DATA = {"num_train": 256, "num_val": 128, "imgsz": 128, "objects": [1, 4], "seed": 0, "background": "photos"}
# The CPU scales: the images and the results folder. cpu-1k has 4x the training images (4x the updates per epoch) for
# a smaller seed spread: at 256 images it comes from training, not the val set (the six 30-epoch teachers scored 1.6
# AP apart on the 128 val images and 1.4 on 1,024).
SCALES = {"cpu": ({"num_train": 256, "num_val": 128}, OUT),
          "cpu-1k": ({"num_train": 1024, "num_val": 256}, ROOT / "results" / "yolo-effect-1k")}
NAMES = {i: str(i) for i in range(10)}


def close_mosaic(epochs: int) -> int:
    """Ultralytics' 10 of its 100-epoch COCO schedule, as the same share of `epochs` (at least 1)."""
    return max(1, round(epochs / 10))


# EPOCHS: one epoch measured at this scale (CPU seconds, one core per training): YOLO11s 13.7, YOLO11n 6.5,
# YOLO11n distilled from YOLO11s 9 (sl2 and Ultralytics' distill_model alike); 21 trainings two at a time come to
# about 100 s per epoch of the whole study, so 30 epochs take about 50 minutes on 2 cores.
EPOCHS = 30
# OPTIMISATION, the same on both sides: at 16 batches an epoch, Ultralytics' nominal batch 64 would make 30 epochs
# 120 updates, and its automatic AdamW lr for 10 classes (0.000714) is small for training from scratch; nbs 16 (one
# update a batch) and AdamW at lr0 0.002 give 480 updates at a workable rate, everything else each tool's default.
OPTIMISATION = {"optimizer": "AdamW", "lr0": 0.002, "nbs": 16}
COMMON = {**OPTIMISATION, "imgsz": 128, "batch": 16, "epochs": EPOCHS, "close_mosaic": close_mosaic(EPOCHS),
          "fliplr": 0.0, "workers": 0, "device": "cpu", "amp": False, "val": False, "plots": False, "exist_ok": True}
SIDES = ("crosskd", "ultralytics")
STEP = {"model": "yolo11n.yaml", "nc": 80, "batch": 16, "imgsz": 640, "repeats": 5, "warmup": 1}


class Run(NamedTuple):
    """One training: its side, name, settings, and the same side's run it distils from (None: trained alone)."""

    side: str
    name: str
    settings: dict[str, Any]
    teacher: str | None = None


RUNS = [  # in the order they start: each crosskd run beside the matching Ultralytics one
    Run("crosskd", "teacher", {"model": "yolo11s.yaml"}),
    Run("ultralytics", "teacher", {"model": "yolo11s.yaml", "pretrained": False}),
    Run("crosskd", "student", {"model": "yolo11n.yaml"}),
    Run("ultralytics", "student", {"model": "yolo11n.yaml", "pretrained": False}),
    Run("crosskd", "sl2", {"model": "yolo11n.yaml", "kd": "sl2"}, teacher="teacher"),
    Run("ultralytics", "distill_model", {"model": "yolo11n.yaml", "pretrained": False}, teacher="teacher"),
    Run("crosskd", "crosskd", {"model": "yolo11n.yaml", "kd": "crosskd"}, teacher="teacher"),
]


# ---------------------------------------------------------------------------------------------- data
def prepare_data(out: Path) -> dict[str, Path]:
    """Generate the images once and write each side's dataset YAML over them: {'crosskd': ..., 'ultralytics': ...}."""
    root = generate_digits(out / "data" / "digits_photos", **DATA).resolve()
    common = {"path": str(root), "names": NAMES}
    files = {"crosskd": {**common, "train": "annotations/instances_train.json", "val": "annotations/instances_val.json",
                         "fliplr": 0, "generate": DATA},
             "ultralytics": {**common, "train": "images/train", "val": "images/val"}}
    paths = {side: out / "data" / f"digits_photos-{side}.yaml" for side in SIDES}
    for side, path in paths.items():
        path.write_text(yaml.safe_dump(files[side], sort_keys=False))
    return paths


# ---------------------------------------------------------------------------------------------- one training
def run_dir(out: Path, side: str, name: str, seed: int) -> Path:
    return out / side / name / f"seed{seed}"


def epoch_times(folder: Path) -> list[float]:
    """The cumulative `time` of each epoch in results.csv (both tools write it; Ultralytics restarts it on resume)."""
    path = folder / "results.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [float(row["time"]) for row in ({k.strip(): v for k, v in r.items()} for r in csv.DictReader(f))]


def epoch_seconds(times: list[float]) -> list[float]:
    """Each epoch's own seconds from the cumulative times, the last (which validates) left out; a time below the
    one before it starts a resumed run, so it is that epoch's own."""
    own = [now - before if now >= before else now for before, now in zip([0.0, *times], times, strict=False)]
    return own[:-1]


def is_finished(folder: Path) -> bool:
    times = epoch_times(folder)
    return len(times) == COMMON["epochs"] and (folder / "weights" / "best.pt").is_file()


def command(out: Path, data: dict[str, Path], run: Run, seed: int, peer: list[str]) -> list[str]:
    """The command line of a training, or of its resume when it has a last.pt."""
    folder = run_dir(out, run.side, run.name, seed)
    last = folder / "weights" / "last.pt"
    settings = {**COMMON, **run.settings, "data": str(data[run.side]), "seed": seed,
                "project": str(folder.parent.resolve()), "name": folder.name}
    if run.teacher:
        teacher = str(run_dir(out, run.side, run.teacher, seed) / "weights" / "best.pt")
        settings["teacher" if run.side == "crosskd" else "distill_model"] = teacher
    if run.side == "ultralytics":
        return [*peer, str(PEER_SCRIPT), "train", json.dumps({"resume": str(last)} if last.is_file() else settings)]
    mode = "distill" if run.teacher else "train"
    if last.is_file():
        return [sys.executable, "-m", "crosskd", mode, f"resume={last}"]
    return [sys.executable, "-m", "crosskd", mode, *(f"{k}={format_value(v)}" for k, v in settings.items())]


def crosskd_ap(best: Path, data_yaml: Path) -> dict[str, float]:
    """AP and AP50 (×100) of a best.pt, crosskd's or Ultralytics', by crosskd's validator on the val images."""
    metrics = Detector(str(best), device="cpu").val(
        data=str(data_yaml), imgsz=COMMON["imgsz"], batch=COMMON["batch"], workers=0, plots=False, verbose=False,
        project=str(best.parents[1].resolve()), name="crosskd_val", exist_ok=True)
    return {"AP": round(100 * metrics["AP"], 2), "AP50": round(100 * metrics["AP50"], 2)}


def train(out: Path, data: dict[str, Path], run: Run, seed: int, peer: list[str]) -> str:
    """Train one run (skipped when finished), evaluate its best.pt and write its JSON; a line saying what happened."""
    folder = run_dir(out, run.side, run.name, seed)
    label = f"{run.side}/{run.name} seed {seed}"
    json_file = out / f"{run.side}-{run.name}-seed{seed}.json"
    if is_finished(folder) and json_file.is_file():
        record = json.loads(json_file.read_text())
        return f"{label}: AP {record['AP']} (own {record['own_AP']}), {record['epoch_s']} s/epoch (done before)"
    if not is_finished(folder):
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_CONFIG_DIR": str(out / "ultralytics_config")}
        with open(folder / "train.log", "a") as log:
            code = subprocess.run(command(out, data, run, seed, peer), stdout=log, stderr=subprocess.STDOUT,
                                  env=env).returncode
        if code != 0 or not is_finished(folder):
            return f"{label}: FAILED (exit {code}, see {folder / 'train.log'})"
    seconds = epoch_seconds(epoch_times(folder))
    record = {"side": run.side, "run": run.name, "seed": seed, "epochs": COMMON["epochs"],
              **crosskd_ap(folder / "weights" / "best.pt", data["crosskd"]),
              "own_AP": final_epochs(folder)[-1]["AP"],
              "epoch_s": round(statistics.median(seconds), 2) if seconds else None,  # None: one epoch only
              "epoch_s_each": seconds, "settings": {**COMMON, **run.settings}}
    json_file.write_text(json.dumps(record, indent=1) + "\n")
    return f"{label}: AP {record['AP']} (own {record['own_AP']}), {record['epoch_s']} s/epoch"


def execute(out: Path, seeds: list[int], jobs: int, peer: list[str], chosen: list[Run]) -> None:
    """The `chosen` runs: teachers first, then students and distillation, each crosskd run beside its Ultralytics
    counterpart."""
    data = prepare_data(out)
    teachers = [run for run in chosen if run.name == "teacher"]
    for group in (teachers, [run for run in chosen if run not in teachers]):
        todo = [(run, seed) for seed in seeds for run in group]
        with ThreadPoolExecutor(jobs) as pool:
            for line in pool.map(lambda job: train(out, data, *job, peer), todo):
                print(f"yolo_effect: {line}", flush=True)


# ---------------------------------------------------------------------------------------------- summary
def results(out: Path, side: str, name: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(out.glob(f"{side}-{name}-seed*.json"))]


def cell(values: list[float]) -> str:
    return f"{format_cell(values)} (n={len(values)})" if values else "—"


def targets(out: Path) -> list[str]:
    """Whether crosskd's YOLO11n alone is within Ultralytics' seed spread, and CrossKD ahead of both feature-KD
    students by more than twice the larger seed spread of the two compared (seed spread: the sample standard
    deviation of the final AP over the seeds)."""
    compared = [("crosskd", "student"), ("ultralytics", "student"), ("crosskd", "sl2"),
                ("ultralytics", "distill_model"), ("crosskd", "crosskd")]
    ap = {key: [r["AP"] for r in results(out, *key)] for key in compared}
    if not all(ap.values()):
        return ["Targets: not all runs have finished."]
    mine, theirs = mean_std(ap["crosskd", "student"]), mean_std(ap["ultralytics", "student"])
    gap = mine[0] - theirs[0]
    lines = [f"- crosskd YOLO11n alone vs Ultralytics': {gap:+.2f} AP, Ultralytics' seed spread {theirs[1]:.2f}: "
             f"{'met' if abs(gap) <= theirs[1] else 'NOT met'}"]
    crosskd = mean_std(ap["crosskd", "crosskd"])
    for key in (("crosskd", "sl2"), ("ultralytics", "distill_model")):
        other = mean_std(ap[key])
        lead, needed = crosskd[0] - other[0], 2 * max(crosskd[1], other[1])
        lines.append(f"- CrossKD student ahead of {'/'.join(key)} by {lead:+.2f} AP, needed > {needed:.2f} "
                     f"(twice the larger seed spread): {'met' if lead > needed else 'NOT met'}")
    return ["Targets (AP by crosskd's validator):", *lines]


def step_line(out: Path) -> list[str]:
    path = out / "step.json"
    if not path.is_file():
        return []
    row = json.loads(path.read_text())
    verdict = "met" if row["ratio"] <= 1.0 else "NOT met"
    return [f"Train step ({row['model']}, batch {row['batch']}, {row['imgsz']} px, {row['threads']} threads, "
            f"median of {row['repeats']}): crosskd {row['crosskd_ms']:.0f} ms, Ultralytics {row['ultralytics_ms']:.0f} "
            f"ms, ratio {row['ratio']:.2f} (target ≤ 1.0: {verdict})"]


def found_variants(out: Path) -> list[Run]:
    """The distilled-student variants (`--variant`) with results in `out` that RUNS does not list."""
    known = {run.name for run in RUNS}
    names = {path.name.removeprefix("crosskd-").rsplit("-seed", 1)[0] for path in out.glob("crosskd-*-*=*.json")}
    return [Run("crosskd", name, {}, teacher="teacher") for name in sorted(names - known)]


def summary(out: Path) -> str:
    """Per run: AP by crosskd's validator, the tool's own AP and seconds per epoch (mean ± seed spread); targets."""
    epochs = sorted({r["epochs"] for path in out.glob("*-seed*.json") for r in [json.loads(path.read_text())]})
    lines = [f"epochs {epochs}, imgsz {COMMON['imgsz']}, batch {COMMON['batch']}; n = seeds found", "",
             "| side | run | AP (crosskd val) | own AP | s/epoch |", "|---|---|---|---|---|"]
    for run in [*RUNS, *found_variants(out)]:
        found = results(out, run.side, run.name)
        lines.append(f"| {run.side} | {run.name} | {cell([r['AP'] for r in found])} | "
                     f"{cell([r['own_AP'] for r in found])} | "
                     f"{cell([r['epoch_s'] for r in found if r['epoch_s'] is not None])} |")
    return "\n".join([*lines, "", *targets(out), "", *step_line(out)]) + "\n"


# ---------------------------------------------------------------------------------------------- step timing
def step_batch(folder: Path) -> tuple[Any, Path]:
    """The timed batch: crosskd's Batch (uint8 images) and the same in Ultralytics' batch format, saved for it."""
    batch = synthetic_batch(STEP["batch"], STEP["imgsz"], STEP["nc"])
    batch.images = (batch.images * 255).round().to(torch.uint8)
    boxes = batch.gt_boxes.reshape(-1, 4) / STEP["imgsz"]  # [B*3, 4] normalised xyxy
    theirs = {"img": batch.images, "cls": batch.gt_labels.reshape(-1, 1).float(),
              "bboxes": torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1),
              "batch_idx": torch.arange(STEP["batch"]).repeat_interleave(batch.gt_boxes.shape[1]).float()}
    path = folder / "step_batch.pt"
    torch.save(theirs, path)
    return batch, path


def crosskd_step(batch: Any) -> Any:
    """A function timing one crosskd train step of STEP's model on `batch` (x/255, loss, backward, SGD step)."""
    torch.manual_seed(0)
    cfg, _ = load_model_yaml(STEP["model"])
    model = build_detector(cfg, STEP["nc"]).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)

    def step() -> dict:
        start = time.perf_counter()
        losses = model.loss(batch.to("cpu"))
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"seconds": time.perf_counter() - start}

    return step


def time_step(out: Path, peer: list[str], threads: int) -> dict:
    """crosskd's and Ultralytics' train step alternated; medians, ratio; written to <out>/step.json."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    batch, batch_file = step_batch(out)
    theirs = UltralyticsSide(peer, out / "ultralytics_step.log", PEER_SCRIPT)
    try:
        built = theirs.ask(op="build", model=STEP["model"], nc=STEP["nc"], batch_file=str(batch_file),
                           threads=threads)
        runs = alternate_epochs({"crosskd": crosskd_step(batch), "ultralytics": lambda: theirs.ask(op="pass")},
                                STEP["warmup"], STEP["repeats"])
    finally:
        theirs.close()
    ms = {side: 1000 * statistics.median(r["seconds"] for r in runs[side]) for side in SIDES}
    row = {**{k: STEP[k] for k in ("model", "batch", "imgsz", "repeats")}, "threads": threads,
           "ultralytics_version": built["version"], "crosskd_ms": ms["crosskd"], "ultralytics_ms": ms["ultralytics"],
           "ratio": ms["crosskd"] / ms["ultralytics"],
           "runs_ms": {side: [1000 * r["seconds"] for r in runs[side]] for side in SIDES}}
    (out / "step.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


# ---------------------------------------------------------------------------------------------- COCO scale
# Ultralytics' COCO val2017 mAP50-95 of its released weights at 640 px (docs.ultralytics.com/models/yolo11; the peer
# package's README tables list YOLO26 only)
PUBLISHED = {"YOLO11n": 39.5, "YOLO11s": 47.0, "YOLO11m": 51.5}


def coco_commands() -> str:
    """The GPU study on COCO: both tools, teachers YOLO11m and YOLO11s into YOLO11n, 100 epochs each; CrossKD at the
    default hold point and at kd_idx=0 (the better one at CPU scale)."""
    common = "data=coco.yaml epochs=100 imgsz=640 batch=16 device=0"
    lines = ["# Teachers: Ultralytics' released yolo11m.pt and yolo11s.pt (crosskd reads them), the same on both sides",
             f"crosskd train model=yolo11n.yaml {common} name=yolo11n",
             f"yolo train model=yolo11n.yaml pretrained=False {common} name=yolo11n"]
    for teacher in ("yolo11m", "yolo11s"):
        for kd, name in (("sl2", "sl2"), ("crosskd", "crosskd"), ("crosskd kd_idx=0", "crosskd-kd_idx0")):
            lines.append(f"crosskd distill teacher={teacher}.pt student=yolo11n.yaml kd={kd} {common} "
                         f"name={teacher}-{name}")
        lines.append(f"yolo train model=yolo11n.yaml pretrained=False distill_model={teacher}.pt {common} "
                     f"name={teacher}-distill_model")
    lines.append("# Evaluate every best.pt the same way: crosskd val model=<best.pt> data=coco.yaml imgsz=640")
    published = ", ".join(f"{name} {ap}" for name, ap in PUBLISHED.items())
    lines.append(f"# To beat (Ultralytics' published COCO mAP50-95 of its released weights): {published}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def variant(base: str, settings: list[str]) -> Run:
    """crosskd's distilled student `base` (crosskd or sl2) with extra settings (key=value ...), named after them."""
    run = next(run for run in RUNS if run.side == "crosskd" and run.name == base)
    extra = dict(item.split("=", 1) for item in settings)
    return run._replace(name="-".join([base, *settings]), settings={**run.settings, **extra})


def peer_python(choice: str) -> list[str]:
    """The command prefix running Ultralytics; stops with one line when there is none."""
    python = find_ultralytics(choice)
    if python is None:
        raise SystemExit("yolo_effect: no Python with ultralytics; pass --ultralytics-python (a venv with "
                         "`pip install ultralytics`) or set $ULTRALYTICS_PYTHON")
    return [python]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results folder (default: the scale's)")
    parser.add_argument("--sections", nargs="+", choices=("train", "step"), default=["train", "step"])
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--runs", nargs="+", choices=sorted({run.name for run in RUNS}),
                        default=[run.name for run in RUNS], help="which runs to train (both sides'; default all)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="whose runs to train")
    parser.add_argument("--variant", nargs="+", metavar="KEY=VALUE",
                        help="also train a crosskd distilled student (--variant-of) with these settings (e.g. "
                             "kd_weight=4), as the run <variant-of>-KEY=VALUE")
    parser.add_argument("--variant-of", choices=("crosskd", "sl2"), default="crosskd", help="the run --variant changes")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="per training (a quick check: 2)")
    parser.add_argument("--threads", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)),
                        help="step timing, both sides (default: Ultralytics' own CPU training rule, cores - 1)")
    parser.add_argument("--ultralytics-python", default="auto",
                        help="a Python that imports ultralytics (auto: $ULTRALYTICS_PYTHON, then this one)")
    parser.add_argument("--scale", choices=(*SCALES, "coco"), default="cpu",
                        help="cpu: 256 training images, cpu-1k: 1,024; coco: print the GPU commands")
    parser.add_argument("--summary", action="store_true", help="print the table of finished runs and exit")
    args = parser.parse_args()
    if args.scale == "coco":
        print(coco_commands())
        return
    images, default_out = SCALES[args.scale]
    DATA.update(images)
    args.out = args.out or default_out
    COMMON.update(epochs=args.epochs, close_mosaic=close_mosaic(args.epochs))
    chosen = [run for run in RUNS if run.name in args.runs and run.side in args.sides]
    if args.variant:
        if not all("=" in item for item in args.variant):
            parser.error(f"--variant takes KEY=VALUE settings, got {' '.join(args.variant)}")
        chosen.append(variant(args.variant_of, args.variant))
    if not args.summary:
        needs_peer = any(run.side == "ultralytics" for run in chosen) or "step" in args.sections
        peer = peer_python(args.ultralytics_python) if needs_peer else []
        if "train" in args.sections:
            execute(args.out, args.seeds, args.jobs, peer, chosen)
        if "step" in args.sections:
            time_step(args.out, peer, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    table = summary(args.out)
    (args.out / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
