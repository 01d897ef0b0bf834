"""DALI pipelines, CPU variant (DALI's CPU decoder takes VP9/MJPEG; frame folders are JPEG).
The GPU variant is checked by `python -m meld_dali.bench.gpu_check` on a CUDA machine."""

import dataclasses
import logging
import shutil
import warnings

import numpy as np
import pytest
import torch

# DALI is a hard dependency (pyproject): these tests fail where it does not import, never skip
from meld_dali.pipelines.faults import FAULT_LIMIT, classify
from meld_dali.pipelines.loader import DaliLoader
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from meld_dali.config import load_config
from meld_dali.data.base import LoaderSpec
from meld_dali.data.decode import read_video_frames
from meld_dali.data.select import resolve_backend
from meld_dali.data.torch_loader import TorchLoader
from meld_dali.errors import BackendFault, UserError
from meld_dali.manifest import Manifest
from meld_dali.synth import write_video

warnings.filterwarnings("ignore", message=".*external source node.*")


def pair(root, split="dev", train=False, frames=False, bs=4, over=(), manifest=None, **kw):
    cfg = load_config("demo", ["data.num_frames=16", "loader.workers=1", *over])
    spec = LoaderSpec(manifest or Manifest.load(root), split, train, bs, seed=5,
                      source="frames" if frames else "video", **kw)
    return (DaliLoader(spec, cfg.data, cfg.loader, "cpu"), TorchLoader(spec, cfg.data, cfg.loader))


def assert_dali_made_every_batch(*loaders):
    """A comparison of DALI with anything says something about DALI only if DALI made the
    batches: the CPU path redoing a failed batch would match the reference exactly."""
    for d in loaders:
        assert d.counts.cpu_redone_batches == 0, d.last_fault
        assert d.counts.backend_batches > 0


@pytest.mark.parametrize("frames", [False, True])
def test_dali_batch_contract(synth_vp9, frames):
    dali, _ = pair(synth_vp9, split="train", train=True, frames=frames)
    m = dali.spec.manifest
    batches = list(dali)
    assert sum(len(b) for b in batches) == dali.num_clips
    padded = 0
    for b in batches:
        B = len(b)
        assert b.video.shape == (B, 3, 16, 32, 32) and b.video.dtype == torch.float32
        assert b.mask.dtype == torch.bool and b.label.dtype == torch.int64
        for k in range(B):
            clip = m.clips[int(b.index[k])]
            assert int(b.mask[k].sum()) == min(clip.num_frames, 16)
            assert int(b.label[k]) == clip.label
            if (~b.mask[k]).any():
                padded += 1
                assert torch.count_nonzero(b.video[k][:, ~b.mask[k]]) == 0
    assert padded > 0


def run_epochs(loader, epochs):
    """Each epoch as the trainer reads it: it stops right after the epoch's last batch,
    without asking the loader for more."""
    out = []
    for e in range(epochs):
        loader.set_epoch(e)
        batches, n = [], len(loader)
        for b in loader:
            batches.append((b.index.clone(), b.mask.clone(), b.video.clone()))
            if len(batches) == n:
                break
        out.append(batches)
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert [len(t[0]) for t in x] == [len(t[0]) for t in y]
        for (i1, m1, v1), (i2, m2, v2) in zip(x, y, strict=True):
            assert torch.equal(i1, i2) and torch.equal(m1, m2) and torch.equal(v1, v2)


@pytest.mark.parametrize("frames", [False, True])
def test_pipelines_are_built_once_and_reused_across_epochs(synth_vp9, frames):
    """Two epochs through one loader (pipelines reset, not rebuilt) == each epoch through a
    fresh loader: same order, frame indices and draws."""
    reused, _ = pair(synth_vp9, split="train", train=True, frames=frames)
    twice = run_epochs(reused, 2)
    assert reused.builds == 1
    fresh = []
    for e in range(2):
        loader, _ = pair(synth_vp9, split="train", train=True, frames=frames)
        loader.set_epoch(e)
        fresh.append([(b.index, b.mask, b.video) for b in loader])
        assert_dali_made_every_batch(loader)
    assert_dali_made_every_batch(reused)
    assert_same_batches(twice, fresh)
    assert not torch.equal(twice[0][0][0], twice[1][0][0])  # epochs differ in order


@pytest.mark.parametrize("frames", [False, True])
def test_several_pipelines_equal_one(synth_vp9, frames):
    """n pipelines, each decoding a share of every batch, merge back to exactly the single
    pipeline's batches (order, indices, draws), last partial batch included."""
    one, _ = pair(synth_vp9, split="train", train=True, frames=frames, bs=5,
                  over=["loader.dali_pipelines=1"])
    three, _ = pair(synth_vp9, split="train", train=True, frames=frames, bs=5,
                    over=["loader.dali_pipelines=3", "loader.workers=3"])
    assert three.n_pipes == 3
    assert_same_batches(run_epochs(one, 1), run_epochs(three, 1))
    assert_dali_made_every_batch(one, three)


def test_several_pipelines_with_an_unreadable_clip_equal_one(synth_vp9, tmp_path):
    """A share left with no readable clip decodes a filler that is dropped: the batches
    still equal the single pipeline's, and the clip is reported once."""
    root = tmp_path / "copy"
    shutil.copytree(synth_vp9, root, ignore=shutil.ignore_patterns("frames"))
    m = Manifest.load(root)
    one, _ = pair(root, bs=3, over=["loader.dali_pipelines=1"])
    missing = one.rows(0)[1]  # the first batch's second clip: pipeline 1's whole share
    m.video_path(m.clips[missing]).unlink()
    three, _ = pair(root, bs=3, over=["loader.dali_pipelines=3", "loader.workers=3"])
    assert_same_batches(run_epochs(one, 1), run_epochs(three, 1))
    assert [f.index for f in three.failures] == [missing] == [f.index for f in one.failures]


@pytest.mark.parametrize("frames, tol", [(True, 1e-4), (False, 0.05)])
def test_eval_values_match_cpu_loader(synth_vp9, frames, tol):
    """Frame folders: the same JPEG decoder and no resampling (frames are stored at the
    short side), so the values are equal to float rounding. Video: DALI's and PyAV's
    YUV->RGB conversion and resize kernels differ, so a small mean difference remains
    (normalized units; one grey level is 0.017)."""
    dali, torch_loader = pair(synth_vp9, frames=frames)
    diffs = []
    for a, b in zip(dali, torch_loader, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.mask, b.mask)
        diffs.append((a.video - b.video).abs().mean().item())
    assert_dali_made_every_batch(dali)
    assert dali.counts.backend_batches == len(diffs)
    assert max(diffs) < tol, diffs


def test_train_draws_match_cpu_loader_and_rotation_sign(synth_vp9):
    dali, torch_loader = pair(synth_vp9, split="train", train=True, frames=True)
    a, b = next(iter(dali)), next(iter(torch_loader))
    assert_dali_made_every_batch(dali)
    assert torch.equal(a.index, b.index)
    same = (a.video - b.video).abs().mean().item()
    assert 0 < same < 0.03  # only the rotation's interpolation differs (0: not DALI's)
    # with the angle reversed in the CPU loader the two disagree far more (a negative
    # rotate_deg is not a valid config: model_copy(update=...) skips validation on purpose)
    cfg = load_config("demo", ["data.num_frames=16", "loader.workers=1"])
    reversed_angle = cfg.data.model_copy(update={"rotate_deg": -cfg.data.rotate_deg})
    flipped_sign = TorchLoader(torch_loader.spec, reversed_angle, cfg.loader)
    c = next(iter(flipped_sign))
    assert (a.video - c.video).abs().mean().item() > 3 * same


def test_sharded_eval_covers_every_clip_once(synth_vp9):
    rows = []
    for rank in range(2):
        dali, _ = pair(synth_vp9, bs=3, rank=rank, world=2)
        rows += torch.cat([b.index for b in dali]).tolist()
        assert_dali_made_every_batch(dali)
    assert sorted(rows) == Manifest.load(synth_vp9).ok("dev")


def test_resume_mid_epoch_continues_identically(synth_vp9):
    full, _ = pair(synth_vp9, split="train", train=True)
    full.set_epoch(2)
    reference = [(b.index.clone(), b.video.clone()) for b in full]
    part, _ = pair(synth_vp9, split="train", train=True)
    part.set_epoch(2)
    it = iter(part)
    next(it)
    state = part.state_dict()
    del it
    assert state["consumed"] == 4
    resumed, _ = pair(synth_vp9, split="train", train=True)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - 1
    for (i1, v1), b in zip(reference[1:], rest, strict=True):
        assert torch.equal(i1, b.index) and torch.equal(v1, b.video)
    assert_dali_made_every_batch(full, resumed)


def test_undecodable_clip_is_skipped_and_reported(synth_vp9, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synth_vp9, root, ignore=shutil.ignore_patterns("frames"))
    m = Manifest.load(root)
    victim = m.ok("dev")[2]
    path = m.video_path(m.clips[victim])
    data = bytearray(path.read_bytes())
    data[len(data) // 3:] = np.random.default_rng(0).bytes(len(data) - len(data) // 3)
    path.write_bytes(bytes(data[: len(data) // 2]))
    missing = m.ok("dev")[5]
    m.video_path(m.clips[missing]).unlink()
    dali, _ = pair(root, bs=3)
    rows = torch.cat([b.index for b in dali]).tolist()
    bad = {f.index for f in dali.failures}
    assert missing in bad and missing not in rows
    assert set(rows) | bad == set(m.ok("dev")) and not set(rows) & bad
    assert all(str(root) in f.path for f in dali.failures)
    assert victim in bad and victim not in rows  # DALI failed its batch; redone on CPU
    # the CPU path could not read the victim either: a bad clip, not a fault of DALI's
    assert dali.counts.cpu_redone_batches == 1 and dali.fault_streak == 0


def test_a_clip_dali_cannot_decode_but_the_cpu_can_is_recovered_named_and_counted(
        synth_vp9, tmp_path, caplog):
    """One H.264 clip among VP9 ones (DALI's CPU decoder takes no H.264, PyAV does): its
    batch is redone by the CPU path, equal to the CPU loader's, the clip named in a warning
    and the batch counted; the other batches stay DALI's."""
    root = tmp_path / "copy"
    shutil.copytree(synth_vp9, root, ignore=shutil.ignore_patterns("frames"))
    m = Manifest.load(root)
    odd = m.ok("dev")[1]
    path = m.video_path(m.clips[odd])
    frames = read_video_frames(path, np.arange(m.clips[odd].num_frames))
    write_video(path, frames, "h264")
    m.clips[odd] = dataclasses.replace(m.clips[odd], codec="h264")
    dali, cpu = pair(root, bs=2, manifest=m)
    with caplog.at_level(logging.WARNING, logger="meld_dali.pipelines"):
        got = list(dali)
    want = list(cpu)
    assert [b.index.tolist() for b in got] == [b.index.tolist() for b in want]
    redone = next(k for k, b in enumerate(got) if odd in b.index.tolist())
    assert torch.equal(got[redone].video, want[redone].video)  # the CPU path's own result
    assert dali.counts.cpu_redone_batches == 1
    assert dali.counts.backend_batches == len(got) - 1 and not dali.failures
    assert "Failed to create video decoder" in dali.last_fault
    named = [r.getMessage() for r in caplog.records if "could not decode" in r.getMessage()]
    assert len(named) == 1 and str(path) in named[0] and "one of" not in named[0]


def test_a_backend_whose_decoder_always_fails_stops_in_one_line(synth_root):
    """DALI's CPU decoder over H.264 clips (the real DALI failure, on every batch): the
    first FAULT_LIMIT - 1 batches are redone and counted, then the run stops with one line
    naming the backend, DALI's message and the cause. Nothing more is decoded by the CPU."""
    dali, _ = pair(synth_root, split="train", train=True, bs=2)
    got = []
    with pytest.raises(BackendFault) as e:
        for b in dali:
            got.append(b)
    assert len(got) == FAULT_LIMIT - 1
    assert dali.counts.cpu_redone_batches == FAULT_LIMIT - 1
    assert dali.counts.backend_batches == 0 and not dali.failures
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, UserError)
    assert msg.startswith("dali-cpu failed: DALI's CPU video decoder does not take these "
                          "clips (h264)")
    assert "Failed to create video decoder" in msg


# A device fault cannot be made here (no GPU): DALI's text for one is raised where DALI's
# iterator raises, in the form DALI gives it (see faults.classify's sources).
NO_NVCUVID = ("Critical error in pipeline:\nError in MIXED operator "
              "`nvidia.dali.fn.decoders.video`,\nwhich was used in the pipeline definition "
              "with the following traceback:\n\n  File \"graphs.py\", line 81\n\n"
              "encountered:\n\nCUDA driver API error CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND "
              "(302):\nnamed symbol not found\nC++ context: [frames_decoder_gpu.cc:487]")


def test_a_device_fault_stops_at_once_without_a_cpu_redo(synth_vp9, monkeypatch):
    dali, _ = pair(synth_vp9, bs=2)
    real, calls = DALIGenericIterator.__next__, []

    def no_nvdec_on_second(self):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError(NO_NVCUVID)
        return real(self)

    monkeypatch.setattr(DALIGenericIterator, "__next__", no_nvdec_on_second)
    got = []
    with pytest.raises(BackendFault, match="NVDEC not available.*NVIDIA_DRIVER_CAPABILITIES"):
        for b in dali:
            got.append(b)
    assert len(got) == 1 and dali.counts.cpu_redone_batches == 0 and not dali.failures


# DALI's own texts, each with where DALI writes it -> what the loader must do with it
DALI_TEXTS = [
    # a real CPU decoder failure on an H.264 clip (dali/operators/video/decoder/
    # video_decoder_base.h), the same text for a truncated file: the CPU path judges
    ("Error in CPU operator `nvidia.dali.fn.decoders.video`,\nencountered:\n\nAssert on "
     "\"frames_decoders_[s]->IsValid()\" failed: Failed to create video decoder for "
     "\"memory file\"", "decode"),
    # NVDECCache::GetDecoder (dali/operators/video/frames_decoder_gpu.cc): a clip's format
    ("Error in MIXED operator `nvidia.dali.fn.decoders.video`,\nencountered:\n\n"
     "Codec configuration not supported on this GPU. Codec: H.264, chroma format: "
     "YUV 4:4:4, bit depth: 8", "decode"),
    # libnvcuvid absent: the nvcuvid stubs' not_found_error (tools/stub_generator/nvcuvid.json)
    (NO_NVCUVID, "device"),
    # the legacy reader's check (dali/operators/video/legacy/reader/video_loader.h)
    ("Error in GPU operator `nvidia.dali.fn.readers.video`,\nencountered:\n\nFailed to load "
     "libnvcuvid.so, needed by the VideoReader operator.", "device"),
    # CUDABadAlloc (include/dali/core/cuda_error.h)
    ("Error in MIXED operator `nvidia.dali.fn.decoders.image`,\nencountered:\n\nCan't "
     "allocate 1073741824 bytes on device 0.", "device"),
    ("Error in GPU operator `nvidia.dali.fn.resize`,\nencountered:\n\nCUDA allocation "
     "failed", "device"),
    # CUDAError::get_message (include/dali/core/cuda_error.h), driver and runtime API
    ("Error in MIXED operator `nvidia.dali.fn.decoders.video`,\nencountered:\n\nCUDA "
     "driver API error CUDA_ERROR_NO_DEVICE (100):\nno CUDA-capable device is detected",
     "device"),
    ("Error in GPU operator `nvidia.dali.fn.crop_mirror_normalize`,\nencountered:\n\nCUDA "
     "runtime API error cudaErrorLaunchFailure (719):\nunspecified launch failure", "device"),
    # not a decoder, not a device: a bug in the graph surfaces as it is
    ("Error in CPU operator `nvidia.dali.fn.resize`,\nencountered:\n\nAssert on "
     "\"in_shape.size() == 3\" failed", None),
    # our own Python source's error (external_source) and anything not from DALI
    ("Error in CPU operator `nvidia.dali.fn.external_source`,\nencountered:\n\nCUDA out "
     "of memory. Tried to allocate 2.00 GiB", None),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", None),
]


@pytest.mark.parametrize("text, kind", DALI_TEXTS)
def test_dali_errors_are_classified_from_dalis_own_texts(text, kind):
    got = classify(RuntimeError(text))
    assert (got.kind if got else None) == kind
    if got:
        assert got.reason == text.split("encountered:")[1].strip().splitlines()[0]
        assert bool(got.cause) == (kind == "device")


def test_backend_selection_explains_what_cannot_run(synth_root, synth_vp9):
    h264 = Manifest.load(synth_root)
    with pytest.raises(UserError, match="VP8/VP9/MJPEG"):
        resolve_backend("dali-cpu", h264, "train", "video")
    assert resolve_backend("dali-cpu", h264, "train", "frames") == "dali-cpu"
    assert resolve_backend("auto", Manifest.load(synth_vp9), "train", "video") == (
        "dali-gpu" if torch.cuda.is_available() else "torch")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            resolve_backend("dali-gpu", h264, "train", "video")
        assert resolve_backend("auto", h264, "train", "video") == "torch"


def test_errors_of_our_own_source_surface(synth_vp9, monkeypatch):
    """An error raised in the source (here the out-of-memory text CUDA would give) is not
    DALI's: no CPU recovery, no backend fault, it reaches the caller as it is."""
    from meld_dali.pipelines.sources import FileReader

    real = FileReader.read
    dali, _ = pair(synth_vp9, bs=2)
    third = dali.rows(0)[2]

    def oom_on_third(self, plan):
        if plan.row == third:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, plan)

    monkeypatch.setattr(FileReader, "read", oom_on_third)
    with pytest.raises(RuntimeError, match="out of memory") as e:
        list(dali)
    assert not isinstance(e.value, BackendFault)
    assert not dali.failures and dali.counts.cpu_redone_batches == 0


def test_a_dropped_dali_loader_frees_its_pipelines_at_once(synth_vp9):
    """No reference cycle through the pipelines' sources: dropping a loader frees its DALI
    pipelines immediately, never later inside a forked DataLoader worker (where a pipeline's
    destructor would wait forever for threads that were not forked)."""
    import gc
    import weakref

    gc.disable()
    try:
        dali, _ = pair(synth_vp9, bs=3)
        assert len(list(dali)) > 0 and dali.its
        pipes = [weakref.ref(it._pipes[0]) for it in dali.its]
        ref = weakref.ref(dali)
        del dali
        assert ref() is None and all(p() is None for p in pipes)
    finally:
        gc.enable()
