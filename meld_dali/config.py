"""Typed configuration: one validated model per component, loaded from YAML, overridden with --set.

Each component receives only its own section (DataConfig, LoaderConfig, ...); nothing reaches
into a global config. `Config` is just the bundle the CLI resolves and dumps to the run folder.

The sections are pydantic models: every field has a type, its allowed choices (`Literal`) or
range, unknown keys are errors (`extra="forbid"`), and assigning a field re-validates it. A YAML
file, `--set` overrides and a checkpoint's saved config all go through the same validation; a
failure becomes one `UserError` line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import logging
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from meld_dali.errors import UserError

log = logging.getLogger(__name__)

# MELD's own label order (its README): saved in every checkpoint and model card.
EMOTIONS: tuple[str, ...] = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")

# ----------------------------------------------------------------------------- choices
# The one place the choices are written; the tuples below are derived from these types.

Backend = Literal["dali-gpu", "dali-cpu", "torch"]
Source = Literal["video", "frames", "cache"]  # cache: a re-encoded clip cache
Split = Literal["train", "dev", "test"]
Stage = Literal["stem", "res2", "res3", "res4", "res5"]  # backbone blocks (model.STAGES)
Flag = Literal["auto", "true", "false"]  # auto = on with CUDA, off on CPU
Amp = Literal["fp16", "bf16", "off"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Interp = Literal["linear", "nearest"]
Anneal = Literal["cos", "linear"]
ClassWeights = Literal["inv_sqrt", "none"]
TrackingMode = Literal["auto", "offline", "online"]
HubPush = Literal["end", "best", "never"]

BACKENDS: tuple[str, ...] = get_args(Backend)
SOURCES: tuple[str, ...] = get_args(Source)
SPLITS: tuple[str, ...] = get_args(Split)
STAGES: tuple[str, ...] = get_args(Stage)
AMP_MODES: tuple[str, ...] = get_args(Amp)

# ----------------------------------------------------------------------------- YAML 1.1 quirks


def _yaml_float(v: Any) -> Any:
    """YAML 1.1 reads `2e-3` (no dot) as text: read it as the number it is."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _yaml_str(v: Any) -> Any:
    """Free text: `--set hub.repo_id=123` stays "123"; a bare `true` stays "true"."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return ""
    if isinstance(v, (int, float)):
        return str(v)
    return v


def _yaml_flag(v: Any) -> Any:
    """auto|true|false choices: YAML reads a bare true/false/on/off as a bool."""
    return ("true" if v else "false") if isinstance(v, bool) else v


def _yaml_off(v: Any) -> Any:
    """A bare `off` (or `false`, `no`) is YAML 1.1's boolean false: the choice "off"."""
    return "off" if v is False else v


def _ordered_pair(v: list[float]) -> list[float]:
    if v[0] > v[1]:
        raise ValueError(f"must be ordered [low, high], got low {v[0]} > high {v[1]}")
    return v


def _unique_stages(v: dict[int, str]) -> dict[int, str]:
    twice = sorted({s for s in v.values() if list(v.values()).count(s) > 1})
    if twice:
        raise ValueError(f"each stage at most once (listed more than once: {', '.join(twice)})")
    return v


Int = Annotated[int, Strict()]  # no bools, no 1.5, no "5"
Float = Annotated[float, BeforeValidator(_yaml_float), Strict()]  # ints widen to float
Str = Annotated[str, BeforeValidator(_yaml_str)]
Bool = Annotated[bool, Strict()]
Count = Annotated[int, Strict(), Field(ge=1)]
NonNeg = Annotated[int, Strict(), Field(ge=0)]
Positive = Annotated[Float, Field(gt=0)]
Prob = Annotated[Float, Field(ge=0, le=1)]
Factors = Annotated[list[Positive], Field(min_length=2, max_length=2),
                    AfterValidator(_ordered_pair)]
Mean = Annotated[list[Annotated[Float, Field(ge=0, le=1)]], Field(min_length=3, max_length=3)]
Std = Annotated[list[Positive], Field(min_length=3, max_length=3)]
Section = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True,
                     allow_inf_nan=False)


def _rule(field: str, value: Any, allowed: str) -> PydanticCustomError:
    """A cross-field error, reported against `field` (dotted from the model it is raised in)."""
    return PydanticCustomError("config_rule", "{allowed}",
                               {"field": field, "value": value, "allowed": allowed})


# ----------------------------------------------------------------------------- sections


class DataConfig(BaseModel):
    model_config = Section

    root: Str = ""  # dataset root or manifest file; "" = none given
    # auto (the loader picks: frames when extracted, else video) | video | frames | cache
    source: Literal["auto", Source] = "auto"
    num_frames: Count = 32  # T
    crop_size: Count = 224
    short_side: Count = 256  # resize shorter side before cropping
    flip_p: Prob = 0.5
    rotate_deg: Annotated[Float, Field(ge=0, le=180)] = 10.0  # uniform in [-deg, deg]
    # linear, or nearest: ~5x cheaper in DALI's CPU warp (the CPU variant's bottleneck)
    rotate_interp: Interp = "linear"
    brightness: Factors = Field(default_factory=lambda: [0.8, 1.2])
    contrast: Factors = Field(default_factory=lambda: [0.8, 1.2])
    mean: Mean = Field(default_factory=lambda: [0.485, 0.456, 0.406])  # pixels in [0, 1]
    std: Std = Field(default_factory=lambda: [0.229, 0.224, 0.225])
    train_split: Split = "train"
    eval_split: Split = "dev"

    @model_validator(mode="after")
    def _crop_fits(self) -> DataConfig:
        if self.crop_size > self.short_side:
            raise _rule("crop_size", self.crop_size,
                        f"must be <= data.short_side ({self.short_side})")
        return self


class LoaderConfig(BaseModel):
    model_config = Section

    backend: Literal["auto", Backend] = "auto"
    workers: NonNeg = 2  # DataLoader workers / DALI threads
    prefetch: Count = 2
    channels_last: Annotated[Flag, BeforeValidator(_yaml_flag)] = "auto"
    dtype: Dtype = "auto"  # auto (follows train.amp) | float32 | float16 | bfloat16


class ModelConfig(BaseModel):
    model_config = Section

    name: Literal["slowfast_r50"] = "slowfast_r50"
    alpha: Count = 4  # fast/slow frame ratio
    num_classes: Annotated[Int, Field(ge=len(EMOTIONS), le=len(EMOTIONS))] = len(EMOTIONS)
    pretrained: Str = ""  # "" | local path | https URL | hf://repo_id/filename | "k400"
    cache_dir: Str = ""  # "" = torch hub cache
    hidden: Annotated[list[Count], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [1024, 256])
    dropout: Annotated[list[Annotated[Float, Field(ge=0, lt=1)]],
                       Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.3, 0.2])


class OptimConfig(BaseModel):
    model_config = Section

    base_lr: Positive = 1e-5  # OneCycle start and final LR
    max_lr: Positive = 1e-3
    weight_decay: Annotated[Float, Field(ge=0)] = 1e-4
    warmup_pct: Annotated[Float, Field(gt=0, lt=1)] = 0.3
    anneal: Anneal = "cos"
    betas: Annotated[list[Annotated[Float, Field(ge=0, lt=1)]],
                     Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.9, 0.999])
    grad_clip: Positive = 1.0
    focal_gamma: Annotated[Float, Field(ge=0)] = 2.0
    class_weights: ClassWeights = "inv_sqrt"

    @model_validator(mode="after")
    def _lr_order(self) -> OptimConfig:
        if self.base_lr > self.max_lr:
            raise _rule("base_lr", self.base_lr, f"must be <= optim.max_lr ({self.max_lr})")
        return self


class TrainConfig(BaseModel):
    model_config = Section

    epochs: Count = 50
    batch_size: Count = 16
    accum_steps: Count = 4
    seed: Annotated[Int, Field(ge=0, lt=2**32)] = 0
    device: Annotated[Str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    amp: Annotated[Amp, BeforeValidator(_yaml_off)] = "fp16"  # off on CPU regardless
    compile: Annotated[Flag, BeforeValidator(_yaml_flag)] = "auto"
    # epoch index -> stage name unfrozen at the start of that epoch (0-based epochs).
    # An epoch at or past train.epochs is allowed (train.epochs may grow on resume).
    unfreeze: Annotated[dict[NonNeg, Stage], AfterValidator(_unique_stages)] = Field(
        default_factory=lambda: {3: "res5", 6: "res4", 9: "res3"})
    freeze_backbone: Bool = True
    patience: Count = 10
    min_epochs: NonNeg = 25
    min_delta: Annotated[Float, Field(ge=0)] = 0.005
    checkpoint_every_steps: NonNeg = 0  # 0 = only at epoch ends
    keep_last: NonNeg = 0  # extra step-numbered copies to keep (0 = none)
    max_steps_per_epoch: NonNeg = 0  # 0 = full epoch (a cap for smoke runs)

    @model_validator(mode="before")
    @classmethod
    def _no_null_unfreeze(cls, data: Any) -> Any:
        if isinstance(data, dict) and "unfreeze" in data and data["unfreeze"] is None:
            data = {**data, "unfreeze": {}}  # `unfreeze:` with nothing after it
        return data


class TrackingConfig(BaseModel):
    model_config = Section

    wandb: Bool = True
    project: Annotated[Str, Field(min_length=1)] = "meld-dali"
    entity: Str = ""
    mode: TrackingMode = "auto"  # auto (offline without an API key) | offline | online
    log_every: Count = 1  # optimizer steps between per-step logs
    sample_predictions: NonNeg = 32  # rows in the sample-prediction table


class HubConfig(BaseModel):
    model_config = Section

    # "" = no push; else "name" or "owner/name"
    repo_id: Annotated[Str, Field(pattern=r"^$|^([\w.-]+/)?[\w.-]+$")] = ""
    push: HubPush = "end"
    private: Bool = True
    retries: NonNeg = 3


class Config(BaseModel):
    model_config = Section

    data: DataConfig = Field(default_factory=DataConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    hub: HubConfig = Field(default_factory=HubConfig)

    @model_validator(mode="after")
    def _frames_split_into_pathways(self) -> Config:
        if self.data.num_frames % self.model.alpha:
            raise _rule("data.num_frames", self.data.num_frames,
                        f"must be a multiple of model.alpha ({self.model.alpha})")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what config.yaml and checkpoints hold)."""
        return self.model_dump()


SECTIONS: tuple[str, ...] = tuple(Config.model_fields)


def notes(cfg: Config) -> list[str]:
    """Valid but worth saying: settings this run's length makes inert."""
    t, out = cfg.train, []
    late = {ep: s for ep, s in sorted(t.unfreeze.items()) if ep >= t.epochs}
    if late and t.freeze_backbone:
        out.append(f"train.unfreeze: {', '.join(f'{s} at epoch {ep}' for ep, s in late.items())}"
                   f" never unfreeze in train.epochs={t.epochs} (unless extended on resume)")
    if t.min_epochs > t.epochs:
        out.append(f"train.min_epochs={t.min_epochs} > train.epochs={t.epochs}: early "
                   "stopping cannot act in this run")
    return out


# ----------------------------------------------------------------------------- errors


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        if part == "[key]":
            text += " key"
        elif isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


# what a `pattern` field allows, in words
PATTERNS = {"train.device": "auto, cpu, cuda or cuda:N", "hub.repo_id": '"" (no push), name or '
            "owner/name (letters, digits, '-', '_', '.')"}


def _allowed(err: dict, key: str) -> str:
    msg = err["msg"]
    if err["type"] == "string_pattern_mismatch" and key in PATTERNS:
        return f"must be {PATTERNS[key]}"
    for old, new in (("Input should be ", "must be "), ("Value error, ", ""),
                     ("String should match pattern", "must match the pattern"),
                     ("List should have", "must have"), ("String should have", "must have")):
        if msg.startswith(old):
            msg = new + msg[len(old):]
    if err["type"] == "model_type":
        msg = "must be a mapping of keys"
    if err["type"] in ("too_short", "too_long"):
        lo, hi = err.get("ctx", {}).get("min_length"), err.get("ctx", {}).get("max_length")
        msg = f"must have exactly {lo or hi} items" if lo in (None, hi) or hi is None else msg
    return msg


def format_error(e: ValidationError, where: str, text: str | None = None) -> str:
    """The first error of `e` as one line: where, dotted key, value, what is allowed."""
    err = e.errors(include_url=False)[0]
    loc, value = tuple(err["loc"]), err.get("input")
    ctx = err.get("ctx") or {}
    if err["type"] == "config_rule":
        loc, value = loc + tuple(str(ctx["field"]).split(".")), ctx["value"]
    line = _yaml_line(text, loc) if text else None
    where = f"{where}:{line}" if line else where
    key = _dotted(loc)
    if loc and loc[-1] == "[key]":  # a dict key, e.g. an epoch of train.unfreeze
        return (f"{where}: config key '{_dotted(loc[:-2])}' has key {value!r}: keys "
                f"{_allowed(err, key)}")
    if err["type"] == "extra_forbidden":
        if len(loc) == 1:
            return f"{where}: unknown config section '{key}' (known: {', '.join(SECTIONS)})"
        if len(loc) == 2 and loc[0] in SECTIONS:
            known = ", ".join(Config.model_fields[loc[0]].annotation.model_fields)
            return f"{where}: unknown config key '{key}' (known in {loc[0]}: {known})"
    return f"{where}: config key '{key}' = {value!r}: {_allowed(err, key)}"


def _yaml_line(text: str, loc: tuple) -> int | None:
    """1-based line of the deepest node of `loc` that the YAML text spells out."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = [(k, v) for k, v in node.value if k.value == str(part)]
            if not hit:
                break
            line, node = hit[0][0].start_mark.line + 1, hit[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def validate(d: Any, where: str = "config", text: str | None = None) -> Config:
    """A Config from a nested dict, every key and value checked (UserError if not)."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping of sections, got {type(d).__name__}")
    # `train:` with nothing under it is an empty section
    d = {k: v for k, v in d.items() if not (v is None and k in SECTIONS)}
    try:
        return Config.model_validate(d)
    except ValidationError as e:
        raise UserError(format_error(e, where, text)) from None


def from_dict(d: dict[str, Any], where: str = "config") -> Config:
    """Build a Config from a nested dict, checking every key and type."""
    return validate(d, where)


def config_from_saved(d: dict[str, Any], where: str = "saved config") -> Config:
    """The Config of a run folder's config.yaml or a checkpoint's `config` (a `to_dict()`).

    Validated like any config; keys this version no longer has are dropped with a warning
    (the saved run is still usable), and keys it lacks take their defaults."""
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping of sections, got {type(d).__name__}")
    kept, dropped = {}, []
    for section, values in d.items():
        if section not in SECTIONS:
            dropped.append(section)
            continue
        if isinstance(values, dict):
            known = Config.model_fields[section].annotation.model_fields
            dropped += [f"{section}.{k}" for k in values if k not in known]
            values = {k: v for k, v in values.items() if k in known}
        kept[section] = values
    if dropped:
        log.warning("%s: ignoring config keys this version does not know: %s", where,
                    ", ".join(dropped))
    return validate(kept, where)


# ----------------------------------------------------------------------------- loading


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


def _merge(base: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for text in overrides:
        section, key, value = parse_override(text)
        values = merged.get(section)
        if not isinstance(values, dict):
            values = merged[section] = {}
        values[key] = value
    return merged


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A new Config: `cfg` with `section.key=value` overrides, validated as a whole."""
    return validate(_merge(cfg.to_dict(), overrides), "--set")


def builtin_config_path(name: str) -> Path:
    return Path(str(resources.files("meld_dali.configs").joinpath(f"{name}.yaml")))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or a built-in recipe name such as 'seed' or 'demo') and apply --set.

    The file is validated on its own first (errors name the file and line), then with the
    overrides (errors name --set)."""
    raw: dict[str, Any] = {}
    if path is None:
        cfg = Config()
    else:
        p = Path(path)
        if not p.exists() and not p.suffix:
            p = builtin_config_path(str(path))
        if not p.exists():
            raise UserError(f"config file not found: {path}")
        text = p.read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        cfg = validate(raw, str(p), text)
        raw = {k: v for k, v in raw.items() if v is not None}
    if overrides:
        cfg = validate(_merge(raw, overrides), "--set")
    for note in notes(cfg):
        log.warning("config: %s", note)
    return cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
