"""Dotted overrides (`align.optim.lr=1e-6`), nested-dict loading and saving of `Config`, with strict checking.

Unknown keys and ill-typed values raise `ConfigError` with one line naming the key and what is allowed, so a typo
on the command line never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from prism_mcore.files import write_text_atomic


class ConfigError(ValueError):
    """A config key or value the schema does not allow; the message is one line meant for the user."""


# Keys that older recipes and saved configs may still set: each gets its own one-line error saying what to do.
RETIRED_KEYS = {
    "data.max_response_length": "was renamed data.max_segment_length (it bounds teacher and warmup segments only; "
    "responses are bounded by each stage's max_new_tokens)",
    "data.packing": "was removed: micro-batches are always packed (sized by data.max_tokens_per_microbatch)",
    "sft.micro_batch_size": "was removed: micro-batches are sized in tokens by data.max_tokens_per_microbatch",
    "warmup.micro_batch_size": "was removed: micro-batches are sized in tokens by data.max_tokens_per_microbatch",
}


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is list:
        return f"a comma-separated list of {_describe(get_args(tp)[0])}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, raw: Any, tp: Any) -> Any:
    """Convert `raw` (a string from the command line, or a JSON value) to the type `tp`, or raise ConfigError."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if type(None) in options and (raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null"))):
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, raw, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {raw!r} is not {_describe(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if raw in allowed:
            return raw
        raise ConfigError(f"{key}: {raw!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
    if origin is list:
        (item_type,) = get_args(tp)
        items = raw if isinstance(raw, list) else [part for part in str(raw).split(",") if part.strip()]
        return [_coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(items)]
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return raw.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: {raw!r} is not a bool (true/false)")
    if tp is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}: {raw!r} is not an int")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw))
        except ValueError:
            raise ConfigError(f"{key}: {raw!r} is not an int") from None
    if tp is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        try:
            return float(str(raw))
        except ValueError:
            raise ConfigError(f"{key}: {raw!r} is not a float") from None
    if tp is str:
        if isinstance(raw, str):
            return raw
        raise ConfigError(f"{key}: {raw!r} is not a string")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def _resolve(config: Any, dotted: str, section: bool = False) -> tuple[Any, str, Any]:
    """Walk `dotted` down the dataclass tree; return (parent object, field name, field type).

    The key must name a value, or a section when `section` is set (a nested dict in a recipe file).
    """
    if dotted in RETIRED_KEYS:
        raise ConfigError(f"{dotted} {RETIRED_KEYS[dotted]}")
    parts = dotted.split(".")
    node = config
    for depth, part in enumerate(parts):
        types_ = _field_types(type(node))
        if part not in types_:
            where = ".".join(parts[:depth]) or "the config"
            allowed = ", ".join(sorted(types_))
            raise ConfigError(f"unknown key {dotted!r}: {where} has no field {part!r} (allowed: {allowed})")
        if depth == len(parts) - 1:
            is_section = dataclasses.is_dataclass(getattr(node, part))
            if is_section and not section:
                raise ConfigError(f"{dotted!r} is a section; set one of its fields, e.g. {dotted}.<field>=...")
            if section and not is_section:
                raise ConfigError(f"{dotted!r} is a value, not a section")
            return node, part, types_[part]
        node = getattr(node, part)
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"unknown key {dotted!r}: {'.'.join(parts[: depth + 1])} is not a section")
    raise ConfigError(f"empty key in override {dotted!r}")


def set_value(config: Any, dotted: str, raw: Any) -> None:
    parent, name, tp = _resolve(config, dotted)
    setattr(parent, name, _coerce(dotted, raw, tp))


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Apply `key=value` strings in order (later wins); returns the same config object."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        set_value(config, key.strip(), value.strip())
    return config


def apply_dict(config: Any, values: dict[str, Any], prefix: str = "") -> Any:
    """Apply a nested dict (e.g. a saved config.json) strictly: unknown keys are errors naming the dotted key.

    `prefix` is the dotted section of `config` that `values` describes (empty: the whole config).
    """
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _resolve(config, dotted, section=True)
            apply_dict(config, value, prefix=f"{dotted}.")
        else:
            set_value(config, dotted, value)
    return config


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as JSON (atomically: a reader never sees half a file)."""
    return write_text_atomic(path, json.dumps(to_dict(config), indent=2, sort_keys=False) + "\n")
