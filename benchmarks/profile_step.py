"""Where a train step and a distill step spend their time: torch.profiler tables and side-by-side ratios.

    python benchmarks/profile_step.py                       # ratios + profiles of every step below
    python benchmarks/profile_step.py --only train --no-profile --repeats 7

Steps (1 thread, batch 2, 256 px, 80 classes, every backbone stage trainable on both sides):
  train:   our FCOS-R50 / RetinaNet-R50 train step vs torchvision's fcos_resnet50_fpn / retinanet_resnet50_fpn
           (weights=None, weights_backbone=None, trainable_backbone_layers=5, transform pinned to 256);
  distill: a CrossKD step (GFL R18 student, GFL R50 teacher) vs its floor, a plain student step plus a teacher
           eval forward.
Each pair is timed alternately in one process (machine noise falls on both sides); the ratio is the result. Each
profile table lists the ops of one step sorted by self CPU time.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from step_cost import synthetic_batch  # benchmarks/ is on sys.path when run as a script
from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn

from crosskd.data import Batch
from crosskd.distill import Distiller
from crosskd.models import DenseDetector, build_detector, load_model_yaml

NUM_CLASSES, IMGSZ, BATCH = 80, 256, 2
Step = Callable[[], object]


def ours(name: str) -> DenseDetector:
    """A shipped model YAML with every backbone stage trainable and BatchNorm in train mode, no pretrained weights."""
    cfg, _ = load_model_yaml(name)
    cfg["backbone"].update(frozen_stages=-1, norm_eval=False, pretrained=None)
    return build_detector(cfg, NUM_CLASSES).train()


def torchvision_model(builder: Callable) -> torch.nn.Module:
    """A torchvision detector from scratch, every backbone stage trainable, the transform pinned to IMGSZ."""
    model = builder(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, trainable_backbone_layers=5,
        min_size=IMGSZ, max_size=IMGSZ,
    )
    return model.train()


def train_step(loss_fn: Callable[[], dict], params) -> Step:
    """Forward, backward and an SGD step of the summed losses of `loss_fn`."""
    optimizer = torch.optim.SGD(list(params), lr=1e-4, momentum=0.9)

    def step() -> None:
        loss = sum(loss_fn().values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def train_pair(kind: str, batch: Batch) -> tuple[Step, Step]:
    """(our step, torchvision's step) for 'fcos' or 'retinanet'."""
    model = ours("fcos_r50.yaml" if kind == "fcos" else "retinanet_r50.yaml")
    tv = torchvision_model(fcos_resnet50_fpn if kind == "fcos" else retinanet_resnet50_fpn)
    images = list(batch.images)
    targets = [{"boxes": b, "labels": label} for b, label in zip(batch.gt_boxes, batch.gt_labels)]
    return train_step(lambda: model.loss(batch), model.parameters()), train_step(
        lambda: tv(images, targets), tv.parameters()
    )


def distill_pair(batch: Batch, kd: str = "crosskd") -> tuple[Step, Step]:
    """(distill step, floor = plain student step + teacher eval forward) for a GFL R18 student, GFL R50 teacher."""
    student, teacher = ours("gfl_r18.yaml"), ours("gfl_r50.yaml").eval()
    distiller = Distiller(student, teacher, kd=kd)
    distill = train_step(lambda: distiller.loss(batch), distiller.parameters())
    plain = train_step(lambda: student.loss(batch), student.parameters())

    def floor() -> None:
        plain()
        with torch.no_grad():
            teacher(batch.images)

    return distill, floor


def alternate(a: Step, b: Step, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median CPU seconds of `a` and `b`, called alternately (a, b, a, b, ...).

    Process CPU time, not wall time: on one thread it is the step's own work, without the time spent waiting for a
    core on a busy machine (which made wall-time ratios swing by ±10% here).
    """
    for _ in range(warmup):
        a(), b()
    times = ([], [])
    for _ in range(repeats):
        for fn, out in zip((a, b), times):
            start = time.process_time()
            fn()
            out.append(time.process_time() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def profile(name: str, step: Step, rows: int, steps: int = 2) -> None:
    """Print the op table of `steps` calls of `step`, sorted by self CPU time."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"\n===== {name}: {steps} steps, sorted by self CPU time =====")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=["fcos", "retinanet", "distill"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--no-profile", action="store_true")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batch = synthetic_batch(BATCH, IMGSZ, NUM_CLASSES)
    for kind in opts.only:
        a, b = distill_pair(batch) if kind == "distill" else train_pair(kind, batch)
        names = ("crosskd distill", "floor") if kind == "distill" else (f"ours {kind}", f"torchvision {kind}")
        ta, tb = alternate(a, b, opts.repeats)
        print(f"{kind}: {names[0]} {ta * 1e3:.0f} ms, {names[1]} {tb * 1e3:.0f} ms, ratio {ta / tb:.3f}", flush=True)
        if not opts.no_profile:
            profile(names[0], a, opts.rows)
            profile(names[1], b, opts.rows)


if __name__ == "__main__":
    main()
