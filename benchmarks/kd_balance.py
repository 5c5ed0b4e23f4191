"""How CrossKD's and PKD's terms pull on the student's shared FPN, alone and combined (issue 20 point 5).

    python benchmarks/kd_balance.py --teacher runs/demo/teacher/weights/best.pt --iters 300

Trains the student from one seed with kd=crosskd, kd=pkd and kd=crosskd+pkd through the Distiller the trainer uses
(AdamW, lr0 x batch/16 with the linear warm-up of the reproduce cpu scale, no augmentation, so every method sees the
same batches). Every `--every` iterations it records, for the detection loss and each KD term (CrossKD = kd_cls +
kd_reg, PKD = kd_feat): the value; the gradient norm that term alone puts on the FPN outputs (per level and in all), on
the FPN parameters and on the backbone parameters; the cosine between the CrossKD and PKD gradients; and the
per-channel statistics of the student's hold features against the teacher's (what align_scale maps) and of the FPN
outputs. Writes `records.csv` and `records.json` (with the resolved weights and PKD levels of each method) under
benchmarks/results/kd_balance/ and prints a table averaged over windows of the run.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crosskd.data import DetectionDataset, build_dataloader, load_data_yaml
from crosskd.distill import Distiller
from crosskd.distill.adapters import resolve_kd_idx
from crosskd.distill.passes import head_pass
from crosskd.engine.deployment.loader import load_teacher
from crosskd.losses.distill import pkd_loss
from crosskd.models import build_detector

ROOT = Path(__file__).resolve().parent
OUT_DIR = ROOT / "results" / "kd_balance"
METHODS = ("crosskd", "pkd", "crosskd+pkd")
GROUPS = {"det": None, "ckd": ("kd_cls", "kd_reg", "kd_ctr"), "pkd": ("kd_feat",)}  # det: every non-KD key
TABLE_COLUMNS = ("det", "ckd", "pkd", "gfeat_ckd", "gfeat_pkd", "gfeat_pkd_P7", "gneck_det", "gneck_ckd", "gneck_pkd",
                 "gbb_det", "gbb_ckd", "gbb_pkd", "cos_feat", "cos_neck", "hold_std_ratio", "hold_mean_gap",
                 "fpn_std_ratio", "fpn_mean_gap", "pkd_P3", "pkd_P6", "pkd_P7")


def grad_norm(grads: list[Tensor | None]) -> float:
    """L2 norm over a list of gradients (None, an unreached tensor, counts as zero)."""
    total = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
    return math.sqrt(total)


def grad_cosine(first: list[Tensor | None], second: list[Tensor | None]) -> float:
    """Cosine between two gradients given as matching lists of tensors; NaN when either is zero."""
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(first, second, strict=True)
              if a is not None and b is not None)
    norms = grad_norm(first) * grad_norm(second)
    return dot / norms if norms > 0 else math.nan


def group_terms(losses: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum the loss dict into det (detection), ckd (CrossKD's prediction terms) and pkd (kd_feat); absent groups are
    left out."""
    kd_keys = {key for keys in GROUPS.values() if keys for key in keys}
    groups = {"det": [v for k, v in losses.items() if k not in kd_keys]}
    for name, keys in GROUPS.items():
        if keys:
            groups[name] = [losses[k] for k in keys if k in losses]
    return {name: sum(terms) for name, terms in groups.items() if terms}


def channel_gap(student: Tensor, teacher: Tensor) -> tuple[float, float]:
    """How far a student map's per-channel statistics (over batch and space) are from the teacher's: the mean over
    channels of σs over that of σt, and the mean over channels of |μs − μt| over the mean σt (channels a ReLU left
    dead have σt 0, so no per-channel ratio). [B, C, H, W] each."""
    s_std, s_mean = torch.std_mean(student.float(), (0, 2, 3))
    t_std, t_mean = torch.std_mean(teacher.float(), (0, 2, 3))
    scale = float(t_std.mean().clamp(min=1e-12))
    return float(s_std.mean()) / scale, float((s_mean - t_mean).abs().mean()) / scale


def mean_gap(pairs: list[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """`channel_gap` averaged over (student, teacher) map pairs (the std ratio geometrically)."""
    gaps = [channel_gap(s, t) for s, t in pairs]
    return (math.exp(statistics.fmean(math.log(max(r, 1e-12)) for r, _ in gaps)), statistics.fmean(g for _, g in gaps))


def window_means(rows: list[dict[str, Any]], columns: tuple[str, ...], windows: int) -> list[dict[str, Any]]:
    """Split rows (one method's records in order) into `windows` consecutive parts and average each column (NaN and
    missing values skipped); each result has the first and last iteration of its part."""
    size = math.ceil(len(rows) / windows) if rows else 1
    parts = [rows[i:i + size] for i in range(0, len(rows), size)]
    means = []
    for part in parts:
        row = {"from": part[0]["iter"], "to": part[-1]["iter"]}
        for column in columns:
            values = [r[column] for r in part if isinstance(r.get(column), float) and not math.isnan(r[column])]
            row[column] = statistics.fmean(values) if values else math.nan
        means.append(row)
    return means


def default_data() -> str:
    """The reproduce cpu scale's digits YAML (generated under its results folder on first use)."""
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module.data_yaml(module.SCALES["cpu"], module.RESULTS_DIR)


class NeckTap:
    """Keeps the student FPN outputs of the last forward (a forward hook on the neck)."""

    def __init__(self, neck: torch.nn.Module) -> None:
        self.outputs: list[Tensor] = []
        self.handle = neck.register_forward_hook(self.keep)

    def keep(self, module: torch.nn.Module, inputs: Any, outputs: list[Tensor]) -> None:
        self.outputs = list(outputs)


@torch.no_grad()
def feature_gaps(distiller: Distiller, images: Tensor, kd_idx: int) -> dict[str, float]:
    """Student vs teacher per-channel statistics of the hold features at kd_idx (what align_scale maps) and of the
    FPN outputs, and the unweighted PKD loss of every FPN level (pkd_P3...; whole maps, as the padding-free digits
    batches are), whatever methods are configured."""
    student, teacher = distiller.student, distiller.teacher
    s_feats, t_feats = student.extract_features(images), teacher.extract_features(images)
    s_holds, _ = head_pass(student.head, s_feats, kd_idx, distiller.kd_hold)
    t_holds, _ = head_pass(teacher.head, t_feats, kd_idx, distiller.kd_hold)
    hold_pairs = [(s, t) for s_level, t_level in zip(s_holds, t_holds) for s, t in zip(s_level, t_level)]
    hold_ratio, hold_gap = mean_gap(hold_pairs)
    fpn_ratio, fpn_gap = mean_gap(list(zip(s_feats, t_feats)))
    per_level = {f"pkd_P{level + 3}": float(pkd_loss(s, t)) for level, (s, t) in enumerate(zip(s_feats, t_feats))}
    return {"hold_std_ratio": hold_ratio, "hold_mean_gap": hold_gap,
            "fpn_std_ratio": fpn_ratio, "fpn_mean_gap": fpn_gap, **per_level}


def measure(distiller: Distiller, tap: NeckTap, losses: dict[str, Tensor]) -> dict[str, Any]:
    """Values and per-term gradient norms on the FPN outputs, FPN parameters and backbone parameters."""
    student = distiller.student
    neck = [p for p in student.neck.parameters() if p.requires_grad]
    backbone = [p for p in student.backbone.parameters() if p.requires_grad]
    feats = tap.outputs
    row: dict[str, Any] = {}
    grads: dict[str, tuple[list, list]] = {}
    for name, term in group_terms(losses).items():
        found = torch.autograd.grad(term, feats + neck + backbone, retain_graph=True, allow_unused=True)
        split = len(feats) + len(neck)
        g_feat, g_neck, g_bb = found[:len(feats)], found[len(feats):split], found[split:]
        row[name] = float(term.detach())
        row[f"gfeat_{name}"] = grad_norm(list(g_feat))
        row[f"gneck_{name}"] = grad_norm(list(g_neck))
        row[f"gbb_{name}"] = grad_norm(list(g_bb))
        for level, g in enumerate(g_feat):
            row[f"gfeat_{name}_P{level + 3}"] = grad_norm([g])
        grads[name] = (list(g_feat), list(g_neck))
    if "ckd" in grads and "pkd" in grads:
        row["cos_feat"] = grad_cosine(grads["ckd"][0], grads["pkd"][0])
        row["cos_neck"] = grad_cosine(grads["ckd"][1], grads["pkd"][1])
    return row


def warmup_lr(base_lr: float, step: int, warmup: int, ratio: float = 0.001) -> float:
    """Linear warm-up from ratio·base_lr to base_lr over `warmup` steps (the trainer's warm-up), then flat."""
    if step >= warmup:
        return base_lr
    return base_lr * (ratio + (1 - ratio) * step / warmup)


def parse_method(spec: str) -> tuple[str, int | None]:
    """'crosskd+pkd' -> ('crosskd+pkd', None); 'crosskd+pkd@4' -> ('crosskd+pkd', 4): PKD on the first 4 FPN levels
    instead of its default, a diagnostic variant the trainer has no setting for."""
    kd, _, levels = spec.strip().partition("@")
    return kd, int(levels) if levels else None


def run_method(spec: str, opts: argparse.Namespace, data: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train the student `opts.iters` steps with the `kd` of `spec` (see parse_method); the records and the resolved
    settings."""
    kd, levels = parse_method(spec)
    torch.manual_seed(opts.seed)
    student = build_detector(opts.student, data.nc).train()
    teacher = load_teacher(opts.teacher, None).model
    distiller = Distiller(student, teacher, kd=kd)
    kd_idx = distiller.kd_idx if "crosskd" in kd else resolve_kd_idx(None, student.head, teacher.head)
    pkd = distiller.methods["pkd"] if "pkd" in distiller.methods else None
    if pkd is not None and levels is not None:
        pkd.levels = levels
    settings = {**distiller.settings(), "pkd_levels": (pkd.levels or len(student.strides)) if pkd else None,
                "hold_kd_idx": kd_idx}
    dataset = DetectionDataset(data, "train", opts.imgsz, augment=False, pad_multiple=max(student.strides))
    loader = build_dataloader(dataset, opts.batch, workers=0, shuffle=True, seed=opts.seed)
    params = [p for p in distiller.parameters() if p.requires_grad]
    base_lr = opts.lr0 * opts.batch / 16
    optimizer = torch.optim.AdamW(params, lr=base_lr, betas=(0.9, 0.999), weight_decay=1e-4)
    tap = NeckTap(student.neck)
    rows, step = [], 0
    while step < opts.iters:
        for batch in loader:
            if step >= opts.iters:
                break
            for group in optimizer.param_groups:
                group["lr"] = warmup_lr(base_lr, step, opts.warmup)
            losses = distiller(batch)
            if step % opts.every == 0 or step == opts.iters - 1:
                row = {"method": spec, "iter": step, **measure(distiller, tap, losses)}
                row.update(feature_gaps(distiller, batch.images, kd_idx))
                rows.append(row)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            step += 1
    tap.handle.remove()
    return rows, settings


def format_table(method: str, means: list[dict[str, Any]]) -> str:
    """A compact text table of one method's window means."""
    header = f"{'iters':>9} " + " ".join(f"{c:>14}" for c in TABLE_COLUMNS)
    lines = [f"kd={method}", header]
    for row in means:
        cells = " ".join(f"{row[c]:>14.4g}" for c in TABLE_COLUMNS)
        lines.append(f"{row['from']:>4}-{row['to']:<4} {cells}")
    return "\n".join(lines)


def write_results(out: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """records.csv (one row per record, every column) and records.json (settings and records)."""
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in records for key in row))
    with open(out / "records.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    (out / "records.json").write_text(json.dumps({**meta, "records": records}, indent=1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="trained teacher checkpoint (a crosskd .pt)")
    parser.add_argument("--student", default=str(ROOT / "configs" / "gfl_r18q_student.yaml"), help="student YAML")
    parser.add_argument("--data", help="dataset YAML (default: the reproduce cpu scale's digits)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated kd settings; kd@L runs PKD on the first L FPN levels (diagnostic)")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--every", type=int, default=10, help="record every k iterations")
    parser.add_argument("--windows", type=int, default=5, help="parts of the run the printed table averages over")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--lr0", type=float, default=0.004, help="for batch 16, scaled by batch/16 (AdamW)")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up iterations")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    data = load_data_yaml(opts.data or default_data())
    records, settings = [], {}
    for kd in opts.methods.split(","):
        rows, settings[kd] = run_method(kd, opts, data)
        records += rows
        print(format_table(kd, window_means(rows, TABLE_COLUMNS, opts.windows)), flush=True)
    meta = {"args": {k: str(v) for k, v in vars(opts).items()}, "settings": settings}
    write_results(opts.out, records, meta)
    print(f"wrote {opts.out / 'records.csv'} and records.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
