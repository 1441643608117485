"""docs/ against the code: every config key, metric, route and command is documented, and every link resolves."""

from __future__ import annotations

import argparse
import re
import types
import typing
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from monitor.cli import _parser
from monitor.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MONITOR = ROOT / "monitor"


def _doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds directly (through Optional, Annotated and unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]
    return []


def _config_keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """Every key the schema accepts, as a path (`proxy.clients[].name`, `pricing.models.<name>.rates[].since`),
    with its default (`...` when required); sections (`http`, `proxy`) are walked, not listed."""
    keys: list[tuple[str, Any]] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        default = ... if field.is_required() else field.get_default(call_default_factory=True)
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):  # a section has no row
            keys.append((path, default))
        for inner in _models_in(annotation):
            keys.extend(_config_keys(inner, f"{path}."))
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin is list:
            for inner in _models_in(args[0]):
                keys.extend(_config_keys(inner, f"{path}[]."))
        if origin is dict:
            for inner in _models_in(args[1]):
                keys.extend(_config_keys(inner, f"{path}.<name>."))
    return keys


def _shown(default: Any) -> str | None:
    """How a scalar default is written in the docs; None for defaults not checked word for word."""
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, int | str | Decimal):
        return str(default)
    if default is None:
        return "none"
    return None


def test_every_config_key_is_documented_with_its_default() -> None:
    text = _doc("configuration.md")
    rows = {match.group(1): match.group(0) for match in re.finditer(r"^\| `([^`]+)` \|.*$", text, re.MULTILINE)}
    keys = _config_keys(Settings)
    assert len(keys) > 100  # the walk reached the nested models
    missing = [path for path, _ in keys if path not in rows]
    assert not missing, f"docs/configuration.md has no row for: {missing}"
    wrong = []
    for path, default in keys:
        shown = _shown(default)
        if default is ... or shown is None or path == "proxy.identity":
            continue
        cells = rows[path].split(" | ")
        if f"`{shown}`" not in cells[2] and shown not in cells[2]:
            wrong.append(f"{path}: default {shown!r}, documented as {cells[2]!r}")
    assert not wrong, "docs/configuration.md states the wrong default:\n" + "\n".join(wrong)


def test_the_env_overrides_are_documented() -> None:
    text = _doc("configuration.md")
    overridable = [name for name, field in Settings.model_fields.items() if field.annotation is str]
    assert overridable
    for name in overridable:
        assert f"`CLAUDE_MONITOR_{name.upper()}`" in text


def _mapping_paths(value: Any, prefix: str = "") -> set[str]:
    """Every key path of nested mappings (lists are leaves)."""
    if not isinstance(value, dict):
        return set()
    paths = set()
    for key, inner in value.items():
        paths.add(f"{prefix}{key}")
        paths |= _mapping_paths(inner, f"{prefix}{key}.")
    return paths


def test_the_documented_tree_is_the_defaults() -> None:
    text = _doc("configuration.md")
    block = re.search(r"## The whole tree, with its defaults\n.*?```yaml\n(.*?)```", text, re.DOTALL)
    assert block is not None
    documented = yaml.safe_load(block.group(1))
    defaults = Settings().model_dump(mode="json", exclude={"proxy": {"identity"}})
    assert _mapping_paths(documented) == _mapping_paths(defaults)
    assert Settings.model_validate(documented) == Settings()


_METRIC = re.compile(
    r"\b(Counter|Gauge|Histogram|CounterMetricFamily|GaugeMetricFamily|HistogramMetricFamily)\(\s*\"(claude_\w+)\""
)


def _exported_metrics() -> dict[str, str]:
    """Every metric family the package defines (daemon and proxy): name -> kind."""
    found: dict[str, str] = {}
    for path in MONITOR.rglob("*.py"):
        for match in _METRIC.finditer(path.read_text(encoding="utf-8")):
            found[match.group(2)] = match.group(1).removesuffix("MetricFamily")
    return found


def test_every_metric_is_documented() -> None:
    text = _doc("metrics.md")
    metrics = _exported_metrics()
    assert {"claude_cost_usd", "claude_proxy_admission", "claude_monitor_job_duration_seconds"} <= set(metrics)
    missing = []
    for name, kind in sorted(metrics.items()):
        exposed = f"{name}_total" if kind == "Counter" else name
        if not re.search(rf"`{exposed}(`|\{{)", text):
            missing.append(exposed)
    assert not missing, f"docs/metrics.md does not document: {missing}"


def _routes(source: Path) -> set[str]:
    """The paths a module's router compares against."""
    text = source.read_text(encoding="utf-8")
    return set(re.findall(r"\"(/(?:v1/[a-z_/]+|metrics|healthz|readyz))\"", text))


def test_every_route_is_documented() -> None:
    api = _doc("http-api.md")
    routes = _routes(MONITOR / "http" / "api.py")
    assert {"/v1/usage", "/v1/check", "/v1/admit", "/metrics", "/readyz"} <= routes
    missing = [route for route in sorted(routes) if f"`{route.rstrip('/')}" not in api and route not in api]
    assert not missing, f"docs/http-api.md does not document: {missing}"
    proxy = _doc("proxy.md")
    proxy_routes = _routes(MONITOR / "http" / "proxy.py")
    assert {"/v1/messages", "/v1/messages/count_tokens", "/metrics"} <= proxy_routes
    missing = [route for route in sorted(proxy_routes) if route not in proxy]
    assert not missing, f"docs/proxy.md does not document: {missing}"


def _commands() -> dict[str, list[str]]:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: [flag for action in command._actions for flag in action.option_strings if flag.startswith("--")]
        for name, command in sub.choices.items()
    }


def test_every_command_and_flag_is_documented() -> None:
    text = _doc("cli.md")
    commands = _commands()
    assert {"serve", "ingest", "report", "proxy", "reconcile", "prices", "reprice"} <= set(commands)
    missing = []
    for name, flags in sorted(commands.items()):
        heading = re.search(rf"^## `{re.escape(name)}`", text, re.MULTILINE)
        if heading is None:
            missing.append(name)
            continue
        for flag in flags:
            if f"`{flag}" not in text:
                missing.append(f"{name} {flag}")
    assert not missing, f"docs/cli.md does not document: {missing}"


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    return {_slug(match.group(1)) for match in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)}


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document: Path) -> None:
    text = re.sub(r"```.*?```", "", document.read_text(encoding="utf-8"), flags=re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (document.parent / file).resolve() if file else document
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{document.relative_to(ROOT)}: {broken}"


def test_the_index_lists_every_document() -> None:
    index = _doc("README.md")
    unlisted = [p.name for p in DOCS.glob("*.md") if p.name != "README.md" and f"({p.name})" not in index]
    assert not unlisted, f"docs/README.md does not list: {unlisted}"


def test_the_pricing_table_lists_every_shipped_model() -> None:
    from monitor.pricing import TOKEN_FIELDS, builtin_models

    text = _doc("pricing.md")
    version, models = builtin_models()
    assert version in text
    missing = []
    for name, entry in models.items():
        for rate in entry.rates:
            row = re.search(rf"^\| `{re.escape(name)}` \| {rate.since.isoformat()} \|.*$", text, re.MULTILINE)
            if row is None:
                missing.append(f"{name} since {rate.since}")
                continue
            cells = [cell.strip() for cell in row.group(0).strip("|").split("|")]
            documented = [Decimal(cell) for cell in cells[2:8]]
            shipped = [getattr(rate, key) for key in (*TOKEN_FIELDS[:2], "cache_write_5m", "cache_write_1h")]
            shipped += [rate.cache_read, rate.web_search_per_1k]
            if documented != shipped:
                missing.append(f"{name} since {rate.since}: {documented} documented, {shipped} shipped")
    assert not missing, f"docs/pricing.md's table: {missing}"
