"""COCO validation of a DenseDetector (or any object with its predict/names/strides) on a dataset split."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchvision.ops import clip_boxes_to_image

from crosskd.config import imgsz_hw, setting_or_model_default
from crosskd.data import DetectionDataset, build_dataloader, load_data_yaml
from crosskd.dist import get_rank, get_world_size, is_dist, is_main_process, reduce_mean
from crosskd.engine.deployment.loader import load_runtime
from crosskd.engine.evaluation.metrics import (
    COCOResult,
    coco_evaluate,
    detections_to_coco,
    format_class_table,
    format_summary,
)
from crosskd.engine.evaluation.plotting import plot_confusion_matrix, plot_curves, plot_images
from crosskd.engine.evaluation.pr_metrics import PRCurves, confusion_matrix, images_from_records, pr_curves
from crosskd.errors import DataError
from crosskd.paths import make_save_dir, newest_best
from crosskd.utils import LOGGER, colorstr, select_device

VAL_CONF = 0.05  # score threshold when conf is empty (COCO-style evaluation keeps low-score boxes)
PLOT_CONF = 0.25  # predictions drawn in val_batch*_pred.jpg
PLOT_BATCHES = 3  # val_batch0..2


class Validator:
    """Predict a split, evaluate with pycocotools, print the tables; `run()` returns the COCO metrics dict with
    Ultralytics' precision and recall (at the best class-mean F1, IoU 0.5).

    Standalone (`model` a path or None) it loads the model and data from `args`; inside training the trainer passes
    the model and its val dataloader (sharded per rank under DDP; predictions are gathered to rank 0).
    """

    def __init__(self, args: Any, model: Any = None, dataloader: Any = None, save_dir: str | Path | None = None):
        self.args = args
        self.model = model
        self.dataloader = dataloader
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.conf = VAL_CONF if args.conf is None else args.conf
        self.multi_label = True if args.multi_label is None else args.multi_label  # empty: every class (COCO AP)
        self.device = torch.device("cpu")
        self.result: COCOResult | None = None
        self.curves: PRCurves | None = None
        self.losses: dict[str, float] = {}  # mean detection losses on the split when run(losses=True)
        self.model_imgsz: tuple[int, int] | None = None  # the loaded model's own size, used unless imgsz= is given

    def setup(self) -> None:
        """Standalone use: device, model, dataset, dataloader and save dir from args."""
        self.device = select_device(self.args.device)
        info = load_data_yaml(self.args.data, self.args.datasets_dir)
        if self.model is None or isinstance(self.model, str | Path):
            source = self.model or self.args.model or newest_best("validating")
            runtime = load_runtime(source, nc=info.nc, model_cfg=self.args.model_cfg, device=self.device)
            self.model, self.model_imgsz = runtime.model, runtime.imgsz
        if len(self.model.names) != info.nc:
            raise DataError(
                f"the model has {len(self.model.names)} classes but data={self.args.data} has {info.nc}; "
                "validate on the dataset the model was trained on"
            )
        if self.dataloader is None:
            self.dataloader = self.build_dataloader(info)
        if self.save_dir is None and is_main_process():
            self.save_dir = make_save_dir(self.args, "val")

    def build_dataloader(self, info: Any):
        imgsz = max(imgsz_hw(setting_or_model_default(self.args, "imgsz", self.model_imgsz)))  # the long side
        static = getattr(self.model, "dynamic_size", True) is False
        if static:
            imgsz = max(self.model.imgsz)
            LOGGER.info(f"Static exported model: validating at its export size imgsz={imgsz}")
        LOGGER.info(f"Validating at imgsz={imgsz}")
        dataset = DetectionDataset(info, self.args.split, imgsz, augment=False, pad_multiple=max(self.model.strides))
        return build_dataloader(
            dataset, self.args.batch, self.args.workers, shuffle=False, seed=self.args.seed,
            rank=get_rank(), world_size=get_world_size(),
        )

    @property
    def dataset(self) -> Any:
        return self.dataloader.dataset

    def run(
        self, model: Any = None, plots: bool | None = None, per_class: bool | None = None, losses: bool = False
    ) -> dict[str, float]:
        """Validate `model` (or the constructor's) and return {AP, AP50, AP75, APs, APm, APl, AR100, precision,
        recall}. `losses`: also average the model's detection losses over the split into `self.losses` (a
        DenseDetector only; training asks for them)."""
        if model is not None:
            self.model = model
        if self.dataloader is None or self.model is None or isinstance(self.model, str | Path):
            self.setup()
        plots = self.args.plots if plots is None else plots
        device = self.model_device()
        start = time.perf_counter()
        losses = losses and hasattr(self.model, "predict_with_loss")
        records = self.predict_all(device, plots and is_main_process(), losses)
        elapsed = time.perf_counter() - start
        records = self.gather(records)
        if not is_main_process():
            return {}
        results = [r for image_id in sorted(records) for r in records[image_id]]
        self.result = coco_evaluate(self.dataset.coco_gt(), results, self.dataset.names, self.dataset.category_ids)
        images = images_from_records(records, self.dataset.records, self.dataset.category_ids)
        self.curves = pr_curves(images, len(self.dataset.names))
        metrics = {**self.result.metrics, "precision": self.curves.mean_precision, "recall": self.curves.mean_recall}
        self.report(len(records), elapsed, per_class)
        if plots and self.save_dir is not None:
            self.plot_metrics(confusion_matrix(images, len(self.dataset.names)))
        if self.args.save_json:
            self.save_json(results)
        return metrics

    def model_device(self) -> torch.device:
        if isinstance(self.model, nn.Module):
            return next(self.model.parameters()).device
        return torch.device(getattr(self.model, "device", self.device))

    @torch.no_grad()
    def predict_all(self, device: torch.device, plots: bool, losses: bool = False) -> dict[int, list[dict]]:
        """COCO result records per image id for this rank's share of the split; with `losses` the mean losses
        (averaged over ranks) go to `self.losses`."""
        was_training = isinstance(self.model, nn.Module) and self.model.training
        self.model.eval()
        amp = self.args.amp and device.type == "cuda" and isinstance(self.model, nn.Module)
        records: dict[int, list[dict]] = {}
        loss_sums: dict[str, torch.Tensor] = {}
        options = (self.conf, self.args.iou, self.args.max_det, self.args.nms_pre)
        for i, batch in enumerate(self.dataloader):
            batch = batch.to(device)
            with torch.autocast(device.type, enabled=amp):
                if losses:
                    detections, batch_losses = self.model.predict_with_loss(batch, *options, self.multi_label)
                    for name, value in batch_losses.items():
                        loss_sums[name] = loss_sums.get(name, 0.0) + value.detach().float()
                else:
                    detections = self.model.predict(batch.images, *options, ratios=batch.ratios,
                                                    multi_label=self.multi_label, img_sizes=batch.img_sizes)
            records.update(self.batch_records(batch, detections))
            if plots and i < PLOT_BATCHES and self.save_dir is not None:
                self.plot_batch(i, batch, detections)
        self.losses = mean_losses(loss_sums, len(self.dataloader)) if losses else {}
        if was_training:
            self.model.train()
        return records

    def batch_records(self, batch: Any, detections: list) -> dict[int, list[dict]]:
        """COCO result records of one batch, boxes clipped to each original image."""
        records = {}
        sizes = batch.orig_sizes.tolist()  # (h, w) per image
        for det, image_id, (height, width) in zip(detections, batch.image_ids.tolist(), sizes, strict=True):
            boxes = clip_boxes_to_image(det.boxes, (height, width))  # a model clips only to its padded input
            records[image_id] = detections_to_coco(boxes, det.scores, det.labels, image_id, self.dataset.category_ids)
        return records

    def gather(self, records: dict[int, list[dict]]) -> dict[int, list[dict]]:
        """Merge every rank's records on all ranks (a padded sampler's repeated images collapse by id)."""
        if not is_dist():
            return records
        shards: list[dict[int, list[dict]] | None] = [None] * get_world_size()
        dist.all_gather_object(shards, records)
        return {image_id: recs for shard in shards for image_id, recs in shard.items()}

    def plot_batch(self, index: int, batch: Any, detections: list) -> None:
        """val_batch{index}_labels.jpg and val_batch{index}_pred.jpg (predictions above PLOT_CONF, boxes back in
        input pixels)."""
        names = self.dataset.names
        keep = [labels >= 0 for labels in batch.gt_labels]
        gt_boxes = [boxes[k] for boxes, k in zip(batch.gt_boxes, keep, strict=True)]
        gt_labels = [labels[k] for labels, k in zip(batch.gt_labels, keep, strict=True)]
        plot_images(batch.images, gt_boxes, gt_labels, names, self.save_dir / f"val_batch{index}_labels.jpg")
        shown = [d.scores >= PLOT_CONF for d in detections]
        pred_boxes = [d.boxes[k] * r for d, k, r in zip(detections, shown, batch.ratios.tolist(), strict=True)]
        plot_images(batch.images, pred_boxes, [d.labels[k] for d, k in zip(detections, shown, strict=True)], names,
                    self.save_dir / f"val_batch{index}_pred.jpg",
                    scores=[d.scores[k] for d, k in zip(detections, shown, strict=True)])

    def plot_metrics(self, matrix: Any) -> None:
        """PR_curve.png, F1_curve.png, P_curve.png, R_curve.png and the raw and normalised confusion matrices."""
        curves, names = self.curves, self.dataset.names
        labels = [names.get(int(c), str(c)) for c in curves.classes]
        mean_ap50 = float(curves.ap50.mean()) if len(curves.ap50) else 0.0
        plot_curves(curves.px, curves.pr, [f"{n} {ap:.3f}" for n, ap in zip(labels, curves.ap50, strict=True)],
                    f"all classes {mean_ap50:.3f} mAP@0.5", self.save_dir / "PR_curve.png", "Recall", "Precision")
        best_conf = curves.px[curves.best]
        for file, ys, title in (("F1_curve.png", curves.f1, "F1"), ("P_curve.png", curves.precision, "Precision"),
                                ("R_curve.png", curves.recall, "Recall")):
            mean = ys.mean(0)[curves.best] if len(ys) else 0.0
            plot_curves(curves.px, ys, labels, f"all classes {mean:.2f} at {best_conf:.3f}", self.save_dir / file,
                        "Confidence", title)
        for normalize, file in ((False, "confusion_matrix.png"), (True, "confusion_matrix_normalized.png")):
            plot_confusion_matrix(matrix, names, self.save_dir / file, normalize)

    def report(self, num_images: int, elapsed: float, per_class: bool | None) -> None:
        """The class table (per-class rows when verbose and not told otherwise), summary and speed lines."""
        per_class = (self.args.verbose and len(self.dataset.names) > 1) if per_class is None else per_class
        for line in format_class_table(self.result, num_images, per_class):
            LOGGER.info(line)
        pr = f"P {self.curves.mean_precision:.4f}  R {self.curves.mean_recall:.4f}  "
        LOGGER.info(f"{colorstr('val:')} {pr}{format_summary(self.result.metrics)}")
        LOGGER.info(f"Speed: {1000 * elapsed / max(num_images, 1):.1f}ms per image (this rank, incl. NMS)")

    def save_json(self, results: list[dict]) -> Path:
        path = self.save_dir / "predictions.json"
        path.write_text(json.dumps(results))
        LOGGER.info(f"Saved {len(results)} predictions to {path}")
        return path


def mean_losses(sums: dict[str, torch.Tensor], num_batches: int) -> dict[str, float]:
    """Per-batch mean of each summed loss, averaged over ranks."""
    if not sums:
        return {}
    means = reduce_mean(torch.stack(list(sums.values())) / max(num_batches, 1))  # [num_losses]
    return dict(zip(sums, means.tolist(), strict=True))


def run(args: Any) -> dict[str, float]:
    """Entry for `crosskd val`: validate args.model (or the newest best.pt) on args.data / args.split."""
    validator = Validator(args, model=args.model)
    metrics = validator.run()
    LOGGER.info(f"Results saved to {colorstr('bold', str(validator.save_dir))}")
    return metrics
