"""Load a preset (YAML, with `extends:`), apply `a.b.c=value` overrides, validate, and explain errors.

Errors name the key path and what was expected, e.g.
    trainer.lora.num_experts: expected int >= 1, got 'x'
"""

from __future__ import annotations

import argparse
import copy
import difflib
import re
import typing
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel, ValidationError

from configs.errors import RecloraError
from configs.schema import Config

PRESET_DIR = Path(__file__).resolve().parent


class ConfigError(RecloraError, ValueError):
    """Invalid configuration; the message lists every offending key path on one line, separated by '; '."""


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    if p.suffix in (".yaml", ".yml"):
        raise ConfigError(f"config file not found: {name_or_path}")
    raise ConfigError(f"unknown preset {name_or_path!r}; available: {', '.join(available_presets())}")


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `extends` cycle: {' -> '.join(str(s) for s in seen + (path,))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _read_yaml(preset_path(str(parent)) if not Path(str(parent)).is_absolute() else Path(parent), seen + (path,))
    return deep_merge(base, data)


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node[part] = dict(child)
            node = node[part]
        node[path[-1]] = value
    return data


def load_config(name_or_path: str = "demo", overrides: list[str] | None = None) -> Config:
    data = _read_yaml(preset_path(name_or_path))
    data = apply_overrides(data, overrides or [])
    return validate(data)


def validate(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError("invalid config: " + "; ".join(format_errors(e, data))) from None


def format_errors(e: ValidationError, data: dict) -> list[str]:
    lines = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        # Root validators report without a field; their message starts with the key they check.
        key = ".".join(loc)
        expected = _expected(loc)
        kind = err["type"]
        got = err.get("input")
        if kind == "extra_forbidden":
            siblings = _field_names(loc[:-1])
            hint = difflib.get_close_matches(loc[-1], siblings, n=1)
            lines.append(
                f"{key}: unknown key"
                + (f" (did you mean {hint[0]!r}?)" if hint else f"; allowed: {', '.join(siblings)}")
            )
        elif kind == "value_error":
            msg = err["msg"].removeprefix("Value error, ")
            section = ".".join(loc)
            if re.match(r"^[\w.\[\]]+: ", msg):  # a section's check names its key first ("batch_size: ...")
                lines.append(f"{section + '.' if section else ''}{msg}")
            else:  # a field's own check: the location is the key
                lines.append(f"{section}: {msg}")
        elif kind == "literal_error":
            lines.append(f"{key}: expected one of {err['ctx']['expected']}, got {got!r}")
        elif kind == "finite_number":
            lines.append(f"{key}: expected a finite number, got {got!r}")
        elif kind == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: expected {expected or err['msg']}, got {got!r}")
    return lines


def _field_at(loc: list[str]):
    model: Any = Config
    info = None
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            info = model.model_fields[part]
            model = _unwrap(info.annotation)
        else:
            return None
    return info


def _unwrap(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return tp


def _field_names(loc: list[str]) -> list[str]:
    model: Any = Config
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            model = _unwrap(model.model_fields[part].annotation)
        else:
            return []
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _expected(loc: list[str]) -> str | None:
    info = _field_at(loc)
    if info is None:
        return None
    tp = _unwrap(info.annotation)
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    bounds = []
    for m in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                bounds.append(f"{sym} {getattr(m, attr)}")
        if isinstance(m, annotated_types.MinLen):
            bounds.append(
                f"with at least {m.min_length} item(s)" if name.startswith("list") else f"of length >= {m.min_length}"
            )
    return " ".join([name] + bounds)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` of every command: each option with its default ("(default: 8)"), also options without a help
    text, unless the help already says what the default is; descriptions keep their line breaks."""

    def add_argument(self, action: argparse.Action) -> None:
        if (
            not action.help
            and action.option_strings
            and not action.required
            and action.default is not argparse.SUPPRESS
        ):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        if "default" in text.lower() or action.required or action.default is argparse.SUPPRESS:
            return text
        if action.option_strings or action.default not in (None, []):
            return f"{text} (default: %(default)s)".strip()
        return text


def explicit_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The `dest` of every option given on this command line (`--epochs 3`, `--epochs=3`, an abbreviation):
    with `--config`, these override the config's values and the others come from the config. Parses `argv`
    once more with every default suppressed, so only what was given lands in the namespace."""
    saved = [(action, action.default) for action in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.update(saved_defaults)
    return {dest for dest in vars(given) if dest != "help"}


def flag_overrides(args: argparse.Namespace, given: set[str], keys: dict[str, str]) -> list[str]:
    """`key.path=value` overrides for the options given on the command line that have a config key (`keys`:
    option dest -> key path), to apply after the user's own overrides: with `--config`, an explicit option wins
    over the config, and the stage's content-addressed folder follows it."""
    import json

    return [f"{keys[dest]}={json.dumps(getattr(args, dest))}" for dest in keys if dest in given]
