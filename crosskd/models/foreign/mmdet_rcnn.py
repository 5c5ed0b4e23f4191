"""MMDetection 2.x / 3.x Faster R-CNN (`FasterRCNN`: RPNHead + StandardRoIHead with Shared2FCBBoxHead) onto ours.

Backbone and neck keys are those of the dense detectors (`mmdet.py`); the two stages map module by module:

| MMDetection                          | crosskd (`faster_rcnn_*.yaml`)   | shape at faster-rcnn_r50_fpn_1x |
|--------------------------------------|----------------------------------|---------------------------------|
| `rpn_head.rpn_conv`                  | `head.rpn.conv`                  | [256, 256, 3, 3]                |
| `rpn_head.rpn_cls`                   | `head.rpn.cls`                   | [3, 256, 1, 1] (sigmoid)        |
| `rpn_head.rpn_reg`                   | `head.rpn.reg`                   | [12, 256, 1, 1]                 |
| `roi_head.bbox_head.shared_fcs.{i}`  | `head.roi_head.fcs.{i}`          | [1024, 12544], [1024, 1024]     |
| `roi_head.bbox_head.fc_cls`          | `head.roi_head.cls`              | [81, 1024] (background last)    |
| `roi_head.bbox_head.fc_reg`          | `head.roi_head.reg`              | [320, 1024] (4 per class)       |

Both orders already agree: MMDetection's softmax classifier keeps the background in its last row and its
class-specific box predictor has no background slot, as crosskd's R-CNN stage (torchvision's needs `frcnn_rows`).
Only the settings of MMDetection's `FasterRCNN` config that change the layers or their numerics are read; the rest
keep the shipped YAML's values (MMDetection's 1x defaults).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

RCNN_DETECTOR = "FasterRCNN"
RCNN_PREFIXES = ("rpn_head.", "roi_head.")
RCNN_CLASSIFIER = "roi_head.bbox_head.fc_cls.weight"
RCNN_MODULES = {  # our head module -> MMDetection's
    "rpn.conv": "rpn_head.rpn_conv",
    "rpn.cls": "rpn_head.rpn_cls",
    "rpn.reg": "rpn_head.rpn_reg",
    "roi_head.cls": "roi_head.bbox_head.fc_cls",
    "roi_head.reg": "roi_head.bbox_head.fc_reg",
}
BBOX_HEADS = {"Shared2FCBBoxHead": 2, "ConvFCBBoxHead": None}  # shared FCs (ConvFC: read num_shared_fcs)


def is_faster_rcnn(model: Mapping) -> bool:
    """True for an MMDetection model dict of a Faster R-CNN (type FasterRCNN, or an RPN plus an RoI head)."""
    return model.get("type") == RCNN_DETECTOR or ("rpn_head" in model and "roi_head" in model)


def has_rcnn_keys(keys: list[str]) -> bool:
    """True when state-dict keys hold an R-CNN box head (`roi_head.bbox_head.*`)."""
    return any(k.startswith("roi_head.bbox_head.") for k in keys)


def rcnn_source_name(key: str) -> str:
    """MMDetection's name of our head tensor `key` (without `head.`), e.g. 'roi_head.fcs.0.weight' ->
    'roi_head.bbox_head.shared_fcs.0.weight'."""
    module, _, param = key.rpartition(".")
    if module.startswith("roi_head.fcs."):
        return f"roi_head.bbox_head.shared_fcs.{module.split('.')[-1]}.{param}"
    return f"{RCNN_MODULES.get(module, module)}.{param}"


def rcnn_num_classes(state: Mapping[str, Tensor]) -> int | None:
    """C foreground classes: the softmax classifier's rows minus the background, or None without one."""
    weight = state.get(RCNN_CLASSIFIER)
    return None if weight is None or weight.shape[0] < 2 else weight.shape[0] - 1


def _nms_iou(section: dict) -> float | None:
    nms = section.get("nms") or {}
    return nms.get("iou_threshold", section.get("nms_thr"))  # 2.x from 2.4 / 3.x; older 2.x: nms_thr


def _rpn_overrides(rpn: dict, train_cfg: dict, test_cfg: dict) -> dict[str, Any]:
    anchors = rpn.get("anchor_generator") or {}
    assigner, sampler = (train_cfg.get("rpn") or {}).get("assigner") or {}, (train_cfg.get("rpn") or {}).get(
        "sampler") or {}
    train, test = train_cfg.get("rpn_proposal") or {}, test_cfg.get("rpn") or {}
    return {
        "rpn_feat_channels": rpn.get("feat_channels"),
        "rpn_anchor_scales": anchors.get("scales"),
        "rpn_anchor_ratios": anchors.get("ratios"),
        "strides": anchors.get("strides"),
        "rpn_pos_iou_thr": assigner.get("pos_iou_thr"),
        "rpn_neg_iou_thr": assigner.get("neg_iou_thr"),
        "rpn_min_pos_iou": assigner.get("min_pos_iou"),
        "rpn_num_samples": sampler.get("num"),
        "rpn_pos_fraction": sampler.get("pos_fraction"),
        "rpn_train_pre_nms": train.get("nms_pre"),
        "rpn_train_post_nms": train.get("max_per_img", train.get("max_num")),
        "rpn_test_pre_nms": test.get("nms_pre"),
        "rpn_test_post_nms": test.get("max_per_img", test.get("max_num")),
        "rpn_nms_iou": _nms_iou(test) or _nms_iou(train),
        "rpn_min_bbox_size": test.get("min_bbox_size"),
        "rpn_loss_cls_weight": (rpn.get("loss_cls") or {}).get("loss_weight"),
        "rpn_loss_box_weight": (rpn.get("loss_bbox") or {}).get("loss_weight"),
    }


def _roi_overrides(roi: dict, train_cfg: dict) -> dict[str, Any]:
    extractor, box = roi.get("bbox_roi_extractor") or {}, roi.get("bbox_head") or {}
    layer, coder = extractor.get("roi_layer") or {}, box.get("bbox_coder") or {}
    rcnn = train_cfg.get("rcnn") or {}
    assigner, sampler = rcnn.get("assigner") or {}, rcnn.get("sampler") or {}
    strides = extractor.get("featmap_strides")
    num_fcs = BBOX_HEADS.get(box.get("type")) or box.get("num_shared_fcs")
    return {
        "roi_levels": len(strides) if strides else None,
        "roi_size": layer.get("output_size", layer.get("out_size")),
        "roi_sampling_ratio": layer.get("sampling_ratio", layer.get("sample_num")),
        "roi_aligned": layer.get("aligned"),
        "roi_finest_scale": extractor.get("finest_scale"),
        "fc_channels": box.get("fc_out_channels"),
        "num_fcs": num_fcs,
        "box_stds": coder.get("target_stds"),
        "rcnn_pos_iou_thr": assigner.get("pos_iou_thr"),
        "rcnn_neg_iou_thr": assigner.get("neg_iou_thr"),
        "rcnn_min_pos_iou": assigner.get("min_pos_iou"),
        "rcnn_num_samples": sampler.get("num"),
        "rcnn_pos_fraction": sampler.get("pos_fraction"),
        "add_gt_as_proposals": sampler.get("add_gt_as_proposals"),
        "loss_cls_weight": (box.get("loss_cls") or {}).get("loss_weight"),
        "loss_box_weight": (box.get("loss_bbox") or {}).get("loss_weight"),
    }


def rcnn_unsupported(model: dict) -> str | None:
    """What of a Faster R-CNN model dict crosskd cannot build (a phrase for the error), or None."""
    roi = model.get("roi_head") or {}
    box = roi.get("bbox_head") or {}
    if roi.get("type", "StandardRoIHead") != "StandardRoIHead" or isinstance(box, list):
        return f"RoI head '{roi.get('type')}'"
    if box.get("type") not in BBOX_HEADS or any(box.get(k) for k in ("num_shared_convs", "num_cls_fcs",
                                                                       "num_reg_fcs", "num_cls_convs")):
        return f"R-CNN box head '{box.get('type')}'"
    if box.get("reg_class_agnostic"):
        return "a class-agnostic R-CNN box predictor (reg_class_agnostic=True)"
    if (model.get("rpn_head") or {}).get("num_convs", 1) != 1:
        return f"an RPN with num_convs={model['rpn_head']['num_convs']}"
    return None


def rcnn_head_overrides(model: dict) -> dict[str, Any]:
    """Our `faster_rcnn` head keys found in MMDetection's `rpn_head`, `roi_head`, `train_cfg` and `test_cfg`
    (2.x and 3.x spellings); keys the config does not give are left out."""
    train_cfg, test_cfg = model.get("train_cfg") or {}, model.get("test_cfg") or {}
    found = _rpn_overrides(model.get("rpn_head") or {}, train_cfg, test_cfg)
    found |= _roi_overrides(model.get("roi_head") or {}, train_cfg)
    return {k: v for k, v in found.items() if v is not None}
