import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meld_dali.sampling import PAD, clip_indices, sample_indices


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), T=st.integers(1, 64), train=st.booleans(),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 100), row=st.integers(0, 20000))
def test_sampling_properties(n, T, train, seed, epoch, row):
    idx, mask = clip_indices(n, T, train=train, seed=seed, epoch=epoch, row=row)
    assert idx.shape == (T,) and mask.shape == (T,) and mask.dtype == bool
    real = idx[mask]
    assert len(real) == min(n, T)
    assert np.all(np.diff(real) > 0)  # sorted, distinct
    assert real.min() >= 0 and real.max() < n
    if n >= T:
        bounds = (np.arange(T + 1) * n) // T
        assert np.all((bounds[:-1] <= idx) & (idx < bounds[1:]))  # one per segment
    else:
        assert list(real) == list(range(n))  # every frame, in order
        assert np.all(idx[~mask] == PAD) and not mask[n:].any()
    again, _ = clip_indices(n, T, train=train, seed=seed, epoch=epoch, row=row)
    assert np.array_equal(idx, again)  # deterministic per (seed, epoch, clip)


def test_eval_takes_segment_middles():
    idx, mask = sample_indices(64, 8, train=False)
    assert idx.tolist() == [4, 12, 20, 28, 36, 44, 52, 60] and mask.all()


def test_train_draws_differ_across_epochs_and_clips_and_cover_segments():
    a = clip_indices(320, 32, train=True, seed=0, epoch=0, row=5)[0]
    b = clip_indices(320, 32, train=True, seed=0, epoch=1, row=5)[0]
    c = clip_indices(320, 32, train=True, seed=0, epoch=0, row=6)[0]
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    # over many epochs every position of a segment is drawn
    seen = {int(clip_indices(320, 32, train=True, seed=0, epoch=e, row=5)[0][0])
            for e in range(200)}
    assert seen == set(range(10))


def test_empty_clip_is_refused():
    with pytest.raises(ValueError):
        sample_indices(0, 32, train=False)
