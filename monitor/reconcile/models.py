"""Anthropic's Models API, through the `anthropic` SDK: which models the account can call, and which of them the
price table cannot price (an entry missing there means their spend would be counted as unpriced)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from monitor.pricing import PriceTable

PAGE_LIMIT = 1000  # the API's largest page; the SDK follows `has_more` / `last_id` for the rest
MAX_MODELS = 10_000  # far past any account's list: a server that keeps paging is an error, not a wait without end
MAX_ID_CHARS = 200  # ids and names as kept and logged; real ones are a few dozen characters


class ModelsApiError(Exception):
    """Anthropic's Models API could not be reached, refused the key, or answered something unreadable."""


@dataclass(frozen=True)
class ListedModel:
    """One model the account can call, and how the price table resolved its id."""

    id: str
    display_name: str
    lifecycle: str
    priced_as: str | None  # the price-table name the id resolves to (itself, an alias or a dated id); None: none
    tried: tuple[str, ...]  # the ids the resolution looked up, in order
    nearest: str | None  # when unpriced: the known name closest in spelling, a hint for the override

    @property
    def priced(self) -> bool:
        """True when the table prices this model."""
        return self.priced_as is not None

    def as_dict(self) -> dict[str, object]:
        """The `prices --check --format json` shape of one model."""
        return {
            "id": self.id,
            "display_name": self.display_name,
            "lifecycle": self.lifecycle,
            "priced_as": self.priced_as,
            "tried": list(self.tried),
            "nearest": self.nearest,
        }


def resolution(prices: PriceTable, model_id: str) -> tuple[str | None, tuple[str, ...]]:
    """How the table resolves an id the Models API lists: the id itself (a name, alias or dated snapshot), then the
    id without a trailing `-YYYYMMDD` date. Events carry ids exactly as sent, so only the first decides a price; the
    second only names the entry an override would extend."""
    tried = [model_id]
    found = prices.resolve(model_id)
    if found is not None:
        return found, tuple(tried)
    head, _, tail = model_id.rpartition("-")
    if head and len(tail) == 8 and tail.isdigit():
        tried.append(head)
    return None, tuple(tried)


def check(prices: PriceTable, models: list[tuple[str, str, str]]) -> list[ListedModel]:
    """Each listed model (id, display name, lifecycle) with how the table prices it; ordered as listed."""
    out = []
    for model_id, name, lifecycle in models:
        priced_as, tried = resolution(prices, model_id)
        nearest = None
        if priced_as is None:
            nearest = next((prices.resolve(t) for t in tried[1:] if prices.resolve(t)), None) or prices.nearest(
                model_id
            )
        out.append(ListedModel(model_id, name, lifecycle, priced_as, tried, nearest))
    return out


class ModelsClient:
    """The Models API: every model the key's account can call (active and deprecated), all pages."""

    def __init__(self, api_key: str, base_url: str, max_retries: int = 2) -> None:
        import anthropic  # imported when a check runs: commands and daemons without one start without the SDK

        timeout = anthropic.Timeout(30.0, connect=10.0)
        self._client: Any = anthropic.Anthropic(
            api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout
        )
        self._base_url = base_url

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def list(self) -> list[tuple[str, str, str]]:
        """(id, display name, lifecycle) of every model listed, across every page."""
        import anthropic

        try:
            pages = self._client.models.list(limit=PAGE_LIMIT)
            models = [
                (m.id[:MAX_ID_CHARS], m.display_name[:MAX_ID_CHARS], m.lifecycle)
                for m in itertools.islice(pages, MAX_MODELS + 1)
            ]
        except anthropic.APIStatusError as exc:
            request_id = exc.response.headers.get("request-id") or "none"
            what = f"Anthropic's Models API answered {exc.status_code} (request_id {request_id})"
            if exc.status_code in (401, 403):
                raise ModelsApiError(
                    f"{what}: the key was refused; pricing.check needs an Anthropic API key in the environment "
                    "variable named by pricing.check.api_key_env"
                ) from None
            raise ModelsApiError(f"{what}: {exc.message}") from None
        except anthropic.APIConnectionError as exc:
            raise ModelsApiError(
                f"cannot reach Anthropic's Models API at {self._base_url} ({exc.__class__.__name__}); "
                "check pricing.check.base_url and the network"
            ) from None
        except anthropic.APIResponseValidationError as exc:
            raise ModelsApiError(f"Anthropic's Models API answered something unreadable: {exc.message}") from None
        if len(models) > MAX_MODELS:
            raise ModelsApiError(
                f"Anthropic's Models API listed more than {MAX_MODELS:,} models; check pricing.check.base_url"
            )
        return models
