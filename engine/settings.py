"""Operator settings from the environment, each validated where it is read.

A bad value is an `InvalidOption` naming the variable, the value and what is
expected (`CONVSIM_LLM_CONCURRENCY='abc': expected an integer from 1 to
100000`), never a traceback. Secret variables (keys, tokens) are read with
`env_str` and their values are never echoed.

The variables, in one place:

    CONVSIM_HOME             directory of convsim.sqlite (default ~/.convsim)
    CONVSIM_ROOTS            extra workspace roots, joined by os.pathsep
    CONVSIM_MODEL            default model for every role
    CONVSIM_API_BASE         OpenAI-compatible endpoint for every model call (http or https URL)
    CONVSIM_API_KEY          key sent to that endpoint
    CONVSIM_LLM_TIMEOUT      seconds per model call (default 60)
    CONVSIM_LLM_RETRIES      retries on server errors, timeouts and lost connections (default 4); 429s are
                             waited out by the rate limiter instead (engine/llm/ratelimit.py)
    CONVSIM_LLM_CONCURRENCY  most model calls in flight (default: the run's concurrency)
    CONVSIM_LLM_TRANSPORT    auto (openai/* models over the direct HTTP path, the rest litellm) or litellm
    CONVSIM_LLM_RPM          most requests per minute to each model, queued and evenly paced (default: unpaced
                             until a 429)
    CONVSIM_LLM_TPM          most tokens per minute to each model (default: not counted)
    CONVSIM_TEMPERATURE      sampling temperature of every model call, 0-2 (default: the provider's)
    CONVSIM_SEED             sampling seed sent with every model call, 0-2147483647 (default: none)
    CONVSIM_CACHE            1 to cache model replies in the database (default 0; see engine/llm/cache.py)
    CONVSIM_PROVIDERS        more model providers a model argument may name (comma-separated)
    CONVSIM_AUTH_TOKEN       bearer token for network transports
    CONVSIM_AGENT_ENV        the variables an HTTP target's headers may reference as ${NAME} (comma-separated);
                             any other reference is refused
"""

from __future__ import annotations

import math
import os
import re

from .errors import InvalidOption


def env_str(name: str) -> str | None:
    """The variable's value stripped, or None when unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or None


def env_int(name: str, default: int, *, low: int, high: int) -> int:
    raw = env_str(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise InvalidOption(f"environment variable {name}={_shown(raw)}: expected an integer from {low} to {high}")
    return value


def env_float(name: str, default: float, *, low: float, high: float) -> float:
    raw = env_str(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low < value <= high):
        raise InvalidOption(f"environment variable {name}={_shown(raw)}: expected a number of seconds above {low:g} "
                            f"and at most {high:g}")
    return value


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def env_bool(name: str, default: bool = False) -> bool:
    raw = env_str(name)
    if raw is None:
        return default
    if raw.lower() in TRUE_WORDS:
        return True
    if raw.lower() in FALSE_WORDS:
        return False
    raise InvalidOption(f"environment variable {name}={_shown(raw)}: expected 1 or 0 (or true/false, yes/no, on/off)")


def env_url(name: str) -> str | None:
    raw = env_str(name)
    if raw is not None and not re.match(r"^https?://[^\s/]+", raw):
        raise InvalidOption(f"environment variable {name}={_shown(raw)}: expected an http:// or https:// URL, "
                            "e.g. http://127.0.0.1:11434/v1")
    return raw


def env_list(name: str, sep: str = ",") -> list[str]:
    raw = env_str(name)
    return [p.strip() for p in raw.split(sep) if p.strip()] if raw else []


def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= 80 else raw[:77] + "...")
