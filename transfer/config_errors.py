"""Configuration errors, formatted one way for every config class (connector, store, roles, router).

A pydantic `ValidationError` becomes one line per problem, each naming where it was found
(a file, or vLLM's `kv_connector_extra_config`) and the dotted path of the field.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the source, the field and the problem."""


def format_errors(e: ValidationError, source: str) -> str:
    lines = [f"{source}: {'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors()]
    return "invalid config:\n  " + "\n  ".join(lines)


def load_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping, or a ConfigError saying why it is not one."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
