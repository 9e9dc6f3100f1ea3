"""One redaction step that knows every secret in play.

Secrets reach the process in three ways: provider keys and tokens in the
environment, keys passed per call (`LLMSettings.api_key`), and the values an
HTTP target's `${VAR}` headers expand to (or literal header values). Each is
registered here, and `redact` replaces all of them, wherever they appear:
an agent's error body, an agent reply that echoes its own header, a
provider's error text. The store runs it on everything it writes, so the
database (and its WAL), exports, reports and resources are clean; the CLI,
the MCP layer and the log handler run it on what they print or return.

Values shorter than `MIN_SECRET_CHARS` are not treated as secrets: words like
"none" or "1" in CONVSIM_API_KEY would otherwise be blanked out of every text.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from typing import Any

MASK = "***"
MIN_SECRET_CHARS = 8

# Environment variables whose values are secrets, by name.
SECRET_ENV_NAME = re.compile(r"(?i)(?:API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|_KEY)$|^CONVSIM_AUTH_TOKEN$")

_lock = threading.Lock()
_registered: set[str] = set()
_env_snapshot: tuple[tuple[str, str], ...] = ()
_pattern: re.Pattern[str] | None = None
_stale = True  # _pattern must be rebuilt (None with _stale False: no secret known, nothing to mask)


def register(value: str | None) -> None:
    """Treat `value` (a key, a token, an expanded header value) as a secret from now on."""
    global _stale
    if not value or len(value) < MIN_SECRET_CHARS:
        return
    forms = {value, json.dumps(value)[1:-1]}  # as written, and as it appears inside JSON text
    with _lock:
        if forms <= _registered:
            return
        _registered.update(forms)
        _stale = True


def refresh_from_env() -> None:
    """Pick up secret-looking environment variables (call when a job or process starts)."""
    global _env_snapshot, _stale
    snapshot = tuple(sorted((k, v) for k, v in os.environ.items()
                            if SECRET_ENV_NAME.search(k) and len(v) >= MIN_SECRET_CHARS))
    with _lock:
        if snapshot != _env_snapshot:
            _env_snapshot = snapshot
            _stale = True


def _compiled() -> re.Pattern[str] | None:
    """The pattern of every known secret, built once per change (None when there is none): the store runs
    `redact` on every message it writes, so the common case is one check of a flag."""
    global _pattern, _stale
    if not _stale:
        return _pattern
    with _lock:
        if _stale:
            values = _registered | {v for _, v in _env_snapshot} | {json.dumps(v)[1:-1] for _, v in _env_snapshot}
            # longest first, so a secret that contains another is masked whole
            _pattern = (re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)))
                        if values else None)
            _stale = False
        return _pattern


def redact(text: str) -> str:
    """`text` with every known secret replaced by '***'."""
    if not text:
        return text
    pattern = _compiled()
    return pattern.sub(MASK, text) if pattern else text


def redact_data(value: Any) -> Any:
    """A JSON-like value (dicts, lists, strings) with secrets masked in every string, keys included."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in the message, its arguments and any traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed format string is the logger's problem, not a reason to leak
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info:
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = redact(formatted), None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add the redacting filter to every handler of `logger` (default: the root logger)."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


refresh_from_env()
