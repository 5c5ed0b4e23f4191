"""`crosskd analyze`: the target conflict of CrossKD's Fig. 3, measured per FPN level on a dataset split.

Definitions (every probability is sigmoid(cls logit), [B, N, C], without centerness):
- locations are the student head's priors; positives and negatives come from the student's assigner
  (`head.get_targets`); priors with label weight 0 (ignored, or in another image's batch padding) are left out.
  Maps in the teacher's layout (its own and the cross-head predictions) are brought to the student's priors by the
  max over the teacher's anchors at each location (the identity when both heads have the same number of anchors).
- the discrepancy of two probability vectors is d(p, q) = max over classes |p_c − q_c|, in [0, 1].
- |Δ| student = d(p_teacher, p_student's own head); |Δ| cross-head = d(p_teacher, p_cross-head).
- target conflict: d(y, p_teacher) > CONFLICT_THRESHOLD, where y is the one-hot of the assigned GT class (all zeros
  at negatives). At 0.5: a positive whose teacher probability of its GT class is below 0.5 (or of another class
  above 0.5), or a negative where the teacher gives some class more than 0.5.
- Fig. 3 ratio(τ) = conflicting locations (positive and negative) / positive locations, for thresholds τ.
Medians and p90 come from a 1000-bin histogram (within 0.001); means, maxima and conflict counts are exact.

A Faster R-CNN pair (the cross-head is the teacher's R-CNN stage, distill/two_stage.py) is measured where its KD
acts: at the student's sampled training RoIs (the R-CNN sampler's positives and negatives), grouped by the pyramid
level each RoI is pooled from, on softmax probabilities over the C+1 classes (background last; y is the one-hot of
the sampled label, the background at negatives). DEFINITIONS_RCNN lists what changes.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich import box
from rich.table import Table
from torch import Tensor

from crosskd.config import check_required, imgsz_hw, setting_or_model_default
from crosskd.data import DetectionDataset, build_dataloader, load_data_yaml
from crosskd.distill import Distiller
from crosskd.distill.passes import feat_sizes, head_pass
from crosskd.distill.two_stage import frcnn_cross_head
from crosskd.engine.deployment.checkpoint import read_kd_state
from crosskd.engine.deployment.loader import Runtime, load_runtime, load_teacher
from crosskd.errors import DataError
from crosskd.ops.roi import roi_levels
from crosskd.paths import make_save_dir
from crosskd.utils import LOGGER, colorstr, console, select_device

CONFLICT_THRESHOLD = 0.5  # d(one-hot GT, teacher) above this is a target conflict
THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))  # the x-axis of the Fig. 3 curve
NUM_BINS = 1000  # histogram resolution of |Δ| on [0, 1] (quantiles within 1 / NUM_BINS)
PLOT_BINS = 20  # histogram bars per plot panel (and in the JSON)
REGIONS = ("pos", "neg")
KINDS = ("student", "cross_head", "teacher_vs_gt")  # d(teacher, own), d(teacher, cross-head), d(GT, teacher)
CONFLICT_KIND = KINDS.index("teacher_vs_gt")
DEFINITIONS = {
    "probability": "sigmoid of the class logits (no centerness); teacher-layout maps take the max over its anchors "
    "at each location of the student's priors",
    "discrepancy": "max over classes |p_a - p_b|",
    "student": "discrepancy(teacher, student's own head)",
    "cross_head": "discrepancy(teacher, cross-head = student hold features through the teacher's head)",
    "teacher_vs_gt": "discrepancy(one-hot assigned GT class, teacher); all zeros at negatives",
    "regions": "positives / negatives of the student's assigner; ignored priors and batch padding left out",
    "conflict": f"teacher_vs_gt > {CONFLICT_THRESHOLD}",
    "fig3_ratio": "conflicting locations (pos + neg) / positive locations, per threshold",
}
DEFINITIONS_RCNN = {  # a Faster R-CNN pair: locations are the student's sampled R-CNN RoIs
    **DEFINITIONS,
    "probability": "softmax over the C+1 classes (background last) of the R-CNN logits at the student's sampled "
    "training RoIs (train-setting proposals, the R-CNN sampler); levels: the FPN level each RoI is pooled from",
    "teacher_vs_gt": "discrepancy(one-hot sampled label over C+1 classes, teacher); the background at negatives",
    "regions": "positive / negative RoIs of the student's R-CNN sampler",
    "fig3_ratio": "conflicting RoIs (pos + neg) / positive RoIs, per threshold",
}


# ----- per-batch measurements -----------------------------------------------------------------------------------
def discrepancy(p: Tensor, q: Tensor) -> Tensor:
    """max over classes |p − q|: [B, N, C] × [B, N, C] -> [B, N]."""
    return (p - q).abs().amax(dim=-1)


def to_student_priors(probs: Tensor, teacher_anchors: int, student_anchors: int) -> Tensor:
    """Teacher-layout probabilities [B, N_t, C] on the student's priors [B, N_s, C] (same strides and sizes).

    Priors are ordered level-major, then y, x, then anchor, so [B, N, C] views as [B, locations, A, C]; the teacher's
    anchors at a location reduce by max and the result repeats for each of the student's anchors there.
    """
    if teacher_anchors == student_anchors:
        return probs
    batch, num, classes = probs.shape
    per_location = probs.view(batch, num // teacher_anchors, teacher_anchors, classes).amax(dim=2)  # [B, L, C]
    return per_location.repeat_interleave(student_anchors, dim=1)  # [B, L·A_s, C]


def gt_one_hot(labels: Tensor, pos_mask: Tensor, num_classes: int) -> Tensor:
    """One-hot GT targets [B, N, C] of the assigned class at positives, zeros elsewhere (labels, pos_mask [B, N])."""
    return F.one_hot(labels.clamp(min=0), num_classes).float() * pos_mask[..., None]


def region_index(pos_mask: Tensor, label_weights: Tensor) -> Tensor:
    """Per prior [B, N]: 0 positive, 1 negative, −1 left out (label weight 0: ignored, or outside its image's valid
    region).

    `pos_mask` and `label_weights` ([B, N]) come from the student's `get_targets`, which gives the priors outside
    their image's valid region (`valid_region`, `DenseHead.valid_mask`) label weight 0.
    """
    return torch.where(label_weights > 0, torch.where(pos_mask, 0, 1), -1)


def level_index(num_per_level: list[int], device: torch.device) -> Tensor:
    """FPN level of every prior [N] (priors are level-major)."""
    counts = torch.tensor(num_per_level, device=device)
    return torch.repeat_interleave(torch.arange(len(num_per_level), device=device), counts)


# ----- accumulation over the split ------------------------------------------------------------------------------
class ConflictStats:
    """Histograms, sums, maxima and conflict counts of the discrepancies per (level, region, kind), on one device."""

    def __init__(self, num_levels: int, device: torch.device) -> None:
        shape = (num_levels, len(REGIONS), len(KINDS))
        self.hist = torch.zeros(*shape, NUM_BINS, dtype=torch.long, device=device)
        self.total = torch.zeros(shape, dtype=torch.float64, device=device)
        self.peak = torch.zeros(shape, device=device)
        self.conflicts = torch.zeros(num_levels, len(REGIONS), len(THRESHOLDS), dtype=torch.long, device=device)
        self.thresholds = torch.tensor(THRESHOLDS, device=device)

    def update(self, levels: Tensor, regions: Tensor, values: Tensor) -> None:
        """Add one batch: levels [N], regions [B, N] (−1 left out), values [B, N, K] discrepancies in KINDS order."""
        keep = regions >= 0
        group = (levels.expand_as(regions) * len(REGIONS) + regions)[keep]  # [P] flat (level, region)
        vals = values[keep]  # [P, K]
        kinds = torch.arange(len(KINDS), device=vals.device)
        cell = (group[:, None] * len(KINDS) + kinds).flatten()  # [P·K] flat (level, region, kind)
        bins = (vals * NUM_BINS).long().clamp(0, NUM_BINS - 1).flatten()
        self.hist += torch.bincount(cell * NUM_BINS + bins, minlength=self.hist.numel()).view_as(self.hist)
        self.total.view(-1).index_add_(0, cell, vals.flatten().double())
        self.peak.view(-1).scatter_reduce_(0, cell, vals.flatten(), "amax")
        over = (vals[:, CONFLICT_KIND, None] > self.thresholds).long()  # [P, T]
        self.conflicts.view(-1, len(THRESHOLDS)).index_add_(0, group, over)

    def with_all_levels(self) -> ConflictStats:
        """A copy on the CPU with one more level: the sum (max) over all levels."""
        merged = ConflictStats.__new__(ConflictStats)
        merged.hist = torch.cat([self.hist, self.hist.sum(0, keepdim=True)]).cpu()
        merged.total = torch.cat([self.total, self.total.sum(0, keepdim=True)]).cpu()
        merged.peak = torch.cat([self.peak, self.peak.amax(0, keepdim=True)]).cpu()
        merged.conflicts = torch.cat([self.conflicts, self.conflicts.sum(0, keepdim=True)]).cpu()
        merged.thresholds = self.thresholds.cpu()
        return merged


def hist_quantile(hist: Tensor, q: float, peak: Tensor) -> Tensor:
    """Quantile `q` of values binned on [0, 1] (hist [..., NUM_BINS]), linear within its bin, at most `peak` [...]."""
    cum = hist.double().cumsum(-1)  # [..., NUM_BINS]
    target = q * cum[..., -1:]  # [..., 1]
    idx = torch.searchsorted(cum.contiguous(), target.contiguous()).clamp(max=NUM_BINS - 1)
    in_bin = hist.gather(-1, idx).double()
    before = cum.gather(-1, idx) - in_bin
    value = (idx + (target - before) / in_bin.clamp(min=1)) / NUM_BINS
    return torch.minimum(value.squeeze(-1), peak.double())


@dataclass
class Summary:
    """Statistics per (level + 'all', region, kind) as CPU tensors; NaN where a group has no locations."""

    count: Tensor  # [L+1, 2] locations
    mean: Tensor  # [L+1, 2, K]
    median: Tensor  # [L+1, 2, K]
    p90: Tensor  # [L+1, 2, K]
    peak: Tensor  # [L+1, 2, K]
    coarse_hist: Tensor  # [L+1, 2, K, PLOT_BINS] counts
    conflict_share: Tensor  # [L+1, 2, T] conflicting / locations of the region
    fig3_ratio: Tensor  # [L+1, T] conflicting (pos + neg) / positives


def summarize(stats: ConflictStats) -> Summary:
    """Means, quantiles, maxima, coarse histograms and conflict shares from the accumulated statistics."""
    s = stats.with_all_levels()
    count = s.hist[:, :, 0].sum(-1)  # [L+1, 2]
    empty = (count == 0)[..., None]
    nan = torch.tensor(math.nan, dtype=torch.float64)

    def masked(x: Tensor) -> Tensor:
        return torch.where(empty, nan, x.double())

    positives = count[:, 0, None].double()
    return Summary(
        count=count,
        mean=masked(s.total / count[..., None].clamp(min=1)),
        median=masked(hist_quantile(s.hist, 0.5, s.peak)),
        p90=masked(hist_quantile(s.hist, 0.9, s.peak)),
        peak=masked(s.peak),
        coarse_hist=s.hist.view(*s.hist.shape[:-1], PLOT_BINS, -1).sum(-1),
        conflict_share=masked(s.conflicts / count[..., None].clamp(min=1)),
        fig3_ratio=torch.where(positives > 0, s.conflicts.sum(1) / positives.clamp(min=1), nan),
    )


# ----- the mode --------------------------------------------------------------------------------------------------
def level_names(strides: list[int]) -> list[str]:
    """'P3', 'P4', ... from strides 8, 16, ..., then 'all'."""
    return [f"P{int(math.log2(s))}" for s in strides] + ["all"]


class Analyzer:
    """Loads the teacher, the student and the split, measures every batch and reports (`run`)."""

    def __init__(self, args: Any) -> None:
        check_required(args)
        self.args = args
        self.device = select_device(args.device)
        info = load_data_yaml(args.data, args.datasets_dir)
        teacher = load_teacher(args.teacher, args.teacher_weights, args.teacher_cfg)
        student = load_runtime(args.model, nc=info.nc, model_cfg=args.model_cfg, device=self.device, role="student")
        if student.nc != info.nc:
            raise DataError(f"the student has {student.nc} classes but data={args.data} has {info.nc}; "
                            "analyze on the dataset the models were trained on")
        self.student_runtime, self.teacher_source = student, teacher.source
        self.distiller = self.build_distiller(student, teacher.detector("analyze"))
        imgsz = max(imgsz_hw(setting_or_model_default(args, "imgsz", student.imgsz)))
        dataset = DetectionDataset(info, args.split, imgsz, augment=False, pad_multiple=max(student.strides),
                                   fraction=args.fraction)
        self.loader = build_dataloader(dataset, args.batch, args.workers, shuffle=False, seed=args.seed)
        self.imgsz = imgsz

    def build_distiller(self, student: Runtime, teacher: Any) -> Distiller:
        """The cross-head pass: kd_idx / kd_align / kd_hold from the settings, else from a distilled student's
        checkpoint (one saved before kd_hold existed used the pre-activation holds).

        A width adapter comes from the student's last.pt when it holds one; otherwise it is freshly initialised
        (seeded) and untrained, which the report says.
        """
        kd_args = student.checkpoint.get("kd_args") or {}
        kd_idx = self.args.kd_idx if self.args.kd_idx is not None else kd_args.get("kd_idx")
        kd_align = setting_or_model_default(self.args, "kd_align", kd_args.get("kd_align"))
        saved_hold = kd_args.get("kd_hold", "pre" if kd_args else None)
        kd_hold = setting_or_model_default(self.args, "kd_hold", saved_hold)
        torch.manual_seed(self.args.seed)
        distiller = Distiller(student.detector("analyze"), teacher, kd="crosskd", kd_idx=kd_idx, kd_align=kd_align,
                              kd_hold=kd_hold, valid_region=self.args.valid_region)
        saved = read_kd_state(student.checkpoint)
        distiller.load_kd_state(saved)
        if distiller.methods["crosskd"].adapter is None:
            self.adapter_status = "none (equal widths)"
        elif "crosskd" in saved:
            self.adapter_status = "trained (from the student checkpoint)"
        else:
            self.adapter_status = "untrained (fresh 1x1 convs)"
            LOGGER.warning("analyze: the widths differ and the student checkpoint holds no trained adapter, so the "
                           "cross-head numbers use an untrained 1x1 adapter; pass the distilled student's last.pt")
        return distiller.eval()

    @property
    def two_stage(self) -> bool:
        """A Faster R-CNN student (the Distiller has already refused a dense/two-stage mix)."""
        return getattr(self.distiller.student, "two_stage", False)

    @property
    def level_strides(self) -> list[int]:
        """The levels the numbers are grouped by: the student's FPN levels, or those its RoIs are pooled from."""
        student = self.distiller.student
        return list(student.head.roi_head.strides if self.two_stage else student.strides)

    @torch.no_grad()
    def measure(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """One batch -> levels [N], regions [B, N] and discrepancies [B, N, K] (KINDS order) on the student's priors."""
        if self.two_stage:
            return self.measure_rois(batch)
        d = self.distiller
        s_head, t_head = d.student.head, d.teacher.head
        s_feats = d.student.extract_features(batch.images)
        s_holds, s_out = head_pass(s_head, s_feats, d.kd_idx, d.kd_hold)
        priors = s_head.priors(feat_sizes(s_feats), s_feats[0].device)
        targets = s_head.get_targets(priors, batch, s_out)
        t_holds, t_out = head_pass(t_head, d.teacher.extract_features(batch.images), d.kd_idx, d.kd_hold)
        cross = d.methods["crosskd"].cross_head(t_head, s_holds, t_holds)
        anchors = (t_head.num_anchors, s_head.num_anchors)
        p_student = s_head.flatten_outputs(s_out).cls.sigmoid()  # [B, N, C]
        p_teacher = to_student_priors(t_head.flatten_outputs(t_out).cls.sigmoid(), *anchors)
        p_cross = to_student_priors(t_head.flatten_outputs(cross).cls.sigmoid(), *anchors)
        gt = gt_one_hot(targets.labels, targets.pos_mask, p_student.shape[-1])
        values = torch.stack(
            [discrepancy(p_teacher, p_student), discrepancy(p_teacher, p_cross), discrepancy(gt, p_teacher)], dim=-1
        )  # [B, N, K]
        regions = region_index(targets.pos_mask, targets.label_weights)
        return level_index(priors.num_per_level, values.device), regions, values

    @torch.no_grad()
    def measure_rois(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """A Faster R-CNN batch -> levels [K], regions [1, K] and discrepancies [1, K, KINDS] at the student's K
        sampled training RoIs, on softmax probabilities over C+1 classes (DEFINITIONS_RCNN)."""
        d = self.distiller
        student, roi_head = d.student, d.teacher.head.roi_head
        s_feats = student.extract_features(batch.images)
        sampled = student.sampled_rois(s_feats, batch, student.head.rpn.train_proposals)
        own = student.head.roi_head(student.head.roi_head.pool(s_feats, sampled.rois))
        adapter = d.methods["crosskd"].adapter
        maps = s_feats[: len(roi_head.strides)]
        maps = maps if adapter is None else [adapter(x) for x in maps]  # student width -> teacher width
        cross = frcnn_cross_head(roi_head, maps, d.teacher.extract_features(batch.images), sampled.rois)
        p_student, p_cross, p_teacher = (out.cls_score.float().softmax(dim=1) for out in (own, *cross))  # [K, C+1]
        gt = F.one_hot(sampled.labels, p_teacher.shape[-1]).float()  # background (label C) at negatives
        values = torch.stack(
            [discrepancy(p_teacher, p_student), discrepancy(p_teacher, p_cross), discrepancy(gt, p_teacher)], dim=-1
        )  # [K, KINDS]
        regions = torch.where(sampled.labels < roi_head.num_classes, 0, 1)  # [K]
        levels = roi_levels(sampled.rois[:, 1:], len(roi_head.strides), roi_head.finest_scale)  # [K]
        return levels, regions[None], values[None]

    def run(self) -> dict[str, Any]:
        """Measure the split, print the table, write analysis.json / .csv and the plots; return the JSON dict."""
        save_dir = make_save_dir(self.args, "analyze")  # before measuring: an unwritable folder fails at once
        stats = ConflictStats(len(self.level_strides), self.device)
        for batch in self.loader:
            stats.update(*self.measure(batch.to(self.device)))
        summary = summarize(stats)
        names = level_names(self.level_strides)
        report = self.report_dict(summary, names)
        console.print(results_table(summary, names, report["setup"]))
        write_outputs(report, summary, names, save_dir, self.args.plots)
        LOGGER.info(f"Results saved to {colorstr('bold', str(save_dir))}")
        report["save_dir"] = str(save_dir)
        return report

    def report_dict(self, summary: Summary, names: list[str]) -> dict[str, Any]:
        """Setup, definitions and per-level numbers as plain JSON values."""
        d = self.distiller
        setup = {
            "teacher": self.teacher_source, "student": self.student_runtime.source, "data": str(self.args.data),
            "split": self.args.split, "images": len(self.loader.dataset), "imgsz": self.imgsz,
            "teacher_head": d.teacher.head_type, "student_head": d.student.head_type, "kd_idx": d.kd_idx,
            "kd_align": d.kd_align, "kd_hold": d.kd_hold, "adapter": self.adapter_status,
        }
        definitions = DEFINITIONS_RCNN if self.two_stage else DEFINITIONS
        return {"setup": setup, "definitions": definitions, "conflict_threshold": CONFLICT_THRESHOLD,
                "thresholds": list(THRESHOLDS), "levels": level_records(summary, names)}


def _num(x: Tensor) -> float | None:
    """A float for JSON, None for NaN."""
    value = float(x)
    return None if math.isnan(value) else value


def level_records(summary: Summary, names: list[str]) -> list[dict[str, Any]]:
    """One JSON record per level (and 'all'): per region the count, each kind's statistics and the conflicts."""
    conflict_col = THRESHOLDS.index(CONFLICT_THRESHOLD)
    records = []
    for li, name in enumerate(names):
        record: dict[str, Any] = {"level": name, "fig3_ratio": [_num(v) for v in summary.fig3_ratio[li]]}
        for ri, region in enumerate(REGIONS):
            kinds = {
                kind: {"mean": _num(summary.mean[li, ri, ki]), "median": _num(summary.median[li, ri, ki]),
                       "p90": _num(summary.p90[li, ri, ki]), "max": _num(summary.peak[li, ri, ki]),
                       "hist": summary.coarse_hist[li, ri, ki].tolist()}
                for ki, kind in enumerate(KINDS)
            }
            record[region] = {"locations": int(summary.count[li, ri]), **kinds,
                              "conflict_share": _num(summary.conflict_share[li, ri, conflict_col]),
                              "conflict_share_per_threshold": [_num(v) for v in summary.conflict_share[li, ri]]}
        records.append(record)
    return records


# ----- outputs ---------------------------------------------------------------------------------------------------
def _cell(x: Tensor) -> str:
    return "–" if math.isnan(float(x)) else f"{float(x):.3f}"


def results_table(summary: Summary, names: list[str], setup: dict[str, Any]) -> Table:
    """Rich table: a row per level × region with |Δ| mean / median / p90 of the student and the cross-head."""
    title = (f"Target conflict: teacher {setup['teacher_head']} → student {setup['student_head']}, "
             f"kd_idx={setup['kd_idx']} ({setup['kd_hold']}), adapter {setup['adapter']}, {setup['images']} "
             f"{setup['split']} images")
    caption = (f"|Δ| = max over classes |p_teacher − p| of the student's own head and of the cross-head; conflict: "
               f"max |one-hot GT − p_teacher| > {CONFLICT_THRESHOLD}; Fig. 3 = conflicting locations / positives")
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, padding=(0, 1))
    columns = ("level", "region", "locations", "own\nmean", "own\np50", "own\np90", "cross\nmean", "cross\np50",
               "cross\np90", "conflict", "Fig. 3")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < 2 else "right")
    conflict_col = THRESHOLDS.index(CONFLICT_THRESHOLD)
    student, cross = KINDS.index("student"), KINDS.index("cross_head")
    for li, name in enumerate(names):
        for ri, region in enumerate(REGIONS):
            stats = [_cell(t[li, ri, k]) for k in (student, cross) for t in (summary.mean, summary.median, summary.p90)]
            ratio = _cell(summary.fig3_ratio[li, conflict_col]) if ri == 0 else ""
            table.add_row(name if ri == 0 else "", region, str(int(summary.count[li, ri])), *stats,
                          _cell(summary.conflict_share[li, ri, conflict_col]), ratio,
                          end_section=ri == len(REGIONS) - 1)
    return table


def write_outputs(report: dict[str, Any], summary: Summary, names: list[str], save_dir: Path, plots: bool) -> None:
    """analysis.json, analysis.csv and (with plots) delta_hist.png and conflict.png in `save_dir`."""
    (save_dir / "analysis.json").write_text(json.dumps(report, indent=1))
    write_csv(report, save_dir / "analysis.csv")
    if plots:
        plot_histograms(summary, names, save_dir / "delta_hist.png")
        plot_conflict_curve(summary, names, save_dir / "conflict.png")


def write_csv(report: dict[str, Any], path: Path) -> None:
    """One row per level × region × kind: locations, mean, median, p90, max and the region's conflict share."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["level", "region", "kind", "locations", "mean", "median", "p90", "max", "conflict_share"])
        for record in report["levels"]:
            for region in REGIONS:
                r = record[region]
                for kind in KINDS:
                    k = r[kind]
                    writer.writerow([record["level"], region, kind, r["locations"], k["mean"], k["median"], k["p90"],
                                     k["max"], r["conflict_share"]])


def plot_histograms(summary: Summary, names: list[str], path: Path) -> Path:
    """A panel per level × region: the share of locations per |Δ| bin, student vs cross-head (log scale)."""
    fig = Figure(figsize=(8, 2.2 * len(names)), tight_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), len(REGIONS), squeeze=False)
    edges = torch.linspace(0, 1, PLOT_BINS + 1)
    for li, name in enumerate(names):
        for ri, region in enumerate(REGIONS):
            ax, total = axes[li, ri], int(summary.count[li, ri])
            if total == 0:
                ax.text(0.5, 0.5, "no locations", ha="center", va="center", transform=ax.transAxes)
            else:
                for kind, label in (("student", "student's own head"), ("cross_head", "cross-head")):
                    share = summary.coarse_hist[li, ri, KINDS.index(kind)].double() / total
                    ax.stairs(share.numpy(), edges.numpy(), label=label, linewidth=1.5)
                ax.set_yscale("log")
            ax.set_title(f"{name} {region} (n={int(summary.count[li, ri])})", fontsize=9)
            ax.set_xlabel("|p_teacher − p| (max over classes)", fontsize=8)
    axes[-1, 1].legend(fontsize=8)  # all levels, negatives: the panel that always has locations
    fig.savefig(path, dpi=120)
    return path


def plot_conflict_curve(summary: Summary, names: list[str], path: Path) -> Path:
    """Fig. 3: conflicting locations / positives against the GT-vs-teacher discrepancy threshold, per level."""
    fig = Figure(figsize=(5, 3.5), tight_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for li, name in enumerate(names):
        ax.plot(THRESHOLDS, summary.fig3_ratio[li].numpy(), marker=".", linewidth=2.5 if name == "all" else 1.2,
                label=name)
    ax.set_xlabel("GT–teacher discrepancy threshold")
    ax.set_ylabel("conflict locations / positives")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def run(args: Any) -> dict[str, Any]:
    """Entry for `crosskd analyze teacher=... student=... data=...`: the target conflict per FPN level."""
    return Analyzer(args).run()
