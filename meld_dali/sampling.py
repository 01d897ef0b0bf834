"""The sampling spec: which frames of a clip are decoded. One pure function for every backend.

- n >= T: split [0, n) into T equal segments; train draws a random index in each segment,
  eval takes each segment's middle. Indices come out sorted, so decoding streams forward.
- 0 < n < T: frames 0..n-1, then T-n padded slots (index -1, mask False).
- n == 0: not loadable (manifest status `empty`); asking for it is a bug.
The random source is seeded from (seed, epoch, manifest row), so a resumed run and every backend
choose the same indices for the same clip in the same epoch.
"""

from __future__ import annotations

import numpy as np

PAD = -1


def clip_rng(seed: int, epoch: int, row: int, stream: int = 0,
             draw: int = 0) -> np.random.Generator:
    """Independent random stream per (seed, epoch, clip's manifest row); `stream` separates
    uses (0 = frame indices, 1 = augmentation parameters); `draw` the training samples taken
    from one decode of a clip (`loader.views_per_decode`): draw 0 is the seed recipe's own
    stream, draw v > 0 one of its own."""
    return np.random.default_rng([seed, epoch, row, stream, *([draw] if draw else [])])


def sample_indices(n: int, num_frames: int, *, train: bool,
                   rng: np.random.Generator | None = None,
                   position: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Return (indices int64 [T], mask bool [T]); padded slots have index PAD and mask False.

    Eval takes the frame at `position` (0..1) of each segment: 0.5 = the middle (the spec);
    multi-view testing takes several positions."""
    T = num_frames
    if n <= 0:
        raise ValueError(f"clip has {n} frames: empty clips never reach a loader")
    if T <= 0:
        raise ValueError(f"num_frames must be positive, got {T}")
    if n < T:
        idx = np.full(T, PAD, dtype=np.int64)
        idx[:n] = np.arange(n)
        return idx, idx >= 0
    bounds = (np.arange(T + 1) * n) // T  # segment i is [bounds[i], bounds[i+1]), never empty
    start, end = bounds[:-1], bounds[1:]
    if train:
        if rng is None:
            raise ValueError("train sampling needs an rng (use clip_rng(seed, epoch, row))")
        idx = start + (rng.random(T) * (end - start)).astype(np.int64)
    elif position == 0.5:
        idx = start + (end - start) // 2
    else:
        idx = np.minimum(start + ((end - start) * position).astype(np.int64), end - 1)
    return idx.astype(np.int64), np.ones(T, dtype=bool)


def clip_indices(n: int, num_frames: int, *, train: bool, seed: int, epoch: int,
                 row: int, position: float = 0.5, draw: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The spec as a clip's plan (`data.plan.make_plan`) calls it: train seeded from
    (seed, epoch, row, draw), eval at `position` of each segment."""
    rng = clip_rng(seed, epoch, row, 0, draw) if train else None
    return sample_indices(n, num_frames, train=train, rng=rng, position=position)
