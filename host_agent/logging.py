"""structlog set-up (console for people, JSON for services) and secret redaction.

Secrets are registered once (`register_secret`) when the configuration is loaded; every log
event, every message shown to a user and every `sync_logs.error_message` passes through
`redact`, which replaces them (and the password part of any URL) with `***`.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO
from urllib.parse import quote, unquote

import structlog

from host_agent.urls import url_secrets

_secrets: set[str] = set()
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):(?P<pw>[^@\s]+)@")


def register_secret(secret: str | None) -> None:
    """Remember `secret` so `redact` removes it (in plain and URL-quoted form)."""
    if secret and len(secret) >= 3:
        _secrets.add(secret)
        _secrets.add(quote(secret, safe=""))
        _secrets.add(unquote(secret))


def register_url(url: str | None) -> None:
    """Remember the secrets inside a database URL (its password, escaped and not, and any
    `password` query parameter), so they are redacted wherever they show up."""
    for secret in url_secrets(url or ""):
        register_secret(secret)


def redact(text: str) -> str:
    """`text` with every registered secret and URL password replaced by `***`."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return _URL_PASSWORD.sub(r"\g<scheme>:***@", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v) for v in value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    return value


def _redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact_value(value)
    return event_dict


def _redact_rendered(_logger: Any, _method: str, rendered: Any) -> Any:
    # A last pass over the final text: tracebacks rendered by format_exc_info included.
    return redact(rendered) if isinstance(rendered, str) else rendered


class _StreamLogger:
    """Writes each rendered line to `stream`, or to whatever `sys.stderr` is at that moment
    (so replacing stderr later, as test runners and daemon managers do, is followed)."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        stream = self._stream or sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg


def configure_logging(
    level: str = "info", fmt: str = "console", stream: TextIO | None = None
) -> None:
    """Configure structlog for the process. Logs go to stderr unless `stream` is given."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_processor,
    ]
    if fmt == "json":
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
            _redact_rendered,
        ]
    else:
        processors += [
            structlog.dev.ConsoleRenderer(colors=(stream or sys.stderr).isatty()),
            _redact_rendered,
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_args: _StreamLogger(stream),
        cache_logger_on_first_use=False,
    )
