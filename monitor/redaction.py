"""Secrets kept out of everything printed or logged: database passwords, webhook URL paths, URL credentials."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

if TYPE_CHECKING:  # config imports this module for its error messages
    from monitor.config import Settings

HIDDEN = "***"
# scheme://user:password@ anywhere in a text: the password goes, whatever it contains short of a space.
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@]*):[^\s]*@")
# libpq takes a password as a query parameter too.
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&](?:password|sslpassword)=)[^&\s'\"]*", re.IGNORECASE)


def scrub(text: str) -> str:
    """`text` with the password of every URL in it hidden (user:***@, password=***)."""
    text = _USERINFO.sub(rf"\g<head>:{HIDDEN}@", text)
    return _QUERY_PASSWORD.sub(rf"\g<head>{HIDDEN}", text)


def database_url(url: str) -> str:
    """A database URL fit to print: `postgresql+psycopg://monitor:***@host/db`."""
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        shown = url  # not a URL SQLAlchemy can parse: the patterns below still find a password
    return scrub(shown)


def webhook_url(url: str) -> str:
    """A webhook URL fit to print: scheme, host and port only (`https://hooks.slack.com/***`); the path and
    query of a webhook are often its only credential."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return HIDDEN
    if not parts.scheme or not host:
        return HIDDEN
    rest = HIDDEN if (parts.path not in ("", "/") or parts.query or parts.fragment) else ""
    return f"{parts.scheme}://{host}{port}/{rest}"


class Redactor:
    """Hides the secrets of loaded settings (and any URL password) in text; `install` applies it to log output."""

    def __init__(self) -> None:
        self._literals: dict[str, str] = {}  # secret text -> what is shown instead

    def add_settings(self, settings: Settings) -> None:
        """Learn the secrets a configuration holds: its database URL and its webhook URLs."""
        self._add(settings.database_url, database_url(settings.database_url))
        for hook in settings.alerts.webhooks:
            self._add(hook.url, webhook_url(hook.url))
            try:
                path = urlsplit(hook.url).path
            except ValueError:
                continue
            if len(path) > 1:
                self._add(path, f"/{HIDDEN}")

    def add_secret(self, secret: str, shown: str = HIDDEN) -> None:
        """Learn one more secret (a key read from the environment): shown as `shown` wherever it appears."""
        self._add(secret, shown)

    def _add(self, secret: str, shown: str) -> None:
        if secret and secret != shown:
            self._literals[secret] = shown

    def __call__(self, text: str) -> str:
        """`text` with every known secret and every URL password hidden."""
        for secret in sorted(self._literals, key=len, reverse=True):  # a whole URL before a part of it
            if secret in text:
                text = text.replace(secret, self._literals[secret])
        return scrub(text)

    def install(self, logger: logging.Logger) -> None:
        """Redact every record that `logger`'s handlers format, tracebacks included."""
        for handler in logger.handlers:
            handler.setFormatter(_RedactingFormatter(handler.formatter or logging.Formatter(), self))


class _RedactingFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter, redact: Redactor) -> None:
        super().__init__()
        self._inner = inner
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(self._inner.format(record))
