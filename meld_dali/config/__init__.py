"""Typed configuration: one validated model per component, loaded from YAML, overridden with --set.

Each component receives only its own section (DataConfig, LoaderConfig, ...); nothing reaches
into a global config. `Config` is just the bundle the CLI resolves and dumps to the run folder.

The sections are pydantic models (`schema`): every field has a type, its allowed choices
(`Literal`) or range, unknown keys are errors (`extra="forbid"`), and assigning a field
re-validates it. A YAML file, `--set` overrides and a checkpoint's saved config all go through
the same validation (`loading`); a failure becomes one `UserError` line naming the key, the
value and what is allowed.
"""

from meld_dali.config.loading import (
    apply_overrides,
    builtin_config_path,
    config_from_saved,
    dump_config,
    format_error,
    load_config,
    parse_override,
    validate,
)
from meld_dali.config.schema import (
    AMP_MODES,
    BACKENDS,
    EMOTIONS,
    SECTIONS,
    SOURCES,
    SPLITS,
    STAGES,
    Config,
    DataConfig,
    HubConfig,
    LoaderConfig,
    ModelConfig,
    OptimConfig,
    TrackingConfig,
    TrainConfig,
    notes,
)

__all__ = ["AMP_MODES", "BACKENDS", "EMOTIONS", "SECTIONS", "SOURCES", "SPLITS", "STAGES",
           "Config", "DataConfig", "HubConfig", "LoaderConfig", "ModelConfig", "OptimConfig",
           "TrackingConfig", "TrainConfig", "apply_overrides", "builtin_config_path",
           "config_from_saved", "dump_config", "format_error", "load_config",
           "notes", "parse_override", "validate"]
