"""YAML configs validated into typed objects.

A job config is a pydantic model (sections nested as models, ``extra="forbid"`` everywhere), so an
unknown key, a wrong type or an impossible value fails at load time, before any Ray call, with one
line naming the file and the key. Command-line ``key.sub=value`` overrides are applied before
validation. Defaults live only in the schema classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine import storage
from engine.errors import ConfigError
from engine.storage import PathOrURL, StorageConfig


class Section(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class JobConfig(Section):
    """Keys every job config has."""

    run_dir: PathOrURL = Field(description="Where all outputs of the job go: a local path or a URL (s3://bucket/prefix).")
    storage: StorageConfig = Field(default_factory=StorageConfig)


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``data.image_size=32`` -> (["data", "image_size"], 32). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"command line: expected key=value, got {item!r}")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"command line: bad key in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"command line: {'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str, storage_config: StorageConfig | None = None) -> dict[str, Any]:
    text = storage.read_bytes(path, storage_config).decode()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', err)})") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def _describe(error: dict[str, Any], key: str) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if not key:  # a check across sections names its keys itself
        return message
    if error["type"] == "extra_forbidden":
        tags = [str(p) for p in error["loc"] if str(p) not in key.split(".")]
        return f"{key}: unknown key" + (f" (for {', '.join(tags)})" if tags else "")
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {message}{shown}"


def config_key(loc: Sequence[Any], raw: Any) -> str:
    """The dotted key of an error's location as the user wrote it: without the tags pydantic adds for a
    discriminated union (``distill.mtt.lr_img`` is ``distill.lr_img`` in the file)."""
    parts, node = [], raw
    for i, part in enumerate(loc):
        if isinstance(node, dict):
            match = next((k for k in node if str(k) == str(part)), None)
            if match is None and i + 1 < len(loc):
                continue  # a union tag, not a key of the config
            node = node.get(match) if match is not None else None
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
        parts.append(str(part))
    return ".".join(parts)


def first_error(err: ValidationError, raw: dict[str, Any]) -> tuple[str, str]:
    """(dotted key, one-line description) of a validation error's first problem, with a count of the rest."""
    errors = err.errors()
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    key = config_key(errors[0]["loc"], raw)
    return key, _describe(errors[0], key) + more


def validate(schema: type[ConfigT], raw: dict[str, Any], source: str, overrides: Sequence[str] = ()) -> ConfigT:
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        key, described = first_error(err, raw)
        key = key or described.split(":", 1)[0]  # a check across keys names them first in its message
        given = [item for item in overrides if _related(key, item.split("=", 1)[0])]
        origin = f"command line ({given[-1]})" if given else source
        raise ConfigError(f"{origin}: {described}") from None


def _related(key: str, overridden: str) -> bool:
    """The error is at the overridden key, inside it, or at the section holding it (a union's tag)."""
    return key == overridden or key.startswith(overridden + ".") or overridden.startswith(key + ".")


def load_config(schema: type[ConfigT], path: str | None, overrides: Sequence[str] = ()) -> ConfigT:
    """Read ``path`` (YAML; optional), apply ``key=value`` overrides and validate into ``schema``."""
    raw = read_yaml(path) if path else {}
    raw = apply_overrides(raw, overrides)
    return validate(schema, raw, path or "command line", overrides)


def to_yaml(config: BaseModel) -> str:
    """The resolved config as YAML, secrets masked, ready to save beside a run's results."""
    data = config.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False)


def split_config_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[config.yaml] [key=value ...]`` -> (config path or None, overrides)."""
    args = list(argv)
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def with_overrides(config: ConfigT, values: dict[str, Any], **fixed: Any) -> ConfigT:
    """``config`` with dotted keys replaced (``{"distill.lr_img": 100}``) and validated again; secrets are
    kept as they are. A value that does not fit raises ConfigError naming the values."""
    raw = config.model_dump()
    for key, value in {**values, **fixed}.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
            node = node[part]
        node[last] = value
    try:
        return type(config).model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"values {values}: {first_error(err, raw)[1]}") from None
