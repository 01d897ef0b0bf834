"""Several training samples per decoded clip (`loader.views_per_decode`): each sample is its
own plan (frames and draw), the clip is decoded once for all of them, on every backend, an
epoch keeps its number of samples, and a resumed loader continues exactly."""

import warnings

import numpy as np
import pytest
import torch
from meld_dali.pipelines.loader import DaliLoader

from meld_dali.config import load_config
from meld_dali.data.base import ClipOrder, LoaderSpec
from meld_dali.data.plan import View, train_views
from meld_dali.data.torch_loader import ClipDataset, TorchLoader
from meld_dali.errors import UserError
from meld_dali.manifest import Manifest

warnings.filterwarnings("ignore", message=".*external source node.*")


def loaders(root, k, bs=4, source="video", dali=False, over=()):
    cfg = load_config("demo", ["data.num_frames=16", "loader.workers=1", *over])
    spec = LoaderSpec(Manifest.load(root), "train", True, bs, seed=5, source=source,
                      views_per_decode=k)
    if dali:
        return DaliLoader(spec, cfg.data, cfg.loader, "cpu"), cfg
    return TorchLoader(spec, cfg.data, cfg.loader), cfg


def test_each_sample_is_its_own_draw_of_one_decode(synth_root):
    """k = 2 on H.264 (the CPU loader): sample j of a batch is draw j % 2 of its clip, equal
    (to float rounding) to that plan loaded on its own by the CPU reference; draw 0 is the
    seed recipe's plan; the two draws differ; each clip was read once."""
    loader, cfg = loaders(synth_root, 2)
    ds = loader.dl.dataset
    reads = []
    read = ds._read
    ds._read = lambda plan, indices=None: reads.append(plan.row) or read(plan, indices)
    loader.dl.num_workers = 0  # the spy counts in this process
    ref = ClipDataset(loader.spec.manifest, cfg.data, train=True, seed=5, source="video")
    batches = list(loader)
    assert sum(map(len, batches)) == 2 * loader.num_clips
    for b in batches:
        rows = b.index.tolist()
        assert rows[0::2] == rows[1::2]  # a clip's draws side by side
        for j, row in enumerate(rows):
            plan = ref.plan(0, row, View(draw=j % 2))
            video, mask, label, _ = ref.load(plan)
            assert torch.equal(b.mask[j], mask) and int(b.label[j]) == label
            torch.testing.assert_close(b.video[j], video, rtol=0, atol=1e-4)
        for j in range(0, len(rows), 2):
            assert not torch.equal(b.video[j], b.video[j + 1])
    assert sorted(reads) == sorted(loader.rows(0))  # one read a clip, not one a sample
    first = ref.plan(0, rows[0])  # draw 0 is the k = 1 recipe's plan of the clip
    again = ref.plan(0, rows[0], train_views(2)[0])
    assert np.array_equal(first.indices, again.indices) and first.params == again.params


def test_an_epoch_keeps_its_samples_and_decodes_every_clip_every_k_epochs(synth_root):
    rows = Manifest.load(synth_root).ok("train")
    one = ClipOrder(rows, train=True, seed=3, batch_size=4)
    two = ClipOrder(rows, train=True, seed=3, batch_size=4, views=2)
    for e in (0, 2):
        a, b = two.order(e), two.order(e + 1)
        assert sorted(a + b) == sorted(rows)  # two epochs: every clip once
        for part in (a, b):  # each epoch about as many samples as one draw of every clip
            assert abs(2 * len(part) - len(one.order(e))) <= 2
    assert two.order(0) != two.order(2)[:len(two.order(0))]  # a new permutation per k epochs
    assert one.order(0) == ClipOrder(rows, train=True, seed=3, batch_size=4).order(0)
    # DDP: the ranks share one epoch's clips, disjoint
    ranks = [ClipOrder(rows, train=True, seed=3, batch_size=2, rank=r, world=2, views=2)
             for r in (0, 1)]
    r0, r1 = (r.order(1) for r in ranks)
    assert len(r0) == len(r1) and not set(r0) & set(r1) and set(r0 + r1) <= set(two.order(1))


@pytest.mark.parametrize("source, atol", [("video", None), ("frames", None)])
def test_dali_draws_equal_the_cpu_loaders(synth_vp9, source, atol):
    """dali-cpu with k = 2 (video: one decode, the draws' frames rearranged from it in the
    graph) gives the CPU loader's batches: the same samples in the same order, values
    within the train verification's tolerance (0.05 mean, 2.5 max normalized units)."""
    dali, _ = loaders(synth_vp9, 2, source=source, dali=True)
    cpu, _ = loaders(synth_vp9, 2, source=source)
    got, want = list(dali), list(cpu)
    assert dali.counts.cpu_redone_batches == 0 and dali.counts.backend_batches == len(want)
    if source == "video":  # the graph gets one sample per clip: B / k clips per batch
        assert dali.its[0]._pipes[0].max_batch_size == 2
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.mask, b.mask)
        d = (a.video - b.video).abs()
        assert d.mean() < 0.05 and d.max() < 2.5
        assert torch.count_nonzero(a.video[~a.mask.view(len(a), 1, -1).expand(-1, 3, -1)]) == 0


def test_dali_draws_split_over_pipelines_equal_one(synth_vp9):
    one, _ = loaders(synth_vp9, 2, bs=6, dali=True, over=["loader.dali_pipelines=1"])
    three, _ = loaders(synth_vp9, 2, bs=6, dali=True,
                       over=["loader.dali_pipelines=3", "loader.workers=3"])
    assert three.n_pipes == 3
    for a, b in zip(one, three, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.video, b.video)
    assert three.counts.cpu_redone_batches == 0


@pytest.mark.parametrize("dali", [False, True])
def test_resume_is_exact_with_several_draws(synth_vp9, dali):
    """Two epochs straight == stopped after 2 batches of epoch 1 (the second epoch of the
    first permutation), saved, and a new loader resumed from the saved state."""
    def epochs(loader, start=0):
        out = []
        for e in range(start, 3):
            loader.set_epoch(e)
            out += [(b.index.clone(), b.video.clone()) for b in loader]
        return out

    straight = epochs(loaders(synth_vp9, 2, dali=dali)[0])
    first, _ = loaders(synth_vp9, 2, dali=dali)
    head = epochs_until(first, stop_epoch=1, batches=2)
    state = first.state_dict()
    resumed, _ = loaders(synth_vp9, 2, dali=dali)
    resumed.load_state_dict(state)
    tail = [(b.index.clone(), b.video.clone()) for b in resumed]
    resumed.set_epoch(2)
    tail += [(b.index.clone(), b.video.clone()) for b in resumed]
    assert len(head + tail) == len(straight)
    for (i1, v1), (i2, v2) in zip(head + tail, straight, strict=True):
        assert torch.equal(i1, i2) and torch.equal(v1, v2)


def epochs_until(loader, stop_epoch: int, batches: int):
    out = []
    for e in range(stop_epoch + 1):
        loader.set_epoch(e)
        for n, b in enumerate(loader, 1):
            out.append((b.index.clone(), b.video.clone()))
            if e == stop_epoch and n == batches:
                return out
    return out


def test_views_per_decode_must_divide_the_batch():
    with pytest.raises(UserError, match="loader.views_per_decode.*must divide train.batch_size"):
        load_config("demo", ["loader.views_per_decode=3", "train.batch_size=8"])
    assert load_config("demo", ["loader.views_per_decode=2"]).loader.views_per_decode == 2
