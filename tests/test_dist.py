"""How a torchrun worker ends: after the command, through os._exit with its logs flushed (crosskd.dist)."""

import subprocess
import sys
import textwrap

LEAK_PROBE = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from torch import nn
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    module = nn.parallel.DistributedDataParallel(nn.Linear(3, 3))
    del module
    dist.destroy_process_group()
    names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
    print(sum(name.startswith("pt_gloo") for name in names))
    sys.stdout.flush()
    os._exit(0)
""")


def run_cli(words: list[str], world_size: int) -> subprocess.CompletedProcess:
    env = {"WORLD_SIZE": str(world_size), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "crosskd", *words], capture_output=True, text=True, env=env,
                          timeout=120)


def test_torch_keeps_the_gloo_group_alive_after_ddp(tmp_path):
    """The reason for end_torchrun_worker: when this fails, torch frees the group and the os._exit can go."""
    result = subprocess.run([sys.executable, "-c", LEAK_PROBE, str(tmp_path / "store")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) > 0


def test_a_worker_ends_with_its_output_flushed_and_its_exit_code():
    done = run_cli(["version"], world_size=2)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()  # printed through a pipe (block-buffered) and still there after os._exit

    failed = run_cli(["train", "epochz=3"], world_size=2)
    assert failed.returncode == 2
    assert "ERROR:" in failed.stderr and "epochz" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_outside_torchrun_the_exit_code_is_the_same():
    assert run_cli(["version"], world_size=1).returncode == 0
    assert run_cli(["train", "epochz=3"], world_size=1).returncode == 2
