"""Typed configuration: one dataclass per component, loaded from YAML, overridden with --set.

Each component receives only its own dataclass (DataConfig, LoaderConfig, ...); nothing reaches
into a global config. `Config` is just the bundle the CLI resolves and dumps to the run folder.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from meld_dali.errors import UserError

# MELD's own label order (its README): saved in every checkpoint and model card.
EMOTIONS: tuple[str, ...] = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")


@dataclass
class DataConfig:
    root: str = ""  # dataset root or manifest file; "" = none given
    source: str = "auto"  # auto | video | frames (auto = frames when extracted)
    num_frames: int = 32  # T
    crop_size: int = 224
    short_side: int = 256  # resize shorter side before cropping
    flip_p: float = 0.5
    rotate_deg: float = 10.0  # rotation uniform in [-rotate_deg, rotate_deg]
    # linear, or nearest: ~5x cheaper in DALI's CPU warp (the CPU variant's bottleneck)
    rotate_interp: str = "linear"
    brightness: list[float] = field(default_factory=lambda: [0.8, 1.2])
    contrast: list[float] = field(default_factory=lambda: [0.8, 1.2])
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    train_split: str = "train"
    eval_split: str = "dev"


@dataclass
class LoaderConfig:
    backend: str = "auto"  # auto | dali-gpu | dali-cpu | torch
    workers: int = 2  # DataLoader workers / DALI threads
    prefetch: int = 2
    channels_last: str = "auto"  # auto (on with CUDA) | true | false
    dtype: str = "auto"  # auto (follows train.amp) | float32 | float16 | bfloat16


@dataclass
class ModelConfig:
    name: str = "slowfast_r50"
    alpha: int = 4  # fast/slow frame ratio
    num_classes: int = 7
    pretrained: str = ""  # "" | local path | https URL | hf://repo_id/filename | "k400"
    cache_dir: str = ""  # "" = torch hub cache
    hidden: list[int] = field(default_factory=lambda: [1024, 256])
    dropout: list[float] = field(default_factory=lambda: [0.3, 0.2])


@dataclass
class OptimConfig:
    base_lr: float = 1e-5  # OneCycle start and final LR
    max_lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_pct: float = 0.3
    anneal: str = "cos"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    focal_gamma: float = 2.0
    class_weights: str = "inv_sqrt"  # inv_sqrt | none


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 16
    accum_steps: int = 4
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "fp16"  # fp16 | bf16 | off (off on CPU regardless)
    compile: str = "auto"  # auto (on with CUDA) | true | false
    # epoch index -> stage name unfrozen at the start of that epoch (0-based epochs)
    unfreeze: dict[int, str] = field(default_factory=lambda: {3: "res5", 6: "res4", 9: "res3"})
    freeze_backbone: bool = True
    patience: int = 10
    min_epochs: int = 25
    min_delta: float = 0.005
    checkpoint_every_steps: int = 0  # 0 = only at epoch ends
    keep_last: int = 0  # extra step-numbered copies to keep (0 = none)
    max_steps_per_epoch: int = 0  # 0 = full epoch (a cap for smoke runs)


@dataclass
class TrackingConfig:
    wandb: bool = True
    project: str = "meld-dali"
    entity: str = ""
    mode: str = "auto"  # auto (offline without an API key) | offline | online
    log_every: int = 1  # optimizer steps between per-step logs
    sample_predictions: int = 32  # rows in the sample-prediction table


@dataclass
class HubConfig:
    repo_id: str = ""  # "" = no push
    push: str = "end"  # end | best | never
    private: bool = True
    retries: int = 3


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- type checking

CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("auto", "video", "frames"),
    "data.rotate_interp": ("linear", "nearest"),
    "loader.backend": ("auto", "dali-gpu", "dali-cpu", "torch"),
    "loader.channels_last": ("auto", "true", "false"),
    "loader.dtype": ("auto", "float32", "float16", "bfloat16"),
    "train.amp": ("fp16", "bf16", "off"),
    "train.compile": ("auto", "true", "false"),
    "tracking.mode": ("auto", "offline", "online"),
    "hub.push": ("end", "best", "never"),
    "optim.class_weights": ("inv_sqrt", "none"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float, etc.)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = UserError(
        f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(key, value, arg)
            except UserError:
                continue
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML reads `true` as a bool: keep it as text
            return "true" if value else "false"
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. --set hub.repo_id=123
        raise bad
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad
        return {
            _coerce(f"{key} key", k, args[0]): _coerce(f"{key}[{k}]", v, args[1])
            for k, v in value.items()
        }
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug, not a user error


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    sections = _section_types(Config)
    if section not in sections:
        raise UserError(
            f"{where}: unknown config section '{section}' (known: {', '.join(sections)})"
        )
    obj = getattr(cfg, section)
    fields = _section_types(type(obj))
    if key not in fields:
        raise UserError(
            f"{where}: unknown config key '{section}.{key}' (known in {section}: "
            f"{', '.join(fields)})"
        )
    value = _coerce(f"{section}.{key}", value, fields[key])
    choices = CHOICES.get(f"{section}.{key}")
    if choices and value == "false" and "off" in choices:
        value = "off"  # YAML 1.1 reads a bare `off` as the boolean false
    if choices and value not in choices:
        raise UserError(f"{where}: config key '{section}.{key}' must be one of {choices}, "
                        f"got {value!r}")
    setattr(obj, key, value)


def from_dict(d: dict[str, Any], where: str = "config") -> Config:
    """Build a Config from a nested dict, checking every key and type."""
    cfg = Config()
    if d is None:
        return cfg
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping of sections, got {type(d).__name__}")
    for section, values in d.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(f"{where}: section '{section}' must be a mapping")
        for key, value in values.items():
            _apply(cfg, section, key, value, where)
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.epochs=5' -> ('train', 'epochs', 5). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise UserError(f"--set '{text}': expected section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"--set '{text}': key must be section.key (e.g. train.epochs)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts[0], parts[1], value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(cfg, section, key, value, "--set")
    return cfg


def builtin_config_path(name: str) -> Path:
    return Path(str(resources.files("meld_dali.configs").joinpath(f"{name}.yaml")))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or a built-in recipe name such as 'seed' or 'demo') and apply --set."""
    if path is None:
        cfg = Config()
    else:
        p = Path(path)
        if not p.exists() and not p.suffix:
            p = builtin_config_path(str(path))
        if not p.exists():
            raise UserError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        cfg = from_dict(raw or {}, where=str(p))
    return apply_overrides(cfg, overrides or [])


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
