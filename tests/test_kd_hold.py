"""kd_hold (issue 20): the default cross-head pass is the one the reference code computes.

The reference runs each tower block as conv + norm, stores that tensor as the hold feature and then activates it
with mmcv's `nn.ReLU(inplace=True)`, which rewrites the stored tensor: its hold is post-activation, for student and
teacher. `reference_*` below rewrite that per-level pass in plain torch from the notes (crosskd-reference-facts.md
§1, steps 1–3), using only the heads' layers (conv, norm, predictors, Scale); the KD recipes are crosskd's own.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_distill import tiny_batch, tiny_detector
from torch import Tensor

from crosskd.config import get_args
from crosskd.distill import Distiller
from crosskd.distill.kd_losses import KDInputs, prediction_kd
from crosskd.distill.passes import feat_sizes
from crosskd.engine.training.run_state import resume_args
from crosskd.models.heads.base import HeadOutputs

STACKED = 3
HEAD_TYPES = ("gfl", "retinanet", "atss", "fcos")
KD_KEYS = {"gfl": ("kd_cls", "kd_reg"), "retinanet": ("kd_cls", "kd_reg"), "atss": ("kd_cls", "kd_reg", "kd_ctr"),
           "fcos": ("kd_cls", "kd_reg")}


def reference_tower(tower: torch.nn.ModuleList, x: Tensor, idx: int) -> tuple[Tensor, Tensor]:
    """(hold, tower output) of one level: conv → norm → store the hold → in-place ReLU, block after block."""
    hold = x  # idx 0: the FPN feature itself
    for i, block in enumerate(tower):
        x = block.norm(block.conv(x))
        if i + 1 == idx:
            hold = x
        x = F.relu(x, inplace=True)  # mmcv ConvModule's activation: also rewrites `hold` when it is this tensor
    return hold, x


def reference_align(student: Tensor, teacher: Tensor) -> Tensor:
    """Per channel over (N, H, W): (s − mean_s) / (std_s + 1e-6) · std_t + mean_t, unbiased std, teacher detached."""
    dims = (0, 2, 3)
    teacher = teacher.detach()
    s_mean, s_std = student.mean(dims, keepdim=True), student.std(dims, keepdim=True)
    t_mean, t_std = teacher.mean(dims, keepdim=True), teacher.std(dims, keepdim=True)
    return (student - s_mean) / (s_std + 1e-6) * t_std + t_mean


def reference_predictors(head, cls_feat: Tensor, reg_feat: Tensor, level: int) -> tuple:
    """The head type's predictor convs, its level Scale and output transform: (cls, reg, centerness or None)."""
    kind = head.head_type
    if kind == "gfl":
        return head.gfl_cls(cls_feat), head.gfl_reg(reg_feat) * head.scales[level].scale, None
    if kind == "retinanet":
        return head.retina_cls(cls_feat), head.retina_reg(reg_feat), None
    if kind == "atss":
        reg = head.atss_reg(reg_feat) * head.scales[level].scale
        return head.atss_cls(cls_feat), reg, head.atss_centerness(reg_feat)
    reg = torch.exp(head.conv_reg(reg_feat) * head.scales[level].scale)  # FCOS, norm_on_bbox=False
    return head.conv_cls(cls_feat), reg, head.conv_centerness(cls_feat)  # centerness on the cls branch


def reference_head(head, feats: list[Tensor], idx: int) -> tuple[list, HeadOutputs]:
    """Per level the (cls, reg) holds and the head's own outputs, as the reference's single-level forward."""
    holds, levels = [], []
    for level, x in enumerate(feats):
        cls_hold, cls_out = reference_tower(head.cls_convs, x, idx)
        reg_hold, reg_out = reference_tower(head.reg_convs, x, idx)
        holds.append((cls_hold, reg_hold))
        levels.append(reference_predictors(head, cls_out, reg_out, level))
    return holds, as_outputs(levels)


def reference_cross_head(t_head, s_holds: list, t_holds: list, idx: int) -> HeadOutputs:
    """`reuse_teacher_head` per level: align_scale, ReLU when idx ≠ 0, the teacher's convs from idx, predictors."""
    levels = []
    for level, (s_pair, t_pair) in enumerate(zip(s_holds, t_holds)):
        branch_feats = []
        for tower, s_hold, t_hold in zip((t_head.cls_convs, t_head.reg_convs), s_pair, t_pair):
            x = reference_align(s_hold, t_hold)
            if idx != 0:
                x = F.relu(x)
            for block in tower[idx:]:
                x = F.relu(block.norm(block.conv(x)))
            branch_feats.append(x)
        levels.append(reference_predictors(t_head, *branch_feats, level))
    return as_outputs(levels)


def as_outputs(levels: list[tuple]) -> HeadOutputs:
    ctr = [lv[2] for lv in levels] if levels[0][2] is not None else None
    return HeadOutputs([lv[0] for lv in levels], [lv[1] for lv in levels], ctr)


def reference_step(student, teacher, batch, idx: int, distiller: Distiller) -> tuple:
    """The reference's cross-head outputs, KD terms (crosskd's recipes) and their gradient at the student's FPN."""
    feats = student.extract_features(batch.images)
    s_holds, s_out = reference_head(student.head, feats, idx)
    with torch.no_grad():
        t_holds, t_out = reference_head(teacher.head, teacher.extract_features(batch.images), idx)
    cross = reference_cross_head(teacher.head, s_holds, t_holds, idx)
    head = teacher.head
    priors = head.priors(feat_sizes(feats), feats[0].device)
    targets = student.head.get_targets(priors, batch, s_out)
    inputs = KDInputs(head.flatten_outputs(cross), head.flatten_outputs(t_out), priors, targets)
    terms = prediction_kd(inputs, head, distiller.weights)
    grads = torch.autograd.grad(sum(terms.values()), feats)
    return cross, terms, grads


def crosskd_step(distiller: Distiller, batch) -> tuple:
    """The Distiller's cross-head outputs, KD terms and the KD terms' gradient at the student's FPN outputs."""
    method, captured, fpn = distiller.methods["crosskd"], [], []
    run_cross = method.cross_head
    method.cross_head = lambda *args: captured.append(run_cross(*args)) or captured[-1]

    def keep_fpn(_module, _inputs, outs):
        for out in outs:
            out.retain_grad()
        fpn.extend(outs)

    handle = distiller.student.neck.register_forward_hook(keep_fpn)
    losses = distiller(batch)
    handle.remove()
    del method.cross_head
    terms = {k: v for k, v in losses.items() if k.startswith("kd_")}
    sum(terms.values()).backward()
    return captured[0], terms, [f.grad for f in fpn]


def spread_head(detector, seed: int):
    """Re-draw the head's weights at unit-variance scale (the 0.01 init gives near-zero KD gradients) and shift the
    norms, so that the activations after the hold point cut off a real share of every map."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in detector.head.modules():
            if isinstance(module, torch.nn.Conv2d):  # the classifiers' prior-0.01 bias goes too: O(1) logits
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in**0.5)
                if module.bias is not None:
                    module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen))
    return detector.eval()


def tiny_pair(head_type: str) -> tuple:
    """(student, teacher) of `head_type` with STACKED-conv towers and spread head weights."""
    student = spread_head(tiny_detector(head_type, stacked=STACKED, seed=1), 11)
    return student, spread_head(tiny_detector(head_type, stacked=STACKED, seed=2), 12)


def relative(got: list[Tensor], want: list[Tensor]) -> tuple[float, float]:
    """(max |got − want|, ‖got − want‖ / ‖want‖) over a list of tensors (all their elements together)."""
    diff = torch.cat([(a - b).flatten() for a, b in zip(got, want)])
    return diff.abs().max().item(), (diff.norm() / torch.cat([b.flatten() for b in want]).norm()).item()


def max_differences(head_type: str, idx: int, kd_hold: str) -> dict[str, tuple[float, float]]:
    """(absolute, relative) max |crosskd − reference| of the cross-head outputs, each KD term and the FPN gradient."""
    student, teacher = tiny_pair(head_type)
    batch = tiny_batch()
    distiller = Distiller(student, teacher, kd_idx=idx, kd_hold=kd_hold).eval()
    cross, terms, grads = crosskd_step(distiller, batch)
    ref_cross, ref_terms, ref_grads = reference_step(copy.deepcopy(student), teacher, batch, idx, distiller)
    flat, ref_flat = (c.cls_scores + c.bbox_preds + (c.centerness or []) for c in (cross, ref_cross))
    assert terms.keys() == set(KD_KEYS[head_type]) == ref_terms.keys()
    diffs = {"cross": relative(flat, ref_flat)}
    diffs.update({key: relative([terms[key]], [ref_terms[key]]) for key in KD_KEYS[head_type]})
    diffs["fpn_grad"] = relative(grads, ref_grads)
    return diffs


@pytest.mark.parametrize("idx", range(STACKED + 1))
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_default_hold_equals_the_reference_pass(head_type, idx):
    """kd_hold=post (the default): cross-head outputs, KD terms and FPN gradient equal the reference to a relative
    1e-6 (‖Δ‖ / ‖reference‖; what is left is float32 rounding of a different operation order)."""
    diffs = max_differences(head_type, idx, Distiller.__init__.__kwdefaults__["kd_hold"])
    assert max(rel for _, rel in diffs.values()) < 1e-6, diffs


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_pre_activation_hold_differs_from_the_reference(head_type):
    """kd_hold=pre at the default hold point (> 0 here) feeds other features, so the equality above can fail."""
    idx = tiny_detector(head_type, stacked=STACKED).head.default_kd_idx
    assert idx > 0
    diffs = max_differences(head_type, idx, "pre")
    assert diffs["cross"][1] > 1e-2 and diffs["fpn_grad"][1] > 1e-2, diffs
    assert max(diffs[key][1] for key in KD_KEYS[head_type]) > 1e-3, diffs


def test_student_outputs_and_hold_settings_follow_kd_hold():
    """The student's own outputs are its forward under both holds; settings() records the hold; bad values fail."""
    (student, teacher), batch = tiny_pair("gfl"), tiny_batch()
    recorded = []
    student.head.loss = lambda outputs, priors, targets: recorded.append(outputs) or {}
    with torch.no_grad():
        expected = student.eval()(batch.images)
        for hold in ("post", "pre"):
            distiller = Distiller(student, teacher, kd_hold=hold).eval()
            assert distiller.settings()["kd_hold"] == hold
            distiller(batch)
    del student.head.loss
    for outputs in recorded:
        for got, want in zip(outputs.cls_scores + outputs.bbox_preds, expected.cls_scores + expected.bbox_preds):
            assert torch.equal(got, want)
    with pytest.raises(Exception, match="kd_hold='mid' is not valid; use one of post, pre"):
        Distiller(student, teacher, kd_hold="mid")


def test_resuming_a_run_saved_before_kd_hold_keeps_the_pre_activation_hold(tmp_path):
    """A checkpoint's train_args without kd_hold / valid_region resume with `pre` / `image` (how it ran); with the
    keys, their own values."""
    args = get_args({"resume": str(tmp_path / "last.pt")}, "distill")
    saved = get_args({"teacher": "teacher.pt", "kd_hold": "post", "valid_region": "mmdet"}, "distill").to_dict()
    resumed = resume_args(args, saved, tmp_path / "last.pt", "distill")
    assert (resumed.kd_hold, resumed.valid_region) == ("post", "mmdet")
    del saved["kd_hold"], saved["valid_region"]
    resumed = resume_args(args, saved, tmp_path / "last.pt", "distill")
    assert (resumed.kd_hold, resumed.valid_region) == ("pre", "image")
    defaults = get_args({"teacher": "teacher.pt"}, "distill")
    assert (defaults.kd_hold, defaults.valid_region) == ("post", "mmdet")
