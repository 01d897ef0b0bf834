"""The CPU fallback loader and the Batch contract."""

import logging
import shutil

import numpy as np
import pytest
import torch

from meld_dali.config import load_config
from meld_dali.data.base import ClipOrder, LoaderSpec
from meld_dali.data.decode import read_video_frames
from meld_dali.data.torch_loader import TorchLoader
from meld_dali.manifest import Manifest
from meld_dali.sampling import clip_indices
from meld_dali.transforms import AugParams, apply_clip, draw_params


def loader(root, split="train", train=True, frames=False, bs=4, workers=0, T=8, **kw):
    cfg = load_config("demo", [f"data.num_frames={T}", f"loader.workers={workers}"])
    spec = LoaderSpec(Manifest.load(root), split, train, bs, seed=3,
                      source="frames" if frames else "video", **kw)
    return TorchLoader(spec, cfg.data, cfg.loader), cfg


@pytest.mark.parametrize("frames", [False, True])
def test_batch_contract(synth_root, frames):
    L, cfg = loader(synth_root, frames=frames, workers=2, T=32)
    m = L.spec.manifest
    batches = list(L)
    assert sum(len(b) for b in batches) == L.num_clips
    saw_padding = False
    for b in batches:
        B = len(b)
        assert b.video.shape == (B, 3, 32, 32, 32) and b.video.dtype == torch.float32
        assert b.mask.shape == (B, 32) and b.mask.dtype == torch.bool
        assert b.label.dtype == torch.int64 and b.index.dtype == torch.int64
        for k in range(B):
            n = m.clips[int(b.index[k])].num_frames
            assert int(b.mask[k].sum()) == min(n, 32)
            assert b.label[k] == m.clips[int(b.index[k])].label
            pad = ~b.mask[k]
            if pad.any():
                saw_padding = True
                assert torch.count_nonzero(b.video[k][:, pad]) == 0  # exactly zero
            assert b.video[k][:, b.mask[k]].abs().sum() > 0
    assert saw_padding


def test_augmentation_is_one_draw_per_clip():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (6, 3, 40, 60), dtype=torch.uint8, generator=g)
    cfg = load_config("demo").data
    plain = apply_clip(frames, cfg, AugParams(crop_x=0.3, crop_y=0.7))
    flipped = apply_clip(frames, cfg, AugParams(crop_x=0.3, crop_y=0.7, flip=True))
    # a flipped clip is flipped in every frame (the flip follows the crop)
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-6)
    assert not torch.allclose(flipped, plain, atol=1e-3)
    # applying the clip transform frame by frame gives the same as the whole clip
    p = draw_params(cfg, seed=1, epoch=2, row=3)
    whole = apply_clip(frames, cfg, p)
    single = torch.cat([apply_clip(frames[i:i + 1], cfg, p) for i in range(6)], dim=1)
    assert torch.allclose(whole, single, atol=1e-5)


def test_augmentation_statistics():
    cfg = load_config("seed").data
    ps = [draw_params(cfg, seed=0, epoch=e, row=c) for e in range(10) for c in range(200)]
    flips = np.mean([p.flip for p in ps])
    assert 0.45 < flips < 0.55
    assert all(-10 <= p.angle <= 10 and 0.8 <= p.brightness <= 1.2 and 0.8 <= p.contrast <= 1.2
               and 0 <= p.crop_x <= 1 for p in ps)


def test_eval_sees_every_clip_once_in_order(synth_root):
    L, _ = loader(synth_root, split="dev", train=False, bs=3)
    rows = torch.cat([b.index for b in L]).tolist()
    assert rows == L.spec.manifest.ok("dev")


def test_sharding_is_disjoint_and_complete(synth_root):
    m = Manifest.load(synth_root)
    for train in (False, True):
        orders = [ClipOrder(m.ok("dev"), train=train, seed=0, batch_size=3, rank=r, world=3)
                  .order(0) for r in range(3)]
        flat = [x for o in orders for x in o]
        assert len(flat) == len(set(flat))
        if train:
            assert len({len(o) for o in orders}) == 1  # DDP ranks stay in step
        else:
            assert sorted(flat) == m.ok("dev")


def test_resume_mid_epoch_gives_the_same_remaining_batches(synth_root):
    L, _ = loader(synth_root)
    L.set_epoch(1)
    full = [(b.index.clone(), b.video.clone()) for b in L]
    L2, _ = loader(synth_root)
    L2.set_epoch(1)
    it = iter(L2)
    for _ in range(2):
        next(it)
    state = L2.state_dict()
    assert state == {"epoch": 1, "consumed": 8, "delivered": 2, "seed": 3}
    L3, _ = loader(synth_root)
    L3.load_state_dict(state)
    rest = [(b.index, b.video) for b in L3]
    assert len(rest) == len(full) - 2
    for (i1, v1), (i2, v2) in zip(full[2:], rest, strict=True):
        assert torch.equal(i1, i2) and torch.equal(v1, v2)


def test_corrupt_clip_mid_epoch_is_skipped_and_reported(synth_root, tmp_path, caplog):
    root = tmp_path / "copy"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns("frames"))
    m = Manifest.load(root)
    victim = m.ok("dev")[4]
    m.video_path(m.clips[victim]).write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated junk")
    L, _ = loader(root, split="dev", train=False, bs=4)
    with caplog.at_level(logging.WARNING):
        rows = torch.cat([b.index for b in L]).tolist()
    assert victim not in rows and len(rows) == len(m.ok("dev")) - 1
    assert [f.index for f in L.failures] == [victim]
    assert str(m.video_path(m.clips[victim])) in caplog.text


def test_decoder_returns_the_requested_frames(synth_root):
    m = Manifest.load(synth_root)
    c = next(c for c in m.clips if c.status == "ok" and c.num_frames >= 40)
    idx, _ = clip_indices(c.num_frames, 8, train=True, seed=0, epoch=0, row=0)
    some = read_video_frames(m.video_path(c), idx)
    every = read_video_frames(m.video_path(c), np.arange(c.num_frames))
    assert np.array_equal(some, every[idx])


def test_seeking_returns_the_same_frames_as_streaming(tmp_path):
    """A long clip with frequent keyframes: reading with seeks (small seek_gap) gives
    exactly the frames a forward decode gives, and each is the frame asked for."""
    import av

    path = tmp_path / "long.mp4"
    n = 300
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=24, options={"g": "12", "preset": "ultrafast"})
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for t in range(n):
            img = np.full((48, 64, 3), (t * 7) % 200 + 20, dtype=np.uint8)
            img[:, : (t % 64)] = 0  # a bar whose width encodes t
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    idx, _ = clip_indices(n, 8, train=True, seed=0, epoch=0, row=0)
    streamed = read_video_frames(path, idx, seek_gap=10**9)
    sought = read_video_frames(path, idx, seek_gap=5)
    assert np.array_equal(streamed, sought)
    with av.open(str(path)) as c:
        every = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert np.array_equal(streamed, np.stack([every[i] for i in idx]))


def test_intra_only_clips_decode_just_the_wanted_frames(tmp_path):
    """MJPEG (every frame on its own): only the wanted packets are decoded, and the frames
    are exactly those a full decode gives at the same positions, repeats included."""
    import av

    path = tmp_path / "intra.avi"
    n = 40
    with av.open(str(path), "w") as out:
        s = out.add_stream("mjpeg", rate=24)
        s.width, s.height, s.pix_fmt = 64, 48, "yuvj420p"
        for t in range(n):
            img = np.full((48, 64, 3), 30 + 5 * t, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.codec.intra_only
        every = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert len(every) == n
    idx = np.array([0, 3, 3, 17, 39])
    assert np.array_equal(read_video_frames(path, idx), every[idx])
    idx, _ = clip_indices(n, 8, train=True, seed=0, epoch=0, row=0)
    assert np.array_equal(read_video_frames(path, idx), every[idx])
    assert len(read_video_frames(path, np.array([38, 39, 45]))) == 2  # beyond the end: fewer


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False),
                                                 (torch.bfloat16, True)])
def test_uint8_batches_normalized_at_delivery_equal_the_float_path(synth_root, dtype,
                                                                   channels_last):
    """The workers deliver uint8 clips and their affine; `deliver` normalizes them in the
    training dtype and memory format. On the same plans (train aug: crop, flip, rotation,
    colour; clips short enough to pad) the delivered batch is the float reference path's
    (`ClipDataset.load` = `to_clip`, what verify compares against) cast to the dtype,
    padded frames exactly 0."""
    from meld_dali.data.torch_loader import ClipDataset

    L, cfg = loader(synth_root, workers=1, T=32, dtype=dtype, channels_last=channels_last)
    L.set_epoch(2)
    m = L.spec.manifest
    ref = ClipDataset(m, cfg.data, train=True, seed=3, source="video")
    saw_padding = seen = 0
    for b in L:
        assert b.video.dtype == dtype
        assert b.video.is_contiguous(memory_format=torch.channels_last_3d
                                     if channels_last else torch.contiguous_format)
        for k, row in enumerate(b.index.tolist()):
            video, mask, label, _ = ref.load(ref.plan(2, row))
            assert torch.equal(b.mask[k], mask) and int(b.label[k]) == label
            want = video.to(dtype)
            assert torch.count_nonzero(b.video[k][:, ~mask]) == 0
            saw_padding += int((~mask).any())
            # float32: the same multiply-add; bf16: the same rounding of the same float32
            torch.testing.assert_close(b.video[k], want, rtol=1e-6, atol=1e-6)
            seen += 1
    assert seen == L.num_clips and saw_padding


def test_batches_are_pinned_by_the_dataloader(synth_root, monkeypatch):
    """collate's batch has `pin_memory()`, so the function a DataLoader's pin_memory thread
    runs on each (batch, failures) pins the batch (torch pins only tensors, containers and
    objects with that method: before, the batch went through unpinned). On CPU: that
    function, with Tensor.pin_memory recorded (no pinned memory without a driver), pins
    every tensor of the batch; where CUDA exists, a DataLoader's batches are pinned."""
    from torch.utils.data import DataLoader
    from torch.utils.data._utils.pin_memory import pin_memory

    from meld_dali.data.base import RawBatch
    from meld_dali.data.torch_loader import ClipDataset, collate

    cfg = load_config("demo", ["data.num_frames=8"])
    m = Manifest.load(synth_root)
    rows = m.ok("train")[:4]
    ds = ClipDataset(m, cfg.data, train=True, seed=3, source="video", raw=True)
    batch, failures = collate([ds[(0, r)] for r in rows[:2]])
    if not torch.cuda.is_available():
        pinned = []
        monkeypatch.setattr(torch.Tensor, "pin_memory",
                            lambda t, *a: pinned.append(t.data_ptr()) or t.clone())
        out, out_failures = pin_memory((batch, failures))
        assert isinstance(out, RawBatch) and out_failures == failures
        fields = vars(batch).values()
        assert sorted(pinned) == sorted(t.data_ptr() for t in fields)
        assert all(torch.equal(a, b) for a, b in zip(vars(out).values(), fields, strict=True))
        pytest.skip("no CUDA here: the pin path ran on every tensor of the batch; that the "
                    "DataLoader's batches end pinned is checked where CUDA exists")
    dl = DataLoader(ds, batch_size=2, sampler=[(0, r) for r in rows], collate_fn=collate,
                    num_workers=1, pin_memory=True)
    batches = [b for b, _ in dl]
    assert len(batches) == 2
    assert all(t.is_pinned() for b in batches for t in vars(b).values())


class _SampledDecodes(torch.utils.data.Dataset):
    """Item k: a train-sampled decode (8 of a clip's frames, stopping at the last) of
    clip k % len(paths), as the loader's workers make them; returns the frames decoded."""

    def __init__(self, paths, frames, n):
        self.paths, self.frames, self.n = paths, frames, n

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        idx, mask = clip_indices(self.frames, 8, train=True, seed=1, epoch=k, row=k)
        return len(read_video_frames(self.paths[k % len(self.paths)], idx[mask]))


@pytest.mark.slow
def test_decoders_never_stall_across_workers(tmp_path):
    """Soak: 2,000 sampled decodes (each stopping before the end of its stream, the pattern
    that stalls FFmpeg frame threading in loader workers) across 2 DataLoader workers with
    the default decoder threading. Every batch must come within a generous bound (the
    DataLoader's timeout: a stalled worker fails the test instead of hanging it; the bound
    is on the wait, not the speed) and every decode return the frames asked for."""
    from torch.utils.data import DataLoader

    from meld_dali.synth import render_clip, write_video

    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):  # small textured clips: decodes of a few ms, the soak stays cheap
        paths.append(tmp_path / f"c{i}.mp4")
        write_video(paths[-1], render_clip(i, 40, 320, 180, rng, texture=True), "h264")
    n = 2000
    dl = DataLoader(_SampledDecodes(paths, 40, n), batch_size=20, num_workers=2, timeout=120)
    got = torch.cat([b for b in dl])
    assert len(got) == n and bool((got == 8).all()), got.unique(return_counts=True)
