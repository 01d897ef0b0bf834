"""The config schema: one validated pydantic model per component (the recipe's every value).

Every field has a type, its allowed choices (`Literal`) or range, unknown keys are errors
(`extra="forbid"`), and assigning a field re-validates it. How files, `--set` and saved
configs reach it: `loading`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    model_validator,
)
from pydantic_core import PydanticCustomError

from meld_dali.hardware import cpu_cores, local_ranks

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
Verify = Literal["auto", "warn", "off"]

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


def _auto_or_count(v: Any) -> Any:
    """`auto`, or a whole number >= 0 (no bools, no 1.5, no "5")."""
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError("must be auto or a whole number >= 0")
    return v


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
    # auto (the clip cache when built, else frame folders when extracted, else the videos)
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
    # DataLoader workers / DALI threads; auto = the CPU cores this process may use, shared
    # by the ranks torchrun starts on the node (`num_workers`, at least 1), so PyTorch never
    # warns that there are more workers than cores and no rank takes every core of the node
    workers: Annotated[Literal["auto"] | int, PlainValidator(_auto_or_count)] = "auto"
    prefetch: Count = 2
    # DALI: pipelines (decode sessions) per loader, each decoding a share of every batch;
    # 0 = auto: one per NVDEC engine of the GPU for video, else 1
    dali_pipelines: NonNeg = 0
    channels_last: Annotated[Flag, BeforeValidator(_yaml_flag)] = "auto"
    dtype: Dtype = "auto"  # auto (follows train.amp) | float32 | float16 | bfloat16
    # training samples taken from each decoded clip, each with its own random frames and
    # augmentation (AVION's num_samples, PySlowFast's repeated sampling); an epoch keeps its
    # samples and optimizer steps and decodes 1/k of the clips (all of them every k epochs);
    # a batch of train.batch_size samples holds batch_size / k clips. 1 = the seed recipe
    views_per_decode: Count = 1
    # before training on a DALI backend, compare its eval output on a few dev clips with the
    # CPU reference (meld_dali.verify): auto = a mismatch beyond the tolerance stops the run
    # with one line; warn = train with `torch` instead, with a warning; off = no check
    verify: Annotated[Verify, BeforeValidator(_yaml_off)] = "auto"

    @property
    def num_workers(self) -> int:
        """`workers` as a number: auto resolved on this machine, for each local rank."""
        if self.workers != "auto":
            return self.workers
        return max(1, cpu_cores() // local_ranks())


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
    # torch.compile, regional (each pytorchvideo ResBlock; the batch dim dynamic). auto = on
    # only on GPU families where it was measured faster than eager (hardware.GPUS, none
    # so far): never a default slower than eager.
    compile: Annotated[Flag, BeforeValidator(_yaml_flag)] = "auto"
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"  # tests: eager
    # torch.backends.cudnn.benchmark (cuDNN picks the fastest conv algorithm per shape):
    # auto = on with CUDA
    cudnn_benchmark: Annotated[Flag, BeforeValidator(_yaml_flag)] = "auto"
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
    progress_every: Count = 50  # micro-batches between progress lines when not a terminal
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
        if self.train.batch_size % self.loader.views_per_decode:
            raise _rule("loader.views_per_decode", self.loader.views_per_decode,
                        f"must divide train.batch_size ({self.train.batch_size}): a batch "
                        "holds whole clips")
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
