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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML keeps the last of two equal keys without a word; in a config that silently drops the first block
    (a second `connector:` would lose the first one's listen address and secret file), so it is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys it brings may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {first + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping, or a ConfigError saying why it is not one (a duplicate key included)."""
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
