"""Who may call the proxy: each client's key, the attributes the proxy sets for it, and the headers it may assert.

A caller sends its proxy key the way the `anthropic` SDK sends an Anthropic key (`x-api-key: K` or
`Authorization: Bearer K`). The proxy keeps only the sha256 of each key and compares digests in constant time.
Identity is the client's fixed `attributes` plus the values of the headers its `identity` allows; no header can
change a fixed attribute, and headers a client may not assert are ignored. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from monitor.config import ConfigError, ProxyClientConfig
from monitor.ingest.parse import redact

MAX_ATTRIBUTE_CHARS = 128  # what the daemon keeps of a value: check with the same value
# What a caller's request may carry on to Anthropic: the API's own headers and the SDK's. Everything else (its key,
# identity headers, cookies, tracing or custom headers) stays at the proxy.
_FORWARDED = frozenset({"content-type", "accept", "user-agent", "idempotency-key"})
_FORWARDED_PREFIXES = ("anthropic-", "x-stainless-")


class Refused(Exception):
    """A call the proxy answers itself, in Anthropic's error shape: `status`, the error `kind`, and why."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class ProxyClient:
    """One configured caller."""

    name: str
    digest: bytes = field(repr=False)  # sha256 of its key
    attributes: Mapping[str, str]  # fixed by the proxy
    headers: Mapping[str, str]  # lower-cased header name -> the dimension it asserts
    header_names: Mapping[str, str]  # lower-cased -> as configured, for messages
    require: tuple[str, ...]

    def identity(self, headers: Mapping[str, str]) -> dict[str, str]:
        """Fixed attributes plus the allowed headers' values (redacted, cut); Refused 400 when a required one lacks.

        `headers` has lower-cased names.
        """
        found = dict(self.attributes)
        for header, dimension in self.headers.items():
            value = headers.get(header, "").strip()
            if value and dimension not in found:
                # redact before cutting: a key cut in half would no longer be recognised as one
                found[dimension] = redact(value)[:MAX_ATTRIBUTE_CHARS]
        missing = [dimension for dimension in self.require if dimension not in found]
        if missing:
            sources = {dimension: header for header, dimension in self.headers.items()}
            named = ", ".join(f"{d} (header {self.header_names.get(sources[d], sources[d])})" for d in missing)
            raise Refused(
                400,
                "invalid_request_error",
                f"this proxy requires every call of client {self.name} to say {named}; the header is missing or "
                f"empty, and an unattributed call would escape its budget",
            )
        return found


class ProxyClients:
    """The configured clients; authenticates a request's key and names the headers that never go upstream."""

    def __init__(self, clients: Iterable[ProxyClient]) -> None:
        self.clients = tuple(clients)
        # Every identity header of every client: none is forwarded, whoever sends it.
        self.identity_headers = frozenset(header for client in self.clients for header in client.headers)

    @classmethod
    def from_config(cls, configs: Iterable[ProxyClientConfig], environ: Mapping[str, str], where: str) -> ProxyClients:
        """Clients from `proxy.clients`; ConfigError when a `key_env` variable is not set."""
        clients = []
        for index, config in enumerate(configs):
            if config.key_env is not None:
                key = environ.get(config.key_env, "").strip()
                if not key:
                    raise ConfigError(
                        f"{where}: proxy.clients[{index}] ({config.name}).key_env: the environment variable "
                        f"{config.key_env} is not set; export the key this client sends, or give its sha256 as "
                        f"key_sha256 instead"
                    )
                digest = hashlib.sha256(key.encode()).digest()
            else:
                assert config.key_sha256 is not None  # the schema requires one of the two
                digest = bytes.fromhex(config.key_sha256)
            clients.append(
                ProxyClient(
                    name=config.name,
                    digest=digest,
                    attributes=dict(config.attributes),
                    headers={header.lower(): dimension for header, dimension in config.identity.headers.items()},
                    header_names={header.lower(): header for header in config.identity.headers},
                    require=tuple(config.require),
                )
            )
        return cls(clients)

    def authenticate(self, headers: Mapping[str, str]) -> ProxyClient:
        """The client whose key the request carries (`headers` lower-cased); Refused 401 when none does."""
        key = presented_key(headers)
        if not self.clients:
            raise Refused(
                401,
                "authentication_error",
                "this proxy has no clients configured (proxy.clients), so it accepts no key; ask its operator for one",
            )
        if key is None:
            raise Refused(
                401,
                "authentication_error",
                "no proxy key: send the key this proxy issued you as `x-api-key` or `Authorization: Bearer` "
                "(anthropic.Anthropic(base_url=<proxy>, api_key=<key>))",
            )
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found: ProxyClient | None = None
        for client in self.clients:  # every digest compared, so the time taken does not say which one matched
            if hmac.compare_digest(digest, client.digest) and found is None:
                found = client
        if found is None:
            raise Refused(
                401, "authentication_error", "invalid proxy key: it is not the key of any client of this proxy"
            )
        return found


def forwarded(name: str) -> bool:
    """Whether a request header (lower-cased name) goes on to Anthropic."""
    return name in _FORWARDED or name.startswith(_FORWARDED_PREFIXES)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: `x-api-key`, else an `Authorization: Bearer` token (lower-cased header names)."""
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None
