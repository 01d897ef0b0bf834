"""SlowFast R50 (pytorchvideo) with masked temporal pooling and MELD's head.

A plain nn.Module over Batch tensors: forward(video [B,3,T,H,W], mask [B,T]) -> logits [B,7].
The slow input is derived here (video[:, :, ::alpha]); padded frames are zeroed at the input
and the head pools over valid time steps only, so padding never leaks into the prediction.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from meld_dali.checkpoint import load_data
from meld_dali.config import STAGES, ModelConfig  # STAGES: backbone blocks, in order
from meld_dali.errors import UserError

log = logging.getLogger("meld_dali.model")

# pytorchvideo's Kinetics-400 SlowFast 8x8 R50 checkpoint (its model zoo).
K400_URL = "https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/kinetics/SLOWFAST_8x8_R50.pyth"
FEATURES = 2048 + 256  # slow + fast channels after res5


def masked_time_pool(feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, C, T', h, w] features, [B, T] frame mask -> [B, C], mean over valid steps only.

    The mask is downsampled to the feature's length T' by taking the frame each step
    starts at (exact for SlowFast R50, which keeps T' = T on each pathway)."""
    B, C, Tf = feat.shape[:3]
    T = mask.shape[1]
    idx = (torch.arange(Tf, device=mask.device) * T) // Tf
    m = mask[:, idx].to(feat.dtype)  # [B, T']
    per_step = feat.mean(dim=(3, 4))  # [B, C, T']
    return (per_step * m[:, None]).sum(-1) / m.sum(-1, keepdim=True).clamp_min(1)


class Head(nn.Module):
    """concat(2304) -> BN -> Linear -> GELU -> Dropout -> Linear -> BN -> GELU -> Dropout
    -> Linear(num_classes)."""

    def __init__(self, in_dim: int, hidden: list[int], dropout: list[float], num_classes: int):
        super().__init__()
        h1, h2 = hidden
        self.net = nn.Sequential(
            nn.BatchNorm1d(in_dim), nn.Linear(in_dim, h1), nn.GELU(), nn.Dropout(dropout[0]),
            nn.Linear(h1, h2), nn.BatchNorm1d(h2), nn.GELU(), nn.Dropout(dropout[1]),
            nn.Linear(h2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SlowFastMELD(nn.Module):
    def __init__(self, model_cfg: ModelConfig):
        super().__init__()
        if model_cfg.name != "slowfast_r50":
            raise ValueError(f"unknown model {model_cfg.name!r} (only slowfast_r50)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pytorchvideo's torch.jit deprecation noise
            from pytorchvideo.models.slowfast import create_slowfast

            net = create_slowfast(model_num_class=model_cfg.num_classes, model_depth=50,
                                  slowfast_conv_channel_fusion_ratio=2,
                                  slowfast_fusion_conv_stride=(model_cfg.alpha, 1, 1))
        # blocks 0-4: stem, res2..res5 (each a two-pathway stage with its fusion).
        # pytorchvideo's own pool + head (fixed 224-px kernels) are replaced by ours.
        self.blocks = nn.ModuleList(net.blocks[:5])
        _plain_ints(self.blocks)
        self.head = Head(FEATURES, model_cfg.hidden, model_cfg.dropout, model_cfg.num_classes)
        self.alpha = model_cfg.alpha
        self.trainable: set[str] = set(STAGES)

    def forward(self, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # pytorchvideo's multipathway blocks mutate the list in place: a fresh one per call
        x = [video[:, :, :: self.alpha], video]
        for block in self.blocks:
            x = block(x)
        slow = masked_time_pool(x[0], mask[:, :: self.alpha])
        fast = masked_time_pool(x[1], mask)
        return self.head(torch.cat([slow, fast], dim=1).float())

    # ------------------------------------------------------------------ progressive unfreezing

    def set_trainable(self, stages: set[str]) -> None:
        """Backbone stages in `stages` train, the others are frozen (requires_grad False,
        BatchNorm in eval mode). The head always trains."""
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)} (known: {STAGES})")
        self.trainable = set(stages)
        for name, block in zip(STAGES, self.blocks, strict=True):
            block.requires_grad_(name in self.trainable)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for name, block in zip(STAGES, self.blocks, strict=True):
            if name not in self.trainable:
                block.eval()  # frozen BatchNorm keeps its running statistics
        return self

    # ------------------------------------------------------------------ pretrained weights

    def load_pretrained(self, source: str, cache_dir: str = "") -> bool:
        """Load Kinetics-400 backbone weights from 'k400', a path, a URL or hf://repo/file.
        "" = random init. A download that fails (no network is normal) keeps the random init
        and says so; a local file that is missing or unreadable, or weights that match no
        backbone tensor, are a UserError: a run that asked for them must not silently train
        from scratch. Returns True when weights were loaded."""
        if not source:
            log.info("model: random init (no pretrained weights configured)")
            return False
        remote = source == "k400" or source.startswith(("http://", "https://", "hf://"))
        try:
            state = _fetch_state(source, cache_dir)
        except Exception as e:  # noqa: BLE001 - offline is normal for a download
            if not remote:
                raise UserError(f"model.pretrained={source}: cannot load it ({type(e).__name__}"
                                f": {str(e).splitlines()[0] if str(e) else ''}); set "
                                "model.pretrained= (empty) for random init") from None
            log.warning("model: could not load pretrained weights from %s (%s); "
                        "continuing from random init", source, e)
            return False
        state = state.get("model_state", state.get("model", state)) \
            if isinstance(state, dict) else {}
        own = self.state_dict()
        usable = {k: v for k, v in state.items() if k in own and isinstance(v, torch.Tensor)
                  and own[k].shape == v.shape and k.startswith("blocks.")}
        if not usable:
            raise UserError(f"model.pretrained={source}: no tensor in it matches the SlowFast "
                            "R50 backbone (expected pytorchvideo's slowfast_r50 keys such as "
                            "blocks.0.multipathway_blocks.0.conv.weight)")
        self.load_state_dict(usable, strict=False)
        backbone = [k for k in own if k.startswith("blocks.")]
        log.info("model: loaded %d/%d backbone tensors from %s", len(usable), len(backbone),
                 source)
        return bool(usable)


def _fetch_state(source: str, cache_dir: str) -> dict:
    if source == "k400":
        source = K400_URL
    if source.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(
            source, model_dir=cache_dir or None, map_location="cpu", progress=False,
            check_hash=False, weights_only=True)  # data only: a swapped file runs no code
    if source.startswith("hf://"):
        from huggingface_hub import hf_hub_download

        repo, _, filename = source[len("hf://"):].partition(":")
        if not filename:  # hf://owner/name/file.pyth
            parts = repo.split("/")
            repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
        path = hf_hub_download(repo, filename, cache_dir=cache_dir or None)
        return load_data(path)
    p = Path(source).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    return load_data(p)


def _plain_ints(module: nn.Module) -> None:
    """pytorchvideo builds some conv/pool strides from numpy ints; torch.compile turns those
    into tensor reads (a graph break per block). Make them Python ints."""
    for m in module.modules():
        for attr in ("stride", "padding", "dilation", "kernel_size"):
            v = getattr(m, attr, None)
            if isinstance(v, tuple) and any(type(x) is not int for x in v):
                setattr(m, attr, tuple(int(x) for x in v))


def build_model(model_cfg: ModelConfig) -> SlowFastMELD:
    model = SlowFastMELD(model_cfg)
    model.load_pretrained(model_cfg.pretrained, model_cfg.cache_dir)
    return model
