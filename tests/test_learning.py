"""The recipe learns: the demo recipe's trainer (AdamW + OneCycle, focal loss with class
weights, the real loaders and augmentation over the synth clips) on a small fixed set, with
a model small enough for seconds on a CPU. The training loss falls and dev weighted F1 beats
the all-neutral baseline; the same seed gives the same numbers (deterministic on CPU).

SlowFast R50 itself is not the model here: on 2 CPU cores it needs minutes of epochs on a
few hundred clips before it beats the baseline (the README's demo run: 8 epochs, 240 clips,
85 s on two free cores). What this checks is that the training loop turns a learnable
signal into a better-than-baseline model: a stuck optimizer, a wrong label, a loss of the
wrong sign or an LR schedule at zero all fail it."""

import pytest
import torch
from torch import nn

from meld_dali.config import load_config
from meld_dali.distributed import Dist
from meld_dali.launch import build_loaders, open_manifest
from meld_dali.model import masked_time_pool
from meld_dali.reporting import EpochReporter
from meld_dali.runtime import Runtime
from meld_dali.trainer import Trainer


class ColourNet(nn.Module):
    """Per-pixel colour detectors (a 1x1x1 conv), their strongest response in each frame,
    averaged over the valid frames (the product's masked pooling), a linear head: the synth
    clips' emotion is the colour of a square, which this can learn."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 16, 1)
        self.fc = nn.Linear(16, 7)
        self.trainable: set[str] = set()

    def set_trainable(self, stages):
        self.trainable = set(stages)

    def forward(self, video, mask):
        spots = torch.relu(self.conv(video)).amax(dim=(3, 4), keepdim=True)  # anywhere
        return self.fc(masked_time_pool(spots, mask))


def train_demo_recipe(root) -> list[dict]:
    cfg = load_config("demo", [f"data.root={root}", "data.num_frames=4", "train.batch_size=4",
                               "loader.workers=0", "loader.backend=torch"])
    runtime = Runtime.resolve(cfg, torch.device("cpu"))
    manifest = open_manifest(root)
    _, train, dev = build_loaders(cfg, manifest, runtime, Dist())
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, ColourNet(), train, dev, manifest.class_counts("train"), runtime,
                      reporter=EpochReporter(enabled=False),
                      clip_ids=[c.clip_id for c in manifest.clips])
    result = trainer.train()
    assert result["epochs"] == cfg.train.epochs == 8  # the demo's whole schedule ran
    return trainer.history


@pytest.mark.slow
def test_demo_recipe_learns_past_the_all_neutral_baseline(synth_root):
    rows = train_demo_recipe(synth_root)
    loss = [r["train_loss"] for r in rows]
    f1 = [r["weighted_f1"] for r in rows]
    print("train loss", [round(v, 4) for v in loss])
    print("dev weighted F1", [round(v, 4) for v in f1], "baseline",
          rows[0]["baseline_weighted_f1"])
    assert loss[-1] < 0.8 * loss[0]  # measured: 1.377 -> 0.931
    baseline = rows[0]["baseline_weighted_f1"]  # all-neutral: 0.245 on these 12 dev clips
    assert f1[-1] > baseline + 0.15  # measured: 0.573
    again = train_demo_recipe(synth_root)
    assert [(r["train_loss"], r["weighted_f1"]) for r in again] == list(zip(loss, f1, strict=True))
