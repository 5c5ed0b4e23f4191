"""`crosskd analyze`: the target-conflict statistics of paper Fig. 3 on a tiny digits set, and their pieces."""

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from crosskd import cli
from crosskd.config import get_args
from crosskd.engine.deployment.checkpoint import make_checkpoint, save_checkpoint
from crosskd.engine.tools.analyzer import (
    CONFLICT_THRESHOLD,
    KINDS,
    NUM_BINS,
    THRESHOLDS,
    ConflictStats,
    region_index,
    summarize,
    to_student_priors,
)
from crosskd.engine.tools.analyzer import run as analyze
from crosskd.models import build_detector

NC = 10
STAT_KEYS = ("mean", "median", "p90", "max")


@pytest.fixture(scope="module")
def work(tmp_path_factory, write_digits_yaml) -> Path:
    """A digits data YAML (2 train, 6 val images of 64 px) and a random-weight gfl_r18t teacher checkpoint."""
    root = tmp_path_factory.mktemp("analyze")
    write_digits_yaml(root, num_train=2, num_val=6)
    save_teacher("gfl_r18t", root / "teacher.pt", seed=0)
    return root


def save_teacher(model_cfg, path: Path, seed: int) -> Path:
    """A teacher checkpoint with seeded initial weights (these tests check the measurement, not accuracy)."""
    torch.manual_seed(seed)
    detector = build_detector(model_cfg, NC)
    ckpt = make_checkpoint(detector, epoch=-1, best_fitness=None, names={i: str(i) for i in range(NC)}, train_args={})
    save_checkpoint(ckpt, path)
    return path


def analyze_args(root: Path, name: str, **overrides):
    settings = {"teacher": str(root / "teacher.pt"), "student": "gfl_r18t.yaml", "data": str(root / "data.yaml"),
                "imgsz": 64, "batch": 4, "workers": 0, "device": "cpu", "project": str(root / "runs"),
                "name": name, "exist_ok": True, **overrides}
    return get_args(settings, mode="analyze")


def measured_groups(report: dict):
    """(level, region, record) for every level × region that has locations."""
    return [(lv["level"], region, lv[region]) for lv in report["levels"] for region in ("pos", "neg")
            if lv[region]["locations"]]


def test_numbers_are_finite_in_unit_interval_and_files_are_written(work):
    report = analyze(analyze_args(work, "random_student"))
    groups = measured_groups(report)
    assert {region for _, region, _ in groups} == {"pos", "neg"}
    for _, _, record in groups:
        values = [record[kind][key] for kind in KINDS for key in STAT_KEYS] + [record["conflict_share"]]
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
        assert record["student"]["median"] <= record["student"]["p90"] <= record["student"]["max"]
    levels, overall = report["levels"][:-1], report["levels"][-1]
    assert [lv["level"] for lv in report["levels"]] == ["P3", "P4", "P5", "P6", "P7", "all"]
    assert overall["neg"]["locations"] == sum(lv["neg"]["locations"] for lv in levels)
    assert report["setup"]["adapter"].startswith("none")

    save_dir = Path(report["save_dir"])
    assert save_dir == work / "runs" / "random_student"
    assert {p.name for p in save_dir.iterdir()} >= {"analysis.json", "analysis.csv", "delta_hist.png", "conflict.png"}
    saved = json.loads((save_dir / "analysis.json").read_text())
    assert saved["levels"] == report["levels"] and saved["conflict_threshold"] == CONFLICT_THRESHOLD
    with open(save_dir / "analysis.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 * 2 * len(KINDS)
    assert float(rows[0]["mean"]) == pytest.approx(report["levels"][0]["pos"]["student"]["mean"])


def test_a_student_that_is_the_teacher_has_zero_discrepancy_and_an_untrained_teacher_conflicts_on_positives(work):
    for kd_idx in (0, 1):
        report = analyze(analyze_args(work, f"same_{kd_idx}", student=str(work / "teacher.pt"), kd_idx=kd_idx,
                                       plots=False))
        for _, _, record in measured_groups(report):
            assert record["student"]["max"] < 1e-5
            assert record["cross_head"]["max"] < 1e-4  # align_scale's eps leaves ~1e-7
    overall = report["levels"][-1]
    # A near-initial teacher gives every class ~0.01: each positive contradicts its GT, no negative does.
    assert overall["pos"]["conflict_share"] == 1.0 and overall["neg"]["conflict_share"] == 0.0
    assert overall["fig3_ratio"] == [1.0] * len(THRESHOLDS)


def test_a_wider_retinanet_teacher_is_mapped_to_the_student_priors_and_its_adapter_is_reported_untrained(work):
    cfg = {"backbone": {"type": "resnet", "depth": 18, "width": 0.25},
           "neck": {"type": "fpn", "out_channels": 48, "num_outs": 5},
           "head": {"type": "retinanet", "stacked_convs": 1, "feat_channels": 48, "norm": "none"}}
    path = work / "retina.yaml"
    path.write_text(yaml.safe_dump(cfg))
    save_teacher(path, work / "retina.pt", seed=1)
    report = analyze(analyze_args(work, "retina", teacher=str(work / "retina.pt"), kd_idx=1, plots=False))
    assert report["setup"]["teacher_head"] == "retinanet" and report["setup"]["adapter"].startswith("untrained")
    for _, _, record in measured_groups(report):
        assert all(0.0 <= record[kind]["mean"] <= 1.0 for kind in KINDS)


def test_stats_of_hand_made_values():
    stats = ConflictStats(num_levels=2, device=torch.device("cpu"))
    levels = torch.tensor([0, 0, 0, 1])
    regions = torch.tensor([[0, 0, 1, -1]])  # two positives and a negative at level 0; level 1 left out
    values = torch.tensor([[[0.1, 0.0, 0.9], [0.3, 0.2, 0.4], [0.05, 0.0, 0.7], [1.0, 1.0, 1.0]]])  # [1, 4, K]
    stats.update(levels, regions, values)
    s = summarize(stats)
    assert s.count.tolist() == [[2, 1], [0, 0], [2, 1]]
    student, conflict_col = KINDS.index("student"), THRESHOLDS.index(CONFLICT_THRESHOLD)
    assert s.mean[0, 0, student].item() == pytest.approx(0.2)
    assert s.peak[0, 0, student].item() == pytest.approx(0.3)
    assert s.median[0, 1, student].item() == pytest.approx(0.05)  # one value: the quantile is capped at the max
    assert abs(s.p90[0, 0, student].item() - 0.3) <= 1 / NUM_BINS
    assert s.conflict_share[0, :, conflict_col].tolist() == [0.5, 1.0]  # 0.9 of two positives; 0.7 of one negative
    assert s.fig3_ratio[0, conflict_col].item() == 1.0  # (1 + 1) conflicts / 2 positives
    assert math.isnan(s.mean[1, 0, student].item()) and math.isnan(s.fig3_ratio[1, 0].item())
    assert s.coarse_hist[2, 0, student].sum().item() == 2


def test_teacher_anchors_reduce_by_max_per_location():
    probs = torch.tensor([[[0.1, 0.7], [0.4, 0.2], [0.3, 0.3], [0.9, 0.0]]])  # [1, 2 locations × 2 anchors, 2]
    assert torch.equal(to_student_priors(probs, 2, 1), torch.tensor([[[0.4, 0.7], [0.9, 0.3]]]))
    assert to_student_priors(probs, 2, 2).shape == (1, 4, 2)
    assert to_student_priors(probs, 1, 1) is probs


def test_priors_in_another_images_padding_are_left_out():
    head = build_detector("gfl_r18t", NC).head
    priors = head.priors([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], "cpu")  # a 64 × 64 padded batch
    batch = SimpleNamespace(gt_boxes=torch.tensor([[[8.0, 8.0, 30.0, 30.0]]] * 2), gt_labels=torch.tensor([[3], [3]]),
                            img_sizes=torch.tensor([[64, 64], [64, 32]]))  # (h, w): the second image is 32 px wide
    targets = head.get_targets(priors, batch)
    regions = region_index(targets.pos_mask, targets.label_weights)  # [2, N]
    positives = (regions == 0).sum(1).tolist()
    assert (regions[0] >= 0).all() and positives[0] == positives[1] > 0  # the box lies inside both images
    cell_x = torch.floor(priors.points[:, 0] / priors.strides) * priors.strides  # [N] left edge of each grid cell
    assert torch.equal(regions[1] == -1, cell_x >= 32)  # 32 + 8 + 2 priors of P3, P4, P5 lie in the padding


@pytest.mark.parametrize(("words", "fragment"), [
    (["analyze", "student=gfl_r18t.yaml"], "'analyze' needs teacher="),
    (["analyze", "teacher=missing.pt", "student=gfl_r18t.yaml"], "teacher 'missing.pt' not found"),
])
def test_bad_input_is_one_line(capsys, work, words, fragment):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*words, f"data={work / 'data.yaml'}", "imgsz=64", "workers=0", "device=cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: ") and fragment in err[0]


def test_kd_hold_comes_from_the_setting_else_the_distilled_students_checkpoint(work):
    """A plain student gets the default (post); a distilled one its kd_args' hold, `pre` when they predate kd_hold;
    kd_hold= on the command line wins. The hold changes the cross-head numbers."""
    torch.manual_seed(1)
    student = build_detector("gfl_r18t", NC)
    for name, kd_args in (("plain", None), ("old", {"kd_idx": 1}), ("new", {"kd_idx": 1, "kd_hold": "post"})):
        ckpt = make_checkpoint(student, epoch=-1, best_fitness=None, names={i: str(i) for i in range(NC)},
                               train_args={})
        if kd_args is not None:
            ckpt["kd_args"] = kd_args
        save_checkpoint(ckpt, work / f"student_{name}.pt")
    holds, cross_means = {}, {}
    for name, overrides in (("plain", {}), ("old", {}), ("new", {}), ("old", {"kd_hold": "post"})):
        run = f"hold_{name}_{len(overrides)}"
        args = analyze_args(work, run, student=str(work / f"student_{name}.pt"), kd_idx=1, plots=False, **overrides)
        report = analyze(args)
        holds[run] = report["setup"]["kd_hold"]
        cross_means[run] = report["levels"][-1]["neg"]["cross_head"]["mean"]
    assert holds == {"hold_plain_0": "post", "hold_old_0": "pre", "hold_new_0": "post", "hold_old_1": "post"}
    assert cross_means["hold_old_1"] == cross_means["hold_new_0"] != cross_means["hold_old_0"]


def test_a_faster_rcnn_pair_is_measured_at_the_students_sampled_rois(work):
    save_teacher("faster_rcnn_r18s.yaml", work / "frcnn.pt", seed=0)
    frcnn = str(work / "frcnn.pt")
    report = analyze(analyze_args(work, "frcnn_same", teacher=frcnn, student=frcnn, plots=False))
    assert [lv["level"] for lv in report["levels"]] == ["P2", "P3", "P4", "P5", "all"]  # the RoIAlign levels
    assert report["definitions"]["regions"] == "positive / negative RoIs of the student's R-CNN sampler"
    overall = report["levels"][-1]
    assert overall["pos"]["locations"] > 0 and overall["neg"]["locations"] > overall["pos"]["locations"]
    for _, _, record in measured_groups(report):  # the same model: its own head and the cross-head are the teacher
        assert record["student"]["max"] == 0.0 and record["cross_head"]["max"] == 0.0
    # An initial R-CNN classifier gives each of the C+1 classes ~1/11: every RoI contradicts its label (the
    # background at negatives), so negatives conflict too, unlike a dense head's all-zero negatives.
    assert overall["pos"]["conflict_share"] == 1.0 and overall["neg"]["conflict_share"] == 1.0

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "cfg/models/faster_rcnn_r18s.yaml").read_text())
    cfg["neck"]["out_channels"] = cfg["head"]["rpn_feat_channels"] = 96
    (work / "frcnn_wide.yaml").write_text(yaml.safe_dump(cfg))
    save_teacher(work / "frcnn_wide.yaml", work / "frcnn_wide.pt", seed=1)
    wide = analyze(analyze_args(work, "frcnn_wide", teacher=str(work / "frcnn_wide.pt"),
                                student="faster_rcnn_r18s.yaml", plots=False))
    assert wide["setup"]["adapter"].startswith("untrained")  # 64 -> 96 channels before the teacher's RoIAlign
    for _, _, record in measured_groups(wide):
        assert all(0.0 <= record[kind]["mean"] <= 1.0 for kind in KINDS)
        assert record["student"]["mean"] > 0.0 and record["cross_head"]["mean"] > 0.0
