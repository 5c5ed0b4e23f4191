"""MMDetection checkpoints: key lists and shapes written from MMDetection's module structure land on our tensors.

The source state dicts are built here from a spec of MMDetection's modules (ResNet/Swin backbones, FPN with
lateral_convs/fpn_convs, the four dense heads), never by inverting crosskd's key map, so a wrong map fails.
"""

import re

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosskd.config import get_args
from crosskd.engine.deployment import exporter
from crosskd.engine.deployment.checkpoint import make_checkpoint, save_checkpoint
from crosskd.engine.deployment.exporter import ExportModel
from crosskd.errors import CheckpointError, ConfigError
from crosskd.models import build_detector
from crosskd.models.backbones import ResNet
from crosskd.models.foreign.mmdet import (
    is_mmdet_checkpoint,
    load_mmdet,
    mmdet_class_names,
    mmdet_key_map,
    mmdet_model_cfg,
    mmdet_transforms,
)

Shapes = dict[str, tuple[int, ...]]
RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
PREDICTORS = {  # MMDet predictor name -> outputs per anchor (None: num_classes)
    "gfl": {"gfl_cls": None, "gfl_reg": 68},
    "retinanet": {"retina_cls": None, "retina_reg": 4},
    "fcos": {"conv_cls": None, "conv_reg": 4, "conv_centerness": 1},
    "atss": {"atss_cls": None, "atss_reg": 4, "atss_centerness": 1},
}
COCO_FIRST = ("person", "bicycle", "car")
SWIN_BLOCK_MODULES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.w_msa": "attn",  # relative_position_bias_table / _index
    "attn.w_msa.qkv": "attn.qkv",
    "attn.w_msa.proj": "attn.proj",
    "ffn.layers.0.0": "mlp.0",
    "ffn.layers.1": "mlp.3",
}


# ----- MMDetection's module structure, as a spec ----------------------------------------------------------
def conv(name: str, out: int, inp: int, k: int, bias: bool = True) -> Shapes:
    return {f"{name}.weight": (out, inp, k, k), **({f"{name}.bias": (out,)} if bias else {})}


def bn(name: str, c: int) -> Shapes:
    stats = {f"{name}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")}
    return {**stats, f"{name}.num_batches_tracked": ()}


def ln(name: str, c: int) -> Shapes:
    return {f"{name}.weight": (c,), f"{name}.bias": (c,)}


def linear(name: str, out: int, inp: int, bias: bool = True) -> Shapes:
    return {f"{name}.weight": (out, inp), **({f"{name}.bias": (out,)} if bias else {})}


def mmdet_resnet(depth: int, base: int = 64) -> tuple[Shapes, list[int]]:
    """mmdet.models.backbones.ResNet (base_channels=base; style 'pytorch' and 'caffe' alike): keys, 4 stage widths."""
    bottleneck, expansion = depth >= 50, 4 if depth >= 50 else 1
    keys = {**conv("backbone.conv1", base, 3, 7, bias=False), **bn("backbone.bn1", base)}
    inplanes, widths = base, []
    for stage, blocks in enumerate(RESNET_BLOCKS[depth]):
        planes = base * 2**stage
        for b in range(blocks):
            p = f"backbone.layer{stage + 1}.{b}"
            if bottleneck:
                keys |= conv(f"{p}.conv1", planes, inplanes, 1, False) | bn(f"{p}.bn1", planes)
                keys |= conv(f"{p}.conv2", planes, planes, 3, False) | bn(f"{p}.bn2", planes)
                keys |= conv(f"{p}.conv3", planes * 4, planes, 1, False) | bn(f"{p}.bn3", planes * 4)
            else:
                keys |= conv(f"{p}.conv1", planes, inplanes, 3, False) | bn(f"{p}.bn1", planes)
                keys |= conv(f"{p}.conv2", planes, planes, 3, False) | bn(f"{p}.bn2", planes)
            if b == 0 and (stage > 0 or inplanes != planes * expansion):
                keys |= conv(f"{p}.downsample.0", planes * expansion, inplanes, 1, False)
                keys |= bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
        widths.append(inplanes)
    return keys, widths


def mmdet_swin_t(out_indices: tuple[int, ...] = (1, 2, 3)) -> tuple[Shapes, list[int]]:
    """mmdet.models.backbones.SwinTransformer (Swin-T, window 7, patch_norm): keys and the 4 stage widths."""
    keys = conv("backbone.patch_embed.projection", 96, 3, 4) | ln("backbone.patch_embed.norm", 96)
    widths = [96 * 2**i for i in range(4)]
    for i, (depth, heads) in enumerate(zip((2, 2, 6, 2), (3, 6, 12, 24))):
        c = widths[i]
        for j in range(depth):
            p = f"backbone.stages.{i}.blocks.{j}"
            keys |= ln(f"{p}.norm1", c) | ln(f"{p}.norm2", c)
            keys[f"{p}.attn.w_msa.relative_position_bias_table"] = (169, heads)
            keys[f"{p}.attn.w_msa.relative_position_index"] = (49, 49)
            keys |= linear(f"{p}.attn.w_msa.qkv", 3 * c, c) | linear(f"{p}.attn.w_msa.proj", c, c)
            keys |= linear(f"{p}.ffn.layers.0.0", 4 * c, c) | linear(f"{p}.ffn.layers.1", c, 4 * c)
        if i < 3:
            keys |= ln(f"backbone.stages.{i}.downsample.norm", 4 * c)
            keys |= linear(f"backbone.stages.{i}.downsample.reduction", 2 * c, 4 * c, bias=False)
    for i in out_indices:
        keys |= ln(f"backbone.norm{i}", widths[i])
    return keys, widths


def mmdet_fpn(in_channels: list[int], out: int, num_outs: int, on_input: bool) -> Shapes:
    """mmdet.models.necks.FPN over the used levels (start_level applied): ConvModules without norm keep a bias."""
    keys: Shapes = {}
    for i, c in enumerate(in_channels):
        keys |= conv(f"neck.lateral_convs.{i}.conv", out, c, 1) | conv(f"neck.fpn_convs.{i}.conv", out, out, 3)
    for j in range(num_outs - len(in_channels)):
        first_in = in_channels[-1] if on_input and j == 0 else out
        keys |= conv(f"neck.fpn_convs.{len(in_channels) + j}.conv", out, first_in, 3)
    return keys


def mmdet_head(
    kind: str, nc: int, in_ch: int, feat: int, stacked: int, gn: bool, anchors: int = 1, conv_bias: bool = False
) -> Shapes:
    """GFLHead / RetinaHead / FCOSHead / ATSSHead: ConvModule towers (conv + gn, or conv with bias), predictors."""
    keys: Shapes = {}
    for branch in ("cls", "reg"):
        for i in range(stacked):
            p = f"bbox_head.{branch}_convs.{i}"
            keys |= conv(f"{p}.conv", feat, in_ch if i == 0 else feat, 3, bias=conv_bias or not gn)
            keys |= ln(f"{p}.gn", feat) if gn else {}
    for name, per_anchor in PREDICTORS[kind].items():
        keys |= conv(f"bbox_head.{name}", anchors * (per_anchor or nc), feat, 3)
    if kind != "retinanet":
        keys |= {f"bbox_head.scales.{i}.scale": () for i in range(5)}
    if kind == "gfl":
        keys["bbox_head.integral.project"] = (17,)
    return keys


def mmdet_detector(kind: str, backbone: str, nc: int = 80, **small) -> Shapes:
    """The full MMDet state dict spec of one shipped model (small=... for the r18s variants: base, out, feat)."""
    if backbone == "swin_t":
        keys, widths = mmdet_swin_t()
    else:
        keys, widths = mmdet_resnet(int(backbone[1:]), small.get("base", 64))
    out, feat, stacked = small.get("out", 256), small.get("feat", 256), small.get("stacked", 4)
    on_input = kind == "retinanet"
    keys |= mmdet_fpn(widths[1:], out, 5, on_input)
    keys |= mmdet_head(kind, nc, out, feat, stacked, gn=kind != "retinanet", anchors=9 if kind == "retinanet" else 1)
    return keys


# ----- where each MMDet tensor must land -------------------------------------------------------------------
def swin_target(key: str) -> str:
    """torchvision swin_t name (features.i / our norms.k) of an MMDet SwinTransformer key (out_indices 1, 2, 3)."""
    if match := re.fullmatch(r"patch_embed\.(projection|norm)\.(\w+)", key):
        return f"features.0.{0 if match[1] == 'projection' else 2}.{match[2]}"
    if match := re.fullmatch(r"norm(\d)\.(\w+)", key):
        return f"norms.{int(match[1]) - 1}.{match[2]}"
    if match := re.fullmatch(r"stages\.(\d)\.downsample\.(.+)", key):
        return f"features.{2 * int(match[1]) + 2}.{match[2]}"
    stage, block, module, param = re.fullmatch(r"stages\.(\d)\.blocks\.(\d)\.(.+)\.(\w+)", key).groups()
    return f"features.{2 * int(stage) + 1}.{block}.{SWIN_BLOCK_MODULES[module]}.{param}"


def expected_target(key: str, num_levels: int = 3) -> str:
    """Our state_dict name for an MMDet key, written from crosskd's module names (docs/teachers.md table)."""
    section, rest = key.split(".", 1)
    if section == "backbone":
        return "backbone." + (swin_target(rest) if rest.startswith(("patch_embed", "stages", "norm")) else rest)
    if section == "neck":
        kind, i, _, param = rest.split(".")
        if kind == "lateral_convs":
            return f"neck.fpn.inner_blocks.{i}.0.{param}"
        if int(i) < num_levels:
            return f"neck.fpn.layer_blocks.{i}.0.{param}"
        return f"neck.fpn.extra_blocks.convs.{int(i) - num_levels}.{param}"
    return "head." + rest.replace(".gn.", ".norm.")


def make_source(shapes: Shapes) -> dict[str, Tensor]:
    """Distinct values for every tensor: seeded normals (ints for BN counters, MMDet's own Swin position index)."""
    gen = torch.Generator().manual_seed(0)
    source = {}
    for i, (key, shape) in enumerate(shapes.items()):
        if key.endswith("num_batches_tracked"):
            source[key] = torch.tensor(1000 + i)
        elif key.endswith("relative_position_index"):
            source[key] = mmdet_relative_position_index(7)
        else:
            source[key] = torch.randn(shape, generator=gen)
    return source


def mmdet_relative_position_index(window: int) -> Tensor:
    """WindowMSA's buffer as MMDetection computes it: a double-step sequence plus its transpose, flipped."""
    coords = (torch.arange(0, (2 * window - 1) * window, 2 * window - 1)[:, None] + torch.arange(window)).reshape(1, -1)
    return (coords + coords.T).flip(1).contiguous()  # [49, 49]


def mmdet_patch_merging(x: Tensor, norm_w: Tensor, norm_b: Tensor, reduction: Tensor) -> Tensor:
    """MMDetection PatchMerging on [B, H, W, C]: nn.Unfold(2, stride 2) -> LayerNorm -> Linear (no bias)."""
    b, h, w, c = x.shape
    cols = nn.functional.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2)  # [B, 4C, L]
    cols = cols.transpose(1, 2)  # [B, L, 4C] channel-major, 4 slots per channel
    cols = nn.functional.layer_norm(cols, (4 * c,), norm_w, norm_b)
    return (cols @ reduction.T).reshape(b, h // 2, w // 2, 2 * c)


def check_every_tensor_lands(detector: nn.Module, source: dict[str, Tensor], num_levels: int = 3) -> int:
    """Every source tensor (but the derived ones) equals its expected target; returns how many were compared."""
    ours = detector.state_dict()
    compared = 0
    for key, tensor in source.items():
        if key == "bbox_head.integral.project" or "downsample.reduction" in key or "downsample.norm" in key:
            continue
        target = ours[expected_target(key, num_levels)]
        assert torch.equal(target, tensor.reshape(target.shape).to(target.dtype)), key
        compared += 1
    return compared


def mmdet_ckpt(source: dict[str, Tensor], meta: dict | None = None) -> dict:
    return {"state_dict": source, "meta": meta if meta is not None else {"mmdet_version": "2.25.0"}}


SMALL = {"base": 32, "out": 64, "feat": 64, "stacked": 2}


# ----- fast: the small shipped variants --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gfl", "retinanet", "fcos", "atss"])
def test_small_variant_every_tensor_lands(kind):
    source = make_source(mmdet_detector(kind, "r18", nc=3, **SMALL))
    detector = load_mmdet(mmdet_ckpt(source), f"{kind}_r18s.yaml", "small.pth")
    assert detector.nc == 3 and detector.names == {0: "0", 1: "1", 2: "2"}
    derived = 1 if kind == "gfl" else 0
    assert check_every_tensor_lands(detector, source) == len(source) - derived
    assert len(detector.state_dict()) == len(source) - derived  # nothing of ours kept its initial value


def test_problems_end_in_one_counted_line():
    source = make_source(mmdet_detector("gfl", "r18", nc=3, **SMALL))
    source["bbox_head.extra.weight"] = torch.zeros(1)
    source["neck.fpn_convs.0.conv.weight"] = torch.zeros(64, 64, 1, 1)
    del source["bbox_head.gfl_cls.bias"]
    with pytest.raises(CheckpointError) as error:
        load_mmdet(mmdet_ckpt(source), "gfl_r18s.yaml", "gfl.pth")
    message = str(error.value)
    assert "\n" not in message and message.startswith("'gfl.pth' does not fit this model")
    assert "1 unexpected (bbox_head.extra.weight)" in message
    assert "1 mis-shaped (neck.fpn_convs.0.conv.weight (64, 64, 1, 1)->(64, 64, 3, 3))" in message
    assert "1 missing (head.gfl_cls.bias)" in message


def test_wrong_head_yaml_is_one_line():
    source = make_source(mmdet_detector("retinanet", "r18", nc=3, **SMALL))
    with pytest.raises(CheckpointError, match="no bbox_head.gfl_cls.weight") as error:
        load_mmdet(mmdet_ckpt(source), "gfl_r18s.yaml", "retina.pth")
    assert "\n" not in str(error.value)


def test_ema_copies_and_module_prefix_are_ignored():
    source = make_source(mmdet_detector("atss", "r18", nc=2, **SMALL))
    wrapped = {f"module.{k}": v for k, v in source.items()}
    wrapped["ema_bbox_head_atss_cls_weight"] = torch.zeros(1)
    detector = load_mmdet(mmdet_ckpt(wrapped), "atss_r18s.yaml", "atss.pth")
    assert check_every_tensor_lands(detector, source) == len(source)


# ----- recognition and meta ----------------------------------------------------------------------------------
def test_recognises_2x_and_3x_meta_only():
    state = {"backbone.conv1.weight": torch.zeros(1), "bbox_head.gfl_cls.weight": torch.zeros(1)}
    v2 = {
        "state_dict": {"backbone.conv1.weight": torch.zeros(1)},
        "meta": {"mmdet_version": "2.28.2", "CLASSES": COCO_FIRST},
    }
    v3 = {"state_dict": state, "meta": {"mmengine_version": "0.7.3", "dataset_meta": {"classes": COCO_FIRST}}}
    assert is_mmdet_checkpoint(v2) and is_mmdet_checkpoint(v3)
    assert mmdet_class_names(v2) == mmdet_class_names(v3) == {0: "person", 1: "bicycle", 2: "car"}
    mmseg = {
        "state_dict": {"backbone.conv1.weight": 1, "decode_head.conv_seg.weight": 1},
        "meta": {"mmengine_version": "0.7.3"},
    }
    crosskd_ckpt = {"model": state, "model_yaml": {}, "names": {0: "a"}}
    torchvision_state = {"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}
    assert not any(map(is_mmdet_checkpoint, (mmseg, crosskd_ckpt, torchvision_state, [1, 2], None)))
    assert mmdet_class_names({"state_dict": state}) is None


# gfl_r101_fpn_ms-2x_coco's model section as MMDetection 2.x stores it in meta['config'] (Config.pretty_text)
GFL_R101_CONFIG = """
model = dict(
    type='GFL',
    backbone=dict(
        type='ResNet',
        depth=101,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet101')),
    neck=dict(
        type='FPN',
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        start_level=1,
        add_extra_convs='on_output',
        num_outs=5),
    bbox_head=dict(
        type='GFLHead',
        num_classes=80,
        in_channels=256,
        stacked_convs=4,
        feat_channels=256,
        anchor_generator=dict(
            type='AnchorGenerator',
            ratios=[1.0],
            octave_base_scale=8,
            scales_per_octave=1,
            strides=[8, 16, 32, 64, 128]),
        loss_cls=dict(
            type='QualityFocalLoss',
            use_sigmoid=True,
            beta=2.0,
            loss_weight=1.0),
        loss_dfl=dict(type='DistributionFocalLoss', loss_weight=0.25),
        reg_max=16,
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0)),
    train_cfg=dict(
        assigner=dict(type='ATSSAssigner', topk=9),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    test_cfg=dict(
        nms_pre=1000,
        min_bbox_size=0,
        score_thr=0.05,
        nms=dict(type='nms', iou_threshold=0.6),
        max_per_img=100))
dataset_type = 'CocoDataset'
"""


def test_config_text_picks_and_adjusts_the_shipped_yaml():
    cfg = mmdet_model_cfg({"state_dict": {}, "meta": {"config": GFL_R101_CONFIG}})
    assert cfg["name"] == "gfl_r101" and cfg["head"]["type"] == "gfl" and cfg["head"]["reg_max"] == 16
    assert cfg["backbone"] == {
        "type": "resnet",
        "depth": 101,
        "width": 1.0,
        "out_indices": [1, 2, 3],
        "frozen_stages": 1,
        "norm_eval": True,
    }
    assert cfg["neck"]["add_extra_convs"] == "on_output" and cfg["neck"]["relu_before_extra_convs"] is False
    altered = GFL_R101_CONFIG.replace("stacked_convs=4", "stacked_convs=2").replace("reg_max=16", "reg_max=8")
    v3_cfg = mmdet_model_cfg({"state_dict": {}, "meta": {"cfg": altered, "mmengine_version": "0.7.3"}})
    assert (v3_cfg["head"]["stacked_convs"], v3_cfg["head"]["reg_max"]) == (2, 8)
    assert mmdet_model_cfg({"state_dict": {}, "meta": {"mmdet_version": "2.0"}}) is None


def test_small_gfl_loads_from_its_embedded_config_alone():
    text = (
        GFL_R101_CONFIG.replace("depth=101", "depth=18, base_channels=32")
        .replace("[256, 512, 1024, 2048]", "[32, 64, 128, 256]")
        .replace("out_channels=256", "out_channels=64")
        .replace("in_channels=256", "in_channels=64")
        .replace("feat_channels=256", "feat_channels=64")
        .replace("stacked_convs=4,", "stacked_convs=2, norm_cfg=dict(type='GN', num_groups=16),")
    )
    source = make_source(mmdet_detector("gfl", "r18", nc=3, **SMALL))
    meta = {"mmengine_version": "0.7.3", "cfg": text, "dataset_meta": {"classes": COCO_FIRST}}
    detector = load_mmdet(mmdet_ckpt(source, meta), None, "gfl_small.pth")
    assert detector.names == {0: "person", 1: "bicycle", 2: "car"}
    assert detector.backbone.pretrained is None
    assert check_every_tensor_lands(detector, source) == len(source) - 1


def test_without_config_or_yaml_and_a_yaml_of_the_other_resnet_style_are_one_line():
    source = make_source(mmdet_detector("fcos", "r18", nc=3, **SMALL))
    with pytest.raises(CheckpointError, match="model_cfg= .teacher_cfg= for teacher=") as error:
        load_mmdet(mmdet_ckpt(source), None, "fcos.pth")
    assert "\n" not in str(error.value)
    caffe = GFL_R101_CONFIG.replace("style='pytorch'", "style='caffe'")
    with pytest.raises(CheckpointError, match="caffe-style ResNet .* set backbone.style: caffe") as error:
        load_mmdet(mmdet_ckpt(source, {"config": caffe}), "fcos_r18s.yaml", "fcos_caffe.pth")
    assert "\n" not in str(error.value)


# ----- full-size shipped models ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "yaml_name, kind, backbone",
    [
        ("gfl_r50", "gfl", "r50"),
        ("gfl_r101", "gfl", "r101"),
        ("retinanet_r50", "retinanet", "r50"),
        ("fcos_r50", "fcos", "r50"),
        ("atss_r50", "atss", "r50"),
    ],
)
def test_full_size_resnet_models_every_tensor_lands(yaml_name, kind, backbone):
    source = make_source(mmdet_detector(kind, backbone))
    detector = load_mmdet(mmdet_ckpt(source), yaml_name, f"{yaml_name}.pth")
    derived = 1 if kind == "gfl" else 0
    assert detector.nc == 80 and check_every_tensor_lands(detector, source) == len(source) - derived
    assert len(detector.state_dict()) == len(source) - derived


def test_swin_t_key_names_and_patch_merging_reorder_on_tiny_tensors():
    """The slow full-size Swin-T test below on no weights: the shipped model built on the meta device gives the real
    key map, and the PatchMerging 4C reorder and the position index are checked on a 4-channel merge."""
    from torchvision.models.swin_transformer import PatchMerging, ShiftedWindowAttention

    with torch.device("meta"):
        detector = build_detector("retinanet_swint.yaml", nc=80)
    key_map = mmdet_key_map(detector)
    spec, _ = mmdet_swin_t()
    assert {k: v for k, v in key_map.items() if k.startswith("backbone.")} == {k: expected_target(k) for k in spec}
    transforms = mmdet_transforms(key_map)
    assert sum("downsample" in key for key in transforms) == 9  # 3 PatchMergings x (reduction, norm weight, bias)
    gen = torch.Generator().manual_seed(0)
    channels, p = 4, "backbone.stages.0.downsample"
    source = {f"{p}.norm.weight": torch.randn(4 * channels, generator=gen),
              f"{p}.norm.bias": torch.randn(4 * channels, generator=gen),
              f"{p}.reduction.weight": torch.randn(2 * channels, 4 * channels, generator=gen)}
    merging = PatchMerging(channels)  # torchvision's, as in swin_t's features
    merging.load_state_dict({key.removeprefix(f"{p}."): transforms[key](t) for key, t in source.items()})
    x = torch.randn(2, 4, 6, channels, generator=gen)  # [B, H, W, C]
    torch.testing.assert_close(merging(x), mmdet_patch_merging(x, *source.values()), rtol=1e-5, atol=1e-5)
    index = transforms["backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"]
    attention = ShiftedWindowAttention(8, [7, 7], [0, 0], num_heads=2)
    assert torch.equal(index(mmdet_relative_position_index(7)), attention.relative_position_index)


@pytest.mark.slow
def test_full_size_retinanet_swint_every_tensor_lands_and_patch_merging_matches_mmdet():
    source = make_source(mmdet_detector("retinanet", "swin_t"))
    detector = load_mmdet(mmdet_ckpt(source), "retinanet_swint.yaml", "swin.pth")
    assert check_every_tensor_lands(detector, source) == len(source) - 9  # 3 PatchMergings x 3, checked below
    assert len(detector.state_dict()) == len(source)
    features = detector.backbone.features
    gen = torch.Generator().manual_seed(1)
    for stage in range(3):
        x = torch.randn(2, 8, 6, 96 * 2**stage, generator=gen)  # [B, H, W, C]
        p = f"backbone.stages.{stage}.downsample"
        ref = mmdet_patch_merging(
            x, source[f"{p}.norm.weight"], source[f"{p}.norm.bias"], source[f"{p}.reduction.weight"]
        )
        torch.testing.assert_close(features[2 * stage + 2](x), ref, rtol=1e-4, atol=1e-4)
    attn = features[1][0].attn
    assert torch.equal(attn.relative_position_index, mmdet_relative_position_index(7).reshape(-1))


# fcos_r18_fpn_gn-head-center-normbbox-centeronreg-giou_8xb8-amp-lsj-200e_coco (MMDet 3.x), narrowed to base 32
FCOS_TRICKS_CONFIG = """
model = dict(
    type='FCOS',
    backbone=dict(type='ResNet', depth=18, base_channels=32, num_stages=4, out_indices=(0, 1, 2, 3),
                  frozen_stages=1, norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True, style='pytorch'),
    neck=dict(type='FPN', in_channels=[32, 64, 128, 256], out_channels=64, start_level=1,
              add_extra_convs='on_output', num_outs=5, relu_before_extra_convs=True),
    bbox_head=dict(type='FCOSHead', num_classes=80, in_channels=64, stacked_convs=2, feat_channels=64,
                   norm_cfg=dict(type='GN', num_groups=16, requires_grad=True), strides=[8, 16, 32, 64, 128],
                   norm_on_bbox=True, centerness_on_reg=True, dcn_on_last_conv=False, center_sampling=True,
                   conv_bias=True, loss_bbox=dict(type='GIoULoss', loss_weight=1.0)))
"""


def test_fcos_tricks_config_keeps_tower_conv_biases():
    cfg = mmdet_model_cfg({"state_dict": {}, "meta": {"cfg": FCOS_TRICKS_CONFIG}})
    head = cfg["head"]
    assert (head["conv_bias"], head["norm_on_bbox"], head["centerness_on_reg"], head["box_loss"]) == (
        True,
        True,
        True,
        "giou",
    )
    assert cfg["neck"]["relu_before_extra_convs"] is True and cfg["backbone"]["width"] == 0.5
    keys, widths = mmdet_resnet(18, 32)
    keys |= mmdet_fpn(widths[1:], 64, 5, on_input=False) | mmdet_head("fcos", 3, 64, 64, 2, gn=True, conv_bias=True)
    source = make_source(keys)
    detector = load_mmdet(mmdet_ckpt(source, {"cfg": FCOS_TRICKS_CONFIG}), None, "fcos_tricks.pth")
    assert detector.head.cls_convs[0].conv.bias is not None
    assert check_every_tensor_lands(detector, source) == len(source) == len(detector.state_dict())


# ----- caffe-style ResNet (MMDetection's plain FCOS zoo files) ----------------------------------------------------
def mmdet_caffe_bottleneck(block: nn.Module, x: Tensor, stride: int) -> Tensor:
    """MMDet Bottleneck(style='caffe') by hand: the stride on the 1x1 conv1, the 3x3 conv2 at stride 1."""
    out = F.relu(block.bn1(F.conv2d(x, block.conv1.weight, stride=stride)))
    out = F.relu(block.bn2(F.conv2d(out, block.conv2.weight, padding=1)))
    return F.relu(block.bn3(F.conv2d(out, block.conv3.weight)) + block.downsample(x))


def test_caffe_style_puts_the_stride_on_the_1x1_conv():
    torch.manual_seed(0)
    caffe, pytorch = ResNet(depth=50, width=0.25, style="caffe").eval(), ResNet(depth=50, width=0.25).eval()
    for stage in (caffe.layer2, caffe.layer3, caffe.layer4):
        assert (stage[0].conv1.stride, stage[0].conv2.stride) == ((2, 2), (1, 1))
        assert all(block.conv1.stride == block.conv2.stride == (1, 1) for block in stage[1:])
    assert caffe.layer1[0].conv1.stride == caffe.layer1[0].conv2.stride == (1, 1)
    assert pytorch.layer2[0].conv2.stride == (2, 2)
    pytorch.load_state_dict(caffe.state_dict())  # same names and shapes
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        outs_caffe, outs_pytorch = caffe(x), pytorch(x)
        stage1 = caffe.layer1(caffe.maxpool(caffe.relu(caffe.bn1(caffe.conv1(x)))))  # [2, 64, 16, 16]
        torch.testing.assert_close(caffe.layer2[0](stage1), mmdet_caffe_bottleneck(caffe.layer2[0], stage1, 2))
    assert [tuple(o.shape) for o in outs_caffe] == [(2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    assert [o.shape for o in outs_pytorch] == [o.shape for o in outs_caffe]
    assert not torch.allclose(outs_caffe[0], outs_pytorch[0])
    basic = ResNet(depth=18, width=0.25, style="caffe")  # BasicBlock: stride on the 3x3 conv1 in both styles
    assert basic.layer2[0].conv1.stride == (2, 2) and basic.layer2[0].conv1.kernel_size == (3, 3)
    with pytest.raises(ConfigError, match="^backbone.style 'coffee' is not one of pytorch, caffe$"):
        ResNet(depth=50, style="coffee")


# fcos_r50_caffe_fpn_gn-head_1x_coco as MMDetection 2.x stores it in meta['config'] (Config.pretty_text), with the
# top-level img_norm_cfg of its pipeline; narrowed to base_channels 16, FPN/head 32, 2 head convs, GN 8 groups
FCOS_CAFFE_CONFIG = """
model = dict(
    type='FCOS',
    backbone=dict(
        type='ResNet',
        depth=50,
        base_channels=16,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=False),
        norm_eval=True,
        style='caffe',
        init_cfg=dict(
            type='Pretrained',
            checkpoint='open-mmlab://detectron/resnet50_caffe')),
    neck=dict(
        type='FPN',
        in_channels=[64, 128, 256, 512],
        out_channels=32,
        start_level=1,
        add_extra_convs='on_output',
        num_outs=5,
        relu_before_extra_convs=True),
    bbox_head=dict(
        type='FCOSHead',
        num_classes=80,
        in_channels=32,
        stacked_convs=2,
        feat_channels=32,
        norm_cfg=dict(type='GN', num_groups=8, requires_grad=True),
        strides=[8, 16, 32, 64, 128],
        loss_cls=dict(
            type='FocalLoss',
            use_sigmoid=True,
            gamma=2.0,
            alpha=0.25,
            loss_weight=1.0),
        loss_bbox=dict(type='IoULoss', loss_weight=1.0),
        loss_centerness=dict(
            type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)),
    train_cfg=dict(
        assigner=dict(
            type='MaxIoUAssigner',
            pos_iou_thr=0.5,
            neg_iou_thr=0.4,
            min_pos_iou=0,
            ignore_iof_thr=-1),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    test_cfg=dict(
        nms_pre=1000,
        min_bbox_size=0,
        score_thr=0.05,
        nms=dict(type='nms', iou_threshold=0.5),
        max_per_img=100))
dataset_type = 'CocoDataset'
img_norm_cfg = dict(
    mean=[102.9801, 115.9465, 122.7717], std=[1.0, 1.0, 1.0], to_rgb=False)
"""
DETECTRON_MEAN = [102.9801, 115.9465, 122.7717]  # BGR means of open-mmlab://detectron/ caffe weights
DETECTRON2_MEAN = [103.53, 116.28, 123.675]  # ... and of open-mmlab://detectron2/ ones


def test_small_fcos_caffe_checkpoint_loads_from_its_embedded_config():
    source = make_source(mmdet_detector("fcos", "r50", nc=3, base=16, out=32, feat=32, stacked=2))
    meta = {"mmdet_version": "2.25.0", "config": FCOS_CAFFE_CONFIG, "CLASSES": COCO_FIRST}
    detector = load_mmdet(mmdet_ckpt(source, meta), None, "fcos_caffe_small.pth")
    assert detector.yaml["name"] == "fcos_r50_caffe" and detector.yaml["backbone"]["style"] == "caffe"
    assert detector.yaml["input"] == {"mean": DETECTRON_MEAN, "std": [1.0, 1.0, 1.0], "bgr": True}
    assert detector.bgr and torch.allclose(detector.mean.flatten() * 255, torch.tensor(DETECTRON_MEAN))
    assert detector.backbone.layer3[0].conv1.stride == (2, 2) and detector.backbone.layer3[0].conv2.stride == (1, 1)
    assert detector.names == {0: "person", 1: "bicycle", 2: "car"}
    assert check_every_tensor_lands(detector, source) == len(source) == len(detector.state_dict())
    again = build_detector(detector.yaml, nc=3)  # the YAML a checkpoint stores rebuilds the same normalisation
    assert again.bgr and again.backbone.style == "caffe" and torch.equal(again.std, detector.std)


def test_caffe_normalisation_from_3x_data_preprocessor_or_the_init_weights():
    v3 = FCOS_CAFFE_CONFIG.replace(
        "type='FCOS',",
        "type='FCOS', data_preprocessor=dict(type='DetDataPreprocessor', mean=[103.53, 116.28, 123.675], "
        "std=[1.0, 1.0, 1.0], bgr_to_rgb=False, pad_size_divisor=32),",
    ).split("dataset_type")[0]
    cfg = mmdet_model_cfg({"state_dict": {}, "meta": {"cfg": v3}})
    assert cfg["input"] == {"mean": DETECTRON2_MEAN, "std": [1.0, 1.0, 1.0], "bgr": True}
    bare = FCOS_CAFFE_CONFIG.split("dataset_type")[0]  # no normalisation named: that of the caffe weights
    assert mmdet_model_cfg({"state_dict": {}, "meta": {"cfg": bare}})["input"]["mean"] == DETECTRON_MEAN
    detectron2 = bare.replace("detectron/resnet50_caffe", "detectron2/resnet50_caffe")
    assert mmdet_model_cfg({"state_dict": {}, "meta": {"cfg": detectron2}})["input"]["mean"] == DETECTRON2_MEAN
    pytorch = GFL_R101_CONFIG + "img_norm_cfg = dict(mean=[1, 2, 3], std=[4, 5, 6], to_rgb=True)"
    cfg = mmdet_model_cfg({"state_dict": {}, "meta": {"config": pytorch}})
    assert cfg["input"] == {"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0], "bgr": False}
    assert "style" not in cfg["backbone"] and cfg["name"] == "gfl_r101"


def caffe_tiny_cfg() -> dict:
    """Quarter-width caffe-style ResNet-50 FCOS with MMDetection's caffe input normalisation."""
    return {
        "backbone": {"type": "resnet", "depth": 50, "width": 0.25, "style": "caffe"},
        "input": {"mean": DETECTRON_MEAN, "std": [1.0, 1.0, 1.0], "bgr": True},
        "neck": {"type": "fpn", "out_channels": 16, "num_outs": 5, "add_extra_convs": "on_output"},
        "head": {"type": "fcos", "stacked_convs": 1, "feat_channels": 16, "num_groups": 4},
    }


def test_caffe_input_is_bgr_255_minus_mean_over_std_and_exports(tmp_path):
    torch.manual_seed(0)
    detector = build_detector(caffe_tiny_cfg(), nc=3).eval()
    seen = []
    detector.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))  # 0..1 RGB
    detector(images)
    mean = torch.tensor(DETECTRON_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], images.flip(1) * 255 - mean)  # BGR 0..255 minus the mean, std 1
    assert torch.equal(seen[0][:, 0], detector.normalise(images)[:, 0])
    imagenet = build_detector({**caffe_tiny_cfg(), "input": None}, nc=3)  # the default: ImageNet RGB
    imagenet_mean, imagenet_std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    expected = (images * 255 - imagenet_mean.view(1, 3, 1, 1)) / imagenet_std.view(1, 3, 1, 1)
    torch.testing.assert_close(imagenet.normalise(images), expected)

    ckpt = make_checkpoint(detector, epoch=-1, best_fitness=None, names={0: "a", 1: "b", 2: "c"}, train_args={})
    weights = save_checkpoint(ckpt, tmp_path / "caffe.pt")
    path = exporter.run(get_args({"model": str(weights), "device": "cpu", "imgsz": 128}, "export"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    output = torch.from_numpy(session.run(None, {"images": images[:1].numpy()})[0])
    with torch.no_grad():
        reference = ExportModel(detector).eval()(images[:1])
    assert (output - reference).abs().max().item() < 1e-3


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"mean": [1.0, 2.0]}, r"input.mean \[1.0, 2.0\] must be 3 numbers in 0..255 units"),
        ({"std": [1.0, 0.0, 1.0]}, r"input.std \[1.0, 0.0, 1.0\] must be 3 numbers > 0"),
        ({"bgr": "yes"}, r"input.bgr 'yes' must be true or false"),
        ({"brg": True}, r"input.brg is not a setting of input; did you mean 'bgr'\?"),
        ([1, 2, 3], r"input must be a mapping of mean, std, bgr"),
    ],
)
def test_bad_input_section_is_one_line(value, message):
    with pytest.raises(ConfigError, match=rf"^model: {message}") as error:
        build_detector({**caffe_tiny_cfg(), "input": value}, nc=3)
    assert "\n" not in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize(("yaml_name", "depth"), [("fcos_r50_caffe", 50), ("fcos_r101_caffe", 101)])
def test_full_size_fcos_caffe_every_tensor_lands(yaml_name, depth):
    source = make_source(mmdet_detector("fcos", f"r{depth}"))
    text = FCOS_CAFFE_CONFIG.replace("depth=50,\n        base_channels=16,", f"depth={depth},")
    text = text.replace("[64, 128, 256, 512]", "[256, 512, 1024, 2048]").replace("=32,", "=256,")
    text = text.replace("stacked_convs=2,", "stacked_convs=4,").replace("num_groups=8", "num_groups=32")
    detector = load_mmdet(mmdet_ckpt(source, {"config": text}), None, f"{yaml_name}.pth")
    assert detector.yaml["name"] == yaml_name and detector.nc == 80
    shipped = build_detector(yaml_name, nc=80)
    assert {k: v.shape for k, v in shipped.state_dict().items()} == {
        k: v.shape for k, v in detector.state_dict().items()
    }
    assert check_every_tensor_lands(detector, source) == len(source) == len(detector.state_dict())
    again = load_mmdet(mmdet_ckpt(source), f"{yaml_name}.yaml", f"{yaml_name}.pth")  # the shipped YAML, no config
    assert again.bgr and again.backbone.layer2[0].conv1.stride == (2, 2)
