"""State and safety: the schedule on an extended resume, checkpoints read as data only,
saving kept out of the data-wait timer."""

import os
import time

import pytest
import torch

from meld_dali import checkpoint as ckpt_io
from meld_dali.config import load_config
from meld_dali.data.base import SyntheticLoader
from meld_dali.errors import UserError
from meld_dali.trainer import Trainer
from tests.test_trainer import CPU, TinyNet


def tiny_trainer(epochs: int, **kw) -> Trainer:
    cfg = load_config(None, ["train.batch_size=2", "train.accum_steps=1", f"train.epochs={epochs}",
                             "train.min_epochs=0", "optim.class_weights=none"])
    train, dev = (SyntheticLoader.random(6, 4, 8, batch_size=2, seed=s) for s in (1, 2))
    return Trainer(cfg, TinyNet(), train, dev, [1] * 7, CPU, **kw)


def lrs(trainer) -> list[float]:
    return [row["lr"] for row in trainer.history]


def test_extended_resume_rebuilds_the_schedule(tmp_path):
    """3 epochs, then resumed with train.epochs=5: the two extra epochs follow the 5-epoch
    OneCycle from the current step (as a straight 5-epoch run does), never a frozen LR."""
    short = tiny_trainer(3)
    short.train()
    ckpt_io.atomic_save(short.checkpoint(), tmp_path / "last.pt")
    longer = tiny_trainer(5)
    longer.restore(ckpt_io.load_checkpoint(tmp_path / "last.pt"))
    assert longer.scheduler.total_steps == 15 and longer.scheduler.last_epoch == 9
    longer.train()
    straight = tiny_trainer(5)
    straight.train()
    assert lrs(longer)[3:] == pytest.approx(lrs(straight)[3:])
    assert lrs(longer)[3] != pytest.approx(lrs(longer)[4])  # still moving
    assert longer.step == straight.step == 15


class CraftedPickle:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_crafted_checkpoint_runs_no_code(tmp_path, synth_root):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
                "model": CraftedPickle(marker)}, bad)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        ckpt_io.load_checkpoint(bad)  # evaluate, predict and --resume all read through this
    from meld_dali.cli import main

    with pytest.raises(SystemExit) as e:  # predict: one line, exit 1
        main(["predict", str(bad), str(tmp_path / "x.mp4")])
    assert e.value.code == 1
    from meld_dali.config import ModelConfig
    from meld_dali.model import SlowFastMELD

    model = SlowFastMELD(ModelConfig(hidden=[8, 8]))
    with pytest.raises(UserError, match="cannot load it"):  # pretrained weights: refused
        model.load_pretrained(str(bad))
    assert not marker.exists()


def test_checkpoint_is_one_entry_per_part_and_nothing_twice(tmp_path):
    """The state tree: each part's own state_dict under its name, the header, nothing else;
    the stage (derived from the epoch) and the pre-tree keys are not there."""
    tr = tiny_trainer(2)
    tr.train(until_epoch=1)
    ckpt = tr.checkpoint()
    assert set(ckpt) == {"format", "version", "emotions", "config", "train", "model",
                         "optimizer", "scheduler", "scaler", "early_stop", "reporter", "ranks"}
    assert set(ckpt["train"]) == {"epoch", "step", "epoch_stats", "rank_weights"}
    assert ckpt["train"]["rank_weights"] == []  # one process: no ranks to compare
    assert ckpt["train"]["epoch"] == 1 and ckpt["train"]["step"] == 3
    assert [r["epoch"] for r in ckpt["reporter"]["history"]] == [0]
    (rank,) = ckpt["ranks"]  # one process: one rank's loader position and RNG states
    assert rank["loader"] == {"epoch": 1, "consumed": 0, "delivered": 0, "seed": 0}
    assert set(rank["rng"]) >= {"python", "numpy", "torch"}
    # restoring the tree into a fresh trainer gives back the same tree
    ckpt_io.atomic_save(ckpt, tmp_path / "last.pt")
    other = tiny_trainer(2)
    other.restore(ckpt_io.load_checkpoint(tmp_path / "last.pt"))
    again = other.checkpoint()
    for name in ("train", "scheduler", "early_stop", "reporter"):
        assert again[name] == ckpt[name], name
    assert again["ranks"][0]["loader"] == rank["loader"]
    for k, v in ckpt["model"].items():
        assert torch.equal(again["model"][k], v), k


def test_a_refused_resume_changes_no_file(tmp_path):
    """A checkpoint of 2 processes stopped mid-epoch, resumed on 1: refused in one line, and
    metrics.jsonl (which a resume rewrites from the checkpoint's history) is untouched."""
    from meld_dali.reporting import METRICS_NAME, EpochReporter

    tr = tiny_trainer(2)
    tr.train(until_epoch=1)
    ckpt = tr.checkpoint()
    ckpt["ranks"] = [{**ckpt["ranks"][0], "loader": {**ckpt["ranks"][0]["loader"],
                                                     "consumed": 2, "delivered": 1}}] * 2
    log = tmp_path / METRICS_NAME
    log.write_text('{"epoch": 0}\n{"epoch": 1}\n')  # one row more than the checkpoint
    other = tiny_trainer(2, reporter=EpochReporter(tmp_path))
    with pytest.raises(UserError, match="written by 2 processes, this run has 1"):
        other.restore(ckpt)
    assert log.read_text() == '{"epoch": 0}\n{"epoch": 1}\n'


def test_a_checkpoint_of_the_flat_format_is_refused_in_one_line(tmp_path):
    flat = tiny_trainer(1).checkpoint()
    flat["version"] = 1
    ckpt_io.atomic_save(flat, tmp_path / "old.pt")
    with pytest.raises(UserError, match=r"format v1, this meld-dali reads v2 only"):
        ckpt_io.load_checkpoint(tmp_path / "old.pt")


class Clock:
    """The trainer's clock (`time.perf_counter`), which a save moves an hour ahead: time
    spent saving is then unmistakable, whatever the machine's speed."""

    def __init__(self):
        self.offset = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.offset


class SlowSaver(ckpt_io.CheckpointSaver):
    def __init__(self, folder, clock: Clock):
        super().__init__(folder)
        self.clock = clock

    def save_last(self, states, cfg):
        self.clock.offset += 3600.0  # an hour-long save, as the trainer's clock sees it
        super().save_last(states, cfg)


def test_saving_is_not_counted_as_data_wait(tmp_path, monkeypatch):
    import meld_dali.trainer

    clock = Clock()
    monkeypatch.setattr(meld_dali.trainer, "time", clock)
    tr = tiny_trainer(1, saver=SlowSaver(tmp_path, clock))
    tr.cfg.train.checkpoint_every_steps = 1
    tr.train_one_epoch()  # 3 steps, 3 saves: 3 h that are neither data wait nor steps
    stats = tr.take_stats()
    assert (tmp_path / "last.pt").exists() and tr.step == 3 and clock.offset == 3 * 3600
    # the bound is on what is counted, not on speed: real waiting never comes near an hour
    assert stats.data_wait < 3600, stats
    assert stats.step_time < 3600, stats


# a child that writes `target` through atomic_write for ever (64 KiB at a time, flushed, so
# the temp file grows on disk) until it is killed
SLOW_WRITER = """
import sys, time
from meld_dali.fileio import atomic_write
with atomic_write(sys.argv[1], "wb", keep_previous=True) as f:
    while True:
        f.write(b"x" * 65536)
        f.flush()
        time.sleep(0.01)
"""


@pytest.mark.slow  # a real process, killed
def test_a_write_killed_midway_leaves_the_old_file_whole(tmp_path):
    """A real SIGKILL to a process inside atomic_write (checkpoints, manifest, metrics): no
    cleanup runs, yet the file it would replace is whole, the leftover temp file is not read
    as a checkpoint, and the next write to that file removes it (a live writer's is kept)."""
    import signal
    import subprocess
    import sys

    from meld_dali.checkpoint import resume_candidates
    from meld_dali.fileio import temp_path

    target = tmp_path / "checkpoints" / "last.pt"
    ckpt_io.atomic_save({"step": 1}, target)
    before = target.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)])
    try:
        deadline, tmps = time.monotonic() + 120, []
        while time.monotonic() < deadline and child.poll() is None:
            tmps = [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
            if tmps and tmps[0].stat().st_size > 0:
                break
            time.sleep(0.02)
        assert tmps and tmps[0].stat().st_size > 0, "the child never started writing"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    (leftover,) = tmps
    assert leftover.exists(), "a SIGKILL runs no cleanup: the temp file must still be there"
    assert target.read_bytes() == before and torch.load(target)["step"] == 1
    assert resume_candidates(tmp_path) == [target]  # the leftover is no checkpoint
    live = temp_path(target)  # another writer, still running (this process): kept
    ckpt_io.atomic_save({"step": 2}, target, keep_previous=True)
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(
        ["last.pt", "last.prev.pt", live.name])
    assert torch.load(target)["step"] == 2
    assert torch.load(tmp_path / "checkpoints" / "last.prev.pt")["step"] == 1


@pytest.mark.parametrize("links", [True, False])
def test_best_and_step_copies_share_last_without_rewriting_it(tmp_path, monkeypatch, links):
    """best.pt and step copies are the last.pt just written (hard links; a copy where the
    filesystem has none); replacing last.pt later leaves them as they were."""
    if not links:  # a filesystem without hard links (cannot be made here): os.link fails
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("no links")))
    saver, cfg = ckpt_io.CheckpointSaver(tmp_path, keep_last=1), load_config(None)
    at = lambda step: {"train": ckpt_io.Part(lambda: {"step": step}, None)}
    saver.save_last(at(1), cfg)
    saver.save_best()
    assert os.path.samefile(saver.last, tmp_path / "best.pt") == links
    saver.save_last(at(2), cfg)
    assert [torch.load(tmp_path / n)["train"]["step"] for n in
            ("last.pt", "last.prev.pt", "best.pt", "step00000002.pt")] == [2, 1, 1, 2]
    assert {p.name for p in tmp_path.iterdir()} == {
        "best.pt", "last.pt", "last.prev.pt", "step00000002.pt"}
