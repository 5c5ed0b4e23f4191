"""Validator: any duck-typed model, COCO results file, equality with a separate COCOeval, model resolution."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from pycocotools.cocoeval import COCOeval

from crosskd.config import get_args
from crosskd.data import DetectionDataset, load_data_yaml
from crosskd.data.digits import generate_digits
from crosskd.engine.deployment.checkpoint import make_checkpoint, save_checkpoint
from crosskd.engine.evaluation import validator as validator_module
from crosskd.engine.evaluation.validator import Validator
from crosskd.errors import CheckpointError, DataError
from crosskd.models import Detections, build_detector

NAMES = {i: str(i) for i in range(10)}


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    root = generate_digits(tmp_path_factory.mktemp("digits") / "digits", num_train=8, num_val=12, imgsz=96, seed=1)
    path = root.parent / "digits.yaml"
    split = {"train": "annotations/instances_train.json", "val": "annotations/instances_val.json"}
    path.write_text(yaml.safe_dump({"path": str(root), **split, "names": NAMES, "fliplr": 0}))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    detector = build_detector("gfl_r18t.yaml", nc=10)
    ckpt = make_checkpoint(detector, epoch=-1, best_fitness=None, names=NAMES, train_args={})
    return save_checkpoint(ckpt, tmp_path_factory.mktemp("weights") / "best.pt")


def val_args(data_yaml: Path, tmp_path: Path, **overrides):
    settings = {"data": str(data_yaml), "imgsz": 96, "batch": 4, "workers": 0, "device": "cpu",
                "project": str(tmp_path)}
    return get_args({**settings, **overrides}, "val")


class GroundTruthModel:
    """A duck-typed model that 'detects' exactly the labelled boxes of the images, in loader order."""

    def __init__(self, dataset: DetectionDataset):
        self.records = dataset.records
        self.names = dict(NAMES)
        self.strides = [8, 16, 32, 64, 128]
        self.seen = 0

    def eval(self):
        return self

    def predict(self, images, conf, iou, max_det, nms_pre, ratios=None, multi_label=True, img_sizes=None):
        assert ratios is not None  # the validator asks for original-pixel boxes
        assert img_sizes is not None and img_sizes.shape == (len(images), 2)  # and clips to each image before NMS
        records = self.records[self.seen : self.seen + len(images)]
        self.seen += len(images)
        return [
            Detections(torch.from_numpy(r.boxes).float(), torch.full((len(r.labels),), 0.9),
                       torch.from_numpy(r.labels).long())
            for r in records
        ]


def test_duck_typed_model_with_ground_truth_boxes_scores_ap_one(data_yaml, tmp_path):
    dataset = DetectionDataset(load_data_yaml(data_yaml), "val", 96, augment=False)
    args = val_args(data_yaml, tmp_path, save_json=True, plots=True)
    validator = Validator(args, model=GroundTruthModel(dataset))
    metrics = validator.run()
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["precision"] == pytest.approx(1.0) and metrics["recall"] == pytest.approx(1.0)
    assert validator.curves.ap50 == pytest.approx(1.0)  # PR_curve.png's per-class AP50
    assert (validator.save_dir / "val_batch0_labels.jpg").is_file()
    assert (validator.save_dir / "val_batch0_pred.jpg").is_file()
    records = json.loads((validator.save_dir / "predictions.json").read_text())
    assert {r["image_id"] for r in records} == set(dataset.image_ids)


def test_printed_ap_equals_a_separate_cocoeval_of_predictions_json(trained_digits, tmp_path):
    args = val_args(trained_digits.data, tmp_path, model=str(trained_digits.weights), imgsz=128, save_json=True,
                    conf=0.001, name="json")
    validator = Validator(args, model=args.model)
    metrics = validator.run()
    assert 0.3 < metrics["AP"] < metrics["AP50"] < 1.0  # the overfitted model: neither all misses nor all hits
    path = validator.save_dir / "predictions.json"
    assert path.parent == tmp_path / "json"
    records = json.loads(path.read_text())
    assert records
    coco_gt = validator.dataset.coco_gt()
    assert {r["category_id"] for r in records} <= set(coco_gt.getCatIds())
    widths = {i["id"]: i["width"] for i in coco_gt.dataset["images"]}
    assert all(r["bbox"][0] + r["bbox"][2] <= widths[r["image_id"]] + 1e-3 for r in records)  # original pixels
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(path)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert metrics["AP"] == max(float(evaluator.stats[0]), 0.0)
    assert metrics["AP50"] == max(float(evaluator.stats[1]), 0.0)
    assert metrics["AR100"] == max(float(evaluator.stats[8]), 0.0)


def test_no_detections_give_zero_ap(data_yaml, checkpoint, tmp_path):
    metrics = validator_module.run(val_args(data_yaml, tmp_path, model=str(checkpoint), conf=0.999, save_json=True))
    assert metrics == dict.fromkeys(["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "precision", "recall"], 0.0)
    assert json.loads((tmp_path / "val" / "predictions.json").read_text()) == []


def test_no_model_uses_the_newest_best_pt_under_runs(data_yaml, checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = val_args(data_yaml, tmp_path, conf=0.999)
    with pytest.raises(CheckpointError, match="no best.pt"):
        Validator(args).run()
    target = tmp_path / "runs" / "train" / "exp" / "weights" / "best.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(checkpoint.read_bytes())
    validator = Validator(args)
    validator.run()
    assert validator.model.names == NAMES


def test_class_count_mismatch_is_a_data_error(data_yaml, tmp_path):
    detector = build_detector("gfl_r18t.yaml", nc=3)
    ckpt = make_checkpoint(detector, epoch=-1, best_fitness=None, names={0: "a", 1: "b", 2: "c"}, train_args={})
    path = save_checkpoint(ckpt, tmp_path / "three.pt")
    with pytest.raises(DataError, match="3 classes"):
        Validator(val_args(data_yaml, tmp_path, model=str(path))).run()


def test_val_without_imgsz_uses_the_checkpoint_training_size(data_yaml, tmp_path):
    detector = build_detector("gfl_r18t.yaml", nc=10)
    ckpt = make_checkpoint(detector, epoch=-1, best_fitness=None, names=NAMES, train_args={"imgsz": 96})
    weights = save_checkpoint(ckpt, tmp_path / "trained_at_96.pt")
    settings = {"data": str(data_yaml), "batch": 4, "workers": 0, "device": "cpu", "project": str(tmp_path)}
    defaults = get_args(settings, "val")  # imgsz not typed: the checkpoint's 96 wins over default.yaml's 640
    validator = Validator(defaults, model=str(weights))
    validator.run(plots=False, per_class=False)
    assert validator.dataset.imgsz == 96
    typed = val_args(data_yaml, tmp_path, imgsz=64)
    validator = Validator(typed, model=str(weights))
    validator.run(plots=False, per_class=False)
    assert validator.dataset.imgsz == 64
