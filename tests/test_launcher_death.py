"""A killed torchrun leaves no rank behind: each rank gets a stop signal when its launcher dies
(PR_SET_PDEATHSIG), stops with the others after the same step, saves and exits; the run
folder is free and `--resume auto` continues to the same weights as a run never stopped."""

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

from meld_dali.checkpoint import load_checkpoint
from meld_dali.fileio import FolderLock
from tests.test_ddp import TORCHRUN

# 2 gloo ranks, a DataLoader worker each, a checkpoint every optimizer step, 6 steps
TINY = ["data.num_frames=4", "train.batch_size=2", "loader.workers=1", "model.hidden=[32, 16]",
        "loader.backend=torch", "train.checkpoint_every_steps=1", "tracking.wandb=false",
        "train.epochs=1", "train.max_steps_per_epoch=6"]
MARK = "MELD_DALI_TEST_RUN"  # in the environment of every process of a launch


def launch(run: Path, root: Path, log: Path, mark: str) -> subprocess.Popen:
    """torchrun in a session of its own (`setsid`), the way a cluster or a terminal runs it."""
    args = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "meld_dali", "train",
            "--config", "demo", "--data", str(root), "--out", str(run), "--resume", "auto"]
    for s in TINY:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250", MARK: mark}
    return subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("torchrun hung:\n" + log.read_text()[-4000:])
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def live_processes(mark: str, run: Path) -> dict[int, str]:
    """pid -> cmdline of every live process of a launch: the mark in its environment (the
    agent, the ranks, their workers) or the run folder on its command line."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours
            continue
        if state != "Z" and (f"{MARK}={mark}".encode() in env or str(run) in cmd):
            found[int(d.name)] = cmd
    return found


def model_of(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.mark.slow
def test_killed_torchrun_stops_every_rank_and_resumes(synth_root, tmp_path):
    """SIGKILL to torchrun's process group after the first checkpoint: within 120 s no
    process of the run is left (ranks and DataLoader workers stopped too) and the ranks
    stopped mid-run (without the death signal they train on to the end, orphaned), having
    agreed on the stop and saved it (the resume hint printed, however many copies of the
    death signal the kernel sent); the run folder's lock is free; `--resume auto` on 2
    processes finishes the run. The rule: the stop lands after a complete optimizer step,
    which last.pt holds, so the resumed run's weights equal those of a run never stopped,
    bit for bit."""
    straight = tmp_path / "straight"
    finish(launch(straight, synth_root, tmp_path / "straight.log", uuid.uuid4().hex),
           tmp_path / "straight.log")
    total = load_checkpoint(straight / "checkpoints" / "last.pt")["train"]["step"]

    run, log, mark = tmp_path / "run", tmp_path / "run.log", uuid.uuid4().hex
    proc = launch(run, synth_root, log, mark)
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 600
    while not last.exists():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)
    ranks = [p for p, cmd in live_processes(mark, run).items() if p != proc.pid]
    assert len(ranks) >= 2, "the ranks are gone before the kill:\n" + log.read_text()[-4000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the agent alone: each rank has a session of its own
    proc.wait()
    killed = time.monotonic()
    left = live_processes(mark, run)
    while left and time.monotonic() < killed + 120:
        time.sleep(0.2)
        left = live_processes(mark, run)
    assert not left, f"left running 120 s after torchrun was killed: {left}\n{log.read_text()}"
    out = log.read_text()
    assert "torchrun died: finishing the current step" in out, (
        "the ranks got no stop signal when torchrun died:\n" + out[-2000:])
    assert "interrupted: saved" in out and "--resume auto" in out, (
        "the ranks did not save their stop:\n" + out[-2000:])
    with open(run / FolderLock.NAME) as f:  # the run folder's lock is free
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    stopped = load_checkpoint(last)
    assert 0 < stopped["train"]["step"] < total, "the stop came after the end of the run"
    assert len(stopped["ranks"]) == 2

    out = finish(launch(run, synth_root, tmp_path / "resume.log", uuid.uuid4().hex),
                 tmp_path / "resume.log")
    assert f"step {stopped['train']['step']})" in out, out[-4000:]  # resumed, not restarted
    resumed, ref = model_of(last), model_of(straight / "checkpoints" / "last.pt")
    assert load_checkpoint(last)["train"]["step"] == total
    assert resumed.keys() == ref.keys()
    assert all(torch.equal(resumed[k], ref[k]) for k in ref), "not the weights of a straight run"


CHILD = textwrap.dedent("""
    import os, sys, time
    launcher, race = os.getppid(), sys.argv[1] == "race"
    from meld_dali import signals

    if race:  # the launcher dies after this rank read its parent, before it armed
        print("read", flush=True)
        while os.getppid() == launcher:
            time.sleep(0.01)
        real, first = os.getppid, [launcher]
        os.getppid = lambda: first.pop() if first else real()
    print("armed", signals.stop_with_launcher(), flush=True)
    time.sleep(30)
    print("survived", flush=True)
""")

PARENT = textwrap.dedent("""
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]],
                             stdout=open(sys.argv[3], "w"))
    print(child.pid, flush=True)
    sys.stdin.readline()  # dies when told, without waiting for the child
""")


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG: Linux")
@pytest.mark.parametrize("mode", ["armed", "race"])
def test_a_rank_stops_when_its_launcher_is_gone(tmp_path, mode):
    """A rank's launcher (its parent) dies after the rank armed the death signal, or between
    the rank reading its parent and arming it: either way the rank gets the launcher's death
    signal at once (no handler here: its default action ends the process)."""
    out = tmp_path / "child.out"
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "LOCAL_RANK": "0"}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, mode, str(out)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while not out.exists() or ("armed" if mode == "armed" else "read") not in out.read_text():
        assert time.monotonic() < deadline and not gone(child), out.read_text()
        time.sleep(0.05)
    parent.stdin.write("die\n")
    parent.stdin.flush()
    parent.wait(timeout=60)
    deadline = time.monotonic() + 25  # the child sleeps 30 s once armed unless stopped
    while not gone(child):
        assert time.monotonic() < deadline, f"still running: {out.read_text()}"
        time.sleep(0.05)
    # raced: the signal came inside stop_with_launcher, before it returned
    assert out.read_text() == ("armed True\n" if mode == "armed" else "read\n")


def test_not_armed_outside_torchrun(monkeypatch):
    from meld_dali import signals

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    signals.stop_with_launcher.cache_clear()
    assert signals.stop_with_launcher() is False
