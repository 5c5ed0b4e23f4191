"""Ultralytics' half of the YOLO benchmark (benchmarks/yolo_effect.py), run by a Python that has `ultralytics`.

Ultralytics is AGPL and never a crosskd dependency: this script runs in its own environment as a subprocess of the
benchmark and imports nothing from crosskd.

    python ultralytics_yolo.py train '{"model": "yolo11n.yaml", "data": ..., "epochs": 10, ...}'
        Ultralytics' own training, `YOLO(model).train(**settings)`; {"resume": "<last.pt>"} resumes that run instead
    python ultralytics_yolo.py serve
        train steps for the step timing: one JSON command per line on stdin, one JSON answer per line on the stdout
        it started with (everything Ultralytics prints goes to stderr):
          {"op": "build", "model": "yolo11n.yaml", "nc": 80, "batch_file": ..., "threads": 2} -> {"version": ...}
              the model with random weights in train mode, its loss and an SGD optimizer; the batch file holds
              {"img": uint8 [B, 3, H, W], "batch_idx": [N], "cls": [N, 1], "bboxes": [N, 4] normalised xywh}
          {"op": "pass"} -> {"seconds": s}   one timed train step: x/255, loss, backward, optimizer step
          {"op": "quit"}
"""

import json
import os
import sys
import time

os.environ.setdefault("YOLO_OFFLINE", "1")  # no update checks, no downloads
LR = 1e-5  # random-init models stay finite over the timed steps (speed.py's value)


def train(settings: dict) -> None:
    from ultralytics import YOLO

    if "resume" in settings:
        YOLO(settings["resume"]).train(resume=True)
    else:
        YOLO(settings.pop("model")).train(**settings)


def build_step(command: dict):
    """A function running one train step of `command['model']` on the batch in `command['batch_file']`."""
    import torch
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.set_num_threads(command["threads"])
    torch.manual_seed(0)
    model = DetectionModel(command["model"], nc=command["nc"], verbose=False)
    model.args = get_cfg()  # the loss gains (box, cls, dfl) the trainer gives the model
    model.train()
    batch = torch.load(command["batch_file"])
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def step() -> dict:
        start = time.perf_counter()
        loss, _ = model.loss({**batch, "img": batch["img"].float() / 255})
        loss.sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"seconds": time.perf_counter() - start}

    return step


def serve() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)  # answers go to the original stdout
    os.dup2(2, 1)  # everything else to stderr
    sys.stdout = sys.stderr
    import ultralytics

    step = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "quit":
                break
            if request["op"] == "build":
                step = build_step(request)
                answer = {"version": ultralytics.__version__}
            else:
                answer = step()
        except Exception as error:  # reported to the benchmark, which stops with it
            answer = {"error": f"{type(error).__name__}: {error}"}
        protocol.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:
        train(json.loads(sys.argv[2]))
    else:
        serve()
