"""evaluate and predict with a tiny trained checkpoint."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from meld_dali.inference import evaluate, load_for_inference, predict_file
from meld_dali.launch import run_training
from meld_dali.synth import render_clip, write_video

# every test here scores a trained run (module fixture): the slow tier
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(synth_root, tmp_path_factory):
    from meld_dali.config import load_config

    cfg = load_config("demo", [
        "data.num_frames=4", "train.batch_size=4", "train.epochs=1", "loader.workers=0",
        "model.hidden=[32, 16]", "loader.backend=torch", "train.max_steps_per_epoch=2",
        f"data.root={synth_root}"])
    d = tmp_path_factory.mktemp("inf") / "run"
    run_training(cfg, d)
    yield d
    shutil.rmtree(d.parent)  # its checkpoints are ~400 MB each: gone once the module is done


def test_evaluate_matches_the_trainers_last_eval(run, synth_root):
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    loaded = load_for_inference(run / "checkpoints" / "last.pt", "cpu")
    assert "optimizer" in loaded.ckpt  # a full training checkpoint loads for inference
    result = evaluate(loaded, None, "dev", backend="torch")
    for key in ("accuracy", "macro_f1", "weighted_f1", "baseline_weighted_f1", "confusion",
                "per_class"):
        assert result[key] == last[key], key


def test_multi_view_is_reported_beside_single_view(run, synth_root):
    loaded = load_for_inference(run / "checkpoints" / "best.pt", "cpu")
    result = evaluate(loaded, synth_root, "dev", backend="torch", views=(2, 3))
    mv = result["multi_view"]
    assert mv["views"] == {"temporal": 2, "spatial": 3} and mv["n"] == result["n"]
    # the figures, recomputed here: the multi-view probabilities (the loader's, checked
    # against the per-clip definition below), the manifest's labels, scikit-learn's F1
    from sklearn.metrics import accuracy_score, f1_score

    from meld_dali.data.base import LoaderSpec
    from meld_dali.data.torch_loader import TorchLoader
    from meld_dali.evaluation import predict_loader
    from meld_dali.manifest import Manifest

    m, cfg = Manifest.load(synth_root), loaded.cfg
    spec = LoaderSpec(m, "dev", False, 4, cfg.train.seed, source="video", views=(2, 3))
    _, probs, rows = predict_loader(loaded.model, TorchLoader(spec, cfg.data, cfg.loader),
                                    loaded.runtime)
    truth, pred = [m.clips[r].label for r in rows.tolist()], probs.argmax(1)
    assert len(truth) == mv["n"]
    assert mv["accuracy"] == pytest.approx(accuracy_score(truth, pred), abs=1e-12)
    assert mv["weighted_f1"] == pytest.approx(
        f1_score(truth, pred, labels=range(7), average="weighted", zero_division=0), abs=1e-12)


def test_multi_view_probabilities_are_the_per_clip_definition(run, synth_root):
    """Through the loader (views batched across clips, averaged by row in predict_loader):
    each clip's probabilities = the mean softmax of the old per-clip path's views."""
    import torch

    from meld_dali.data.base import LoaderSpec
    from meld_dali.data.decode import read_clip, to_clip
    from meld_dali.data.torch_loader import TorchLoader
    from meld_dali.evaluation import predict_loader
    from meld_dali.manifest import Manifest
    from meld_dali.sampling import sample_indices
    from meld_dali.transforms import AugParams

    loaded = load_for_inference(run / "checkpoints" / "best.pt", "cpu")
    m, cfg = Manifest.load(synth_root), loaded.cfg
    spec = LoaderSpec(m, "dev", False, 4, cfg.train.seed, source="video", views=(2, 3))
    _, multi, rows = predict_loader(loaded.model, TorchLoader(spec, cfg.data, cfg.loader),
                                    loaded.runtime)
    assert rows.tolist() == m.ok("dev")
    for row, probs in list(zip(rows.tolist(), multi, strict=True))[:6]:
        clip, views = m.clips[row], []
        for t in (0.25, 0.75):
            idx, mask = sample_indices(clip.num_frames, cfg.data.num_frames, train=False,
                                       position=t)
            raw = read_clip(m, clip, idx[mask], "video")
            views += [to_clip(raw, cfg.data, AugParams(crop_x=p)) for p in (0.0, 0.5, 1.0)]
        video, mask = (torch.stack(v) for v in zip(*views, strict=True))
        with torch.no_grad():
            want = loaded.model(video, mask).float().softmax(-1).mean(0)
        np.testing.assert_allclose(probs, want.numpy(), atol=1e-5)


def test_predict_of_a_dataset_file_equals_its_evaluation(run, synth_root):
    """predict plans a loose file as evaluation plans a manifest clip (one make_plan): the
    same file gets the same probabilities both ways."""
    from meld_dali.data.base import LoaderSpec
    from meld_dali.data.torch_loader import TorchLoader
    from meld_dali.evaluation import predict_loader
    from meld_dali.manifest import Manifest

    loaded = load_for_inference(run / "checkpoints" / "best.pt", "cpu")
    m, cfg = Manifest.load(synth_root), loaded.cfg
    spec = LoaderSpec(m, "dev", False, 4, cfg.train.seed, source="video")
    _, probs, rows = predict_loader(loaded.model, TorchLoader(spec, cfg.data, cfg.loader),
                                    loaded.runtime)
    for row, want in list(zip(rows.tolist(), probs, strict=True))[:4]:
        got = predict_file(loaded, m.video_path(m.clips[row]))
        assert got["frames"] == m.clips[row].num_frames
        np.testing.assert_allclose(list(got["probabilities"].values()), want, atol=1e-6)


@pytest.mark.parametrize("codec", ["h264", "vp9", "mjpeg"])
def test_predict_any_codec_size_and_length(run, tmp_path, codec):
    rng = np.random.default_rng(0)
    path = tmp_path / f"clip.{'webm' if codec == 'vp9' else 'mp4'}"
    if codec == "mjpeg":
        path = tmp_path / "clip.avi"
    write_video(path, render_clip(3, 50, 96, 72, rng), codec, fps=30)
    loaded = load_for_inference(run / "checkpoints" / "best.pt", "cpu")
    r = predict_file(loaded, path)
    assert "error" not in r, r
    assert len(r["probabilities"]) == 7 and r["frames"] == 50
    assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert r["emotion"] == max(r["probabilities"], key=r["probabilities"].get)


def test_predict_cli_reports_bad_files_and_predicts_the_rest(run, tmp_path):
    good = tmp_path / "good.mp4"
    write_video(good, render_clip(1, 3, 64, 48, np.random.default_rng(1)), "h264")  # 3 frames
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    r = subprocess.run([sys.executable, "-m", "meld_dali", "predict",
                        str(run / "checkpoints" / "best.pt"), str(good), str(bad),
                        str(tmp_path / "absent.mp4"), "--json", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert [o["path"] for o in out] == [str(good), str(bad), str(tmp_path / "absent.mp4")]
    assert "probabilities" in out[0] and "error" in out[1] and "error" in out[2]
    assert str(bad) in r.stderr and "Traceback" not in r.stderr
    assert "predict 3/3" in r.stderr  # progress goes to stderr; stdout stays JSON


def test_evaluate_cli_json(run, synth_root, tmp_path):
    r = subprocess.run([sys.executable, "-m", "meld_dali", "evaluate",
                        str(run / "checkpoints" / "best.pt"), "--split", "test", "--backend",
                        "torch", "--json", str(tmp_path / "e.json"), "--png",
                        str(tmp_path / "c.png"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["split"] == "test" and result["n"] > 0
    assert "clips/s" in r.stderr and "weighted F1" in r.stdout  # progress, then the table
    assert (tmp_path / "c.png").exists()
