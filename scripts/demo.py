"""The crosskd demo: teacher → CrossKD student vs plain student → ONNX export → predict, on generated digits.

Runs the same `crosskd` commands a user would type, prints each one, and ends with both students' AP side by side.
Sized for 2 CPU cores (about 10 minutes); pass `--epochs`/`--imgsz`/`--device` to scale it up on a GPU.
"""

import argparse
import csv
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from crosskd.engine.training.callbacks import COCO_COLUMNS, METRIC_COLUMNS
from crosskd.paths import CFG_DIR

console = Console()
PROJECT = "demo"  # run directories land in runs/demo/<name>
RUNS = Path("runs") / PROJECT


def crosskd(*args: str) -> None:
    """Run one crosskd command, echoing it first; stop the demo if it fails."""
    command = [sys.executable, "-m", "crosskd", *args]
    console.print(f"\n[bold cyan]$ crosskd {shlex.join(args)}[/]")
    result = subprocess.run(command)
    if result.returncode != 0:
        sys.exit(result.returncode)


def final_metrics(run_dir: Path) -> dict[str, float]:
    """AP figures of the last epoch in a run's results.csv (Ultralytics' column names)."""
    with open(run_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {**METRIC_COLUMNS, **COCO_COLUMNS}
    return {key: float(rows[-1][columns[key]]) for key in ("AP", "AP50", "AP75")}


def write_demo_data_yaml(num_train: int) -> Path:
    """A digits dataset YAML with a larger training split than the shipped digits.yaml (generated on first use)."""
    shipped = yaml.safe_load((CFG_DIR / "datasets" / "digits.yaml").read_text())
    shipped["path"] = "digits-demo"
    shipped["generate"]["num_train"] = num_train
    RUNS.mkdir(parents=True, exist_ok=True)
    data_yaml = RUNS / "digits-demo.yaml"
    data_yaml.write_text(yaml.safe_dump(shipped, sort_keys=False))
    return data_yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=6, help="student epochs")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-train", type=int, default=1024, help="training images to generate")
    opts = parser.parse_args()

    data_yaml = write_demo_data_yaml(opts.num_train)
    common = [
        f"data={data_yaml}", f"imgsz={opts.imgsz}", "batch=8", f"device={opts.device}", "workers=2",
        "optimizer=AdamW", "lr0=0.004", "warmup_iters=50", f"project={PROJECT}", "exist_ok=True", "plots=False",
    ]
    started = time.time()
    crosskd("train", "model=gfl_r18s.yaml", "name=teacher", f"epochs={opts.teacher_epochs}", *common)
    teacher = str(RUNS / "teacher" / "weights" / "best.pt")
    student_epochs = f"epochs={opts.epochs}"
    crosskd("distill", f"teacher={teacher}", "student=gfl_r18t.yaml", "name=student_crosskd", student_epochs, *common)
    crosskd("train", "model=gfl_r18t.yaml", "name=student_baseline", student_epochs, *common)

    table = Table(title=f"Digits val at {opts.imgsz} px (teacher {opts.teacher_epochs} epochs, students {opts.epochs})")
    for column in ("model", "AP", "AP50", "AP75"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for label, name in (("teacher gfl_r18s", "teacher"), ("student gfl_r18t, no KD", "student_baseline"),
                        ("student gfl_r18t, CrossKD", "student_crosskd")):
        metrics = final_metrics(RUNS / name)
        table.add_row(label, *(f"{metrics[key]:.3f}" for key in ("AP", "AP50", "AP75")))
    console.print(table)

    student = RUNS / "student_crosskd" / "weights" / "best.pt"
    crosskd("export", f"model={student}", "format=onnx", f"imgsz={opts.imgsz}")
    onnx_file = str(student.with_suffix(".onnx"))
    images = Path("datasets/digits-demo/images/val")
    sources = sorted(images.glob("*"))[:4]
    list_file = RUNS / "predict_sources.txt"
    list_file.write_text("\n".join(str(p) for p in sources) + "\n")
    crosskd("predict", f"model={onnx_file}", f"source={list_file}", f"imgsz={opts.imgsz}",
            f"project={PROJECT}", "name=predict", "exist_ok=True")
    console.print(f"\n[bold green]Demo finished in {time.time() - started:.0f} s.[/]")


if __name__ == "__main__":
    main()
