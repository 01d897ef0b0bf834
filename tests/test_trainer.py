"""Recipe pieces (schedule, early stopping, accumulation) and end-to-end runs on synth data."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console
from torch import nn

from meld_dali.checkpoint import load_checkpoint
from meld_dali.config import Config, load_config
from meld_dali.data.base import SyntheticLoader
from meld_dali.errors import UserError
from meld_dali.launch import build_trainer, run_training
from meld_dali.recipe import EarlyStopping, build_scheduler, stages_for_epoch
from meld_dali.reporting import EpochReporter
from meld_dali.runtime import Runtime
from meld_dali.trainer import Trainer
from tests.faults import corrupt_in_place

CPU = Runtime.resolve(load_config(None), torch.device("cpu"))


def test_onecycle_start_peak_end_and_warmup():
    p = nn.Parameter(torch.zeros(1))
    cfg = Config().optim
    opt = torch.optim.AdamW([p], lr=cfg.base_lr)
    total = 100
    sched = build_scheduler(opt, cfg, total)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(total - 1):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[0] == pytest.approx(1e-5)
    peak = max(range(total), key=lambda i: lrs[i])
    assert lrs[peak] == pytest.approx(1e-3)
    assert peak == pytest.approx(0.3 * total, abs=1)  # 30% warmup
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-3)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1], strict=True))  # rising
    assert all(a >= b for a, b in zip(lrs[peak:-1], lrs[peak + 1:], strict=True))  # annealing


def test_early_stopping_rules():
    es = EarlyStopping(patience=3, min_epochs=6, min_delta=0.005)
    assert es.update(0.30)
    assert not es.update(0.304)  # +0.004 is not an improvement
    assert not es.update(0.30) and not es.update(0.29)
    assert es.bad_epochs == 3
    assert not es.should_stop(epoch=3)  # patience used up, but before min_epochs
    assert es.should_stop(epoch=5)
    assert es.update(0.306) and es.bad_epochs == 0 and not es.should_stop(epoch=9)


@pytest.mark.parametrize(("patience", "min_epochs", "stops_after"), [
    (2, 5, 5),  # patience runs out after epoch 2; min_epochs holds the run to 5 epochs
    (3, 1, 4),  # min_epochs is no bar; patience (3 epochs without a gain) ends it
])
def test_early_stopping_ends_the_run(patience, min_epochs, stops_after):
    """The Trainer's own loop stops a run before train.epochs, at the epoch the rules say,
    and says why. min_delta=1 makes every epoch after the first one without a gain (weighted
    F1 cannot rise by 1), so the stop epoch depends on the rules alone, not on learning."""
    cfg = load_config(None, ["train.batch_size=4", "train.accum_steps=1", "train.epochs=10",
                             "train.min_delta=1.0",
                             f"train.patience={patience}", f"train.min_epochs={min_epochs}",
                             "optim.class_weights=none"])
    loader = SyntheticLoader.random(8, 4, 8, batch_size=4, seed=1)
    out = io.StringIO()
    reporter = EpochReporter(console=Console(file=out, force_terminal=False, width=200))
    tr = Trainer(cfg, TinyNet(), loader, loader, [1] * 7, CPU, reporter=reporter)
    result = tr.train()
    assert result["epochs"] == tr.epoch == stops_after < cfg.train.epochs
    assert [r["epoch"] for r in tr.history] == list(range(stops_after))
    assert [r["best"] for r in tr.history] == [True] + [False] * (stops_after - 1)
    assert tr.step == stops_after * 2  # no epoch ran past the stop (2 steps per epoch)
    said = [ln for ln in out.getvalue().splitlines() if ln.startswith("early stop")]
    assert said == [f"early stop: no weighted-F1 gain >= 1.0 for {patience} epochs "
                    f"(best {tr.history[0]['weighted_f1']:.4f})"]
    assert out.getvalue().rstrip().splitlines()[-1] == said[0]  # the last word of the run


def test_unfreeze_schedule():
    t = Config().train
    assert stages_for_epoch(t, 0) == set()
    assert stages_for_epoch(t, 3) == {"res5"}
    assert stages_for_epoch(t, 8) == {"res5", "res4"}
    assert stages_for_epoch(t, 40) == {"res5", "res4", "res3"}


class TinyNet(nn.Module):
    """A model over Batch tensors with no BatchNorm or dropout, for exact comparisons."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 7)
        self.trainable: set[str] = set()

    def set_trainable(self, stages):
        self.trainable = set(stages)

    def forward(self, video, mask):
        return self.fc(video.mean(dim=(2, 3, 4)))


class GradProbe(Trainer):
    """The real Trainer, recording each applied gradient and the weights it applies to."""

    def optimizer_step(self):
        self.seen = getattr(self, "seen", [])
        self.seen.append(({n: p.detach().clone() for n, p in self.model.named_parameters()},
                          {n: p.grad.clone() for n, p in self.model.named_parameters()}))
        super().optimizer_step()


def test_accumulating_4_micro_batches_equals_one_4x_batch():
    """Same gradient (not just a similar AdamW step, which is ~lr*sign(g) on step one and
    would hide a constant scale error) and the same weights."""
    data = SyntheticLoader.random(8, 4, 8, batch_size=2, seed=1)
    runs = []
    for bs, accum in ((2, 4), (8, 1)):
        cfg = load_config(None, [f"train.batch_size={bs}", f"train.accum_steps={accum}",
                                 "optim.class_weights=none", "train.epochs=1"])
        loader = SyntheticLoader(data.video, data.mask, data.label, bs)
        tr = GradProbe(cfg, TinyNet(), loader, loader, [1] * 7, CPU)
        tr.train_one_epoch()
        assert tr.step == 1
        runs.append(tr)
    (_, g_acc), (_, g_big) = runs[0].seen[0], runs[1].seen[0]
    for name in g_big:
        assert torch.allclose(g_acc[name], g_big[name], rtol=1e-5, atol=1e-7), name
    assert torch.allclose(runs[0].model.fc.weight, runs[1].model.fc.weight, atol=1e-6)
    assert not torch.equal(runs[0].model.fc.weight, TinyNet().fc.weight)


def test_last_partial_accumulation_group_is_applied():
    """5 micro-batches at accumulation 4: a group of 4, then a group of 1 whose gradient is
    that one batch's own (scaled by 1/1, not 1/4)."""
    cfg = load_config(None, ["train.batch_size=2", "train.accum_steps=4", "train.epochs=1",
                             "optim.class_weights=none"])
    loader = SyntheticLoader.random(10, 4, 8, batch_size=2)  # 5 micro-batches: 4 + 1
    tr = GradProbe(cfg, TinyNet(), loader, loader, [1] * 7, CPU)
    tr.train_one_epoch()
    assert tr.step == 2 and tr.scheduler.total_steps == 2
    assert all(p.grad is None for p in tr.model.parameters())
    weights, grads = tr.seen[1]
    net = TinyNet()
    net.load_state_dict(weights)
    loss = tr.criterion(net(loader.video[8:], loader.mask[8:]), loader.label[8:])
    loss.backward()
    for name, p in net.named_parameters():
        assert torch.allclose(p.grad, grads[name], rtol=1e-5, atol=1e-7), name


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_end_to_end_run(synth_root, tiny_cfg, tmp_path):
    tiny_cfg.data.root = str(synth_root)
    tiny_cfg.train.max_steps_per_epoch = 2
    result = run_training(tiny_cfg, tmp_path / "run")
    run = tmp_path / "run"
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1] and result["epochs"] == 2
    for r in rows:
        for key in ("train_loss", "accuracy", "macro_f1", "weighted_f1", "baseline_weighted_f1",
                    "per_class", "confusion", "data_wait_share"):
            assert key in r
        assert r["n"] == 12 and sum(map(sum, r["confusion"])) == 12  # every dev clip once
    assert rows[0]["stages"] == ["res5"] and rows[1]["stages"] == ["res4", "res5"]
    assert (run / "config.yaml").exists() and (run / "confusion_epoch001.png").exists()
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["train"]["epoch"] == 2 and last["emotions"][0] == "neutral"
    assert (run / "checkpoints" / "best.pt").exists()
    with pytest.raises(UserError, match="already holds a run"):
        run_training(tiny_cfg, run)


@pytest.mark.slow
def test_resume_equality_across_unfreezing(synth_root, tiny_cfg, tmp_path):
    """3 epochs straight == 1 epoch, save, reload, 2 more (bit-exact on CPU), with the
    unfreezing of res4/res3 happening after the resume point."""
    tiny_cfg.data.root = str(synth_root)
    tiny_cfg.train.epochs = 3
    tiny_cfg.train.max_steps_per_epoch = 2
    straight = run_training(tiny_cfg, tmp_path / "a")
    trainer, _ = build_trainer(tiny_cfg, tmp_path / "b")
    trainer.train(until_epoch=1)
    trainer.run_lock.release()  # the first process has ended
    del trainer
    resumed = run_training(tiny_cfg, tmp_path / "b", resume="auto")
    assert straight["epochs"] == resumed["epochs"] == 3
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith(("_s", "share"))}
                          for r in rows]
    assert strip(ma) == strip(mb)


class StopAtStep:
    """A tracker that asks the trainer to stop (as SIGINT would) at a given optimizer step."""
    run_id = None

    def __init__(self, trainer, step):
        self.trainer, self.at = trainer, step

    def log(self, data, step):
        if step == self.at:
            self.trainer.request_stop("test")

    def log_epoch(self, *a, **k): ...

    def log_image(self, *a, **k): ...

    def finish(self): ...


@pytest.mark.slow
def test_resume_equality_mid_epoch_in_process(synth_root, tiny_cfg, tmp_path):
    """N steps straight == stop mid-epoch after k steps (last.pt written to disk), build a
    new trainer from that file, train the rest: bit-exact on CPU, accumulation included."""
    tiny_cfg.data.root = str(synth_root)
    tiny_cfg.train.epochs = 2
    tiny_cfg.train.accum_steps = 2
    tiny_cfg.train.max_steps_per_epoch = 3
    straight, _ = build_trainer(tiny_cfg, tmp_path / "a")
    straight.train()
    first, _ = build_trainer(tiny_cfg, tmp_path / "b")
    first.reporter.tracker = StopAtStep(first, 2)
    result = first.train()
    first.run_lock.release()  # the first process has ended
    assert result["interrupted"] and first.epoch == 0 and first.step == 2
    saved = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert saved["ranks"][0]["loader"]["consumed"] == 2 * 2 * tiny_cfg.train.batch_size
    resumed, _ = build_trainer(tiny_cfg, tmp_path / "b", resume="auto")
    assert resumed.step == 2
    resumed.train()
    assert resumed.step == straight.step == 6
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


@pytest.mark.slow
def test_micro_step_survives_skipped_clips(synth_root, tiny_cfg, tmp_path):
    """A whole batch of unreadable clips early in epoch 0 puts the loader's position ahead
    of the micro-batches trained; the resumed run must form the same accumulation groups."""
    import shutil

    from meld_dali.data.base import ClipOrder
    from meld_dali.manifest import Manifest

    root = tmp_path / "data"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns("frames"))
    m = Manifest.load(root)
    tiny_cfg.data.root = str(root)
    tiny_cfg.data.source = "video"
    tiny_cfg.train.batch_size = 2
    tiny_cfg.train.accum_steps = 2
    tiny_cfg.train.epochs = 1
    tiny_cfg.train.max_steps_per_epoch = 4
    order = ClipOrder(m.ok("train"), train=True, seed=tiny_cfg.train.seed, batch_size=2).order(0)
    for row in order[2:4]:  # the second batch of epoch 0, both clips
        corrupt_in_place(m.video_path(m.clips[row]))
    straight, _ = build_trainer(tiny_cfg, tmp_path / "a")
    straight.train()
    first, _ = build_trainer(tiny_cfg, tmp_path / "b")
    first.reporter.tracker = StopAtStep(first, 1)
    first.train()
    first.run_lock.release()  # the first process has ended
    saved = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    position = saved["ranks"][0]["loader"]
    assert position["delivered"] == 2 and position["consumed"] == 6  # 3 batches read
    resumed, _ = build_trainer(tiny_cfg, tmp_path / "b", resume="auto")
    resumed.train()
    assert resumed.step == straight.step == 4
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


@pytest.mark.slow
def test_resume_refuses_another_config(synth_root, tiny_cfg, tmp_path):
    tiny_cfg.data.root = str(synth_root)
    tiny_cfg.train.epochs = 1
    tiny_cfg.train.max_steps_per_epoch = 1
    run_training(tiny_cfg, tmp_path / "r")
    tiny_cfg.optim.max_lr = 0.5
    with pytest.raises(UserError, match="optim.max_lr"):
        run_training(tiny_cfg, tmp_path / "r", resume="auto")


@pytest.mark.slow
def test_garbage_last_checkpoint_falls_back_to_previous(synth_root, tiny_cfg, tmp_path):
    tiny_cfg.data.root = str(synth_root)
    tiny_cfg.train.epochs = 2
    tiny_cfg.train.max_steps_per_epoch = 1
    run_training(tiny_cfg, tmp_path / "r")
    ck = tmp_path / "r" / "checkpoints"
    assert load_checkpoint(ck / "last.prev.pt")["train"]["epoch"] == 1
    data = (ck / "last.pt").read_bytes()
    (ck / "last.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(ck / "last.pt")
    trainer, _ = build_trainer(tiny_cfg, tmp_path / "r", resume="auto")
    assert trainer.epoch == 1
    # the fallback holds 1 epoch: the row of epoch 1 goes, so the rerun does not double it
    assert [r["epoch"] for r in read_metrics(tmp_path / "r")] == [0]


@pytest.mark.slow
def test_sigint_saves_a_loadable_last(synth_root, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "meld_dali", "train", "--config", "demo", "--data",
            str(synth_root), "--out", str(run), "--set", "train.epochs=50",
            "--set", "data.num_frames=4", "--set", "train.batch_size=4",
            "--set", "loader.workers=0", "--set", "train.checkpoint_every_steps=1",
            "--set", "loader.backend=torch"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resume with" in err
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["train"]["step"] >= 1 and ck["train"]["epoch"] < 50
    trainer, _ = build_trainer(load_config("demo", [
        f"data.root={synth_root}", "train.epochs=50", "data.num_frames=4", "train.batch_size=4",
        "loader.workers=0", "train.checkpoint_every_steps=1", "loader.backend=torch"]),
        run, resume="auto")
    assert trainer.step == ck["train"]["step"]
