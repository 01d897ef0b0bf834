"""A clip's plan: which frames, which mask, which augmentation draw, which test view.

`make_plan` is the one function that makes it, for every backend (the CPU dataset, the DALI
sources, the DALI loader's CPU recovery), for evaluation and for multi-view testing, so they
cannot disagree on a clip. Its random streams are the specs' own: `clip_rng(seed, epoch, row,
0)` for the frame indices, `draw_params` (stream 1) for the augmentation draw; a training
clip decoded once for several samples (`loader.views_per_decode`) has one plan per draw,
each from streams of its own (draw 0 = the seed recipe's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meld_dali.clips import Clip
from meld_dali.config import DataConfig
from meld_dali.sampling import clip_indices
from meld_dali.transforms import AugParams, draw_params


@dataclass(frozen=True)
class View:
    """One view of a clip. Eval (multi-view testing): where in each sampling segment its
    frame is taken (0..1; 0.5 = the segment's middle, the plain eval view) and where its crop
    sits along the frame's longer side (0..1; 0.5 = the centre crop). Train: `draw`, which
    of the clip's random samples it is (0 = the seed recipe's only one)."""
    temporal: float = 0.5
    spatial: float = 0.5
    draw: int = 0


CENTRE = View()  # the plain eval view, and a training clip's first draw


def train_views(per_decode: int) -> tuple[View, ...]:
    """The training samples taken from one decode of a clip (`loader.views_per_decode`)."""
    if per_decode < 1:
        raise ValueError(f"views per decode must be at least 1, got {per_decode}")
    return tuple(View(draw=v) for v in range(per_decode))


def frame_union(indices: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Several plans' frame indices of one clip -> the sorted union (what one decode reads)
    and, for each plan, the positions of its frames in that union."""
    union = np.unique(np.concatenate(indices))
    return union, [np.searchsorted(union, i) for i in indices]


def multi_views(temporal: int, spatial: int) -> tuple[View, ...]:
    """PySlowFast-style multi-view testing: `temporal` positions (t + 0.5) / temporal, each
    with `spatial` crops along the longer side (3 = start, centre, end); temporal-major."""
    if temporal < 1 or spatial < 1:
        raise ValueError(f"views must be at least 1x1, got {temporal}x{spatial}")
    crops = [0.5] if spatial == 1 else [k / (spatial - 1) for k in range(spatial)]
    return tuple(View((t + 0.5) / temporal, s) for t in range(temporal) for s in crops)


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (arrays do not hash)
class ClipPlan:
    row: int  # manifest row
    indices: np.ndarray  # int64 [T], PAD in padded slots (the sampling spec)
    mask: np.ndarray  # bool [T], True = real frame
    params: AugParams  # the augmentation draw (train) or the view's crop (eval)
    view: View


def make_plan(clip: Clip, data: DataConfig, *, train: bool, seed: int, epoch: int, row: int,
              view: View = CENTRE) -> ClipPlan:
    """The plan of manifest row `row` (`clip`) in `epoch`. Train: the seeded random indices
    and draw (of `view.draw`). Eval: the view's frame position and crop, no randomness."""
    if train and (view.temporal, view.spatial) != (CENTRE.temporal, CENTRE.spatial):
        raise ValueError("a training view is a random draw: multi-view testing is eval only")
    if not train and view.draw:
        raise ValueError("an eval view has no random draw")
    idx, mask = clip_indices(clip.num_frames, data.num_frames, train=train, seed=seed,
                             epoch=epoch, row=row, position=view.temporal, draw=view.draw)
    params = (draw_params(data, seed=seed, epoch=epoch, row=row, draw=view.draw) if train
              else view_crop(clip, view))
    return ClipPlan(row, idx, mask, params, view)


def view_crop(clip: Clip, view: View) -> AugParams:
    """The eval crop of `view`: moved along the longer side of the stored frames (frame
    folders and cached clips keep the source's orientation), centred on the other."""
    landscape = (clip.width or 1) >= (clip.height or 1)
    return (AugParams(crop_x=view.spatial) if landscape
            else AugParams(crop_y=view.spatial))
