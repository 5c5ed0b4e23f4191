"""The one-off runner of the 8-epoch rows in this folder (issue 20 point 5), kept as the record of how they were made.

    PYTHONPATH=. python benchmarks/results/kd_balance/train8/train_variant.py crosskd+pkd 4 ckdpkd4

Arguments: kd, PKD levels ('default', or L to patch PKD onto the first L FPN levels, which no setting offers) and the
run name. The reproduce cpu scale's data and schedule (seed 0), with the demo teacher (runs/demo/teacher, gfl_r18s
trained 10 epochs) instead of the reproduce teacher.
"""
import sys

import torch

import crosskd.distill.methods.pkd as pkd_module
from crosskd.config import get_args
from crosskd.engine.training import launch

kd, levels, name = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
if levels != "default":
    original = pkd_module.PKD.__init__

    def patched(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.levels = int(levels)

    pkd_module.PKD.__init__ = patched
settings = {
    "model": "benchmarks/configs/gfl_r18q_student.yaml", "teacher": "runs/demo/teacher/weights/best.pt", "kd": kd,
    "data": "benchmarks/results/reproduce/data/digits-1024-256-128-s0.yaml", "imgsz": 128, "batch": 8, "seed": 0,
    "epochs": 8, "val": False, "plots": False, "project": "runs/pkd_rows", "name": name, "exist_ok": True,
    "optimizer": "AdamW", "lr0": 0.004, "warmup_iters": 100, "device": "cpu", "workers": 0,
}
print(launch.run(get_args(settings, "distill")))
