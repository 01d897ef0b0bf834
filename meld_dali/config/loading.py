"""Loading a config: YAML files, `--set` overrides and saved configs, all through the same
validation; a failure is one `UserError` line naming the key, the value and what is allowed
(and the file and line when it came from a file)."""

from __future__ import annotations

import copy
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from meld_dali.config.schema import SECTIONS, Config, notes
from meld_dali.errors import UserError
from meld_dali.fileio import atomic_write

log = logging.getLogger("meld_dali.config")

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
        if not p.is_file():
            raise UserError(f"--config {path}: a folder, not a YAML file")
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: cannot read the config file ({e})") from None
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
    with atomic_write(path) as f:
        f.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
