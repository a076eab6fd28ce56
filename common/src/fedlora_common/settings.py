"""Loading typed settings from a YAML file, FEDLORA_ environment variables and flags.

Precedence, lowest first: defaults, the YAML file named by --config, the environment,
then flags (`--rounds 5`, `--lora.rank 8`). Unknown keys are refused by name.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, CliSettingsSource, EnvSettingsSource, SettingsError

__all__ = [
    "ConfigError",
    "StrictModel",
    "describe",
    "load_settings",
    "merge",
    "missing_descriptions",
    "read_yaml_mapping",
    "settings_flags",
    "settings_reference",
]

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


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(problem=f"key {key!r} is given twice", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty: {}); ConfigError names the file and line."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except _DuplicateKey as exc:
        mark = exc.problem_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}:{where}: {exc.problem}; keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}:{where} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of settings")
    return data


def _section(annotation: Any) -> type[BaseModel] | None:
    """The settings model inside a field's type (`X`, `X | None`, `tuple[X, ...]`), if any."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        found = _section(argument)
        if found is not None:
            return found
    return None


def _keys_at(model: type[BaseModel] | None, loc: Sequence[int | str]) -> list[str]:
    """The setting names allowed where `loc` points (list indices are skipped)."""
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = None if field is None else _section(field.annotation)
    return [] if model is None else list(model.model_fields)


def _name(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc) or "config"


def _unknown(loc: Sequence[int | str], model: type[BaseModel] | None) -> str:
    key = str(loc[-1]) if loc else ""
    close = difflib.get_close_matches(key, _keys_at(model, loc[:-1]), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{_name(loc)}: unknown setting{hint}"


_MAX_UNKNOWN = 3


def describe(error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One readable line naming the offending field.

    An unknown key is the likelier fault than anything it caused (a typo in a required key also
    makes that key missing), so unknown keys come first, each with the closest known name of
    `model` at that place, followed by the required settings that are missing.
    """
    errors = error.errors()
    unknown = [e["loc"] for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        named = [_unknown(loc, model) for loc in unknown[:_MAX_UNKNOWN]]
        if len(unknown) > _MAX_UNKNOWN:
            named.append(f"{len(unknown) - _MAX_UNKNOWN} more unknown settings (is this the other program's file?)")
        missing = [f"{_name(e['loc'])}: Field required" for e in errors if e["type"] == "missing"]
        return "; ".join([*named, *missing])
    first = errors[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    if not first["loc"]:
        return message
    return f"{_name(first['loc'])}: {message}"


def load_settings(
    cls: type[S],
    argv: Sequence[str],
    *,
    environ: Mapping[str, str] | None = None,
) -> S:
    """Build `cls` from `--config FILE`, the environment and the remaining flags; raise ConfigError."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--config", type=Path)
    try:
        known, rest = pre.parse_known_args(list(argv))
    except argparse.ArgumentError as exc:
        raise ConfigError(str(exc)) from None
    data: dict[str, Any] = read_yaml_mapping(known.config) if known.config else {}
    env = EnvSettingsSource(cls)
    if environ is not None:
        env.env_vars = {k.lower(): v for k, v in environ.items()}
    from_env = env()
    if known.config is None and not rest and not from_env:
        raise ConfigError("--config FILE is required")
    data = merge(data, from_env)
    try:
        data = merge(data, CliSettingsSource(cls, cli_exit_on_error=False)(args=rest)())
        return cls.model_validate(data)
    except SettingsError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    except ValidationError as exc:
        detail = describe(exc, cls)
        raise ConfigError(detail if known.config else f"{detail} (no --config FILE was given)") from None


# ---- the settings reference, rendered from the models themselves ---------------------------


def _doc(model: type[BaseModel]) -> str:
    """A model's own docstring (not one inherited from BaseModel), on one line."""
    text = model.__dict__.get("__doc__") or ""
    return " ".join(text.split())


def _is_optional(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def _type_name(annotation: Any) -> str:
    """How a field's type reads to someone writing YAML."""
    origin, arguments = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " or ".join(f"`{value}`" for value in arguments)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in arguments if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in arguments else "")
    if origin is tuple or origin is list:
        return f"list of {_type_name(arguments[0])}"
    if origin is dict:
        return f"mapping of {_type_name(arguments[0])} to {_type_name(arguments[1])}"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return "section"
    plain: dict[Any, str] = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        Path: "path",
        SecretStr: "secret string",
    }
    return plain.get(annotation) or str(getattr(annotation, "__name__", annotation))


def _constraints(field: FieldInfo) -> str:
    unit = "characters" if _type_name(field.annotation).startswith("string") else "items"
    parts: list[str] = []
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            parts.append(f">= {item.ge}")
        elif isinstance(item, annotated_types.Gt):
            parts.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Le):
            parts.append(f"<= {item.le}")
        elif isinstance(item, annotated_types.Lt):
            parts.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.MinLen):
            parts.append(f"at least {item.min_length} {unit.removesuffix('s') if item.min_length == 1 else unit}")
        elif isinstance(item, annotated_types.MaxLen):
            parts.append(f"at most {item.max_length} {unit}")
        elif getattr(item, "pattern", None):
            parts.append(f"matches `{item.pattern}`")
    return ", ".join(parts)


def _yaml_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = [str(v) if isinstance(v, Path) else v for v in value]
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return f"`{_yaml_value(field.default_factory())}`"  # type: ignore[call-arg]
    if field.default is PydanticUndefined:
        return "**required**"
    if field.default is None:
        return "absent" if _section(field.annotation) else "`null`"
    if isinstance(field.default, BaseModel):
        return "see below"
    return f"`{_yaml_value(field.default)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _path(prefix: str, name: str, field: FieldInfo) -> str:
    """A setting's dotted name; a list of sections is written `name[]`."""
    listed = get_origin(field.annotation) is tuple or any(get_origin(a) is tuple for a in get_args(field.annotation))
    return f"{prefix}{name}[]" if listed and _section(field.annotation) else f"{prefix}{name}"


def _sections(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, type[BaseModel]]]:
    """Every section below `model`, depth first, named by its dotted path."""
    for name, field in model.model_fields.items():
        inner = _section(field.annotation)
        if inner is not None:
            path = _path(prefix, name, field)
            yield path, inner
            yield from _sections(inner, f"{path}.")


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    lines = ["| setting | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        inner = _section(field.annotation)
        kind = _type_name(field.annotation)
        if inner is not None:
            kind = "list of sections" if "list of" in kind else "section"
            kind += ", optional" if _is_optional(field.annotation) else ""
        limits = _constraints(field)
        kind += f" ({limits})" if limits else ""
        meaning = field.description or (_doc(inner) if inner is not None else "")
        lines.append(f"| `{prefix}{name}` | {_cell(kind)} | {_cell(_default(field))} | {_cell(meaning)} |")
    return lines


def settings_reference(model: type[BaseModel], *, file: str, program: str) -> str:
    """A markdown reference of every setting of `model`: type, limits, default and meaning, per section.

    Rendered from the model's fields and descriptions, so the page says what the program accepts.
    """
    lines = [f"## `{file}` ({program})", "", _doc(model), "", *_table(model, "")]
    for path, section in _sections(model, ""):
        lines += ["", f"### `{path}`", ""]
        if _doc(section):
            lines += [_doc(section), ""]
        lines += _table(section, f"{path}.")
    return "\n".join(lines) + "\n"


def missing_descriptions(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of the settings under `model` that would go undocumented in the reference."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        inner = _section(field.annotation)
        path = _path(prefix, name, field)
        if not (field.description or (inner is not None and _doc(inner))):
            out.append(path)
        if inner is not None:
            out += missing_descriptions(inner, f"{path}.")
    return out


def settings_flags(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(flag, type, default) for every setting a flag can set: `--lora.rank`, `integer`, `16`.

    A list of sections is one flag taking JSON (`--workers '[{"id": ...}]'`); its entries are not listed.
    """
    out: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        inner = _section(field.annotation)
        path = _path(prefix, name, field)
        if inner is not None and path.endswith("[]"):
            out.append((f"--{prefix}{name}", "JSON list", _default(field).replace("`", "")))
        elif inner is not None:
            out += settings_flags(inner, f"{path}.")
        else:
            out.append((f"--{path}", _type_name(field.annotation).replace("`", ""), _default(field).replace("`", "")))
    return out
