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
that Retry-After is honoured and every attempt is counted: `Usage.calls` counts
each request, `failed_calls` / `failures` the ones that gave nothing usable, and
an `LLMError` carries the usage spent before it was raised (`error.usage`).

Replies are strict: the model is asked for `strict_schema(schema)` (every field
required, no other keys) and its reply is parsed with the same schema, so
`{"totally": "wrong"}` is an invalid reply (repair retry, then LLMOutputError)
rather than a model full of defaults. The Python classes keep their defaults.

A refused key stops the backend: the first authentication error is latched
(`auth_error`) and every later `complete()` raises `LLMAuthError` at once
without a request. Until one reply has shown the credentials are not refused,
requests go one at a time, so a bad key costs one request, not one per
conversation; after that, calls run concurrently as usual.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import operator
import os
import random
import re
import time
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticUndefined

from . import secrets
from .errors import InvalidOption, LLMAuthError, LLMError, LLMOutputError
from .models import Role, Usage
from .settings import env_float, env_int, env_list, env_str, env_url

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

# provider/model as litellm spells it; no URL, no whitespace (a tool argument must not choose an endpoint)
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.:@/+-]{1,200}")
NOT_A_MODEL_NAME = ("model {model!r} is not a 'provider/model' name: a model argument names a model only. Where "
                    "calls go and with which key is operator configuration (CONVSIM_API_BASE, CONVSIM_API_KEY, "
                    "provider keys)")

REPAIR_PROMPT = """\
Your previous reply could not be used: {error}
Reply again with only a JSON object that matches the required schema. No prose, no code fences."""

UNCONFIGURED_PROVIDER = (
    "model '{model}': provider '{provider}' is not one the operator configured, and model calls go only to "
    "those (a model argument cannot choose where the server's keys are sent). Configure it with {variable}, "
    "CONVSIM_MODEL, or CONVSIM_PROVIDERS={provider}")

AUTH_ERROR = ("model {model}: the provider refused the credentials ({detail}). Set {variable} to a valid API key, "
              "then run again.")

# The environment variable litellm reads each provider's key from (others: PROVIDER_API_KEY).
PROVIDER_KEY_VARIABLES = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "groq": "GROQ_API_KEY",
    "cohere": "COHERE_API_KEY",
    "cohere_chat": "COHERE_API_KEY",
    "together_ai": "TOGETHERAI_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "xai": "XAI_API_KEY",
    "fireworks_ai": "FIREWORKS_AI_API_KEY",
    "perplexity": "PERPLEXITYAI_API_KEY",
    "azure": "AZURE_API_KEY",
    "huggingface": "HUGGINGFACE_API_KEY",
    "cerebras": "CEREBRAS_API_KEY",
    "deepinfra": "DEEPINFRA_API_KEY",
    "nvidia_nim": "NVIDIA_NIM_API_KEY",
    "codestral": "CODESTRAL_API_KEY",
    "vertex_ai": "GOOGLE_APPLICATION_CREDENTIALS",
    "bedrock": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
}

RETRYABLE_KINDS = frozenset({"rate_limit", "server_error", "timeout", "connection"})


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
    auth_error: LLMAuthError | None = None  # set once the provider refused the credentials: no more calls

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
    """Any litellm provider; strict schema-validated JSON output with one repair retry."""

    def __init__(self, settings: LLMSettings):
        self.settings = settings
        self.model = settings.model
        secrets.refresh_from_env()
        secrets.register(settings.api_key)
        self._limiter = anyio.CapacityLimiter(settings.max_concurrency)
        self._answered = False  # a request got an answer other than "bad credentials": no more gating
        self._first_call = anyio.Lock()

    async def complete(self, messages, schema, *, role, offline=None):
        if self.auth_error is not None:
            raise self._refusal(Usage())
        wire = strict_schema(schema)
        usage = Usage()
        convo = list(messages)
        last_error = ""
        for attempt in range(2):  # the call, then one repair retry on invalid output
            try:
                text, call_usage = await self._call_with_retries(convo, wire)
            except LLMError as e:
                e.usage = usage.add(e.usage)
                raise
            usage = usage.add(call_usage)
            try:
                return LLMResult(output=_parse(text, wire), usage=usage, model=self.model)
            except (ValueError, ValidationError) as e:
                usage = usage.add(Usage.failed("invalid_output", calls=0))
                last_error = _short_validation_error(e)
                log.warning("model %s returned invalid %s (attempt %d): %s", self.model, schema.__name__, attempt + 1, last_error)
                convo = [*convo, {"role": "assistant", "content": text}, {"role": "user", "content": REPAIR_PROMPT.format(error=last_error)}]
        raise LLMOutputError(f"model {self.model} did not return a valid {schema.__name__} after a repair attempt: "
                             f"{last_error}", usage=usage)

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
                resp = await self._attempt(litellm, kwargs)
            except LLMError as err:  # the provider answered with an error (or never answered)
                usage = usage.add(Usage.failed(err.kind))
                if not err.retryable or attempt == s.max_retries:
                    err.usage = usage
                    raise
                delay = _retry_after(err.__cause__)
                if delay is None:
                    delay = s.backoff_s * (2**attempt) * (0.5 + random.random() / 2)
                log.warning("model %s: %s; retry %d/%d in %.1fs", s.model, err, attempt + 1, s.max_retries, delay)
                await anyio.sleep(min(delay, 60.0))
                continue
            if resp is None:  # refused without a request: another call found the credentials bad
                raise self._refusal(usage)
            usage = usage.add(_usage_of(resp))
            try:
                return _content(resp), usage
            except LLMError as err:
                err.usage = usage.add(Usage.failed(err.kind, calls=0))
                raise
        raise AssertionError("unreachable")

    async def _attempt(self, litellm: Any, kwargs: dict[str, Any]) -> Any:
        """One request, or None when the credentials were refused meanwhile. Raises the classified LLMError."""
        if self._answered:
            return await self._request(litellm, kwargs)
        async with self._first_call:  # until a first answer, one request at a time (a bad key costs one)
            if self.auth_error is not None:
                return None
            if not self._answered:
                return await self._request(litellm, kwargs)
        return await self._request(litellm, kwargs)  # answered while this call waited: no more gating

    async def _request(self, litellm: Any, kwargs: dict[str, Any]) -> Any:
        try:
            async with self._limiter:
                resp = await litellm.acompletion(**kwargs)
        except Exception as e:  # classify at the boundary, decide in the caller
            err = _classify(e)
            if err.kind == "auth":
                raise self._latch(err) from e
            self._answered = True
            raise err from e
        self._answered = True
        return resp

    def _latch(self, err: LLMError) -> LLMAuthError:
        """Remember the first refusal of the credentials; every later call raises it without a request."""
        if self.auth_error is None:
            self.auth_error = LLMAuthError(
                AUTH_ERROR.format(model=self.model, detail=err, variable=key_variable(self.settings)),
                status_code=err.status_code,
            )
            log.error("%s", self.auth_error)
        return self._refusal(Usage())

    def _refusal(self, usage: Usage) -> LLMAuthError:
        assert self.auth_error is not None
        return LLMAuthError(str(self.auth_error), status_code=self.auth_error.status_code, usage=usage)


def configured_providers() -> set[str]:
    """The providers the operator set up, which are the only ones a model argument may name.

    litellm finds a key for nearly every provider, falling back to OPENAI_API_KEY for dozens of
    OpenAI-compatible hosts, so a caller naming `deepinfra/...` would otherwise send the operator's
    OpenAI key there. Configured: CONVSIM_MODEL's provider and CONVSIM_PROVIDERS; with
    CONVSIM_API_BASE, 'openai' (the OpenAI-compatible route to it); without it, each provider whose
    own key variable is set.
    """
    providers = {p.lower() for p in env_list("CONVSIM_PROVIDERS")}
    default = env_str("CONVSIM_MODEL")
    if default and default != OFFLINE:
        providers.add(normalise_model(default).partition("/")[0].lower())
    if env_str("CONVSIM_API_BASE"):
        providers.add("openai")
        return providers
    for provider, variable in PROVIDER_KEY_VARIABLES.items():
        if all(os.environ.get(v.strip()) for v in variable.split("/")):
            providers.add(provider)
    providers.update(name[: -len("_API_KEY")].lower() for name in os.environ
                     if name.endswith("_API_KEY") and os.environ[name].strip() and name != "CONVSIM_API_KEY")
    return providers


def key_variable(settings: LLMSettings) -> str:
    """The environment variable that holds the key `settings` sends: CONVSIM_API_KEY with an api_base or an
    explicit key, else the provider's own (OPENAI_API_KEY for openai/*, ...)."""
    if settings.api_base or settings.api_key:
        return "CONVSIM_API_KEY"
    provider = settings.model.partition("/")[0].strip().lower()
    return PROVIDER_KEY_VARIABLES.get(provider) or f"{re.sub(r'[^A-Z0-9]+', '_', provider.upper())}_API_KEY"


@functools.lru_cache(maxsize=512)
def strict_schema(schema: type[T]) -> type[T]:
    """A subclass of `schema` in which every field is required and unknown keys are refused (nested models too).

    The model is asked for it and its reply is validated against it; its instances are instances of
    `schema`, so callers need no conversion. The Python class keeps its defaults for code that builds
    instances itself (`UserTurn(message=...)`).
    """
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {}
    for name, info in schema.model_fields.items():
        required = copy.copy(info)
        required.default = PydanticUndefined
        required.default_factory = None
        annotations[name] = _strict_type(info.annotation)
        namespace[name] = required
    namespace.update(__annotations__=annotations, __module__=schema.__module__, __qualname__=schema.__qualname__,
                     __doc__=schema.__doc__, model_config=ConfigDict(extra="forbid"))
    return type(schema)(schema.__name__, (schema,), namespace)


def _strict_type(tp: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return strict_schema(tp)
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if not args or origin is typing.Literal:
        return tp
    strict_args = tuple(_strict_type(a) for a in args)
    if strict_args == args:
        return tp
    if origin is typing.Union or origin is types.UnionType:
        return functools.reduce(operator.or_, strict_args)
    return origin[strict_args]


def normalise_model(model: str) -> str:
    """Accept MLflow's `provider:/model` as well as litellm's `provider/model`."""
    model = model.strip()
    if "://" in model or any(c.isspace() for c in model):
        raise InvalidOption(NOT_A_MODEL_NAME.format(model=model[:80]))
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


_AUTH_TEXT = re.compile(r"(?i)invalid[ _-]?(?:x-)?api[ _-]?key|incorrect api key|api key not valid|missing credentials|"
                        r"no api key|api[ _-]?key (?:is )?(?:missing|required)")
_CONTEXT_TEXT = re.compile(r"(?i)context_length_exceeded|maximum context length|context window|prompt is too long")
_SERVER_ERRORS = frozenset({"InternalServerError", "ServiceUnavailableError", "BadGatewayError"})


def _classify(e: Exception) -> LLMError:
    """Translate a litellm/openai exception into LLMError with its kind, retryable or not (its message is redacted)."""
    status = getattr(e, "status_code", None)
    status = status if isinstance(status, int) else None
    name = type(e).__name__
    text = str(e)
    message = str(getattr(e, "message", "") or e).strip().splitlines()[0][:300] if text else name
    if name in ("AuthenticationError", "PermissionDeniedError") or status in (401, 403) or _AUTH_TEXT.search(text):
        kind = "auth"
    elif name == "ContextWindowExceededError" or (status in (None, 400, 413) and _CONTEXT_TEXT.search(text)):
        kind = "context_length"
    elif name == "RateLimitError" or status == 429:
        kind = "rate_limit"
    elif name in ("Timeout", "APITimeoutError") or status == 408 or isinstance(e, TimeoutError):
        kind = "timeout"
    elif name == "APIConnectionError" or isinstance(e, ConnectionError) or "connection error" in text.lower():
        kind = "connection"
    elif name in _SERVER_ERRORS or (status is not None and status >= 500):
        kind = "server_error"
    else:
        kind = "other"
    return LLMError(f"{name}: {message}", retryable=kind in RETRYABLE_KINDS, status_code=status, kind=kind)


def _retry_after(e: BaseException | None) -> float | None:
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
        raise LLMError(f"model response had no message: {e}", kind="other") from e


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
