"""Shared fixtures: small synthetic MELD datasets written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from meld_dali.config import load_config
from meld_dali.prepare import prepare
from meld_dali.synth import SynthSpec, synth

torch.set_num_threads(2)
MELD_CSV_DIR = Path(os.environ.get("MELD_CSV_DIR", Path(__file__).parents[2] / "shared" / "meld"))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """60 H.264 clips with MELD's faults, prepared (manifest + frame folders)."""
    root = tmp_path_factory.mktemp("synth_h264")
    synth(root, SynthSpec(clips=60, seed=1, faults=True))
    prepare(root, frames=root / "frames", short_side=36, workers=1)
    return root


@pytest.fixture(scope="session")
def synth_vp9(tmp_path_factory) -> Path:
    """40 VP9 clips, prepared with frame folders (what DALI's CPU decoder takes)."""
    root = tmp_path_factory.mktemp("synth_vp9")
    synth(root, SynthSpec(clips=40, seed=2, codec="vp9"))
    prepare(root, frames=root / "frames", short_side=36, workers=1)
    return root


@pytest.fixture()
def tiny_cfg():
    """A config small enough for seconds-long CPU runs (same code path as the seed)."""
    return load_config("demo", ["data.num_frames=4", "data.crop_size=32", "data.short_side=36",
                                "train.batch_size=4", "train.epochs=2", "loader.workers=0",
                                "model.hidden=[32, 16]", "tracking.wandb=false",
                                "loader.backend=torch"])
