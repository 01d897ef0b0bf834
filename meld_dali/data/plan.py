"""A clip's plan: which frames, which mask, which augmentation draw, which test view.

`make_plan` is the one function that makes it, for every backend (the CPU dataset, the DALI
sources, the DALI loader's CPU recovery), for evaluation and for multi-view testing, so they
cannot disagree on a clip. Its random streams are the specs' own: `clip_rng(seed, epoch, row,
0)` for the frame indices, `draw_params` (stream 1) for the augmentation draw.
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
    """One test view of a clip: where in each sampling segment its frame is taken (0..1;
    0.5 = the segment's middle, the plain eval view) and where its crop sits along the
    frame's longer side (0..1; 0.5 = the centre crop)."""
    temporal: float = 0.5
    spatial: float = 0.5


CENTRE = View()  # the plain eval view (and the only view of a training clip)


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
    and draw (one view only). Eval: the view's frame position and crop, no randomness."""
    if train and view != CENTRE:
        raise ValueError("a training clip has one view: multi-view testing is eval only")
    idx, mask = clip_indices(clip.num_frames, data.num_frames, train=train, seed=seed,
                             epoch=epoch, row=row, position=view.temporal)
    params = (draw_params(data, seed=seed, epoch=epoch, row=row) if train
              else view_crop(clip, view))
    return ClipPlan(row, idx, mask, params, view)


def view_crop(clip: Clip, view: View) -> AugParams:
    """The eval crop of `view`: moved along the longer side of the stored frames (frame
    folders and cached clips keep the source's orientation), centred on the other."""
    landscape = (clip.width or 1) >= (clip.height or 1)
    return (AugParams(crop_x=view.spatial) if landscape
            else AugParams(crop_y=view.spatial))
