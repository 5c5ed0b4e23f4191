"""MMDetection 2.x / 3.x checkpoints (GFL, RetinaNet, FCOS, ATSS, Faster R-CNN; ResNet or Swin-T) onto crosskd.

An MMDetection checkpoint is `{'state_dict': ..., 'meta': ...}`. 2.x `meta` holds `mmdet_version`, `CLASSES` and
`config` (the merged python config as text); 3.x (mmengine) `meta` holds `dataset_meta['classes']`,
`mmengine_version` and `cfg` (the same text). The model section of that text is read with `ast` (never executed)
to pick and adjust a shipped model YAML. Tensors move through one explicit key map (`mmdet_key_map`) and
`load_mapped`, so every source tensor is accounted for. A caffe-style ResNet (`style='caffe'`, MMDetection's plain
FCOS zoo files) has the same keys as a pytorch-style one; it maps onto `backbone.style: caffe` and an `input:`
section with the config's normalisation (BGR, 0..255, std 1), as in the shipped `fcos_r{50,101}_caffe.yaml`.
A Faster R-CNN (`rpn_head.*`, `roi_head.bbox_head.*`) maps its two stages through `mmdet_rcnn.py`.

Source keys dropped on purpose: `bbox_head.integral.project` (GFL's constant 0..reg_max projection buffer; the
shape of `gfl_reg` already fixes reg_max) and mmcv 2.x EMAHook's `ema_*` copies (mmcv swaps the averaged weights
into the regular keys before saving, so the regular keys are the weights MMDetection evaluates with; 3.x keeps
its EMA copy outside `state_dict`, in `ema_state_dict`, which is not read).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from crosskd.errors import CheckpointError, ConfigError
from crosskd.models.backbones import ResNet, SwinT
from crosskd.models.build import HEADS, build_detector, constructor_parameters, load_model_yaml
from crosskd.models.dense_detector import DenseDetector

from .mapping import load_mapped
from .mmdet_rcnn import (
    RCNN_CLASSIFIER,
    RCNN_PREFIXES,
    has_rcnn_keys,
    is_faster_rcnn,
    rcnn_head_overrides,
    rcnn_num_classes,
    rcnn_source_name,
    rcnn_unsupported,
)

MMDET_PREFIXES = ("backbone.", "neck.", "bbox_head.", *RCNN_PREFIXES)
DERIVED_KEYS = ("bbox_head.integral.project",)
MMDET_HEADS = {"GFLHead": "gfl", "RetinaHead": "retinanet", "FCOSHead": "fcos", "ATSSHead": "atss"}
CLS_PREDICTORS = {"gfl": "gfl_cls", "retinanet": "retina_cls", "fcos": "conv_cls", "atss": "atss_cls"}
RESNET_DEPTHS = (18, 34, 50, 101)
RESNET_STYLES = ("pytorch", "caffe")
CAFFE_MEANS = {  # BGR pixel means (std 1) of MMDet's caffe-style ImageNet weights, by their init checkpoint
    "detectron2": [103.530, 116.280, 123.675],  # open-mmlab://detectron2/resnet50_caffe
    "detectron": [102.9801, 115.9465, 122.7717],  # open-mmlab://detectron/resnet50_caffe (the FCOS configs)
}
SWIN_T = {"embed_dims": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7}
SWIN_PATCH_EMBED = {"0": "projection", "2": "norm"}  # torchvision features.0 = Conv2d, Permute, LayerNorm
SWIN_MERGE_ORDER = [0, 2, 1, 3]  # unfold slot (kh, kw) of torchvision's x0, x1, x2, x3 (self-inverse)
LOSS_WEIGHTS = {
    "loss_cls": "loss_cls_weight",
    "loss_bbox": "loss_box_weight",
    "loss_dfl": "loss_dfl_weight",
    "loss_centerness": "loss_ctr_weight",
}


# ----- recognising a checkpoint ---------------------------------------------------------------------------
def _meta(ckpt: Mapping) -> Mapping:
    meta = ckpt.get("meta")
    return meta if isinstance(meta, Mapping) else {}


def _has_mmdet_keys(state: Mapping) -> bool:
    keys = [k.removeprefix("module.") for k in state if not k.startswith("ema_")]
    has_head = any(k.startswith("bbox_head.") for k in keys) or has_rcnn_keys(keys)
    return has_head and all(k.startswith(MMDET_PREFIXES) for k in keys)


def is_mmdet_checkpoint(obj: Any) -> bool:
    """True for an MMDetection checkpoint: a dict with `state_dict` and 2.x meta (`mmdet_version`) or MMDet keys.

    A 3.x (mmengine) checkpoint is recognised by its `backbone.`/`neck.`/`bbox_head.` (Faster R-CNN: `rpn_head.`,
    `roi_head.`) state_dict keys, since its
    `meta` (`mmengine_version`, `dataset_meta`, `cfg`) is shared with other OpenMMLab projects.
    """
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        return False
    return "mmdet_version" in _meta(obj) or _has_mmdet_keys(obj["state_dict"])


def mmdet_class_names(ckpt: Mapping) -> dict[int, str] | None:
    """Class names from `meta['CLASSES']` (2.x) or `meta['dataset_meta']['classes']` (3.x), else None."""
    meta = _meta(ckpt)
    dataset_meta = meta.get("dataset_meta")
    classes = meta.get("CLASSES") or (dataset_meta.get("classes") if isinstance(dataset_meta, Mapping) else None)
    if isinstance(classes, str):
        classes = [classes]
    return {i: str(name) for i, name in enumerate(classes)} if classes else None


# ----- the embedded config ----------------------------------------------------------------------------------
def _literal(node: ast.AST) -> Any:
    """A config expression as plain values: `dict(a=1)` and `{...}` as dicts, lists/tuples as lists, else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg}
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _config_values(ckpt: Mapping) -> dict[str, Any]:
    """Top-level `name = ...` values of the config text in `meta['config']` / `meta['cfg']`, parsed, not run."""
    meta = _meta(ckpt)
    text = next((meta[k] for k in ("config", "cfg") if isinstance(meta.get(k), str)), None)
    try:
        tree = ast.parse(text or "")
    except SyntaxError:
        return {}
    return {
        target.id: _literal(stmt.value)
        for stmt in tree.body
        if isinstance(stmt, ast.Assign)
        for target in stmt.targets
        if isinstance(target, ast.Name)
    }


def mmdet_config_model(ckpt: Mapping) -> dict | None:
    """The `model = dict(...)` section of the checkpoint's embedded config, or None."""
    model = _config_values(ckpt).get("model")
    return model if isinstance(model, dict) else None


def _unsupported(what: str) -> CheckpointError:
    return CheckpointError(
        f"MMDetection {what} has no crosskd equivalent; supported: GFL/RetinaNet/FCOS/ATSS heads and Faster R-CNN "
        "(RPN + Shared2FCBBoxHead) on pytorch- or "
        f"caffe-style ResNet-{'/'.join(map(str, RESNET_DEPTHS))} or Swin-T with an FPN"
    )


def _backbone_section(backbone: dict, neck: dict) -> dict:
    """Our backbone YAML section for MMDet's backbone dict; MMDet outputs before `start_level` are not used."""
    outs = list(backbone.get("out_indices", (0, 1, 2, 3)))
    start, end = neck.get("start_level", 0), neck.get("end_level", -1)
    used = outs[start:] if end in (-1, len(outs) - 1) else outs[start : end + 1]
    kind = backbone.get("type")
    if kind == "ResNet":
        style = backbone.get("style", "pytorch")
        if backbone.get("depth") not in RESNET_DEPTHS or style not in RESNET_STYLES:
            raise _unsupported(f"ResNet depth={backbone.get('depth')} style='{style}'")
        return {
            "type": "resnet",
            "depth": backbone["depth"],
            "width": backbone.get("base_channels", 64) / 64,
            **({"style": "caffe"} if style == "caffe" else {}),
            "out_indices": used,
            "frozen_stages": backbone.get("frozen_stages", -1),
            "norm_eval": backbone.get("norm_eval", True),
        }
    if kind == "SwinTransformer":
        if any(backbone.get(k, v) != v for k, v in SWIN_T.items()):
            raise _unsupported("SwinTransformer other than Swin-T (embed_dims 96, depths 2-2-6-2, window 7)")
        return {
            "type": "swin_t",
            "out_indices": used,
            "drop_path_rate": backbone.get("drop_path_rate", 0.1),
            "frozen_stages": backbone.get("frozen_stages", -1),
        }
    raise _unsupported(f"backbone '{kind}'")


def _neck_section(neck: dict) -> dict:
    extra = neck.get("add_extra_convs", False)
    if extra is True:
        extra = "on_input" if neck.get("extra_convs_on_inputs", True) else "on_output"
    elif extra is False:
        extra = "max_pool"  # MMDet's FPN without extra convs max-pools the last output (Faster R-CNN's P6)
    if neck.get("type") != "FPN" or extra not in ("on_input", "on_output", "max_pool"):
        raise _unsupported(f"neck '{neck.get('type')}' with add_extra_convs={extra!r}")
    return {
        "type": "fpn",
        "out_channels": neck.get("out_channels", 256),
        "num_outs": neck.get("num_outs", 5),
        "add_extra_convs": extra,
        "relu_before_extra_convs": neck.get("relu_before_extra_convs", False),
    }


def _head_overrides(head: dict, train_cfg: dict) -> dict:
    """Head settings present in MMDet's bbox_head (and train_cfg.assigner) under our argument names."""
    anchors, coder = head.get("anchor_generator") or {}, head.get("bbox_coder") or {}
    assigner = train_cfg.get("assigner") or {}
    found = {
        "stacked_convs": head.get("stacked_convs"),
        "feat_channels": head.get("feat_channels"),
        "reg_max": head.get("reg_max"),
        "octave_base_scale": anchors.get("octave_base_scale"),
        "scales_per_octave": anchors.get("scales_per_octave"),
        "ratios": anchors.get("ratios"),
        "strides": head.get("strides") or anchors.get("strides"),
        "box_stds": coder.get("target_stds"),
        "topk": assigner.get("topk"),
        **{k: assigner.get(k) for k in ("pos_iou_thr", "neg_iou_thr", "min_pos_iou")},
        **{
            k: head.get(k)
            for k in ("norm_on_bbox", "centerness_on_reg", "center_sampling", "center_sample_radius", "regress_ranges")
        },
        **{ours: (head.get(theirs) or {}).get("loss_weight") for theirs, ours in LOSS_WEIGHTS.items()},
    }
    if "norm_cfg" in head:
        norm = head["norm_cfg"] or {}
        found["norm"] = "gn" if norm.get("type") == "GN" else "none"
        found["num_groups"] = norm.get("num_groups")
        if norm and norm.get("type") != "GN":
            raise _unsupported(f"head norm '{norm.get('type')}'")
    if "conv_bias" in head:
        found["conv_bias"] = None if head["conv_bias"] == "auto" else head["conv_bias"]
    box_loss = (head.get("loss_bbox") or {}).get("type")
    found["box_loss"] = {"IoULoss": "iou", "GIoULoss": "giou"}.get(box_loss)
    return {k: v for k, v in found.items() if v is not None or k == "conv_bias"}


def _input_section(model: dict, img_norm_cfg: Any) -> dict | None:
    """Our `input:` section from 3.x `model.data_preprocessor` (3.0rc `preprocess_cfg`) or 2.x `img_norm_cfg`.

    MMDetection reads images as BGR and turns them to RGB only with `bgr_to_rgb` (3.x, default False) / `to_rgb`
    (2.x, default True). A caffe-style ResNet whose config has neither gets BGR, std 1 and the pixel mean of the
    caffe weights it started from (CAFFE_MEANS); otherwise None keeps the base YAML's normalisation.
    """
    sources = ((model.get("data_preprocessor"), False), (model.get("preprocess_cfg"), False), (img_norm_cfg, True))
    for norm, rgb_default in sources:
        if isinstance(norm, dict) and norm.get("mean") is not None and norm.get("std") is not None:
            rgb = norm.get("bgr_to_rgb", norm.get("to_rgb", rgb_default))
            return {"mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]], "bgr": not rgb}
    backbone = model.get("backbone") or {}
    if backbone.get("style") != "caffe":
        return None
    init = backbone.get("init_cfg")
    weights = str(init.get("checkpoint") if isinstance(init, dict) else model.get("pretrained"))
    mean = CAFFE_MEANS["detectron2" if "detectron2" in weights else "detectron"]
    return {"mean": mean, "std": [1.0, 1.0, 1.0], "bgr": True}


def _base_yaml(head_type: str, suffix: str) -> dict:
    """The shipped `<head>_<suffix>.yaml`, else the same without `_caffe`, else the head's R50 YAML."""
    for name in (f"{head_type}_{suffix}", f"{head_type}_{suffix.removesuffix('_caffe')}"):
        try:
            return load_model_yaml(f"{name}.yaml")[0]
        except ConfigError:  # not shipped: try the next one
            continue
    return load_model_yaml(f"{head_type}_r50.yaml")[0]


def mmdet_model_cfg(ckpt: Mapping) -> dict | None:
    """Our model YAML dict for the checkpoint's embedded config, or None when it carries none.

    The shipped `<head>_<backbone>.yaml` (e.g. gfl_r101.yaml, fcos_r101_caffe.yaml; the head's r50 YAML when none
    is shipped) gives the defaults; backbone, neck, input normalisation and the head settings found in the config
    text override them. Raises CheckpointError for architectures crosskd cannot express (other heads, other Swin
    sizes, FPNs without extra convs).
    """
    values = _config_values(ckpt)
    model = values.get("model")
    return _model_yaml(model, values.get("img_norm_cfg")) if isinstance(model, dict) else None


def _model_yaml(model: dict, img_norm_cfg: Any = None) -> dict:
    """Our model YAML dict for MMDet's parsed `model` dict (and 2.x's top-level `img_norm_cfg`)."""
    head, neck = model.get("bbox_head") or {}, model.get("neck") or {}
    head_type = "faster_rcnn" if is_faster_rcnn(model) else MMDET_HEADS.get(head.get("type"))
    if head_type is None:
        raise _unsupported(f"head '{head.get('type')}' (detector '{model.get('type')}')")
    if head_type == "faster_rcnn" and (problem := rcnn_unsupported(model)):
        raise _unsupported(problem)
    backbone = _backbone_section(model.get("backbone") or {}, neck)
    suffix = "swint" if backbone["type"] == "swin_t" else f"r{backbone['depth']}"
    suffix += "_caffe" if backbone.get("style") == "caffe" else ""
    base = _base_yaml(head_type, suffix)
    accepted = constructor_parameters(HEADS[head_type])
    train_cfg = model.get("train_cfg") or {}
    found = rcnn_head_overrides(model) if head_type == "faster_rcnn" else _head_overrides(head, train_cfg)
    overrides = {k: v for k, v in found.items() if k in accepted}
    normalisation = _input_section(model, img_norm_cfg)
    return {
        **base,
        "name": f"{head_type}_{suffix}",
        "backbone": backbone,
        **({"input": normalisation} if normalisation else {}),
        "neck": _neck_section(neck),
        "head": {**base["head"], **overrides},
    }


# ----- key map ----------------------------------------------------------------------------------------------
def _swin_name(backbone: SwinT, key: str) -> str:
    """torchvision swin_t `features.*` / our `norms.k.*` -> MMDet SwinTransformer names."""
    if key.startswith("norms."):
        k, param = key.split(".")[1:]
        return f"norm{backbone.out_indices[int(k)]}.{param}"
    index, rest = key.split(".", 2)[1:]
    index = int(index)
    if index == 0:  # patch embedding: Conv2d, Permute, LayerNorm
        module, param = rest.split(".")
        return f"patch_embed.{SWIN_PATCH_EMBED[module]}.{param}"
    if index % 2 == 0:  # PatchMerging after stage index/2 - 1
        return f"stages.{index // 2 - 1}.downsample.{rest}"
    block, rest = rest.split(".", 1)
    rest = re.sub(r"^attn\.", "attn.w_msa.", rest)
    rest = rest.replace("mlp.0.", "ffn.layers.0.0.").replace("mlp.3.", "ffn.layers.1.")
    return f"stages.{(index - 1) // 2}.blocks.{block}.{rest}"


def _backbone_name(backbone: Any, key: str) -> str:
    if isinstance(backbone, ResNet):
        return key  # MMDet ResNet (pytorch and caffe style) uses torchvision's names
    if isinstance(backbone, SwinT):
        return _swin_name(backbone, key)
    raise CheckpointError(f"MMDetection checkpoints map onto ResNet or Swin-T backbones, not {type(backbone).__name__}")


def _neck_name(num_inputs: int, key: str) -> str:
    """torchvision FeaturePyramidNetwork (+ our extra convs) -> MMDet FPN (`lateral_convs`, `fpn_convs`)."""
    parts = key.split(".")  # fpn.inner_blocks.i.0.weight | fpn.layer_blocks.i.0.weight | fpn.extra_blocks.convs.j.w
    if parts[1] == "extra_blocks":
        return f"fpn_convs.{num_inputs + int(parts[3])}.conv.{parts[4]}"
    module = {"inner_blocks": "lateral_convs", "layer_blocks": "fpn_convs"}[parts[1]]
    return f"{module}.{parts[2]}.conv.{parts[4]}"


def mmdet_key_map(detector: DenseDetector) -> dict[str, str]:
    """MMDetection state_dict key -> our state_dict key, for every tensor of `detector`.

    backbone: ResNet names are identical; Swin-T `features.*` -> `stages.i.blocks.j.*` / `stages.i.downsample.*`
    / `patch_embed.*`, `norms.k` -> `norm{out_index}`. neck: `fpn.inner_blocks.i.0` -> `lateral_convs.i.conv`,
    `fpn.layer_blocks.i.0` -> `fpn_convs.i.conv`, `fpn.extra_blocks.convs.j` -> `fpn_convs.{levels+j}.conv`.
    head: `head.` -> `bbox_head.`, tower `norm` -> `gn`; predictors and `scales.i.scale` keep their names;
    a Faster R-CNN's `head.rpn.*` / `head.roi_head.*` -> `rpn_head.*` / `roi_head.bbox_head.*` (mmdet_rcnn.py).
    """
    num_inputs = len(detector.neck.fpn.inner_blocks)
    key_map = {}
    for key in detector.state_dict():
        part, rest = key.split(".", 1)
        if part == "backbone":
            source = "backbone." + _backbone_name(detector.backbone, rest)
        elif part == "neck":
            source = "neck." + _neck_name(num_inputs, rest)
        elif getattr(detector, "two_stage", False):
            source = rcnn_source_name(rest)
        else:
            source = "bbox_head." + re.sub(r"_convs\.(\d+)\.norm\.", r"_convs.\1.gn.", rest)
        key_map[source] = key
    return key_map


def _swin_merge_to_torchvision(tensor: Tensor) -> Tensor:
    """MMDet PatchMerging 4C axis (nn.Unfold: channel-major, 4 slots) -> torchvision (slot-major x0..x3)."""
    lead, channels = tensor.shape[:-1], tensor.shape[-1] // 4
    slots = tensor.reshape(*lead, channels, 4)[..., SWIN_MERGE_ORDER]  # [..., C, 4]
    return slots.transpose(-1, -2).reshape(*lead, 4 * channels)


def mmdet_transforms(key_map: Mapping[str, str]) -> dict[str, Callable[[Tensor], Tensor]]:
    """Source tensors that need reordering: Swin PatchMerging's 4C axis and the [49, 49] relative position index."""
    transforms: dict[str, Callable[[Tensor], Tensor]] = {}
    for source in key_map:
        if re.search(r"downsample\.(reduction\.weight|norm\.weight|norm\.bias)$", source) and "stages." in source:
            transforms[source] = _swin_merge_to_torchvision
        elif source.endswith("relative_position_index"):
            transforms[source] = lambda t: t.reshape(-1)
    return transforms


# ----- loading ----------------------------------------------------------------------------------------------
def mmdet_state_dict(ckpt: Mapping) -> dict[str, Tensor]:
    """The checkpoint's state_dict without a `module.` prefix, EMA copies (`ema_*`) and derived buffers."""
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("ema_")}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in DERIVED_KEYS}


def _anchors_per_location(head: dict) -> int:
    params = constructor_parameters(HEADS[head["type"]])
    if "scales_per_octave" not in params:
        return 1
    scales = head.get("scales_per_octave", params["scales_per_octave"].default)
    return scales * len(head.get("ratios", params["ratios"].default))


def _num_classes(state: Mapping[str, Tensor], cfg: dict, source_name: str) -> int:
    """nc from the classifier's output channels divided by the anchors per location of the YAML's head."""
    head_type = (cfg.get("head") or {}).get("type")
    if head_type == "faster_rcnn":
        return _rcnn_num_classes(state, source_name)
    if head_type not in CLS_PREDICTORS:
        raise CheckpointError(f"model YAML head.type '{head_type}' is not one of {', '.join(CLS_PREDICTORS)}")
    key = f"bbox_head.{CLS_PREDICTORS[head_type]}.weight"
    anchors = _anchors_per_location(cfg["head"])
    if key not in state or state[key].shape[0] % anchors:
        raise CheckpointError(
            f"'{source_name}' has no {key} with a multiple of {anchors} outputs: it is not a {head_type} checkpoint; "
            "check that the model YAML (model_cfg=/teacher_cfg=) matches the checkpoint's architecture"
        )
    return state[key].shape[0] // anchors


def _rcnn_num_classes(state: Mapping[str, Tensor], source_name: str) -> int:
    """nc of a Faster R-CNN checkpoint: its softmax classifier's rows minus the background row."""
    nc = rcnn_num_classes(state)
    if nc is None:
        raise CheckpointError(
            f"'{source_name}' has no {RCNN_CLASSIFIER} with C+1 rows: it is not a Faster R-CNN checkpoint; check that "
            "the model YAML (model_cfg=/teacher_cfg=) matches the checkpoint's architecture"
        )
    return nc


def _check_resnet_style(cfg: dict, inferred: dict | None, source_name: str) -> None:
    """A given model YAML must build the ResNet style the checkpoint's config names (the keys cannot tell)."""
    their_backbone, our_backbone = (inferred or {}).get("backbone") or {}, cfg.get("backbone") or {}
    if their_backbone.get("type") != "resnet" or our_backbone.get("type") != "resnet":
        return
    theirs, ours = their_backbone.get("style", "pytorch"), our_backbone.get("style", "pytorch")
    if theirs != ours:
        raise CheckpointError(
            f"'{source_name}' holds a {theirs}-style ResNet (style='{theirs}') but the model YAML builds a {ours}-"
            f"style one; set backbone.style: {theirs} (and its input: normalisation) or leave model_cfg= out to use "
            "the checkpoint's own config"
        )


def load_mmdet(ckpt: Mapping, model_cfg: dict | str | Path | None, source_name: str) -> DenseDetector:
    """Build the detector of an MMDetection checkpoint and copy every tensor onto it.

    `model_cfg` (a model YAML path, shipped name or dict) wins; otherwise the YAML comes from the checkpoint's
    embedded config. nc is read from the classifier; `detector.names` from the meta classes (else '0'..'nc-1').
    The backbone's `pretrained` spec is cleared: its weights come from the checkpoint.
    """
    inferred = mmdet_model_cfg(ckpt)  # also rejects what a given YAML would silently mis-load
    if model_cfg is not None:
        cfg, _ = load_model_yaml(model_cfg)
        _check_resnet_style(cfg, inferred, source_name)
    elif inferred is not None:
        cfg = inferred
    else:
        raise CheckpointError(
            f"'{source_name}' is an MMDetection checkpoint without an embedded config: give the matching model "
            "YAML as model_cfg= (teacher_cfg= for teacher=), e.g. gfl_r101.yaml"
        )
    cfg = {**cfg, "backbone": {**cfg["backbone"], "pretrained": None}}
    state = mmdet_state_dict(ckpt)
    detector = build_detector(cfg, _num_classes(state, cfg, source_name))
    key_map = mmdet_key_map(detector)
    load_mapped(
        detector,
        state,
        key_map,
        source_name,
        optional=lambda name: name.endswith("num_batches_tracked"),
        transforms=mmdet_transforms(key_map),
    )
    names = mmdet_class_names(ckpt)
    detector.names = names if names and len(names) == detector.nc else {i: str(i) for i in range(detector.nc)}
    return detector
