"""Ultralytics' half of the loader benchmark (benchmarks/loader_bench.py), run by a Python that has `ultralytics`.

Ultralytics is AGPL and never a crosskd dependency: it lives in its own virtual environment (or the `compare`
extra), and this script runs there as a subprocess of the benchmark, importing nothing from crosskd. It reads one
JSON command per line on stdin and answers one JSON line on the stdout it started with (everything else it or
Ultralytics prints goes to stderr):

  {"op": "build", "root": ..., "imgsz": 640, "batch": 16, "workers": 2, "cache": false|"ram"|"disk", "hyp": {...}}
      -> {"images": N, "workers": W}   Ultralytics' training dataset (build_yolo_dataset, mode train: its mosaic,
         affine, HSV and flips at the strengths in hyp) in a DataLoader with persistent workers, its collate_fn and
         worker seeding, prefetch 2: the DataLoader crosskd's side uses too (see loader_bench.py for why)
  {"op": "pass"} -> {"seconds": s, "images": n}   one timed epoch
  {"op": "infinite", "epochs": 3} -> {"seconds": s, "images": n}   Ultralytics' own build_dataloader
         (InfiniteDataLoader, prefetch 4) timed over `epochs` epochs after one untimed epoch
  {"op": "quit"}
"""

import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # no update checks, no downloads
os.environ.setdefault("YOLO_VERBOSE", "False")


def build(command: dict) -> tuple[object, object]:
    """Ultralytics' training dataset over `root`/images/train (YOLO labels in labels/train) and its DataLoader."""
    import torch
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset, seed_worker

    root = Path(command["root"])
    overrides = {"imgsz": command["imgsz"], "batch": command["batch"], "workers": command["workers"],
                 "cache": command["cache"], "task": "detect", "mode": "train", **command["hyp"]}
    cfg = get_cfg(overrides=overrides)
    names = {i: str(i) for i in range(command.get("nc", 10))}
    data = {"path": str(root), "train": str(root / "images" / "train"), "names": names, "nc": len(names),
            "channels": 3}
    dataset = build_yolo_dataset(cfg, str(root / "images" / "train"), command["batch"], data, mode="train")
    workers = command["workers"]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=command["batch"], shuffle=True, num_workers=workers, collate_fn=dataset.collate_fn,
        worker_init_fn=seed_worker, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0),
    )
    return dataset, loader


def timed_epochs(loader: object, epochs: int) -> dict:
    images, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            images += len(batch["im_file"])
    return {"seconds": time.perf_counter() - start, "images": images}


def infinite(dataset: object, command: dict, epochs: int) -> dict:
    from ultralytics.data.build import build_dataloader

    loader = build_dataloader(dataset, command["batch"], command["workers"], shuffle=True, device="cpu")
    timed_epochs(loader, 1)  # starts the workers
    result = timed_epochs(loader, epochs)
    if hasattr(loader, "close"):  # stops its persistent workers
        loader.close()
    return result


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)  # answers go to the original stdout
    os.dup2(2, 1)  # everything else (Ultralytics' logging, workers) to stderr
    sys.stdout = sys.stderr
    import torch

    torch.set_num_threads(1)
    dataset = loader = command = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "build":
                dataset = loader = None  # the last setting's cache and workers go before the next is built
                gc.collect()
                command = request
                dataset, loader = build(request)
                import ultralytics

                answer = {"images": len(dataset), "workers": loader.num_workers, "version": ultralytics.__version__}
            elif request["op"] == "pass":
                answer = timed_epochs(loader, 1)
            elif request["op"] == "infinite":
                answer = infinite(dataset, command, request.get("epochs", 3))
            else:
                break
        except Exception as error:  # reported to the benchmark, which stops with it
            answer = {"error": f"{type(error).__name__}: {error}"}
        protocol.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
