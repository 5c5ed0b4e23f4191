"""What a CrossKD step costs next to a plain training step, measured side by side in one run.

    python benchmarks/step_cost.py --student gfl_r18t.yaml --teacher gfl_r18s.yaml --imgsz 128 --batch 8

Prints the median time of a plain student step, a teacher eval forward and a distillation step for each `kd`
method, and their ratios to the plain step (absolute times vary between machines; the ratios are the result).
"""

import argparse
import statistics
import time

import torch

from crosskd.data import Batch
from crosskd.distill import Distiller
from crosskd.models import build_detector


def synthetic_batch(batch: int, imgsz: int, num_classes: int, seed: int = 0) -> Batch:
    """Random images with three random boxes each: timing does not depend on the pixels."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, 3, 2, generator=gen) * imgsz * 0.6
    wh = torch.rand(batch, 3, 2, generator=gen) * imgsz * 0.3 + 8
    return Batch(
        images=torch.rand(batch, 3, imgsz, imgsz, generator=gen),
        gt_boxes=torch.cat([xy, xy + wh], dim=-1),
        gt_labels=torch.randint(0, num_classes, (batch, 3), generator=gen),
        img_sizes=torch.full((batch, 2), imgsz),
        orig_sizes=torch.full((batch, 2), imgsz),
        ratios=torch.ones(batch),
        image_ids=torch.arange(batch),
        paths=[f"{i}.jpg" for i in range(batch)],
    )


def median_seconds(step, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(loss_module, optimizer, batch):
    def step():
        loss = sum(loss_module(batch).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="gfl_r18t.yaml")
    parser.add_argument("--teacher", default="gfl_r18s.yaml")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)

    num_classes = 10
    batch = synthetic_batch(opts.batch, opts.imgsz, num_classes)
    student = build_detector(opts.student, num_classes).train()
    teacher = build_detector(opts.teacher, num_classes).eval()

    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    plain = median_seconds(train_step(student.loss, optimizer, batch), opts.repeats)
    with torch.no_grad():
        teacher_forward = median_seconds(lambda: teacher(batch.images), opts.repeats)

    rows = [("plain student step", plain), ("teacher eval forward", teacher_forward)]
    for kd in ("crosskd", "pm", "pkd", "crosskd+pkd"):
        if kd in ("pm", "pkd", "crosskd+pkd") and not same_layout(student, teacher, kd):
            continue
        distiller = Distiller(student, teacher, kd=kd).train()
        kd_optimizer = torch.optim.SGD(distiller.parameters(), lr=1e-3, momentum=0.9)
        seconds = median_seconds(train_step(distiller, kd_optimizer, batch), opts.repeats)
        rows.append((f"distill step, kd={kd}", seconds))

    print(f"student {opts.student}, teacher {opts.teacher}, batch {opts.batch}, {opts.imgsz} px, "
          f"{opts.threads} threads, median of {opts.repeats}")
    print(f"{'step':<28}{'ms':>10}{'x plain':>10}")
    for name, seconds in rows:
        print(f"{name:<28}{seconds * 1000:>10.1f}{seconds / plain:>10.2f}")


def same_layout(student, teacher, kd: str) -> bool:
    """pm needs the same head type; pkd needs equal FPN widths."""
    same_head = student.head.head_type == teacher.head.head_type
    same_width = student.head.feat_channels == teacher.head.feat_channels
    return (kd != "pm" or same_head) and ("pkd" not in kd or same_width)


if __name__ == "__main__":
    main()
