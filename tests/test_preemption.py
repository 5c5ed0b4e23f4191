"""Preemption and kill-anywhere: SIGTERM/SIGINT save a mid-epoch last.pt and exit 143/130 with the resume command,
save_period_iters, and a run killed with SIGKILL at random moments (inside checkpoint saves too) that still finishes
like an uninterrupted run."""

import csv
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from crosskd import cli
from crosskd.config import get_args
from crosskd.engine.checkpoint import load_checkpoint
from crosskd.engine.trainer import Trainer
from crosskd.errors import RunStopped

SETTINGS = {"model": "gfl_r18t.yaml", "epochs": 2, "batch": 4, "imgsz": 64, "workers": 0, "device": "cpu",
            "warmup_iters": 2, "lr0": 0.02, "ema": True, "val": False, "plots": False, "seed": 0}  # 16 images: 4 its
LOSS_COLUMNS = ("train/cls_loss", "train/box_loss", "train/dfl_loss", "lr/pg0")

# Runs `crosskd ARGS...` with one fault (argv[1]): "none"; "step:N:wait" (after the N-th training step, touch $MARKER
# and wait for a signal); "step:N:kill" (SIGKILL after the N-th step); "save:N" (SIGKILL inside the N-th .pt save,
# after the temporary file is written and before os.replace); "time:S" (SIGKILL after S seconds). With
# $FINAL_WEIGHTS, the float32 model and EMA weights are written there before finishing.
HELPER = '''
import os, signal, sys, threading, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from crosskd.cli import main
from crosskd.engine.trainer import Trainer

kind, _, value = sys.argv[1].partition(":")
if kind == "step":
    count, action = value.split(":")
    train_step, calls = Trainer.train_step, [0]
    def step(self, batch):
        losses = train_step(self, batch)
        calls[0] += 1
        if calls[0] == int(count) and action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if calls[0] == int(count):
            Path(os.environ["MARKER"]).touch()
            deadline = time.monotonic() + 120
            while not self.stop_signals.signum and time.monotonic() < deadline:
                time.sleep(0.01)
        return losses
    Trainer.train_step = step
elif kind == "save":
    replace, calls = os.replace, [0]
    def killing_replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".pt"):
            calls[0] += 1
            if calls[0] == int(value):
                os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, *args, **kwargs)
    os.replace = killing_replace
elif kind == "time":
    timer = threading.Timer(float(value), os.kill, (os.getpid(), signal.SIGKILL))
    timer.daemon = True
    timer.start()
if os.environ.get("FINAL_WEIGHTS"):
    finish = Trainer.finish
    def dump_then_finish(self):
        torch.save({"model": self.model.state_dict(), "ema": self.ema.module.state_dict()}, os.environ["FINAL_WEIGHTS"])
        finish(self)
    Trainer.finish = dump_then_finish
main(sys.argv[2:])
'''


@pytest.fixture(scope="module")
def reference(tmp_path_factory, write_digits_yaml):
    """16 digits images with flips (drawn from the restored RNG on resume) and one uninterrupted run on them."""
    root = tmp_path_factory.mktemp("preempt")
    data = write_digits_yaml(root, num_train=16, num_val=4)
    data.write_text(yaml.safe_dump({**yaml.safe_load(data.read_text()), "fliplr": 0.5}))
    trainer = Trainer(run_args(data, root, "reference"))
    trainer.train()
    return SimpleNamespace(root=root, data=data, weights=final_weights(trainer), rows=read_rows(root / "reference"))


def run_args(data: Path, project: Path, name: str, **overrides):
    return get_args({**SETTINGS, "data": str(data), "project": str(project), "name": name, **overrides}, "train")


def final_weights(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    return {"model": trainer.model.state_dict(), "ema": trainer.ema.module.state_dict()}


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_run(weights: dict, rows: list[dict], reference: SimpleNamespace) -> float:
    """Weights equal to the uninterrupted run's (rtol 1e-5) and the same results.csv losses and lr; the largest
    absolute weight difference."""
    worst = 0.0
    for part in ("model", "ema"):
        for name, value in reference.weights[part].items():
            torch.testing.assert_close(weights[part][name], value, rtol=1e-5, atol=1e-7)
            if value.is_floating_point():
                worst = max(worst, (weights[part][name] - value).abs().max().item())
    assert [[r[k] for k in LOSS_COLUMNS] for r in rows] == [[r[k] for k in LOSS_COLUMNS] for r in reference.rows]
    return worst


def signal_at(iteration: int, signum: int):
    """A callback sending `signum` to this process after global iteration `iteration`."""

    def send(trainer: Trainer) -> None:
        if trainer.iteration == iteration:
            os.kill(os.getpid(), signum)

    return send


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_epoch_saves_and_resume_equals_uninterrupted(reference, signum, code):
    name = f"stopped-{signum}"
    before = signal.getsignal(signum)
    stopped = Trainer(run_args(reference.data, reference.root, name))
    stopped.add_callback("on_train_batch_end", signal_at(5, signum))  # epoch 2, its 2nd of 4 iterations
    with pytest.raises(RunStopped) as stop:
        stopped.train()
    last = reference.root / name / "weights" / "last.pt"
    assert stop.value.exit_code == code
    assert str(stop.value) == (f"{signal.Signals(signum).name} received: stopped at epoch 2/2 iteration 2/4 and saved "
                               f"{last}; resume with: crosskd train resume={last.resolve()}")
    assert signal.getsignal(signum) == before  # the handlers are put back
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 1 and ckpt["partial_epoch"]["batches"] == 2 and ckpt["scheduler"]["iteration"] == 6
    assert [r["epoch"] for r in read_rows(reference.root / name)] == ["1"]

    resumed = Trainer(run_args(reference.data, reference.root, "ignored", resume=str(last)))
    seen = []
    resumed.add_callback("on_train_batch_end", lambda t: seen.append((t.iteration, t.lr)))
    resumed.train()
    assert [i for i, _ in seen] == [6, 7]  # continues at the next iteration
    assert seen[0][1] == pytest.approx(resumed.schedule(6))
    worst = assert_same_run(final_weights(resumed), read_rows(reference.root / name), reference)
    print(f"max |resumed - uninterrupted| weight difference: {worst:.3g}")


class Crash(Exception):
    """A job killed without warning, simulated in-process."""


def test_save_period_iters_resumes_a_run_killed_without_warning(reference):
    def crash(trainer: Trainer) -> None:
        if trainer.iteration == 6:
            raise Crash

    killed = Trainer(run_args(reference.data, reference.root, "periodic", save_period_iters=3))
    killed.add_callback("on_train_batch_end", crash)
    with pytest.raises(Crash):
        killed.train()
    last = reference.root / "periodic" / "weights" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 1 and ckpt["partial_epoch"]["batches"] == 2  # written after iteration 6 of 8 (index 5)
    resumed = Trainer(run_args(reference.data, reference.root, "ignored", resume=str(last)))
    resumed.train()
    assert resumed.args.save_period_iters == 3
    assert_same_run(final_weights(resumed), read_rows(reference.root / "periodic"), reference)


def test_cli_prints_the_stop_message_and_exits_with_its_code(monkeypatch, capsys):
    def stopped(args):
        raise RunStopped("SIGTERM received: stopped ...; resume with: crosskd train resume=/r/last.pt", 143)

    module = SimpleNamespace(run=stopped)
    monkeypatch.setitem(sys.modules, "fake_stopping_engine", module)
    monkeypatch.setitem(cli.MODE_TARGETS, "train", ("fake_stopping_engine", "run"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "model=m.yaml"])
    assert exit_info.value.code == 143
    err = capsys.readouterr().err
    assert err.strip() == "SIGTERM received: stopped ...; resume with: crosskd train resume=/r/last.pt"


def run_cli(tmp_path: Path, fault: str, words: list[str], **env: str) -> subprocess.CompletedProcess:
    helper = tmp_path / "fault_helper.py"
    helper.write_text(HELPER)
    command = [sys.executable, str(helper), fault, *words]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **env}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def cli_words(reference: SimpleNamespace, project: Path) -> list[str]:
    return ["train", *(f"{k}={v}" for k, v in SETTINGS.items()), f"data={reference.data}", f"project={project}",
            "name=exp"]


@pytest.mark.slow
def test_sigterm_through_the_cli_prints_the_resume_command_and_exits_143(reference, tmp_path):
    marker = tmp_path / "at-step"
    helper = tmp_path / "fault_helper.py"
    helper.write_text(HELPER)
    command = [sys.executable, str(helper), "step:6:wait", *cli_words(reference, tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "MARKER": str(marker)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # the 6th step is done: epoch 2, iteration 2 of 4
    out, err = process.communicate(timeout=240)
    assert process.returncode == 143, out[-2000:] + err[-2000:]
    assert "Traceback" not in out + err
    last = tmp_path / "exp" / "weights" / "last.pt"
    expected = f"crosskd train resume={last.resolve()}"
    assert f"SIGTERM received: stopped at epoch 2/2 iteration 2/4 and saved {last}; resume with: {expected}" in err

    final = tmp_path / "final.pt"
    resumed = run_cli(tmp_path, "none", shlex.split(expected)[1:], FINAL_WEIGHTS=str(final))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "Resuming training" in resumed.stdout and "from epoch 2 iteration 3 to 2" in resumed.stdout
    worst = assert_same_run(torch.load(final), read_rows(tmp_path / "exp"), reference)
    print(f"max |resumed - uninterrupted| weight difference: {worst:.3g}")


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_finishes_like_an_uninterrupted_run(reference, tmp_path):
    """SIGKILL at seeded random moments: inside .pt saves (temporary file written, not renamed), after a training
    step, after a random time; each time the run resumes from its last.pt (mid-epoch ones from save_period_iters)."""
    rng = random.Random(13)
    faults = [f"save:{rng.randint(2, 3)}", f"step:{rng.randint(2, 5)}:kill", f"save:{rng.randint(2, 4)}",
              f"time:{rng.uniform(6.0, 9.0):.2f}", f"save:{rng.randint(1, 3)}"]
    words = [*cli_words(reference, tmp_path), "save_period_iters=1"]
    last = tmp_path / "exp" / "weights" / "last.pt"
    final = tmp_path / "final.pt"
    outcomes = []
    for fault in [*faults, "none"]:
        run = run_cli(tmp_path, fault, [*words[:1], f"resume={last}"] if last.exists() else words,
                      FINAL_WEIGHTS=str(final))
        outcomes.append((fault, run.returncode))
        finished = run.returncode == 2 and "finished (stripped) checkpoint" in run.stderr  # killed after stripping
        assert run.returncode in (0, -signal.SIGKILL) or finished, run.stdout[-2000:] + run.stderr[-2000:]
        assert "Traceback" not in run.stderr
        if len(outcomes) == 1:
            assert list((tmp_path / "exp" / "weights").glob(".last.pt.*.tmp"))  # killed inside a save
        if run.returncode == 0 or finished:
            break
    print(f"faults and exit codes: {outcomes}")
    assert sum(code == -signal.SIGKILL for _, code in outcomes) >= 3, outcomes
    weights = tmp_path / "exp" / "weights"
    for path in (weights / "last.pt", weights / "best.pt"):
        assert load_checkpoint(path)["epoch"] == -1  # loadable, finished (stripped)
    assert [r["epoch"] for r in read_rows(tmp_path / "exp")] == ["1", "2"]
    assert not list(weights.glob(".*.tmp")) and not list((tmp_path / "exp").glob(".*.tmp"))
    assert_same_run(torch.load(final), read_rows(tmp_path / "exp"), reference)
