"""Loading typed settings from a YAML file, FEDLORA_ environment variables and flags.

Precedence, lowest first: defaults, the YAML file named by --config, the environment,
then flags (`--rounds 5`, `--lora.rank 8`). Unknown keys are refused by name.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_settings import BaseSettings, CliSettingsSource, EnvSettingsSource, SettingsError

__all__ = ["ConfigError", "StrictModel", "load_settings", "merge", "read_yaml_mapping"]

S = TypeVar("S", bound=BaseSettings)


class StrictModel(BaseModel):
    """A config section: unknown keys are an error, and instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ConfigError(Exception):
    """A config that cannot be used; the message is one line that names the field."""


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two nested dicts; values in override win."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty: {}); ConfigError names the file and line."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}:{where} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of settings")
    return data


def describe(error: ValidationError) -> str:
    """One readable line naming the first offending field."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "config"
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{field}: unknown setting"
    if not first["loc"]:
        return message
    return f"{field}: {message}"


def load_settings(
    cls: type[S],
    argv: Sequence[str],
    *,
    environ: Mapping[str, str] | None = None,
) -> S:
    """Build `cls` from `--config FILE`, the environment and the remaining flags; raise ConfigError."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, rest = pre.parse_known_args(list(argv))
    data: dict[str, Any] = read_yaml_mapping(known.config) if known.config else {}
    env = EnvSettingsSource(cls)
    if environ is not None:
        env.env_vars = {k.lower(): v for k, v in environ.items()}
    data = merge(data, env())
    try:
        data = merge(data, CliSettingsSource(cls, cli_exit_on_error=False)(args=rest)())
        return cls.model_validate(data)
    except SettingsError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None
