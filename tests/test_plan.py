"""The clip plan: one function makes it for every backend; multi-view testing through the
loaders (the same views as the old per-clip path, every backend alike); padded frames
zeroed where every batch is delivered; views averaged by manifest row."""

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from meld_dali.clips import Clip
from meld_dali.config import load_config
from meld_dali.data.base import Batch, LoaderSpec
from meld_dali.data.decode import read_clip, to_clip
from meld_dali.data.plan import View, make_plan, multi_views, view_crop
from meld_dali.data.torch_loader import ClipDataset, TorchLoader
from meld_dali.evaluation import average_views
from meld_dali.manifest import Manifest
from meld_dali.sampling import clip_rng, sample_indices
from meld_dali.transforms import AugParams, draw_params

warnings.filterwarnings("ignore", message=".*external source node.*")


def setup(root, train=False, frames=False, views=(1, 1), bs=4, over=()):
    cfg = load_config("demo", ["data.num_frames=8", "loader.workers=1", *over])
    spec = LoaderSpec(Manifest.load(root), "train" if train else "dev", train, bs, seed=5,
                      source="frames" if frames else "video", views=views)
    return spec, cfg


def per_view(loader) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """row -> its delivered (video, mask) in delivery order, checking len(loader)."""
    out: dict[int, list] = {}
    batches = list(loader)
    assert len(batches) == len(loader)
    for b in batches:
        for k, row in enumerate(b.index.tolist()):
            out.setdefault(row, []).append((b.video[k], b.mask[k]))
    return out


def old_multi_view(m: Manifest, row: int, data, source: str, temporal: int, spatial: int):
    """The per-clip path multi-view testing had before the loaders took views (the
    definition, written out here independently of the plan module)."""
    clip = m.clips[row]
    out = []
    for t in range(temporal):
        idx, mask = sample_indices(clip.num_frames, data.num_frames, train=False,
                                   position=(t + 0.5) / temporal)
        raw = read_clip(m, clip, idx[mask], source)
        h, w = raw.shape[1:3]
        pos = [0.5] if spatial == 1 else [i / (spatial - 1) for i in range(spatial)]
        out += [to_clip(raw, data, AugParams(crop_x=p) if w >= h else AugParams(crop_y=p))
                for p in pos]
    return out


def test_plans_come_from_one_function_with_the_specs_streams(synth_vp9):
    """The CPU dataset's plan, the DALI loader's pass plans and what its source feeds the
    decoder are make_plan's, whose streams are the specs' own (bit-identical figures)."""
    from meld_dali.pipelines.loader import DaliLoader

    spec, cfg = setup(synth_vp9, train=True)
    m, data = spec.manifest, cfg.data
    dali = DaliLoader(spec, data, cfg.loader, "cpu")
    dali.set_epoch(3)
    run = dali._start_pass()
    ds = ClipDataset(m, data, train=True, seed=5, source="video")
    assert [p.row for p in run.plans] == dali.rows(3) and len(run.plans) > 4
    for p in run.plans:
        n = m.clips[p.row].num_frames
        idx, mask = sample_indices(n, 8, train=True, rng=clip_rng(5, 3, p.row, 0))
        for other in (ds.plan(3, p.row), make_plan(m.clips[p.row], data, train=True, seed=5,
                                                    epoch=3, row=p.row)):
            assert np.array_equal(other.indices, p.indices) and other.params == p.params
        assert np.array_equal(p.indices, idx) and np.array_equal(p.mask, mask)
        assert p.params == draw_params(data, seed=5, epoch=3, row=p.row)
    fed = dali.sources[0](None)  # the first batch's samples, as the decoder gets them
    for k, p in enumerate(run.batch(0)):
        assert np.array_equal(fed[1][k][p.mask], p.indices[p.mask])
        assert int(fed[4][k]) == p.row
    dali.close()


def test_views_are_eval_only_and_the_train_plan_has_one(synth_vp9):
    cfg = load_config("demo")
    with pytest.raises(ValueError, match="eval only"):
        make_plan(Clip("d0_u0", "train", "joy", 4, num_frames=40), cfg.data, train=True,
                  seed=0, epoch=0, row=0, view=View(0.25, 0.5))
    spec = LoaderSpec(Manifest.load(synth_vp9), "train", True, 4, seed=0, views=(3, 3))
    with pytest.raises(ValueError, match="multi-view testing is for evaluation"):
        TorchLoader(spec, cfg.data, cfg.loader)


def test_multi_views_and_their_crops():
    assert multi_views(2, 3) == (View(0.25, 0.0), View(0.25, 0.5), View(0.25, 1.0),
                                 View(0.75, 0.0), View(0.75, 0.5), View(0.75, 1.0))
    assert multi_views(1, 1) == (View(),)
    wide = Clip("a", "dev", "joy", 4, width=64, height=48)
    tall = Clip("a", "dev", "joy", 4, width=48, height=64)
    assert view_crop(wide, View(0.5, 0.0)) == AugParams(crop_x=0.0)
    assert view_crop(tall, View(0.5, 1.0)) == AugParams(crop_y=1.0)
    assert view_crop(wide, View()) == AugParams()  # the plain eval view: centre crop


@pytest.mark.parametrize("frames", [False, True])
def test_multi_view_through_the_torch_loader_is_the_per_clip_definition(synth_vp9, frames):
    """views=(2, 3): every clip's 6 views, batched across clips, are exactly the old
    per-clip path's video tensors (same frames, same crops), in the same order."""
    spec, cfg = setup(synth_vp9, frames=frames, views=(2, 3))
    got = per_view(TorchLoader(spec, cfg.data, cfg.loader))
    source = "frames" if frames else "video"
    assert sorted(got) == spec.manifest.ok("dev")
    for row, views in got.items():
        want = old_multi_view(spec.manifest, row, cfg.data, source, 2, 3)
        assert len(views) == len(want) == 6
        for (v, m), (wv, wm) in zip(views, want, strict=True):
            assert torch.equal(m, wm) and torch.equal(v, wv)
    # the views really differ: an equality above is not one view six times
    v = got[spec.manifest.ok("dev")[0]]
    assert not torch.equal(v[0][0], v[2][0]) and not torch.equal(v[0][0], v[3][0])


@pytest.mark.parametrize("frames, tol", [(True, 1e-4), (False, 0.05)])
def test_multi_view_through_dali_cpu_equals_the_torch_loader(synth_vp9, frames, tol):
    """The same views on DALI (crop_pos from the plan) as on the CPU path: frame folders
    to float rounding; video within the decoders' colour-conversion difference (as in
    test_dali's single-view comparison). Another view would differ far more."""
    from meld_dali.pipelines.loader import DaliLoader

    spec, cfg = setup(synth_vp9, frames=frames, views=(2, 3), bs=5,
                      over=["loader.dali_pipelines=2", "loader.workers=2"])
    dali_loader = DaliLoader(spec, cfg.data, cfg.loader, "cpu")
    dali = per_view(dali_loader)
    ref = per_view(TorchLoader(spec, cfg.data, cfg.loader))
    # DALI made every batch (a CPU redo would equal the reference and prove nothing)
    assert dali_loader.counts.cpu_redone_batches == 0 and dali_loader.counts.backend_batches
    assert sorted(dali) == sorted(ref)
    worst, other = 0.0, []
    for row in ref:
        for k, ((v, m), (rv, rm)) in enumerate(zip(dali[row], ref[row], strict=True)):
            assert torch.equal(m, rm)
            worst = max(worst, (v - rv).abs().mean().item())
            other.append((v - ref[row][(k + 1) % 6][0]).abs().mean().item())
    assert worst < tol and min(other) > 3 * worst, (worst, min(other))


def test_deliver_zeroes_padded_frames_whatever_they_hold(synth_vp9):
    """The one place padded frames are zeroed: whatever a backend left there (here NaN and
    large values) is exactly 0 after delivery, real frames untouched, channels_last kept."""
    spec, cfg = setup(synth_vp9)
    loader = TorchLoader(replace(spec, channels_last=True), cfg.data, cfg.loader)
    video = torch.randn(2, 3, 8, 4, 4)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    dirty = video.clone()
    dirty[0, :, 5:] = float("nan")
    dirty[0, :, 6] = 1e4
    out = loader.deliver(Batch(dirty, mask, torch.zeros(2, dtype=torch.int64),
                               torch.arange(2)))
    assert torch.count_nonzero(out.video[0, :, 5:]) == 0 and not out.video.isnan().any()
    assert torch.equal(out.video[:, :, :5], video[:, :, :5]) and torch.equal(out.video[1],
                                                                             video[1])
    assert out.video.is_contiguous(memory_format=torch.channels_last_3d)


def test_views_are_averaged_by_row():
    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4], [1.0, 0.0], [0.1, 0.9], [0.3, 0.7]])
    rows = torch.tensor([7, 7, 2, 7, 2])
    labels = torch.tensor([1, 1, 0, 1, 0])
    lab, mean, r = average_views(labels, probs, rows)
    assert r.tolist() == [2, 7] and lab.tolist() == [0, 1]
    torch.testing.assert_close(mean, torch.tensor([[0.65, 0.35], [0.3, 0.7]]))
    single = torch.rand(5, 7).softmax(-1)
    lab, same, r = average_views(torch.arange(5), single, torch.arange(10, 15))
    assert torch.equal(same, single) and r.tolist() == list(range(10, 15))
