"""The price table as `claude-monitor prices` shows it: each model's name, aliases, rates by effective date,
modifiers and source. Pure: the table and the entries it was built from in, JSON-ready dicts and text out."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from monitor.config import ModelPricing, RateConfig
from monitor.pricing import TOKEN_FIELDS, PriceTable


def _money(value: Decimal) -> str:
    """USD per million tokens as a plain decimal string ('0.30' stays '0.3', '12.50' is '12.5')."""
    text = f"{value.normalize():f}"
    return text


def modifiers(rate: RateConfig) -> dict[str, Any]:
    """What changes a request's price beyond its tokens at this rate: fast mode, inference geo, long prompt."""
    out: dict[str, Any] = {}
    if rate.fast_multiplier != 1:
        out["fast_multiplier"] = _money(rate.fast_multiplier)
    if rate.geo_multipliers:
        out["geo_multipliers"] = {geo: _money(m) for geo, m in sorted(rate.geo_multipliers.items())}
    if rate.long_prompt is not None:
        out["long_prompt"] = {
            "threshold_tokens": rate.long_prompt.threshold_tokens,
            **{name: _money(getattr(rate.long_prompt, name)) for name in TOKEN_FIELDS},
        }
    return out


def listing(
    table: PriceTable, shipped: Mapping[str, ModelPricing], overrides: Mapping[str, ModelPricing]
) -> dict[str, Any]:
    """`prices --format json`: the table's version and every model, by name."""
    models = []
    for name in table.models:
        entry = overrides.get(name) or shipped.get(name)
        origin = "config" if name in overrides else "shipped"
        source = entry.source if entry is not None else None
        models.append(
            {
                "name": name,
                "aliases": table.aliases(name),
                "origin": origin,
                "source": source,
                "rates": [
                    {
                        "since": rate.since.isoformat(),
                        **{field: _money(getattr(rate, field)) for field in TOKEN_FIELDS},
                        "web_search_per_1k": _money(rate.web_search_per_1k),
                        "modifiers": modifiers(rate),
                    }
                    for rate in table.rates(name)
                ],
            }
        )
    return {"version": table.version, "unit": "USD per million tokens", "models": models}


def _modifier_text(mods: Mapping[str, Any]) -> str:
    parts = []
    if "fast_multiplier" in mods:
        parts.append(f"fast x{mods['fast_multiplier']}")
    for geo, multiplier in mods.get("geo_multipliers", {}).items():
        parts.append(f"{geo} x{multiplier}")
    if "long_prompt" in mods:
        lp = mods["long_prompt"]
        rates = "/".join(lp[field] for field in TOKEN_FIELDS)
        parts.append(f"prompt>{lp['threshold_tokens']}: {rates}")
    return ", ".join(parts) or "-"


def to_table(document: Mapping[str, Any]) -> str:
    """`prices` as text: one line per model and effective date."""
    header = ("model", "since", "input", "output", "5m write", "1h write", "cache read", "modifiers")
    lines = [header]
    notes = []
    for model in document["models"]:
        for index, rate in enumerate(model["rates"]):
            lines.append(
                (
                    model["name"] if index == 0 else "",
                    rate["since"],
                    *(rate[field] for field in TOKEN_FIELDS),
                    _modifier_text(rate["modifiers"]),
                )
            )
        extra = []
        if model["aliases"]:
            extra.append("aliases " + ", ".join(model["aliases"]))
        extra.append(f"source: {model['source']}" if model["source"] else f"source: {model['origin']} (none given)")
        notes.append(f"  {model['name']}: " + "; ".join(extra))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header) - 1)]
    out = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + str(row[-1])
        for row in lines
    ]
    return (
        f"price table {document['version']} ({document['unit']}; input, output, 5 min and 1 h cache writes, "
        "cache reads)\n" + "\n".join(out) + "\n\n" + "\n".join(notes) + "\n"
    )
