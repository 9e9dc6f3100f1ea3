"""`resolve_llm`: from a model argument and the operator's configuration to a backend."""

from __future__ import annotations

import math
import re
from typing import Callable, TypeVar

from ..errors import InvalidOption
from ..settings import env_float, env_int, env_str, env_url
from .base import LLM, OFFLINE, LLMSettings
from .litellm_backend import LiteLLMBackend
from .openai_http import OpenAIHTTPBackend, takes_direct_path, transport_setting
from .offline import OfflineBackend
from .providers import (
    MODEL_NAME,
    NOT_A_MODEL_NAME,
    PROVIDER_KEY_VARIABLES,
    UNCONFIGURED_PROVIDER,
    configured_providers,
    resolve_model,
)

T = TypeVar("T")


def resolve_llm(
    model: str | None = None,
    *,
    api_base: str | None = None,
    api_key: str | None = None,
    timeout_s: float | None = None,
    max_retries: int | None = None,
    max_concurrency: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
) -> LLM:
    """Build the backend for `model` (see `resolve_model`). Per-call options beat the environment
    (CONVSIM_API_BASE, CONVSIM_API_KEY, CONVSIM_LLM_TIMEOUT, CONVSIM_LLM_RETRIES, CONVSIM_LLM_CONCURRENCY,
    CONVSIM_TEMPERATURE, CONVSIM_SEED, CONVSIM_LLM_RPM, CONVSIM_LLM_TPM).

    `rpm` and `tpm` pace the requests to this model at this endpoint (see ratelimit.py); the offline
    backend makes no requests and ignores them, after checking them.

    `max_concurrency` caps model calls in flight; a job passes its own concurrency, since
    each conversation has at most one call in flight.

    `openai/*` models (OpenAI, or any OpenAI-compatible api_base) get the direct transport, `OpenAIHTTPBackend`;
    every other provider, and OpenAI's reasoning models, litellm (see openai_http.py; CONVSIM_LLM_TRANSPORT=litellm
    sends everything through litellm).
    """
    name = resolve_model(model)
    temperature, seed = sampling(temperature, seed)
    rpm, tpm = rate_limits(rpm, tpm)
    if name == OFFLINE:
        backend = OfflineBackend()
        backend.temperature, backend.seed = temperature, seed  # recorded with the run; the heuristics ignore them
        return backend
    if "/" not in name:
        raise InvalidOption(
            f"model '{name}' needs a provider prefix, e.g. 'openai/{name}' or 'openai:/{name}' (or 'offline')"
        )
    if not MODEL_NAME.fullmatch(name):
        raise InvalidOption(NOT_A_MODEL_NAME.format(model=name[:80]))
    provider = name.partition("/")[0].lower()
    if not (api_base or api_key) and provider not in configured_providers():
        raise InvalidOption(UNCONFIGURED_PROVIDER.format(model=name, provider=provider,
                                                         variable=PROVIDER_KEY_VARIABLES.get(provider) or
                                                         f"{provider.upper()}_API_KEY"))
    settings = LLMSettings(
        model=name,
        api_base=api_base or env_url("CONVSIM_API_BASE"),
        api_key=api_key or env_str("CONVSIM_API_KEY"),
        timeout_s=timeout_s if timeout_s is not None else env_float("CONVSIM_LLM_TIMEOUT", 60.0, low=0, high=3600),
        max_retries=max_retries if max_retries is not None else env_int("CONVSIM_LLM_RETRIES", 4, low=0, high=20),
        max_concurrency=min(max_concurrency or 64,
                            env_int("CONVSIM_LLM_CONCURRENCY", 100_000, low=1, high=100_000)),
        temperature=temperature,
        seed=seed,
        rpm=rpm,
        tpm=tpm,
    )
    if takes_direct_path(settings, transport_setting()):
        return OpenAIHTTPBackend(settings)
    return LiteLLMBackend(settings)


MAX_TEMPERATURE = 2.0
MAX_SEED = 2**31 - 1  # what every provider that takes a seed accepts


def sampling(temperature: float | None = None, seed: int | None = None) -> tuple[float | None, int | None]:
    """The temperature and seed of a run's model calls, checked: the arguments, else CONVSIM_TEMPERATURE and
    CONVSIM_SEED, else None (the provider's default temperature, no seed). Raises InvalidOption."""
    return (_given_or_env(temperature, "temperature", "CONVSIM_TEMPERATURE", _temperature),
            _given_or_env(seed, "seed", "CONVSIM_SEED", _seed))


MAX_RATE = 1e9


def rate_limits(rpm: float | None = None, tpm: float | None = None) -> tuple[float | None, float | None]:
    """Requests and tokens per minute for a run's model calls, checked: the arguments, else CONVSIM_LLM_RPM and
    CONVSIM_LLM_TPM, else None (unpaced until the provider answers 429). Raises InvalidOption."""
    return (_given_or_env(rpm, "rpm", "CONVSIM_LLM_RPM", _per_minute),
            _given_or_env(tpm, "tpm", "CONVSIM_LLM_TPM", _per_minute))


def _per_minute(value: object, what: str) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and 0.0 < number <= MAX_RATE):
        raise InvalidOption(f"{what} must be a positive number (per minute), at most {MAX_RATE:g}, got "
                            f"{str(value)[:40]!r}")
    return number


def _given_or_env(value: object, field: str, variable: str, check: Callable[[object, str], T]) -> T | None:
    """`value` checked as `field`, else the environment variable checked as itself, else None."""
    if value is not None:
        return check(value, field)
    raw = env_str(variable)
    return None if raw is None else check(raw, f"environment variable {variable}")


def _temperature(value: object, what: str) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and 0.0 <= number <= MAX_TEMPERATURE):
        raise InvalidOption(f"{what} must be a number from 0 to {MAX_TEMPERATURE:g}, got {str(value)[:40]!r}")
    return number


def _seed(value: object, what: str) -> int:
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,10}", value.strip()):
        number = int(value.strip())
    if number is None or not 0 <= number <= MAX_SEED:
        raise InvalidOption(f"{what} must be an integer from 0 to {MAX_SEED}, got {str(value)[:40]!r}")
    return number
