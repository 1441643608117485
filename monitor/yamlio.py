"""YAML loading that keeps decimal numbers exact and remembers line numbers for error messages."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import yaml


class _DecimalLoader(yaml.SafeLoader):
    """A SafeLoader whose floats are `Decimal` parsed from the source text, never binary floats."""


# libyaml's parser, where PyYAML was built with it, reads a config of a thousand budgets ten times faster; a
# document it refuses is read again by the pure-Python parser, whose error (with the offending line shown) is raised.
_FastLoader: Any = _DecimalLoader
if getattr(yaml, "__with_libyaml__", False):

    class _CDecimalLoader(yaml.CSafeLoader):
        """_DecimalLoader on libyaml's parser."""

    _FastLoader = _CDecimalLoader


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.Node) -> Decimal:
    text = str(loader.construct_scalar(node)).replace("_", "")  # type: ignore[arg-type]
    lowered = text.lower()
    if lowered in (".inf", "+.inf", "-.inf", ".nan"):
        raise yaml.constructor.ConstructorError(None, None, f"{text} is not a usable number", node.start_mark)
    return Decimal(text)


_DecimalLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)
_FastLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)


def load_yaml(text: str) -> Any:
    """Parse YAML text with exact decimals."""
    try:
        return yaml.load(text, Loader=_FastLoader)
    except yaml.YAMLError:
        return yaml.load(text, Loader=_DecimalLoader)


def key_lines(text: str) -> dict[tuple[str | int, ...], int]:
    """Map each key path of a YAML document (('budgets', 0, 'window')) to its 1-based line number."""
    lines: dict[tuple[str | int, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=_FastLoader)
    except yaml.YAMLError:
        try:
            root = yaml.compose(text, Loader=_DecimalLoader)
        except yaml.YAMLError:
            return lines

    def walk(node: yaml.Node | None, path: tuple[str | int, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                lines[(*path, key)] = key_node.start_mark.line + 1
                walk(value_node, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[(*path, index)] = item.start_mark.line + 1
                walk(item, (*path, index))

    walk(root, ())
    return lines
