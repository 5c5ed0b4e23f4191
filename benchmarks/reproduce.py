"""Reproduce the CrossKD paper's comparisons at CPU scale on the digits data, 3 seeds each (issue 12).

    nohup python benchmarks/reproduce.py > reproduce.log 2>&1 &     # everything, in the background; rerun to resume
    python benchmarks/reproduce.py --summary                         # tables + AP-per-epoch plot of what has finished
    python benchmarks/reproduce.py --rows 1 --rows CrossKD --seeds 0 # some tables / labels, some seeds
    python benchmarks/reproduce.py --scale coco                      # print the paper's COCO runs (--run runs them)
    python benchmarks/reproduce.py --rows issue20                    # issue 20 point 3: Tables 5, 1, 3, 12, 7
    python benchmarks/reproduce.py --scale cpu-long                  # issue 20 point 4: Table 5, students 32 epochs
    python benchmarks/reproduce.py --rows table11 --dry-run          # issue 23: Faster R-CNN rows, commands only
    python benchmarks/reproduce.py --smoke --rows table11            # the same rows tiny (2 epochs, 16 images)

Issue 20 changed two crosskd defaults (kd_hold pre -> post, valid_region image -> mmdet). The results of the old
defaults stay in `benchmarks/results/reproduce/` (read only: training there is refused); new runs go to
`benchmarks/results/reproduce-v2/` (scale cpu) and `reproduce-v2-<scale>/`. Each results folder records the defaults
it was trained with in `defaults.json`, and a run refuses a folder of other defaults, so a metrics JSON of old
defaults is never taken for a finished training of the new ones. Row sets for `--rows`: `issue20` (Tables 5, 1, 3,
12, 7, with CrossKD and CrossKD+PKD at kd_hold=pre beside post) and `main` (Table 5's teacher, student, PM, LD,
PKD, CrossKD, CrossKD (pre), CrossKD+PKD). The cpu-long scale is the cpu scale with students trained 4x longer (32
epochs, towards their plateau) on the main rows; it distils from the cpu scale's teachers
(linked from its folder, never retrained: run the cpu scale first). After a cpu or cpu-long run (or `--summary`),
`<out>/comparison.md` sets the old cpu results, the new cpu results and cpu-long side by side with the paper, and
states which of the paper's orderings hold in each.

Every experiment is a row (paper table, label, crosskd settings). Rows with equal settings share one training, and
each finished (training, seed) leaves `<out>/metrics/<run>-seed<k>.json` (final and per-epoch AP, AP50, AP75, read from
the run's results.csv). A restart skips finished trainings, resumes an unfinished one from its last.pt and starts one
without a last.pt from scratch. Teachers are trained once (seed 0), as the paper distils every student from one
teacher; the seed spread is the students'. The summary reports mean ± std over seeds beside the paper's numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import active_children, get_context, set_start_method
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from crosskd.config import get_args
from crosskd.data import load_data_yaml
from crosskd.data.loader import stop_all_workers
from crosskd.engine.deployment.checkpoint import is_resumable, load_checkpoint
from crosskd.engine.evaluation.plotting import read_results
from crosskd.engine.training import launch
from crosskd.paths import CFG_DIR, DEFAULT_CFG_PATH
from crosskd.settings import format_value
from crosskd.utils import LOGGER

ROOT = Path(__file__).resolve().parent
RESULTS_DIR = ROOT / "results" / "reproduce-v2"  # results of the current defaults (issue 20)
OLD_RESULTS_DIR = ROOT / "results" / "reproduce"  # results of kd_hold=pre, valid_region=image: the comparison
DEFAULTS_FILE = "defaults.json"  # in each results folder: the crosskd defaults its trainings ran with
TRACKED_DEFAULTS = ("kd_hold", "valid_region")  # defaults that changed the results and are not in the run keys
SEEDS = (0, 1, 2)
TEACHER_SEED = 0  # teachers are trained once
TEACHER_ROLES = ("teacher", "atss_teacher", "frcnn_teacher")  # roles trained for teacher_epochs, distilled from
METRICS = ("AP", "AP50", "AP75")
METRIC_COLUMNS = {"AP": "metrics/mAP50-95(B)", "AP50": "metrics/mAP50(B)", "AP75": "metrics/mAP75(B)"}  # results.csv
CURVE_LABELS = ("student", "PM", "LD", "CrossKD")  # AP-per-epoch plot (paper Fig. 6c); only these validate every epoch
PAPER_HEAD_CONVS = 4  # GFL head convs in the paper (Table 1 runs kd_idx 0..4)


class Row(NamedTuple):
    """One experiment: the paper table it belongs to, its label there, and its crosskd settings.

    `model` and `teacher` name roles: `model` a model YAML of the scale, `teacher` the checkpoint of that role's
    teacher training. Every other key is a crosskd setting passed as is.
    """

    table: str
    label: str
    settings: dict[str, Any]
    paper_label: str | None = None  # the paper row to compare with, when it is named differently


class Run(NamedTuple):
    """One training: unique settings and one seed."""

    key: str
    seed: int
    settings: dict[str, Any]


@dataclass(frozen=True)
class Scale:
    """Data, models and schedule of one reproduction size."""

    name: str
    data: dict[str, Any] | str  # digits generate: arguments, or a dataset YAML
    models: dict[str, str]  # role -> model YAML
    stacked_convs: int  # head convs of the GFL pair: Table 1 runs kd_idx 0..stacked_convs
    imgsz: int
    batch: int
    epochs: int
    teacher_epochs: int
    train: dict[str, Any] = field(default_factory=dict)  # further crosskd settings of every run
    runs_by_default: bool = True  # False: print the commands unless --run
    teachers_from: str | None = None  # the scale whose trained teachers this one distils from (never trains its own)
    default_rows: tuple[str, ...] = ()  # the --rows filters when none are given (all rows without)
    role_epochs: dict[str, int] = field(default_factory=dict)  # a role's epochs where they differ from the scale's


CONFIGS = ROOT / "configs"
CPU = Scale(
    name="cpu",
    data={"num_train": 1024, "num_val": 256, "imgsz": 128, "objects": [1, 4], "seed": 0},
    models={"teacher": "gfl_r18s.yaml", "student": str(CONFIGS / "gfl_r18q_student.yaml"),
            "atss_teacher": "atss_r18s.yaml", "frcnn_teacher": "faster_rcnn_r18s.yaml",
            "frcnn_student": str(CONFIGS / "faster_rcnn_r18q_student.yaml")},
    stacked_convs=2, imgsz=128, batch=8, epochs=8, teacher_epochs=24,
    train={"optimizer": "AdamW", "lr0": 0.004, "warmup_iters": 100, "device": "cpu", "workers": 1},
)
SCALES = {
    "cpu": CPU,
    # Issue 20 point 4: the cpu scale's data and teachers, students 4x longer (8 epochs leave them at 20 % of the
    # teacher's AP and still rising, far from the paper's near-converged 90 %).
    "cpu-long": replace(CPU, name="cpu-long", epochs=4 * CPU.epochs, teachers_from="cpu", default_rows=("main",)),
    "smoke": Scale(
        name="smoke",
        data={"num_train": 16, "num_val": 8, "imgsz": 64, "objects": [1, 3], "seed": 0},
        models={"teacher": "gfl_r18t.yaml", "student": "gfl_r18t.yaml",
                "frcnn_teacher": str(CONFIGS / "faster_rcnn_r18q_student.yaml"),
                "frcnn_student": str(CONFIGS / "faster_rcnn_r18q_student.yaml")},
        stacked_convs=1, imgsz=64, batch=4, epochs=2, teacher_epochs=2,
        train={"optimizer": "AdamW", "lr0": 0.004, "warmup_iters": 2, "device": "cpu", "workers": 0},
    ),
    "coco": Scale(
        name="coco", data="coco.yaml",
        models={"teacher": "gfl_r101.yaml", "student": "gfl_r50.yaml", "atss_teacher": "atss_r101.yaml",
                "frcnn_teacher": "faster_rcnn_r50.yaml", "frcnn_student": "faster_rcnn_r18.yaml"},
        stacked_convs=4, imgsz=1333, batch=16, epochs=12, teacher_epochs=24,
        train={"device": "0,1,2,3,4,5,6,7", "workers": 4}, runs_by_default=False,
        role_epochs={"frcnn_teacher": 12},  # Table 11's teacher: faster-rcnn_r50_fpn_1x (MMDetection's 37.4 AP)
    ),
}

STUDENT = {"model": "student"}
KD = {"model": "student", "teacher": "teacher"}
CROSSKD = {**KD, "kd": "crosskd"}
PM = {**KD, "kd": "pm"}
LD = {**KD, "kd": "ld"}
PKD = {**KD, "kd": "pkd"}
FRCNN_STUDENT = {"model": "frcnn_student"}
FRCNN_KD = {"model": "frcnn_student", "teacher": "frcnn_teacher"}


def experiment_rows(stacked_convs: int) -> list[Row]:
    """Every paper comparison as rows. CrossKD's default hold point is the last-but-one head conv (paper: 3 of 4)."""
    default_idx = max(stacked_convs - 1, 0)
    student, teacher = Row("5", "student", STUDENT), Row("5", "teacher", {"model": "teacher"})
    rows = [
        teacher, student, Row("5", "PM", PM), Row("5", "LD", LD), Row("5", "PKD", PKD), Row("5", "CrossKD", CROSSKD),
        Row("5", "CrossKD (pre)", {**CROSSKD, "kd_hold": "pre"}, "CrossKD"),
        Row("5", "CrossKD+PKD", {**KD, "kd": "crosskd+pkd"}),
        Row("5", "CrossKD+PKD (pre)", {**KD, "kd": "crosskd+pkd", "kd_hold": "pre"}, "CrossKD+PKD"),
    ]
    rows += [Row("1", "student", STUDENT), Row("1", "PM", PM)]
    rows += [Row("1", f"kd_idx={i}", CROSSKD if i == default_idx else {**CROSSKD, "kd_idx": i},
                 f"kd_idx={paper_kd_idx(i, stacked_convs)}") for i in range(stacked_convs + 1)]
    rows += [Row("2", "student", STUDENT), Row("2", "PKD neck", PKD), Row("2", "CrossKD", CROSSKD)]
    rows += [Row("2", f"PKD {on}", {**PKD, "pkd_on": on}) for on in ("cls", "reg")]
    for branch in ("cls", "reg", "both"):
        rows += [Row("3", f"PM {branch}", PM if branch == "both" else {**PM, "kd_branch": branch}),
                 Row("3", f"CrossKD {branch}", CROSSKD if branch == "both" else {**CROSSKD, "kd_branch": branch})]
    rows += [Row("4", "student", STUDENT), Row("4", "CrossKD", CROSSKD), Row("4", "PM", PM),
             Row("4", "CrossKD+PM", {**KD, "kd": "crosskd+pm"}), Row("4", "CrossKD+LD", {**KD, "kd": "crosskd+ld"})]
    rows.append(Row("9", "student", STUDENT))
    rows += [Row("9", f"{loss.upper()} {region}",
                 CROSSKD if (loss, region) == ("qfl", "all") else {**CROSSKD, "kd_cls_loss": loss, "kd_region": region})
             for loss in ("bce", "qfl") for region in ("pos", "neg", "all")]
    rows.append(Row("12", "student", STUDENT))
    rows += [Row("12", f"({s})", CROSSKD if s == "a" else {**CROSSKD, "kd_strategy": s}) for s in "abcd"]
    rows += [Row("7", "student", STUDENT), Row("7", "ATSS teacher", {"model": "atss_teacher"}),
             Row("7", "CrossKD", {**CROSSKD, "teacher": "atss_teacher"})]
    rows += [Row("11", "teacher", {"model": "frcnn_teacher"}), Row("11", "student", FRCNN_STUDENT),
             Row("11", "CrossKD", {**FRCNN_KD, "kd": "crosskd"}),
             Row("11", "CrossKD+PKD", {**FRCNN_KD, "kd": "crosskd+pkd"})]
    return rows


def paper_kd_idx(kd_idx: int, stacked_convs: int) -> int:
    """The paper's hold point (of 4 head convs) that uses as many teacher convs as `kd_idx` of `stacked_convs` does."""
    return 0 if kd_idx == 0 else kd_idx + PAPER_HEAD_CONVS - stacked_convs


# Named --rows filters: issue 20 point 3 (the findings) and point 4 (the main rows, at cpu-long).
ROW_SETS = {
    "issue20": ("5", "1", "3", "12", "7"),
    "main": tuple(f"5/{label}" for label in ("teacher", "student", "PM", "LD", "PKD", "CrossKD", "CrossKD (pre)",
                                              "CrossKD+PKD")),
}
SMOKE_ROWS = [Row("5", "teacher", {"model": "teacher"}), Row("5", "CrossKD", CROSSKD)]

TABLE_TITLES = {
    "5": "Main comparison (paper Table 5: GFL R101 -> R50 on COCO)",
    "1": "Table 1: CrossKD hold point kd_idx (paper: GFL R50 -> R18, 4 head convs)",
    "2": "Table 2: feature imitation (PKD on neck / cls / reg branch) vs CrossKD",
    "3": "Table 3: KD on one branch (kd_branch), prediction mimicking vs CrossKD",
    "4": "Table 4: CrossKD combined with prediction mimicking",
    "9": "Table 9: classification KD loss x region (kd_cls_loss, kd_region)",
    "12": "Table 12: cross-head strategies (kd_strategy; (a) is CrossKD)",
    "7": "Table 7: heterogeneous pair, ATSS teacher -> GFL student (paper: ATSS R101 -> GFL R50; its KD row, "
         "prediction mimicking across head types, has no crosskd setting: kd=pm needs equal heads)",
    "11": "Table 11: two-stage, Faster R-CNN teacher -> Faster R-CNN student (paper: R50 -> R18, 12 epochs; it "
          "reports no CrossKD+PKD number, whose config is in the authors' repository)",
}
# The paper's (AP, AP50, AP75) per (table, label). Tables 1-4, 9, 12 use GFL R50 -> R18 (teacher 40.2 AP). The paper's
# 'LD' in Tables 1, 3 and 4 is prediction mimicking on the student head (our kd=pm); Table 5's LD is LD proper.
_R18 = (35.8, 53.1, 38.2)
_CROSSKD_R18 = (38.7, 56.3, 41.6)
PAPER: dict[tuple[str, str], tuple[float, float, float]] = {
    ("5", "teacher"): (44.9, 63.1, 49.0), ("5", "student"): (40.2, 58.4, 43.3), ("5", "LD"): (43.0, 61.6, 46.6),
    ("5", "PKD"): (43.3, 61.3, 46.9), ("5", "CrossKD"): (43.7, 62.1, 47.4), ("5", "CrossKD+PKD"): (43.9, 62.0, 47.7),
    ("1", "student"): _R18, ("1", "kd_idx=0"): (38.2, 55.6, 41.3), ("1", "kd_idx=1"): (38.3, 55.8, 41.1),
    ("1", "kd_idx=2"): (38.6, 56.2, 41.5), ("1", "kd_idx=3"): _CROSSKD_R18, ("1", "kd_idx=4"): (38.2, 55.7, 41.2),
    ("1", "PM"): (37.8, 55.5, 40.5),
    ("2", "student"): _R18, ("2", "PKD neck"): (38.0, 55.0, 41.2), ("2", "PKD cls"): (37.5, 54.9, 40.5),
    ("2", "PKD reg"): (37.2, 54.0, 40.2), ("2", "CrossKD"): _CROSSKD_R18,
    ("3", "PM cls"): (37.3, 55.2, 40.0), ("3", "CrossKD cls"): (37.7, 55.6, 40.2), ("3", "PM reg"): (36.8, 53.8, 39.6),
    ("3", "CrossKD reg"): (37.2, 54.0, 40.0), ("3", "PM both"): (37.8, 55.4, 40.5), ("3", "CrossKD both"): _CROSSKD_R18,
    ("4", "student"): _R18, ("4", "CrossKD"): _CROSSKD_R18, ("4", "PM"): (37.8, 55.5, 40.5),
    ("4", "CrossKD+PM"): (38.1, 55.6, 40.9),
    ("9", "student"): _R18, ("9", "BCE pos"): (36.3, 53.8, 39.1), ("9", "BCE neg"): (36.2, 53.5, 38.9),
    ("9", "BCE all"): (36.9, 54.3, 39.5), ("9", "QFL all"): _CROSSKD_R18,
    ("12", "student"): _R18, ("12", "(a)"): _CROSSKD_R18, ("12", "(b)"): (35.4, 52.5, 37.8),
    ("12", "(c)"): (34.5, 51.9, 36.7), ("12", "(d)"): (32.5, 48.8, 35.0),
    ("7", "student"): (40.2, 58.4, 43.3), ("7", "ATSS teacher"): (41.5, 59.9, 45.2),
    ("7", "CrossKD"): (42.1, 60.5, 45.7),
    ("11", "teacher"): (37.4, 58.1, 40.4), ("11", "student"): (33.5, 53.7, 35.9), ("11", "CrossKD"): (35.5, 55.8, 38.0),
}


# The paper's orderings (table, better row, worse row) that the comparison checks in each regime.
ORDERINGS = [
    ("5", "CrossKD", "PKD"), ("5", "CrossKD", "LD"), ("5", "CrossKD", "PM"), ("5", "PKD", "LD"),
    ("5", "CrossKD+PKD", "CrossKD"), ("5", "CrossKD+PKD", "PKD"), ("5", "LD", "student"),
    ("1", "kd_idx=1", "kd_idx=0"), ("1", "kd_idx=1", "kd_idx=2"), ("1", "kd_idx=1", "PM"),
    ("3", "CrossKD cls", "PM cls"), ("3", "CrossKD reg", "PM reg"), ("3", "CrossKD both", "CrossKD cls"),
    ("3", "CrossKD both", "CrossKD reg"),
    ("12", "(a)", "(b)"), ("12", "(b)", "(c)"), ("12", "(c)", "(d)"), ("12", "student", "(b)"),
    ("7", "CrossKD", "student"), ("11", "CrossKD", "student"),
]


# ---------------------------------------------------------------------------------------------------- planning
def select_rows(rows: list[Row], filters: list[str] | tuple[str, ...] | None) -> list[Row]:
    """Rows that a filter matches (case-insensitive): a table ('1', 'T1', 'table1'), a label ('CrossKD', in every
    table), a table's label ('5/CrossKD'), or a ROW_SETS name standing for its filters; all rows without filters."""
    if not filters:
        return rows
    filters = [f.lower() for name in filters for f in ROW_SETS.get(name.lower(), (name,))]
    wanted = {f.removeprefix("table").removeprefix("t").strip() for f in filters} | set(filters)
    return [row for row in rows if {row.table, row.label.lower(), f"{row.table}/{row.label.lower()}"} & wanted]


def run_key(settings: dict[str, Any]) -> str:
    """A readable, unique folder name for a settings dict, e.g. 'student-from-teacher-kd=crosskd-kd_idx=0'."""
    parts = [str(settings["model"])] + ([f"from-{settings['teacher']}"] if "teacher" in settings else [])
    parts += [f"{k}={v}" for k, v in sorted(settings.items()) if k not in ("model", "teacher")]
    return "-".join(parts)


def plan_runs(rows: list[Row], seeds: tuple[int, ...]) -> list[Run]:
    """Unique trainings in run order: the teachers the rows need (once), then seed by seed every other row."""
    teacher_roles = {row.settings["teacher"] for row in rows if "teacher" in row.settings}
    teacher_roles |= {row.settings["model"] for row in rows if row.settings["model"] in TEACHER_ROLES}
    runs = [teacher_run(role) for role in TEACHER_ROLES if role in teacher_roles]
    for seed in seeds:
        for row in rows:
            if row.settings["model"] not in TEACHER_ROLES:
                runs.append(Run(run_key(row.settings), seed, row.settings))
    return list(runs_by_identity(runs).values())


def runs_by_identity(runs: list[Run]) -> dict[tuple[str, int], Run]:
    """The runs keyed by (key, seed), first occurrence first."""
    unique: dict[tuple[str, int], Run] = {}
    for run in runs:
        unique.setdefault((run.key, run.seed), run)
    return unique


# ---------------------------------------------------------------------------------------------------- folders
def default_out(scale: Scale) -> Path:
    """The results folder of a scale: RESULTS_DIR for cpu, RESULTS_DIR-<scale> for the others."""
    return RESULTS_DIR if scale.name == "cpu" else RESULTS_DIR.with_name(f"{RESULTS_DIR.name}-{scale.name}")


def current_defaults() -> dict[str, Any]:
    """The crosskd defaults of TRACKED_DEFAULTS, as this code trains with them."""
    defaults = yaml.safe_load(DEFAULT_CFG_PATH.read_text())
    return {key: defaults[key] for key in TRACKED_DEFAULTS}


def claim_folder(out: Path) -> None:
    """Record the current defaults in out/defaults.json; refuse a folder of other (or unrecorded) defaults that holds
    results, whose metrics JSONs would pass for finished trainings of the current defaults."""
    marker, defaults = out / DEFAULTS_FILE, current_defaults()
    recorded = json.loads(marker.read_text()) if marker.is_file() else None
    has_results = any((out / "metrics").glob("*.json"))
    if recorded != defaults and (recorded is not None or has_results):
        raise SystemExit(f"reproduce: {out} holds results of other crosskd defaults ({recorded or 'unrecorded'}, now "
                         f"{defaults}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, defaults)


def retrain_lost_teachers(runs: list[Run], out: Path, source_scale: Scale, source: Path) -> list[str]:
    """Train again, in `source`, each finished teacher whose checkpoint is gone (a fresh clone holds its metrics JSON,
    never its .pt) while a student of `runs` still has to distil from it; returns the failed ones."""
    lost = [run for run in runs if metrics_path(source, run).is_file() and teacher_to_retrain(run, runs, source, out)]
    if not lost:
        return []
    claim_folder(source)
    LOGGER.info(f"reproduce: training {len(lost)} teachers of {source} again (their checkpoints are gone)")
    load_data_yaml(data_yaml(source_scale, source))
    with training_pool(1) as pool:  # in this process, its loader workers outlived the training and held up the exit
        return run_group(lost, source_scale, source, pool)


def link_teachers(runs: list[Run], out: Path, source: Path) -> None:
    """Make the teachers trained in `source` this folder's: a link to each run folder and a copy of its metrics
    JSON. A teacher that has not finished there is left out (its students then fail as 'no teacher')."""
    for run in runs:
        if run.settings["model"] not in TEACHER_ROLES or not metrics_path(source, run).is_file():
            continue
        folder = run_dir(out, run)
        if not folder.exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.symlink_to(run_dir(source, run).resolve(), target_is_directory=True)
        write_json(metrics_path(out, run), json.loads(metrics_path(source, run).read_text()))


# ---------------------------------------------------------------------------------------------------- running
def data_yaml(scale: Scale, out: Path) -> str:
    """The dataset YAML of a scale: a digits YAML under out/data (generated on first use), or the scale's YAML."""
    if isinstance(scale.data, str):
        return scale.data
    shipped = yaml.safe_load((CFG_DIR / "datasets" / "digits.yaml").read_text())
    params = dict(scale.data)
    name = "digits-{num_train}-{num_val}-{imgsz}-s{seed}".format(**params)
    path = out / "data" / f"{name}.yaml"
    if not path.is_file():  # written (and its data generated) by `execute` before any training starts
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({**shipped, "path": str((out / "data" / name).resolve()), "generate": params},
                                       sort_keys=False))
    return str(path)


def run_dir(out: Path, run: Run) -> Path:
    return out / "runs" / run.key / f"seed{run.seed}"


def metrics_path(out: Path, run: Run) -> Path:
    return out / "metrics" / f"{run.key}-seed{run.seed}.json"


def teacher_run(role: str) -> Run:
    """The one training of a teacher role."""
    return Run(run_key({"model": role}), TEACHER_SEED, {"model": role})


def run_settings(run: Run, scale: Scale, out: Path) -> tuple[str, dict[str, Any]]:
    """(mode, crosskd settings) of a run: roles replaced by model YAMLs and teacher checkpoints."""
    settings = dict(run.settings)
    is_teacher = settings["model"] in TEACHER_ROLES
    settings["model"] = scale.models[settings["model"]]
    if "teacher" in settings:
        settings["teacher"] = str(run_dir(out, teacher_run(settings["teacher"])) / "weights" / "best.pt")
    target = run_dir(out, run)
    per_epoch_val = is_teacher or run.settings in (STUDENT, PM, LD, CROSSKD)  # the others validate the last epoch
    common = {"data": data_yaml(scale, out), "imgsz": scale.imgsz, "batch": scale.batch, "seed": run.seed,
              "epochs": run_epochs(run, scale), "val": per_epoch_val, "plots": False,
              "project": str(target.parent.resolve()), "name": target.name, "exist_ok": True}
    return ("distill" if "teacher" in settings else "train"), {**common, **scale.train, **settings}


def run_epochs(run: Run, scale: Scale) -> int:
    """A run's epochs: its role's in `scale.role_epochs`, else the scale's teacher or student epochs."""
    role = run.settings["model"]
    default = scale.teacher_epochs if role in TEACHER_ROLES else scale.epochs
    return scale.role_epochs.get(role, default)


def command_line(mode: str, settings: dict[str, Any]) -> str:
    """The `crosskd` command that runs these settings."""
    return shlex.join(["crosskd", mode, *(f"{key}={format_value(value)}" for key, value in settings.items())])


def is_finished(folder: Path, epochs: int) -> bool:
    """True when the run's results.csv holds its last epoch with AP (the trainer validates the last epoch always)."""
    csv_path = folder / "results.csv"
    columns = read_metric_columns(csv_path) if csv_path.is_file() else {}
    return bool(columns.get("epoch")) and columns["epoch"][-1] == epochs and not math.isnan(columns["AP"][-1])


def read_metric_columns(csv_path: Path) -> dict[str, list[float]]:
    """results.csv columns with AP, AP50, AP75 under their short names; a file written before results.csv took
    Ultralytics' column names (runs of an earlier benchmark) has them under these names already."""
    columns = read_results(csv_path)
    return {**columns, **{m: columns[c] for m, c in METRIC_COLUMNS.items() if c in columns}}


def train(run: Run, scale: Scale, out: Path) -> None:
    """Train one run in its folder, which `prepare_folder` left empty, unfinished (resume from last.pt) or finished."""
    mode, settings = run_settings(run, scale, out)
    folder = run_dir(out, run)
    if is_finished(folder, settings["epochs"]):
        return  # trained, only the metrics JSON was missing
    last = folder / "weights" / "last.pt"
    if last.is_file():
        LOGGER.info(f"reproduce: resuming {folder} from {last}")
        launch.run(get_args({"resume": str(last)}, mode))
        return
    LOGGER.info(f"reproduce: {command_line(mode, settings)}")
    launch.run(get_args(settings, mode))


def prepare_folder(folder: Path, epochs: int) -> None:
    """Empty a run folder unless it holds a finished results.csv or a resumable last.pt."""
    last = folder / "weights" / "last.pt"
    if is_finished(folder, epochs) or (last.is_file() and is_resumable(load_checkpoint(last))):
        return
    shutil.rmtree(folder, ignore_errors=True)


def collect(run: Run, scale: Scale, out: Path, wall_seconds: float) -> dict[str, Any]:
    """The metrics record of a trained run: last-epoch AP, AP50, AP75 (×100, as in the paper) and the per-epoch AP."""
    mode, settings = run_settings(run, scale, out)
    columns = read_metric_columns(run_dir(out, run) / "results.csv")
    epochs = [{"epoch": int(e), **{m: round(100 * columns[m][i], 2) for m in METRICS}}
              for i, e in enumerate(columns["epoch"]) if not math.isnan(columns["AP"][i])]
    return {"key": run.key, "seed": run.seed, "mode": mode, "settings": settings, "final": epochs[-1],
            "best_AP": max(e["AP"] for e in epochs), "epochs": epochs, "train_seconds": columns["time"][-1],
            "wall_seconds": round(wall_seconds, 1)}


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write JSON through a temporary file and os.replace, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def train_and_record(run: Run, scale: Scale, out: Path) -> str | None:
    """Train one run with its output in <run dir>/train.log and write its metrics JSON; the error text on failure.

    Any exception is caught, logged with its traceback and returned: one broken row must not stop a two-hour run.
    """
    folder = run_dir(out, run)
    prepare_folder(folder, run_settings(run, scale, out)[1]["epochs"])
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(folder / "train.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            train(run, scale, out)
        except Exception as error:  # noqa: BLE001 - reported with its traceback, the other runs go on
            traceback.print_exc(file=log)
            stop_all_workers()  # its loader workers, which a failed run leaves running
            return f"{type(error).__name__}: {error}"
    write_json(metrics_path(out, run), collect(run, scale, out, time.monotonic() - started))
    return None


def execute(runs: list[Run], scale: Scale, out: Path, jobs: int) -> list[str]:
    """Train every run whose metrics JSON is missing, `jobs` at a time: teachers first, beside them the students that
    distil from no teacher or from one that has finished, then the other distilled students; returns the failed
    runs."""
    todo = [run for run in runs if not metrics_path(out, run).is_file() or teacher_to_retrain(run, runs, out)]
    LOGGER.info(f"reproduce: {len(runs) - len(todo)} of {len(runs)} trainings finished earlier, {len(todo)} to run, "
                f"{jobs} at a time; each training logs to <run dir>/train.log")
    load_data_yaml(data_yaml(scale, out))  # generate the digits once, before parallel trainings read them
    first = [run for run in todo if can_start_now(run, todo, out)]
    students = [run for run in todo if run not in first]
    pool = training_pool(jobs) if jobs > 1 else None
    with pool or contextlib.nullcontext():
        failed = run_group(first, scale, out, pool)
        failed += [f"{run.key}-seed{run.seed} (no teacher)" for run in students if teacher_missing(run, out)]
        failed += run_group([run for run in students if not teacher_missing(run, out)], scale, out, pool)
    return failed


def training_pool(jobs: int) -> ProcessPoolExecutor:
    """`jobs` processes sharing the cores, each running one training (a fresh process: the code as it is now)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    return ProcessPoolExecutor(jobs, get_context("spawn"), initializer=start_training_process, initargs=(threads,),
                               max_tasks_per_child=1)


def can_start_now(run: Run, todo: list[Run], out: Path) -> bool:
    """A teacher, a student without one, or a student whose teacher has finished and is not to be trained again."""
    teacher = run.settings.get("teacher")
    if run.settings["model"] in TEACHER_ROLES or not teacher:
        return True
    return not teacher_missing(run, out) and teacher_run(teacher) not in todo


def start_training_process(threads: int) -> None:
    """Pool initializer: `threads` torch threads, and loader workers forked from the training (a spawned process
    would spawn them too, and a spawned worker imports crosskd as it is on disk then, perhaps newer than its
    training's)."""
    torch.set_num_threads(threads)
    set_start_method("fork", force=True)


def stop_with_workers(signum: int, frame: Any) -> None:
    """SIGTERM handler: end the training processes too, so a restart never races a leftover one, and exit at once
    (a SystemExit would wait in the pool's shutdown, which starts the queued trainings in new processes)."""
    for child in active_children():
        child.terminate()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def teacher_to_retrain(run: Run, runs: list[Run], out: Path, students_out: Path | None = None) -> bool:
    """A finished teacher whose checkpoint is gone (a fresh clone holds its metrics JSON, never its .pt) while a
    student that distils from it has still to run (in `students_out`, default `out`): it is trained again (same
    settings and seed)."""
    role = run.settings["model"]
    if role not in TEACHER_ROLES or (run_dir(out, run) / "weights" / "best.pt").is_file():
        return False
    students_out = students_out or out
    return any(r.settings.get("teacher") == role and not metrics_path(students_out, r).is_file() for r in runs)


def teacher_missing(run: Run, out: Path) -> bool:
    """True when the run distils from a teacher whose training has not finished."""
    teacher = run.settings.get("teacher")
    return bool(teacher) and not metrics_path(out, teacher_run(teacher)).is_file()


def run_group(runs: list[Run], scale: Scale, out: Path, pool: ProcessPoolExecutor | None) -> list[str]:
    """Train `runs` in this process (no pool) or in the pool's processes; log each end; returns the failed ones."""
    failed = []
    if pool is None:
        results = (train_and_record(run, scale, out) for run in runs)
    else:
        results = pool.map(train_and_record, runs, [scale] * len(runs), [out] * len(runs))
    for number, (run, error) in enumerate(zip(runs, results), start=1):
        name = f"{run.key} seed {run.seed}"
        if error is None:
            final = json.loads(metrics_path(out, run).read_text())
            LOGGER.info(f"reproduce: [{number}/{len(runs)}] {name}: AP {final['final']['AP']:.1f} "
                        f"in {final['train_seconds']:.0f} s")
        else:
            LOGGER.error(f"reproduce: [{number}/{len(runs)}] {name} failed: {error} ({run_dir(out, run)}/train.log)")
            failed.append(f"{run.key}-seed{run.seed}")
    return failed


# ---------------------------------------------------------------------------------------------------- summary
def load_records(out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Every metrics JSON under out/metrics, keyed by (run key, seed)."""
    records = {}
    for path in sorted((out / "metrics").glob("*.json")):
        record = json.loads(path.read_text())
        records[(record["key"], record["seed"])] = record
    return records


def row_values(row: Row, records: dict, seeds: tuple[int, ...]) -> list[dict[str, float]]:
    """The final metrics of a row over the seeds that finished (a teacher's single run for teacher rows)."""
    if row.settings["model"] in TEACHER_ROLES:
        seeds = (TEACHER_SEED,)
    key = run_key(row.settings)
    return [records[(key, s)]["final"] for s in seeds if (key, s) in records]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_cell(values: list[float]) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def table_markdown(table: str, rows: list[Row], records: dict, seeds: tuple[int, ...]) -> list[str]:
    """One paper table: ours (mean ± std over seeds, ΔAP vs the student) beside the paper's AP, AP50, AP75, ΔAP."""
    student_row = next((row for row in rows if row.label == "student"), Row(table, "student", STUDENT))
    student_values = row_values(student_row, records, seeds)
    paper_student = PAPER.get((table, "student"), _R18)
    lines = [f"### {TABLE_TITLES[table]}", "", "| row | n | AP | AP50 | AP75 | ΔAP | paper AP | AP50 | AP75 | ΔAP |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        values = row_values(row, records, seeds)
        ours = [format_cell([v[m] for v in values]) for m in METRICS]
        delta = (f"{mean_std([v['AP'] for v in values])[0] - mean_std([v['AP'] for v in student_values])[0]:+.1f}"
                 if values and student_values else "—")
        paper = PAPER.get((row.table, row.paper_label or row.label))
        paper_cells = [f"{p:.1f}" for p in paper] + [f"{paper[0] - paper_student[0]:+.1f}"] if paper else ["—"] * 4
        label = f"{row.label} (paper {row.paper_label})" if row.paper_label not in (None, row.label) else row.label
        lines.append(f"| {label} | {len(values)} | " + " | ".join([*ours, delta, *paper_cells]) + " |")
    return [*lines, ""]


def spread_line(rows: list[Row], records: dict, seeds: tuple[int, ...]) -> str:
    """The acceptance check: teacher-student AP gap against the largest seed-to-seed std of any row."""
    teacher = row_values(Row("5", "teacher", {"model": "teacher"}), records, seeds)
    student = row_values(Row("5", "student", STUDENT), records, seeds)
    stds = [mean_std([v["AP"] for v in row_values(r, records, seeds)])[1] for r in rows
            if len(row_values(r, records, seeds)) > 1]
    if not (teacher and student and stds):
        return "Teacher-student gap vs seed spread: not enough finished runs yet."
    gap = teacher[0]["AP"] - mean_std([v["AP"] for v in student])[0]
    return (f"Teacher-student gap {gap:.1f} AP; seed-to-seed std: student "
            f"{mean_std([v['AP'] for v in student])[1]:.2f}, largest over rows {max(stds):.2f}, median "
            f"{statistics.median(stds):.2f} AP (gap / largest std = {gap / max(max(stds), 1e-9):.1f}).")


def ap_stats(rows: list[Row], table: str, label: str, records: dict,
             seeds: tuple[int, ...]) -> tuple[float, float] | None:
    """Mean and std of a row's AP over the finished seeds; None for a row that is not in `rows` or has no results."""
    row = next((r for r in rows if (r.table, r.label) == (table, label)), None)
    values = row_values(row, records, seeds) if row else []
    return mean_std([v["AP"] for v in values]) if values else None


def ordering_cell(better: tuple[float, float] | None, worse: tuple[float, float] | None) -> str:
    """'holds (23.5 vs 12.8)' or 'does not hold (...)', marked 'within std' when the gap is under the larger std."""
    if better is None or worse is None:
        return "—"
    verdict = "holds" if better[0] > worse[0] else "does not hold"
    noise = ", within std" if abs(better[0] - worse[0]) < max(better[1], worse[1]) else ""
    return f"{verdict} ({better[0]:.1f} vs {worse[0]:.1f}{noise})"


def paper_ap(rows: list[Row], table: str, label: str) -> str:
    """The paper's AP of the row labelled `label` in `table` (through its paper_label), '—' when it has none."""
    row = next((r for r in rows if (r.table, r.label) == (table, label)), None)
    paper = PAPER.get((table, row.paper_label or row.label)) if row else None
    return f"{paper[0]:.1f}" if paper else "—"


def orderings_markdown(rows: list[Row], columns: dict[str, dict], seeds: tuple[int, ...]) -> list[str]:
    """The paper's orderings (ORDERINGS) among `rows`, one column per regime (name -> its metrics records)."""
    lines = ["### The paper's orderings", "", "| table | ordering (paper AP) | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for table, better, worse in ORDERINGS:
        if not any(r.table == table and r.label in (better, worse) for r in rows):
            continue
        paper = [paper_ap(rows, table, label) for label in (better, worse)]
        cells = [ordering_cell(ap_stats(rows, table, better, records, seeds),
                               ap_stats(rows, table, worse, records, seeds)) for records in columns.values()]
        lines.append(f"| {table} | {better} > {worse} ({paper[0]} vs {paper[1]}) | " + " | ".join(cells) + " |")
    return [*lines, ""]


def comparison_markdown(rows: list[Row], folders: dict[str, Path], seeds: tuple[int, ...]) -> str:
    """Regimes side by side (name -> results folder): per paper table the AP of each (mean ± std over seeds) beside
    the paper's, then which of the paper's orderings hold in each."""
    columns = {name: load_records(folder) for name, folder in folders.items()}
    lines = ["# CrossKD reproduction: regimes side by side", "",
             "Last-epoch COCO AP ×100 on the digits val split, mean ± std over seeds; — where a regime has no result. "
             "Regimes: " + "; ".join(f"{name}: `{shown(folder)}`" for name, folder in folders.items()) + ".", ""]
    for table in dict.fromkeys(row.table for row in rows):
        lines += [f"### {TABLE_TITLES[table]}", "", "| row | " + " | ".join(columns) + " | paper AP |",
                  "|---|" + "---|" * (len(columns) + 1)]
        for row in (r for r in rows if r.table == table):
            cells = [format_cell([v["AP"] for v in row_values(row, records, seeds)]) for records in columns.values()]
            paper = PAPER.get((row.table, row.paper_label or row.label))
            lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {f'{paper[0]:.1f}' if paper else '—'} |")
        lines.append("")
    return "\n".join(lines + orderings_markdown(rows, columns, seeds))


def shown(folder: Path) -> Path:
    """A folder relative to the repository when it is inside it."""
    root = ROOT.parent
    return folder.resolve().relative_to(root) if folder.resolve().is_relative_to(root) else folder


def comparison_folders() -> dict[str, Path]:
    """The regimes of issue 20: the old defaults at cpu scale, the new ones at cpu scale and at cpu-long."""
    return {"cpu, old (pre, image)": OLD_RESULTS_DIR, "cpu, new (post, mmdet)": default_out(SCALES["cpu"]),
            "cpu-long, new": default_out(SCALES["cpu-long"])}


def plot_curves(rows: list[Row], records: dict, seeds: tuple[int, ...], path: Path) -> Path | None:
    """AP per epoch (mean over seeds, min-max band) of student alone, PM, LD and CrossKD (paper Fig. 6c)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), tight_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    drawn = 0
    for label in CURVE_LABELS:
        row = next((r for r in rows if r.table == "5" and r.label == label), None)
        key = run_key(row.settings) if row else ""
        curves = [records[(key, s)]["epochs"] for s in seeds if (key, s) in records]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        per_epoch = [[c[i]["AP"] for c in curves] for i in range(length)]
        epochs = [curves[0][i]["epoch"] for i in range(length)]
        ax.plot(epochs, [statistics.fmean(v) for v in per_epoch], marker=".", label=f"{label} (n={len(curves)})")
        ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch], alpha=0.2)
        drawn += 1
    if not drawn:
        return None
    ax.set(xlabel="epoch", ylabel="val AP", title="AP per epoch (mean over seeds, band = min-max)")
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def summarise(rows: list[Row], scale: Scale, out: Path, seeds: tuple[int, ...]) -> str:
    """Write out/summary.md and out/ap_per_epoch.png of `rows` from the metrics JSONs; returns the markdown."""
    records = load_records(out)
    plot = plot_curves(rows, records, seeds, out / "ap_per_epoch.png")
    text = summary_markdown(rows, scale, records, seeds, plot)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    return text


def summary_markdown(rows: list[Row], scale: Scale, records: dict, seeds: tuple[int, ...], plot: Path | None) -> str:
    seconds = sum(r["train_seconds"] for r in records.values())
    lines = [f"# CrossKD reproduction, scale '{scale.name}'", "",
             f"{len(records)} trainings finished ({seconds / 3600:.2f} h of training, summed). Ours: last-epoch COCO "
             f"AP ×100 on the val split, mean ± std over seeds {list(seeds)} (n = seeds finished; teachers trained "
             "once). ΔAP: against the table's student alone. Paper: its COCO numbers, its ΔAP against its student.",
             "", spread_line(rows, records, seeds), ""]
    for table in dict.fromkeys(row.table for row in rows):
        lines += table_markdown(table, [r for r in rows if r.table == table], records, seeds)
    lines += orderings_markdown(rows, {scale.name: records}, seeds)
    lines.append(f"![AP per epoch]({plot.name})" if plot else "No AP-per-epoch curves yet.")
    return "\n".join(lines) + "\n"


def paper_lines(rows: list[Row]) -> list[str]:
    """'# Table T, label: paper AP … AP50 … AP75 …' for every printed row (comments after the commands)."""
    lines = []
    for row in rows:
        paper = PAPER.get((row.table, row.paper_label or row.label))
        numbers = "AP {:.1f}  AP50 {:.1f}  AP75 {:.1f}".format(*paper) if paper else "no number in the paper"
        lines.append(f"# Table {row.table}, {row.label}: paper {numbers}")
    return lines


# ---------------------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("cpu", "cpu-long", "coco"), default="cpu",
                        help="cpu: digits on 2 cores; cpu-long: cpu with 4x longer students; coco: paper")
    parser.add_argument("--rows", action="append",
                        help=f"only these tables (1, T9), labels (CrossKD) or row sets ({', '.join(ROW_SETS)}); "
                             "repeatable")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="student seeds (default 0 1 2)")
    parser.add_argument("--smoke", action="store_true",
                        help="CI: tiny configs, one seed, a few iterations (Table 5's teacher and CrossKD, or --rows)")
    parser.add_argument("--summary", action="store_true", help="only summarise the finished trainings")
    parser.add_argument("--run", action="store_true", help="with --scale coco: train instead of printing commands")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the crosskd commands of the selected rows and the paper's numbers; train nothing")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time, each on cpus/jobs threads")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS_DIR}[-<scale>])")
    parser.add_argument("--teachers", type=Path, default=None,
                        help="cpu-long: the results folder of the teachers to distil from (default: the cpu scale's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run (or print) the selected trainings, then write the summary; exit code 1 when some training failed."""
    opts = parse_args(argv)
    scale = SCALES["smoke" if opts.smoke else opts.scale]
    seeds = (TEACHER_SEED,) if opts.smoke else tuple(opts.seeds)
    scale_rows = select_rows(experiment_rows(scale.stacked_convs), scale.default_rows)
    rows = select_rows(experiment_rows(scale.stacked_convs), opts.rows) if opts.rows else scale_rows
    if opts.smoke:  # a throwaway folder: its summary is the rows it ran
        scale_rows = rows = rows if opts.rows else SMOKE_ROWS
    out = opts.out or default_out(scale)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("data/\n*.pt\n")
    runs = plan_runs(rows, seeds)
    failed: list[str] = []
    if opts.dry_run or (not opts.summary and not scale.runs_by_default and not opts.run):
        for run in runs:
            print(command_line(*run_settings(run, scale, out)))
        print("\n".join(paper_lines(rows)))
        return 0
    if not opts.summary:
        claim_folder(out)
        if scale.teachers_from:
            source_scale = SCALES[scale.teachers_from]
            source = opts.teachers or default_out(source_scale)
            failed += retrain_lost_teachers(runs, out, source_scale, source)
            link_teachers(runs, out, source)
            runs = [run for run in runs if run.settings["model"] not in TEACHER_ROLES]
        signal.signal(signal.SIGTERM, stop_with_workers)
        failed += execute(runs, scale, out, max(1, opts.jobs))
    summary = summarise(scale_rows, scale, out, seeds)  # the file covers every row of the scale, whatever --rows says
    print(summary if rows == scale_rows else summary_markdown(rows, scale, load_records(out), seeds, None))
    if scale.name in ("cpu", "cpu-long"):
        issue_rows = select_rows(experiment_rows(scale.stacked_convs), ["issue20"])
        (out / "comparison.md").write_text(comparison_markdown(issue_rows, comparison_folders(), seeds) + "\n")
    if failed:
        LOGGER.error(f"reproduce: {len(failed)} trainings failed: {', '.join(failed)}; rerun to retry them")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
