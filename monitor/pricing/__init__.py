"""The price table and the exact cost of one request, in integer pico-dollars (10^-12 USD)."""

from __future__ import annotations

import bisect
import difflib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from importlib import resources
from typing import TYPE_CHECKING, NamedTuple

from monitor.config import ModelPricing, RateConfig
from monitor.wire import PICO_PER_USD as PICO_PER_USD  # importable from here too: the unit prices are in
from monitor.yamlio import load_yaml

if TYPE_CHECKING:
    from monitor.ingest.parse import Event

# USD per million tokens -> pico-dollars per token: x 10^12 / 10^6.
_PICO_PER_TOKEN_PER_USD_PER_MTOK = Decimal(10**6)
# USD per 1,000 searches -> pico-dollars per search.
_PICO_PER_SEARCH_PER_USD_PER_1K = Decimal(10**9)
_HALF = Decimal("0.5")
TOKEN_FIELDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
UNPRICED = "unpriced"  # the metric `model` label of every model the table does not know
SPEEDS = frozenset({"standard", "fast"})
# inference_geo values known whatever the table says (priced at 1x unless a rate gives them a multiplier).
BASE_GEOS = frozenset({"global"})
OTHER_MODIFIER = "other"  # any other speed or inference_geo string: stored as this, priced at 1x


def usd(pico: int) -> Decimal:
    """Pico-dollars as exact USD."""
    return Decimal(pico).scaleb(-12)


def format_usd(pico: int) -> str:
    """Exact USD as a decimal string with at least 6 decimals and no more than needed ('0.001250', '1.0000005')."""
    text = f"{usd(pico):.12f}"
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0").ljust(6, "0")
    return f"{whole}.{frac}"


class Price(NamedTuple):
    """What one event costs: its model's price-table name, the cost (None = unpriced) and the rates used.

    A named tuple: one is made for every event ingested, in C (a frozen dataclass sets each field through a call)."""

    model: str
    cost_pico: int | None
    price_version: str | None
    long_prompt: bool = False


@dataclass(frozen=True, slots=True)
class _Rates:
    since: date
    version: str
    config: RateConfig


class PriceTable:
    """Models, their aliases and dated rates; prices an event at the rates in force on its UTC date."""

    def __init__(self, models: Mapping[str, ModelPricing], versions: Mapping[str, str], table_version: str) -> None:
        self.version = table_version
        self._names: dict[str, str] = {}
        self._rates: dict[str, list[_Rates]] = {}
        self._since: dict[str, list[date]] = {}
        # Keyed by bounded values only (rates entry, two flags, fast or not, a geo the rates entry names).
        self._per_token: dict[tuple[int, bool, bool, bool, str | None], _IntRates] = {}
        geos: set[str] = set(BASE_GEOS)
        for name, entry in models.items():
            self._names[name] = name
            for alias in entry.aliases:
                self._names[alias] = name
            ordered = sorted(entry.rates, key=lambda r: r.since)
            self._rates[name] = [_Rates(r.since, f"{versions[name]}:{name}@{r.since.isoformat()}", r) for r in ordered]
            self._since[name] = [r.since for r in ordered]
            for r in ordered:
                geos.update(r.geo_multipliers)
        self._geos = frozenset(geos)

    @property
    def models(self) -> list[str]:
        """Price-table names of every model."""
        return sorted(self._rates)

    def aliases(self, model: str) -> list[str]:
        """Every id that resolves to `model`, other than its own name."""
        return sorted(alias for alias, name in self._names.items() if name == model and alias != model)

    def rates(self, model: str) -> list[RateConfig]:
        """The dated rates of a model, oldest first."""
        return [r.config for r in self._rates[model]]

    def resolve(self, model_id: str) -> str | None:
        """The price-table name of a model id, alias or dated snapshot; None when unknown."""
        return self._names.get(model_id)

    def nearest(self, model_id: str) -> str | None:
        """The price-table name of the known id (name, alias or snapshot) closest in spelling to `model_id`."""
        close = difflib.get_close_matches(model_id, list(self._names), n=1, cutoff=0.6)
        return self._names[close[0]] if close else None

    def label(self, model: str) -> str:
        """A model's metric label: its price-table name, or `unpriced` for a model the table does not know."""
        name = self._names.get(model)
        return UNPRICED if name is None else name

    def modifiers(self, speed: str | None, geo: str | None) -> tuple[str | None, str | None]:
        """usage.speed and usage.inference_geo as stored and priced: a value the table knows (speed standard or fast;
        geo global or one a rate gives a multiplier), None when absent, `other` for anything else (priced at 1x)."""
        if speed is not None and speed not in SPEEDS:
            speed = OTHER_MODIFIER
        if geo is not None and geo not in self._geos:
            geo = OTHER_MODIFIER
        return speed, geo

    def cache_size(self) -> int:
        """Entries of the per-token rate cache (bounded: rates entries x 2 x 2 x 2 x (their geos + 1))."""
        return len(self._per_token)

    def price(self, event: Event) -> Price:
        """Price one event exactly; an unknown model (or a date before its first rate) is unpriced, not $0."""
        name = self._names.get(event.model_id)
        if name is None:
            return Price(event.model_id, None, None)
        day = event.timestamp.date()  # timestamps are UTC-aware
        index = bisect.bisect_right(self._since[name], day) - 1
        if index < 0:
            return Price(name, None, None)
        rates = self._rates[name][index]
        config = rates.config
        prompt = (
            event.input_tokens + event.cache_write_5m_tokens + event.cache_write_1h_tokens + event.cache_read_tokens
        )
        long_prompt = config.long_prompt is not None and prompt > config.long_prompt.threshold_tokens
        batch = event.batch or event.service_tier == "batch"
        fast = event.speed == "fast"
        geo = event.inference_geo if event.inference_geo in config.geo_multipliers else None
        key = (id(rates), long_prompt, batch, fast, geo)
        per_token = self._per_token.get(key)
        if per_token is None:
            per_search = config.web_search_per_1k * _PICO_PER_SEARCH_PER_USD_PER_1K
            per_token = self._per_token[key] = _int_rates(
                (*_per_token_rates(config, long_prompt, batch, fast, geo), per_search)
            )
        scale, p_input, p_output, p_5m, p_1h, p_read, p_search = per_token
        total = (
            event.input_tokens * p_input
            + event.output_tokens * p_output
            + event.cache_write_5m_tokens * p_5m
            + event.cache_write_1h_tokens * p_1h
            + event.cache_read_tokens * p_read
            + event.web_search_requests * p_search
        )
        if scale == 1:
            return Price(name, total, rates.version, long_prompt)
        cost, rest = divmod(total, scale)  # to the nearest pico-dollar, a tie to the even one
        if 2 * rest > scale or (2 * rest == scale and cost % 2):
            cost += 1
        return Price(name, cost, rates.version, long_prompt)


# (scale, input, output, 5 min write, 1 h write, read, per search): pico-dollars per unit times scale, a power of
# ten that makes every rate a whole number, so an event's exact cost is integer arithmetic and one rounding.
_IntRates = tuple[int, int, int, int, int, int, int]


def _int_rates(rates: tuple[Decimal, ...]) -> _IntRates:
    """Exact Decimal rates as integers over one power-of-ten scale."""
    places = max(0, *(-int(rate.as_tuple().exponent) for rate in rates))
    scale = 10**places
    scaled = [rate.scaleb(places) for rate in rates]
    assert all(value == value.to_integral_value() for value in scaled)
    ints = [int(value) for value in scaled]
    return (scale, ints[0], ints[1], ints[2], ints[3], ints[4], ints[5])


def _per_token_rates(
    config: RateConfig, long_prompt: bool, batch: bool, fast: bool, geo: str | None
) -> tuple[Decimal, ...]:
    """Pico-dollars per token for (input, output, 5 min write, 1 h write, read) with every modifier applied."""
    source = config.long_prompt if long_prompt and config.long_prompt is not None else config
    factor = _PICO_PER_TOKEN_PER_USD_PER_MTOK
    if batch:
        factor *= _HALF
    if fast:
        factor *= config.fast_multiplier
    if geo is not None:
        factor *= config.geo_multipliers[geo]
    return tuple(getattr(source, field) * factor for field in TOKEN_FIELDS)


def _digest(entry: ModelPricing) -> str:
    # `source` documents the rates and changes no price: the version names the rates only.
    canonical = json.dumps(entry.model_dump(mode="json", exclude={"source"}), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def builtin_models() -> tuple[str, dict[str, ModelPricing]]:
    """The shipped price table: its version and models."""
    text = resources.files("monitor.pricing").joinpath("prices.yaml").read_text(encoding="utf-8")
    data = load_yaml(text)
    models = {name: ModelPricing.model_validate(entry) for name, entry in data["models"].items()}
    return str(data["version"]), models


def load_price_table(overrides: Mapping[str, ModelPricing] | None = None) -> PriceTable:
    """The shipped table with config entries added, or replacing the rates of shipped ones (aliases are kept)."""
    version, models = builtin_models()
    versions = dict.fromkeys(models, f"builtin-{version}")
    for name, entry in (overrides or {}).items():
        for alias in entry.aliases:
            if alias in models and alias != name:
                raise ValueError(
                    f"pricing.models.{name}.aliases: {alias!r} is a model of the shipped table; "
                    f"override it under its own name instead"
                )
        # An override may take over an id that a shipped model lists as an alias: it then resolves to the override.
        taken = {name, *entry.aliases}
        for other, other_entry in list(models.items()):
            if other != name and taken & set(other_entry.aliases):
                models[other] = other_entry.model_copy(
                    update={"aliases": [a for a in other_entry.aliases if a not in taken]}
                )
        shipped = models.get(name)
        if shipped is not None:
            # Overriding a shipped model's rates keeps the ids it is known by (its dated snapshots).
            merged = list(dict.fromkeys([*shipped.aliases, *entry.aliases]))
            entry = entry.model_copy(update={"aliases": merged})
        models[name] = entry
        versions[name] = f"config-{_digest(entry)}"
    table_version = f"{version}+config" if overrides else version
    return PriceTable(models, versions, table_version)
