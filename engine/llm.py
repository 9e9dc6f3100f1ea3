"""Structured model calls: one interface, two backends.

    llm = resolve_llm(model)             # "offline", "openai/gpt-4o-mini", "openai:/gpt-4o-mini", ...
    result = await llm.complete(messages, UserTurn, role=Role.USER, offline=heuristic)
    result.output                        # a validated UserTurn
    result.usage                         # calls, tokens, cost of this call (retries included)

`LiteLLMBackend` talks to any provider litellm knows, including local
OpenAI-compatible servers (`api_base`). `OfflineBackend` calls no model: the
caller passes `offline=`, a deterministic heuristic that lives beside the
prompt it replaces, and the result is marked `heuristic=True`. That keeps the
demo, CI and tests free of keys and network, and keeps each heuristic next to
the prompt whose job it does.

Retries (429, 5xx, timeouts, connection errors) are ours, not litellm's, so
that Retry-After is honoured and every attempt is counted.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

import anyio
from pydantic import BaseModel, ValidationError

from . import secrets
from .errors import InvalidOption, LLMError, LLMOutputError
from .models import Role, Usage
from .settings import env_float, env_int, env_str, env_url

log = logging.getLogger("convsim.llm")

T = TypeVar("T", bound=BaseModel)

OFFLINE = "offline"

# Sensible defaults when a provider key is present and no model was named.
DEFAULT_MODELS_BY_KEY = (
    ("OPENAI_API_KEY", "openai/gpt-4o-mini"),
    ("ANTHROPIC_API_KEY", "anthropic/claude-3-5-haiku-latest"),
    ("GEMINI_API_KEY", "gemini/gemini-2.0-flash"),
    ("MISTRAL_API_KEY", "mistral/mistral-small-latest"),
    ("GROQ_API_KEY", "groq/llama-3.1-8b-instant"),
)

REPAIR_PROMPT = """\
Your previous reply could not be used: {error}
Reply again with only a JSON object that matches the required schema. No prose, no code fences."""


@dataclass
class LLMResult(Generic[T]):
    output: T
    usage: Usage
    model: str
    heuristic: bool = False


@dataclass(frozen=True)
class LLMSettings:
    """Options for the litellm backend. `api_key` is held in memory only, never stored."""

    model: str
    api_base: str | None = None
    api_key: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 1.0
    max_concurrency: int = 64
    temperature: float | None = None


class LLM:
    """A structured-completion backend.

    `offline` is the caller's deterministic stand-in for the model, used only by
    `OfflineBackend`. Raises `LLMError` (after retries) or `LLMOutputError`
    (unparseable reply).
    """

    model: str = ""
    offline: bool = False

    async def complete(
        self,
        messages: list[dict[str, Any]],
        schema: type[T],
        *,
        role: Role,
        offline: Callable[[], T] | None = None,
    ) -> LLMResult[T]:
        raise NotImplementedError(f"{type(self).__name__} does not implement complete")


class OfflineBackend(LLM):
    """Deterministic, network-free: runs the caller's heuristic. Results say `heuristic=True`."""

    model = OFFLINE
    offline = True

    async def complete(self, messages, schema, *, role, offline=None):
        if offline is None:
            raise LLMError(
                f"The offline backend has no heuristic for {schema.__name__}; configure a model "
                "(--model or CONVSIM_MODEL) and its API key."
            )
        output = offline()
        return LLMResult(output=schema.model_validate(output), usage=Usage(calls=1), model=OFFLINE, heuristic=True)


class LiteLLMBackend(LLM):
    """Any litellm provider; schema-validated JSON output with one repair retry."""

    def __init__(self, settings: LLMSettings):
        self.settings = settings
        self.model = settings.model
        secrets.refresh_from_env()
        secrets.register(settings.api_key)
        self._limiter = anyio.CapacityLimiter(settings.max_concurrency)

    async def complete(self, messages, schema, *, role, offline=None):
        usage = Usage()
        convo = list(messages)
        last_error = ""
        for attempt in range(2):  # the call, then one repair retry on invalid output
            text, call_usage = await self._call_with_retries(convo, schema)
            usage = usage.add(call_usage)
            try:
                return LLMResult(output=_parse(text, schema), usage=usage, model=self.model)
            except (ValueError, ValidationError) as e:
                last_error = _short_validation_error(e)
                log.warning("model %s returned invalid %s (attempt %d): %s", self.model, schema.__name__, attempt + 1, last_error)
                convo = [*convo, {"role": "assistant", "content": text}, {"role": "user", "content": REPAIR_PROMPT.format(error=last_error)}]
        raise LLMOutputError(f"model {self.model} did not return a valid {schema.__name__} after a repair attempt: {last_error}")

    async def _call_with_retries(self, messages: list[dict[str, Any]], schema: type[BaseModel]) -> tuple[str, Usage]:
        litellm = _import_litellm()
        s = self.settings
        kwargs: dict[str, Any] = dict(
            model=s.model, messages=messages, response_format=schema, timeout=s.timeout_s, num_retries=0
        )
        if s.api_base:
            kwargs["api_base"] = s.api_base
        if s.api_key:
            kwargs["api_key"] = s.api_key
        if s.temperature is not None:
            kwargs["temperature"] = s.temperature
        usage = Usage()
        for attempt in range(s.max_retries + 1):
            try:
                async with self._limiter:
                    resp = await litellm.acompletion(**kwargs)
            except Exception as e:  # classify at the boundary, decide here
                err = _classify(e)
                usage = usage.add(Usage(calls=1))
                if not err.retryable or attempt == s.max_retries:
                    raise err from e
                delay = _retry_after(e)
                if delay is None:
                    delay = s.backoff_s * (2**attempt) * (0.5 + random.random() / 2)
                log.warning("model %s: %s; retry %d/%d in %.1fs", s.model, err, attempt + 1, s.max_retries, delay)
                await anyio.sleep(min(delay, 60.0))
                continue
            return _content(resp), usage.add(_usage_of(resp))
        raise AssertionError("unreachable")


def normalise_model(model: str) -> str:
    """Accept MLflow's `provider:/model` as well as litellm's `provider/model`."""
    model = model.strip()
    if ":/" in model:
        provider, _, name = model.partition(":/")
        return f"{provider}/{name}"
    return model


def resolve_model(model: str | None = None) -> str:
    """Explicit argument, then CONVSIM_MODEL, then a default for a present provider key, then offline."""
    if model and model.strip():
        return normalise_model(model)
    env_model = env_str("CONVSIM_MODEL")
    if env_model:
        name = normalise_model(env_model)
        if name != OFFLINE and "/" not in name:
            raise InvalidOption(f"environment variable CONVSIM_MODEL={env_model!r}: expected 'provider/model' "
                                f"(e.g. 'openai/{name}') or 'offline'")
        return name
    for key, default in DEFAULT_MODELS_BY_KEY:
        if os.environ.get(key):
            return default
    return OFFLINE


def resolve_llm(
    model: str | None = None,
    *,
    api_base: str | None = None,
    api_key: str | None = None,
    timeout_s: float | None = None,
    max_retries: int | None = None,
    max_concurrency: int | None = None,
) -> LLM:
    """Build the backend for `model` (see `resolve_model`). Per-call options beat the environment
    (CONVSIM_API_BASE, CONVSIM_API_KEY, CONVSIM_LLM_TIMEOUT, CONVSIM_LLM_RETRIES, CONVSIM_LLM_CONCURRENCY).

    `max_concurrency` caps model calls in flight; a job passes its own concurrency, since
    each conversation has at most one call in flight.
    """
    name = resolve_model(model)
    if name == OFFLINE:
        return OfflineBackend()
    if "/" not in name:
        raise InvalidOption(
            f"model '{name}' needs a provider prefix, e.g. 'openai/{name}' or 'openai:/{name}' (or 'offline')"
        )
    settings = LLMSettings(
        model=name,
        api_base=api_base or env_url("CONVSIM_API_BASE"),
        api_key=api_key or env_str("CONVSIM_API_KEY"),
        timeout_s=timeout_s if timeout_s is not None else env_float("CONVSIM_LLM_TIMEOUT", 60.0, low=0, high=3600),
        max_retries=max_retries if max_retries is not None else env_int("CONVSIM_LLM_RETRIES", 4, low=0, high=20),
        max_concurrency=min(max_concurrency or 64,
                            env_int("CONVSIM_LLM_CONCURRENCY", 100_000, low=1, high=100_000)),
    )
    return LiteLLMBackend(settings)


_litellm = None


def _import_litellm():
    """Import litellm on first use, hardened: no network fetch at import, no .env loading, no stdout logs."""
    global _litellm
    if _litellm is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        os.environ.setdefault("LITELLM_MODE", "PRODUCTION")
        os.environ.setdefault("LITELLM_LOG", "WARNING")
        started = time.perf_counter()
        import litellm

        litellm.suppress_debug_info = True
        litellm.drop_params = True  # providers without e.g. temperature support don't fail the call
        for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
        log.debug("imported litellm in %.2fs", time.perf_counter() - started)
        _litellm = litellm
    return _litellm


def _classify(e: Exception) -> LLMError:
    """Translate a litellm/openai exception into LLMError, retryable or not (its message is redacted)."""
    status = getattr(e, "status_code", None)
    name = type(e).__name__
    message = str(getattr(e, "message", "") or e).strip().splitlines()[0][:300] if str(e) else name
    retryable_names = {"RateLimitError", "Timeout", "APITimeoutError", "APIConnectionError", "InternalServerError",
                       "ServiceUnavailableError", "BadGatewayError"}
    retryable = name in retryable_names or (isinstance(status, int) and (status == 429 or status >= 500))
    if isinstance(e, (TimeoutError, ConnectionError)):
        retryable = True
    if name == "ContextWindowExceededError":
        retryable = False
    return LLMError(f"{name}: {message}", retryable=retryable,
                    status_code=status if isinstance(status, int) else None)


def _retry_after(e: Exception) -> float | None:
    """Seconds from a Retry-After header on the error's response, if any."""
    for headers in (getattr(getattr(e, "response", None), "headers", None), getattr(e, "litellm_response_headers", None)):
        if not headers:
            continue
        value = headers.get("retry-after") or headers.get("Retry-After")
        if value is None:
            continue
        try:
            return max(0.0, float(value))
        except ValueError:
            return None
    return None


def _content(resp: Any) -> str:
    try:
        return resp.choices[0].message.content or ""
    except (AttributeError, IndexError) as e:
        raise LLMError(f"model response had no message: {e}") from e


def _usage_of(resp: Any) -> Usage:
    u = getattr(resp, "usage", None)
    cost = (getattr(resp, "_hidden_params", None) or {}).get("response_cost")
    return Usage(
        calls=1,
        prompt_tokens=int(getattr(u, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(u, "completion_tokens", 0) or 0),
        cost_usd=float(cost) if cost else 0.0,
        cost_unknown_calls=0 if cost is not None else 1,
    )


def _parse(text: str, schema: type[T]) -> T:
    """Parse a JSON object out of the reply, tolerating code fences and surrounding prose."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.strip("`")
        stripped = stripped[stripped.find("\n") + 1 :] if "\n" in stripped else stripped
    start, end = stripped.find("{"), stripped.rfind("}")
    if start == -1 or end < start:
        raise ValueError(f"no JSON object in reply: {text[:120]!r}")
    return schema.model_validate(json.loads(stripped[start : end + 1]))


def _short_validation_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'root'}: {err['msg']}" for err in e.errors()[:5])
    return str(e)[:300]
