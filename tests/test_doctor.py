"""`meld-dali doctor`, backend verification (meld_dali.verify), the hardware tables and the
rough edges a newcomer meets: predict's table at 80 columns, evaluate from another folder,
loader.workers: auto."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from meld_dali.config import BACKENDS, EMOTIONS, load_config
from meld_dali.data.base import LoaderSpec
from meld_dali.data.select import build_loader
from meld_dali.distributed import Dist
from meld_dali.errors import UserError
from meld_dali.hardware import DECODERS, cpu_cores, decodes, gpu_facts, nvdec_engines
from meld_dali.inference import evaluate, load_for_inference
from meld_dali.launch import build_loaders, run_training
from meld_dali.manifest import Manifest
from meld_dali.runtime import Runtime
from meld_dali.synth import render_clip, write_video
from meld_dali.verify import MEAN_TOL, check_backend, compare, first_clips

warnings.filterwarnings("ignore", message=".*external source node.*")
CLI = [sys.executable, "-m", "meld_dali"]


def cli(*args, cwd=None, columns=80, timeout=300):
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


# ----------------------------------------------------------------------------- hardware


def test_one_gpu_table_answers_every_question():
    h100, pcie = gpu_facts("NVIDIA H100 80GB HBM3"), gpu_facts("NVIDIA H100 PCIe")
    assert (h100.nvdec, h100.nvjpg, h100.peak_tflops) == (7, 7, 989.0)
    assert pcie.peak_tflops == 756.0  # the more specific row wins
    assert gpu_facts("NVIDIA L40S").peak_tflops == 362.0  # an L40S is not an L4
    assert gpu_facts("NVIDIA L4").peak_tflops == 121.0
    assert gpu_facts("NVIDIA GeForce RTX 4090") is None
    assert nvdec_engines("NVIDIA GeForce RTX 4090") == 2 and nvdec_engines("NVIDIA A100") == 5
    assert not any(g.compile_faster for g in [h100, pcie])
    assert cpu_cores() == len(os.sched_getaffinity(0))


def test_one_codec_table_for_every_backend():
    assert set(DECODERS) == set(BACKENDS)
    assert decodes("dali-cpu", "vp9") and decodes("dali-cpu", "jpeg")
    assert not decodes("dali-cpu", "h264") and not decodes("dali-cpu", None)
    assert decodes("dali-gpu", "h264", "yuv420p", "High")
    assert not decodes("dali-gpu", "h264", "yuv420p10le", "High 10")
    assert not decodes("dali-gpu", "h264", "yuv420p", "High 4:4:4 Predictive")
    assert decodes("dali-gpu", "vp9", "yuv444p") and decodes("torch", "h264", "yuv444p")


# ----------------------------------------------------------------------------- verify


class Shifted:
    """A deliberately wrong backend: a real loader whose pixels come out shifted."""

    def __init__(self, loader, shift: float):
        self.loader, self.shift, self.failures = loader, shift, loader.failures
        self.counts = loader.counts

    def __iter__(self):
        for b in self.loader:
            b.video = b.video + self.shift
            yield b


def shifted(shift):
    def make(spec, data, loader_cfg, backend):
        return Shifted(build_loader(spec, data, loader_cfg, backend), shift)
    return make


@pytest.fixture()
def vp9_cfg():
    return load_config("demo", ["data.num_frames=8", "loader.workers=1"])


def test_dali_cpu_passes_and_a_shifted_backend_fails(synth_vp9, vp9_cfg):
    m = Manifest.load(synth_vp9)
    good = compare(m, "dev", "video", vp9_cfg.data, vp9_cfg.loader, "dali-cpu")
    assert good.ok and good.clips == 4 and good.mean_abs_diff < MEAN_TOL
    assert 0 < good.max_abs_diff < 2.5  # decoders differ a little, never by much
    bad = compare(m, "dev", "video", vp9_cfg.data, vp9_cfg.loader, "dali-cpu",
                  make_loader=shifted(0.2))
    assert bad.ok is False and bad.mean_abs_diff == pytest.approx(0.2, abs=0.05)
    assert bad.worst.endswith(".mp4") and "differs from the CPU reference" in bad.line()


def test_a_backend_whose_batches_the_cpu_path_made_is_not_verified(synth_root, vp9_cfg):
    """DALI's CPU decoder over H.264 (it takes none: every batch fails inside DALI and is
    redone by the CPU path, which then equals the reference exactly): a failed check that
    says the CPU path made the batches, never a pass at 0.000."""
    m = Manifest.load(synth_root)
    v = compare(m, "dev", "video", vp9_cfg.data, vp9_cfg.loader, "dali-cpu")
    assert v.ok is False and v.mean_abs_diff is None
    assert v.cpu_redone_batches == 2 and v.backend_batches == 0
    assert "2 of 2 batches were made by the CPU path, not dali-cpu" in v.line()
    assert "Failed to create video decoder" in v.line()
    with pytest.raises(UserError, match="made by the CPU path"):
        check_backend(vp9_cfg, m, "video", "dali-cpu", torch.device("cpu"))


def test_train_mode_is_verified_on_each_clips_draws(synth_vp9, vp9_cfg):
    """The train graph (flip, rotation, colour) against the reference on the same plans;
    the rotation's sign reversed in the backend fails it."""
    m = Manifest.load(synth_vp9)
    good = compare(m, "dev", "video", vp9_cfg.data, vp9_cfg.loader, "dali-cpu", train=True)
    assert good.ok and good.mode == "train" and good.clips == 4
    assert good.backend_batches == 2 and good.cpu_redone_batches == 0
    reversed_angle = vp9_cfg.data.model_copy(update={"rotate_deg": -vp9_cfg.data.rotate_deg})

    def wrong_sign(spec, data, loader_cfg, backend):
        return build_loader(spec, reversed_angle, loader_cfg, backend)

    bad = compare(m, "dev", "video", vp9_cfg.data, vp9_cfg.loader, "dali-cpu", train=True,
                  make_loader=wrong_sign)
    assert bad.ok is False and bad.mean_abs_diff > 3 * good.mean_abs_diff
    assert "(video, train)" in bad.line()


def test_two_draws_per_decode_are_verified_each_against_its_own_plan(synth_vp9, vp9_cfg):
    """views_per_decode=2: DALI's one decode and two augmentations (the graph's rearrange)
    against the reference's two plans; the draws swapped in the backend fail it."""
    m = Manifest.load(synth_vp9)
    good = compare(m, "dev", "video", vp9_cfg.data, vp9_cfg.loader, "dali-cpu", train=True,
                   views_per_decode=2)
    assert good.ok and good.mode == "train x2" and good.clips == 4  # 2 clips x 2 draws
    assert good.backend_batches == 1 and good.cpu_redone_batches == 0

    def swapped(spec, data, loader_cfg, backend):  # each clip's draws in the other order
        loader = build_loader(spec, data, loader_cfg, backend)
        deliver = loader.deliver

        def swap(batch):
            b = deliver(batch)
            order = torch.arange(len(b)).view(-1, 2).flip(1).reshape(-1)
            return type(b)(b.video[order], b.mask[order], b.label[order], b.index[order])
        loader.deliver = swap
        return loader

    bad = compare(m, "dev", "video", vp9_cfg.data, vp9_cfg.loader, "dali-cpu", train=True,
                  views_per_decode=2, make_loader=swapped)
    assert bad.ok is False and bad.mean_abs_diff > 3 * good.mean_abs_diff
    assert "(video, train x2)" in bad.line()


def test_nvdec_library_problem_names_the_docker_capability(monkeypatch):
    """No NVIDIA driver here, so libnvcuvid really cannot be loaded: the reason says why
    and, in a container without the `video` capability, how to get it."""
    from meld_dali.hardware import nvcuvid_problem

    monkeypatch.setenv("NVIDIA_DRIVER_CAPABILITIES", "compute,utility")
    why = nvcuvid_problem()
    assert why.startswith("libnvcuvid cannot be loaded (libnvcuvid.so.1")
    assert "NVIDIA_DRIVER_CAPABILITIES including video" in why and "'compute,utility'" in why
    monkeypatch.setenv("NVIDIA_DRIVER_CAPABILITIES", "compute,utility,video")
    assert "it comes with the NVIDIA driver" in nvcuvid_problem()


def test_the_docker_image_keeps_the_video_capability():
    dockerfile = (Path(__file__).parents[1] / "docker" / "Dockerfile").read_text()
    caps = re.search(r"^ENV NVIDIA_DRIVER_CAPABILITIES=(\S+)", dockerfile, re.M)
    assert caps and "video" in caps.group(1).split(",")


def test_a_mismatch_stops_training_with_one_line(synth_vp9, vp9_cfg, caplog):
    m = Manifest.load(synth_vp9)
    with pytest.raises(UserError) as e:
        check_backend(vp9_cfg, m, "video", "dali-cpu", torch.device("cpu"), shifted(0.3))
    msg = str(e.value)
    assert "\n" not in msg and "dali-cpu" in msg and "loader.verify=warn" in msg
    assert "0.3" in msg and ".mp4" in msg  # the difference and the clip
    vp9_cfg.loader.verify = "warn"
    with caplog.at_level(logging.WARNING, logger="meld_dali.verify"):
        picked = check_backend(vp9_cfg, m, "video", "dali-cpu", torch.device("cpu"),
                               shifted(0.3))
    assert picked == "torch" and "training with torch instead" in caplog.text
    vp9_cfg.loader.verify = "off"
    assert check_backend(vp9_cfg, m, "video", "dali-cpu", torch.device("cpu"),
                         shifted(0.3)) == "dali-cpu"


def test_training_verifies_a_dali_backend_first(synth_vp9, tiny_cfg, caplog):
    tiny_cfg.loader.backend = "dali-cpu"
    tiny_cfg.data.root = str(synth_vp9)
    with caplog.at_level(logging.INFO, logger="meld_dali.verify"):
        backend, train, _ = build_loaders(tiny_cfg, Manifest.load(synth_vp9),
                                          Runtime.resolve(tiny_cfg), Dist())
    assert backend == "dali-cpu" and train.backend == "dali-cpu"
    assert "verified dali-cpu against the CPU reference on 4 dev clips" in caplog.text


# ----------------------------------------------------------------------------- doctor


@pytest.fixture(scope="module")
def doctor(synth_vp9, tmp_path_factory):
    """One doctor run here, with --data (VP9 clips + frame folders) and --json."""
    out = tmp_path_factory.mktemp("doctor")
    r = cli("doctor", "--data", synth_vp9, "--out", out / "runs", "--json", out / "d.json")
    return r, json.loads((out / "d.json").read_text()) if (out / "d.json").exists() else {}


@pytest.mark.slow
def test_doctor_passes_here_and_fits_80_columns(doctor):
    r, rep = doctor
    assert r.returncode == 0, r.stdout + r.stderr
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    assert "ok: every check that ran passed" in r.stdout and "Traceback" not in r.stderr
    if not torch.cuda.is_available():
        assert re.search(r"dali-gpu +h264 640x360 +no: no CUDA device is visible", r.stdout)
    assert re.search(r"dali-cpu +h264 640x360 +no: DALI's CPU video decoder", r.stdout)


@pytest.mark.slow
def test_doctor_verifies_dali_cpu_and_torch_on_generated_and_given_clips(doctor):
    _, rep = doctor
    ok = {(c["group"], c["backend"], c["data"] if c["group"] == "generated" else c["source"])
          for c in rep["checks"] if c["ok"]}
    assert {("generated", "dali-cpu", "vp9 640x360"), ("generated", "dali-cpu", "mjpeg 640x360"),
            ("generated", "dali-cpu", "jpeg frames"), ("generated", "torch", "h264 640x360"),
            ("generated", "torch", "jpeg frames"), ("data", "dali-cpu", "video"),
            ("data", "dali-cpu", "frames"), ("data", "torch", "video")} <= ok
    trained = {(c["backend"], c["data"]) for c in rep["checks"]
               if c["ok"] and c["mode"] == "train" and c["group"] == "generated"}
    assert {("dali-cpu", "vp9 640x360"), ("dali-cpu", "jpeg frames")} <= trained
    for c in rep["checks"]:
        if c["ok"]:
            assert c["clips"] == 4 and c["mean_abs_diff"] <= rep["tolerance"]["mean"]
            # every batch of a passed check was the backend's own
            assert c["cpu_redone_batches"] == 0 and c["backend_batches"] == 2
        elif c["ok"] is None:
            assert c["error"]  # why it cannot run here
    no_gpu = [c for c in rep["checks"] if c["backend"] == "dali-gpu"]
    assert all(c["ok"] is None for c in no_gpu) or torch.cuda.is_available()


@pytest.mark.slow
def test_doctor_json_fields(doctor, synth_vp9):
    _, rep = doctor
    assert rep["ok"] is True and rep["failures"] == []
    m = rep["machine"]
    for key in ("python", "torch", "cuda", "driver", "gpu", "nvdec", "nvjpg", "dali", "pyav",
                "ffmpeg", "cores", "memory_free_gb"):
        assert key in m, key
    assert [d["what"] for d in rep["disk"]] == ["run folder", "cache"]
    assert all(d["writable"] and d["free_gb"] > 0 for d in rep["disk"])
    assert rep["auto"]["data"] == str(synth_vp9)
    for cmd in ("train", "evaluate"):
        pick = rep["auto"][cmd]
        assert pick["verified"] and pick["source"] == "frames"  # auto: frames when extracted
        assert pick["backend"] == ("dali-gpu" if torch.cuda.is_available() else "torch")


def test_doctor_without_a_manifest_is_one_line(tmp_path, capfd):
    from meld_dali.cli import main

    with pytest.raises(SystemExit) as e:
        main(["doctor", "--data", str(tmp_path)])
    err = capfd.readouterr().err
    assert e.value.code == 1 and "meld-dali prepare" in err
    assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- rough edges


@pytest.fixture(scope="module")
def relative_run(synth_root, tmp_path_factory):
    """A tiny run trained from its own folder with a relative data root (data -> the synth
    root), as a newcomer does with `--data data`."""
    home = tmp_path_factory.mktemp("home")
    (home / "data").symlink_to(synth_root)
    cfg = load_config("demo", ["train.epochs=1", "train.max_steps_per_epoch=1",
                               "data.num_frames=4", "model.hidden=[32, 16]",
                               "train.batch_size=4", "loader.workers=0", "data.root=data"])
    here = os.getcwd()
    os.chdir(home)
    try:
        run_training(cfg, "run")
    finally:
        os.chdir(here)
    yield home / "run" / "checkpoints" / "best.pt"
    shutil.rmtree(home)  # its checkpoints are ~400 MB each


@pytest.mark.slow
def test_evaluate_from_another_folder_finds_the_data(relative_run, tmp_path, monkeypatch):
    loaded = load_for_inference(relative_run, "cpu")
    root = loaded.cfg.data.root
    assert os.path.isabs(root) and root == str(relative_run.parents[2] / "data")
    monkeypatch.chdir(tmp_path)  # evaluate CKPT run from another folder: no --data
    result = evaluate(loaded, None, "dev", backend="torch")
    assert result["n"] == len(Manifest.load(root).ok("dev")) > 0


@pytest.mark.slow
def test_predict_table_keeps_names_and_emotions_whole_at_80_columns(relative_run, tmp_path):
    rng = np.random.default_rng(0)
    paths = [tmp_path / "first_camera_take" / "dia1_utt2.mp4",
             tmp_path / "second_camera_take" / "dia1_utt2.mp4",
             tmp_path / "an_unusually_long_recording_name.mp4"]
    for p in paths:
        p.parent.mkdir(exist_ok=True)
        write_video(p, render_clip(1, 12, 64, 48, rng), "h264")
    r = cli("predict", relative_run, *paths, "--device", "cpu", columns=80)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for name in ("first_camera_take/dia1_utt2.mp4", "second_camera_take/dia1_utt2.mp4",
                 "an_unusually_long_recording_name.mp4"):
        row = next(line for line in lines if line.startswith(name))
        assert row.split()[1] in EMOTIONS  # the emotion, whole
    assert "probabilities, the highest (all: --json)" in r.stdout  # fewer columns fit


def test_workers_auto_is_the_machine_and_draws_no_warning(synth_root):
    cfg = load_config("seed", ["data.num_frames=4", "data.crop_size=32",
                               "data.short_side=36", "train.batch_size=2"])
    assert cfg.loader.workers == "auto" and cfg.loader.num_workers == cpu_cores()
    m = first_clips(Manifest.load(synth_root), "dev", 2)  # one batch: seconds

    def warnings_of(loader_cfg):
        spec = LoaderSpec(m, "dev", False, 2, 0, source="video")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            next(iter(build_loader(spec, cfg.data, loader_cfg, "torch")))
        return [str(w.message) for w in caught if "worker" in str(w.message)]

    assert warnings_of(cfg.loader) == []
    too_many = cfg.loader.model_copy(update={"workers": cpu_cores() + 1})
    assert any("worker processes in total" in w for w in warnings_of(too_many))
