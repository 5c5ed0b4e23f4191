"""Preemption and kill-anywhere: SIGTERM/SIGINT save a mid-epoch last.pt and exit 143/130 with the resume command,
also under torchrun (2 processes, only rank 0 writes), save_period_iters, and a run killed with SIGKILL at random
moments (inside checkpoint saves too) that still finishes like an uninterrupted run."""

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
from crosskd.engine.deployment.checkpoint import load_checkpoint
from crosskd.engine.training import ddp
from crosskd.engine.training.trainer import Trainer
from crosskd.errors import RunStopped

SETTINGS = {"model": "gfl_r18t.yaml", "epochs": 2, "batch": 4, "imgsz": 64, "workers": 0, "device": "cpu",
            "warmup_iters": 2, "lr0": 0.02, "ema": True, "val": False, "plots": False, "seed": 0}  # 16 images: 4 its
LOSS_COLUMNS = ("train/cls_loss", "train/box_loss", "train/dfl_loss", "lr/pg0")

# Runs `crosskd ARGS...` with one fault (argv[1]): "none"; "step:N:wait" (after the N-th training step, touch $MARKER
# and wait for a signal); "step:N:kill" (SIGKILL after the N-th step); "save:N" (SIGKILL inside the N-th .pt save,
# after the temporary file is written and before os.replace); "time:S" (SIGKILL after S seconds). With
# $FINAL_WEIGHTS, the float32 model and EMA weights are written there before finishing; with $EXIT_DIR, the process's
# exit code goes to $EXIT_DIR/rank<RANK>.
HELPER = '''
import os, signal, sys, threading, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from crosskd import cli
from crosskd.engine.training.trainer import Trainer

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
            while not self.state.stop_signals.signum and time.monotonic() < deadline:
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
end_worker = cli.end_torchrun_worker
def record_then_end(code):
    if os.environ.get("EXIT_DIR"):
        Path(os.environ["EXIT_DIR"], "rank" + os.environ.get("RANK", "0")).write_text(str(code))
    end_worker(code)
cli.end_torchrun_worker = record_then_end
cli.main(sys.argv[2:])
'''
# crosskd's own relaunch (`ddp.launch`, as for device=0,1) of the command given in argv in place of torchrun's.
LAUNCHER = '''
import sys
from crosskd.config import get_args
from crosskd.engine.training import ddp
ddp.ddp_command = lambda args, mode, nproc: sys.argv[1:]
ddp.launch(get_args({"device": "0,1"}, "train"), "train")
'''
# Records the stop signals it gets (argv[2]) after touching argv[1]; exits 128 + the first one's number.
SIGNAL_RECORDER = '''
import signal, sys, time
from pathlib import Path
got = []
for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda signum, frame: got.append(signum))
Path(sys.argv[1]).touch()
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(1.0)  # a repeated signal would arrive now
Path(sys.argv[2]).write_text(" ".join(str(signum) for signum in got))
sys.exit(128 + got[0])
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


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def test_launch_passes_one_ctrl_c_on_to_torchrun_and_exits_130(tmp_path):
    """A terminal's Ctrl-C goes to the whole foreground process group; torchrun, in a session of its own, gets it
    once, from crosskd's relaunch (a second one would cut its wait for the training processes short)."""
    started, signals = tmp_path / "started", tmp_path / "signals"
    command = [sys.executable, "-c", LAUNCHER, sys.executable, "-c", SIGNAL_RECORDER, str(started), str(signals)]
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # its own process group, like a shell's foreground job
    wait_for(started, parent, 60)
    os.killpg(parent.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(parent.pid, signal.SIGINT)  # Ctrl-C pressed twice
    out, err = parent.communicate(timeout=60)
    assert parent.returncode == 130, out + err
    assert "Traceback" not in err
    assert signals.read_text() == str(int(signal.SIGINT))


def run_files(project: Path) -> list[str]:
    return sorted(str(path.relative_to(project)) for path in project.rglob("*") if path.is_file())


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_and_rank_0_saves(tmp_path, write_digits_yaml):
    """crosskd's relaunch (2 gloo processes on CPU) gets SIGTERM after the 2nd iteration, as a scheduler sends it:
    torchrun and both processes stop, rank 0 alone saves last.pt and prints the resume command; resumed under torchrun
    with 2 processes, the run finishes both epochs."""
    data = write_digits_yaml(tmp_path, num_train=16, num_val=4)  # batch 4 = 2 processes x 2 images: 4 its per epoch
    project, exits, marker = tmp_path / "runs", tmp_path / "exits", tmp_path / "at-step"
    exits.mkdir()
    settings = {**SETTINGS, "data": str(data), "project": str(project), "name": "exp", "save_period_iters": 1}
    command = ddp.ddp_command(get_args(settings, "train"), "train", 2)
    entry = command.index("-m", 1 + command.index("crosskd.engine.training.torchrun"))
    helper = tmp_path / "fault_helper.py"
    helper.write_text(HELPER)
    command[entry:entry + 2] = [str(helper), "step:2:wait"]  # each process waits for the signal after its 2nd step
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "MARKER": str(marker), "EXIT_DIR": str(exits)}
    start = time.monotonic()
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, *command], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
    wait_for(marker, launcher)
    signalled = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    stopped = time.monotonic()
    assert launcher.returncode == 143, out[-3000:] + err[-3000:]
    assert "Traceback" not in out + err and "forcefully exiting" not in err  # no SIGKILL after torchrun's 30 s
    assert {path.name: path.read_text() for path in exits.iterdir()} == {"rank0": "143", "rank1": "143"}
    last = project / "exp" / "weights" / "last.pt"
    resume = f"crosskd train resume={last.resolve()}"
    stop_lines = [line for line in (out + err).splitlines() if "resume with:" in line]
    where = "epoch 1/2 iteration 2/4"
    assert stop_lines == [f"SIGTERM received: stopped at {where} and saved {last}; resume with: {resume}"]
    assert run_files(project) == ["exp/args.yaml", "exp/weights/last.pt"]  # rank 0's alone: no exp2, no .tmp
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 0 and ckpt["partial_epoch"]["batches"] == 2 and ckpt["scheduler"]["iteration"] == 2

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                "-m"]  # `-m crosskd train resume=...`: the printed command
    resumed = subprocess.run([*torchrun, *shlex.split(resume)], capture_output=True, text=True, timeout=300, env=env,
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "DDP: gloo process group of 2 processes" in resumed.stdout
    assert "from epoch 1 iteration 3 to 2" in resumed.stdout
    assert [r["epoch"] for r in read_rows(project / "exp")] == ["1", "2"]
    assert load_checkpoint(last)["epoch"] == -1  # finished (stripped)
    print(f"SIGTERM after {signalled - start:.1f} s, all stopped {stopped - signalled:.1f} s later (exit 143), "
          f"resumed run {time.monotonic() - stopped:.1f} s; {stop_lines[0]}")


@pytest.mark.parametrize(("partial", "kept"), [(None, ["1", "2"]), ({"batches": 3, "loss_sums": {}}, ["1"])])
def test_restore_trims_results_csv_to_the_checkpoints_finished_epochs(tmp_path, partial, kept):
    """The fast share of the kill-anywhere tests: RunState.restore of a last.pt whose epoch index is 1 (0-based),
    finished or mid-epoch, over a results.csv that a killed run left with later epochs, a repeat and a torn line."""
    from crosskd.engine.training.run_state import RunState

    header = ["epoch", "train/box_loss", "lr/pg0"]
    rows = [["1", "0.9", "0.01"], ["2", "0.8", "0.01"], ["2", "0.7", "0.01"], ["3", "0.6", "0.01"], ["4", "0.5"]]
    (tmp_path / "results.csv").write_text("\n".join(",".join(row) for row in [header, *rows]) + "\n")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    trainer = SimpleNamespace(
        optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None, world_size=1,
        save_dir=tmp_path, weights_dir=tmp_path, args=SimpleNamespace(epochs=5), restore_extras=lambda ckpt: None,
    )
    state = RunState(trainer)
    state.restore({"optimizer": optimizer.state_dict(), "epoch": 1, "partial_epoch": partial})
    assert state.start_epoch == len(kept)
    with open(tmp_path / "results.csv", newline="") as f:
        assert list(csv.reader(f)) == [header, *rows[: len(kept)]]  # the first row of an epoch wins
