"""The model path every chat transport shares: retries, error kinds, the auth latch, the format fallback, parsing.

    ChatBackend                      one retry loop, one classification, one latch, one fallback, strict replies
      ├── LiteLLMBackend             litellm_backend.py: any provider litellm knows
      └── OpenAIHTTPBackend          openai_http.py: OpenAI-compatible chat completions over one httpx client

A transport says only how one request is shaped (`_payload`) and sent and read (`_send`); it raises what its
client raises, and `_classify` turns that into an `LLMError` of one kind (auth, rate_limit, timeout, connection,
server_error, context_length, other) whichever transport it came from.

The two seams every request passes: `_call_with_retries` (one logical call: the retry loop, the fallback, the
back-off; a 429 is waited out there, not spent from the retry budget) and `_request` (one HTTP request: inside the
concurrency limiter and the endpoint's rate limiter, the payload built right before `self._send`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
from typing import Any, Callable

import anyio
from pydantic import BaseModel, ValidationError

from .. import secrets
from ..errors import LLMAuthError, LLMError, LLMOutputError
from ..models import Usage
from .base import LLM, RETRYABLE_KINDS, LLMResult, LLMSettings, T, log, strict_schema
from .providers import key_variable
from .ratelimit import RateLimitExhausted, estimate_tokens, limiter_for, retry_after_seconds

REPAIR_PROMPT = """\
Your previous reply could not be used: {error}
Reply again with only a JSON object that matches the required schema. No prose, no code fences."""


SCHEMA_INSTRUCTIONS = """\
Reply with only a JSON object that matches this JSON schema. No prose, no code fences.
JSON schema: {schema}"""


AUTH_ERROR = ("model {model}: the provider refused the credentials ({detail}). Set {variable} to a valid API key, "
              "then run again.")

QUOTA_ERROR = ("model {model}: the provider refused the request because the account's quota is used up ({detail}). "
               "Add credit to the account or set {variable} to a key with quota, then run again.")


# The backend name response-cache keys have carried from the start. Both transports send the same request to the
# same endpoint, so a reply cached through one stands for the other, and caches written before the direct path stay
# valid.
CACHE_BACKEND = "LiteLLMBackend"


class ChatBackend(LLM):
    """Strict schema-validated JSON output over a chat-completions transport, with one repair retry."""

    def __init__(self, settings: LLMSettings):
        self.settings = settings
        self.model = settings.model
        self.temperature, self.seed = settings.temperature, settings.seed
        secrets.refresh_from_env()
        secrets.register(settings.api_key)
        # requests in flight; a semaphore with no checkpoint when free (CapacityLimiter costs ~6 us a request)
        self._limiter = anyio.Semaphore(settings.max_concurrency, max_value=settings.max_concurrency, fast_acquire=True)
        self._credential = (settings.model, settings.api_base, hashlib.sha256(self._sent_key().encode()).hexdigest())
        # a request got an answer other than "bad credentials": no more gating. A key this process has seen
        # accepted for this model and endpoint (an earlier run of a server) is not checked again.
        self._answered = self._credential in _accepted_credentials
        self._first_call = anyio.Lock()
        self._endpoint = (settings.api_base, settings.model)
        self._rate = limiter_for(settings.api_base, settings.model, owner=self, rpm=settings.rpm, tpm=settings.tpm)
        self._holding = True  # its rates apply to the shared limiter; released by aclose, held again when used

    async def aclose(self) -> None:
        """The job is over: this backend's rates stop applying to the endpoint's shared limiter."""
        if self._holding:
            self._rate.release(self)
            self._holding = False

    def cache_identity(self) -> dict[str, Any]:
        """The endpoint counts too: one model name at two servers (a local `openai/...`) may be two models.
        The endpoint is hashed into the key, never stored; the API key is left out."""
        return {**super().cache_identity(), "backend": CACHE_BACKEND, "api_base": self.settings.api_base}

    # --- what a transport provides ------------------------------------------------------------------

    def _sent_key(self) -> str:
        """The API key this transport sends ("" for none): only its digest is kept (`_accepted_credentials`)."""
        return self.settings.api_key or os.environ.get(key_variable(self.settings)) or ""

    def _payload(self, messages: list[dict[str, Any]], response_format: dict[str, Any] | None) -> Any:
        """The request this transport sends: `messages` as they go, `response_format` None in text mode."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _payload")

    async def _send(self, payload: Any) -> tuple[str | None, Usage]:
        """Send one request; the reply's text (None: the response had no message) and its usage (calls=1).
        Raises its client's exceptions, for `_classify`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _send")

    # --- one logical call ---------------------------------------------------------------------------

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

    def _build(self, messages: list[dict[str, Any]], schema: type[BaseModel],
               trying: str | None = None) -> tuple[Any, str, int]:
        """The request in the structured-output mode this endpoint is known to accept, that mode, and its prompt
        tokens as the token rate limit counts them (the messages sent: with the schema in them, in a fallback mode).

        Built right before sending, so a call that waited behind the first one uses what that one learnt.
        `trying`: a lower mode this call tries without the endpoint having been shown to need it (see `guess`)."""
        mode = _working_modes.get(self._endpoint, JSON_SCHEMA)
        if trying is not None and _MODES.index(trying) > _MODES.index(mode):
            mode = trying
        if mode == JSON_SCHEMA:
            response_format: dict[str, Any] | None = response_format_of(schema)
        else:
            response_format = JSON_OBJECT_FORMAT if mode == JSON_OBJECT else None
        sent = _with_schema(messages, schema, mode)
        tokens = estimate_tokens(sent) if self._rate.counts_tokens else 0
        return self._payload(sent, response_format), mode, tokens

    async def _call_with_retries(self, messages: list[dict[str, Any]], schema: type[BaseModel]) -> tuple[str, Usage]:
        s = self.settings
        usage = Usage()
        attempt = 0
        trying: str | None = None  # a mode stepped down to on a guess: the endpoint learns it only if it works
        while True:
            try:
                reply = await self._attempt(lambda: self._build(messages, schema, trying))
            except _FormatRefused as err:  # not transient: ask again at once in the next mode, no retry spent
                usage = usage.add(Usage.failed(err.kind))
                if err.mode == TEXT:
                    err.usage = usage
                    raise
                fallback = _MODES[_MODES.index(err.mode) + 1]
                if err.guess:
                    trying = fallback
                else:
                    self._learn_mode(fallback, err)
                continue
            except RateLimitExhausted as err:  # refused for too long: no request was sent this time
                err.usage = usage
                raise
            except LLMError as err:  # the provider answered with an error (or never answered)
                usage = usage.add(Usage.failed(err.kind))
                if err.kind == "rate_limit" and err.retryable:  # waited out in the rate limiter, not the budget:
                    continue  # it paused and slowed down; RateLimitExhausted once refused rate_limit_wait_s
                if not err.retryable or attempt == s.max_retries:
                    err.usage = usage
                    raise
                delay = _retry_after(err.__cause__)
                if delay is None:
                    delay = s.backoff_s * (2**attempt) * (0.5 + random.random() / 2)
                log.warning("model %s: %s; retry %d/%d in %.1fs", s.model, err, attempt + 1, s.max_retries, delay)
                await anyio.sleep(min(delay, 60.0))
                attempt += 1
                continue
            if reply is None:  # refused without a request: another call found the credentials bad
                raise self._refusal(usage)
            text, call_usage = reply
            usage = usage.add(call_usage)
            if trying is not None:  # the guess was right: the lower mode answered where the higher one did not
                self._learn_mode(trying, None)
            if text is None:
                raise LLMError(f"model {self.model}: the response had no message", kind="other",
                               usage=usage.add(Usage.failed("other", calls=0)))
            return text, usage

    def _learn_mode(self, mode: str, refusal: Exception | None) -> None:
        """Use `mode` for this endpoint from now on (in this process), unless it already steps lower."""
        if _MODES.index(_working_modes.get(self._endpoint, JSON_SCHEMA)) < _MODES.index(mode):
            _working_modes[self._endpoint] = mode
            log.warning("model %s at %s refused a response_format (%s); using %s from now on", self.model,
                        self.settings.api_base or "its provider", refusal or "a lower mode answered", mode)

    async def _attempt(self, build: Callable[[], tuple[Any, str, int]]) -> tuple[str | None, Usage] | None:
        """One request, or None when the credentials were refused meanwhile. Raises the classified LLMError."""
        if self.auth_error is not None:  # latched while this call was retrying or queued: no further request
            return None
        if self._answered:
            return await self._request(build)
        async with self._first_call:  # until a first answer, one request at a time (a bad key costs one)
            if self.auth_error is not None:
                return None
            if not self._answered:
                return await self._request(build)
        return await self._request(build)  # answered while this call waited: no more gating

    async def _request(self, build: Callable[[], tuple[Any, str, int]]) -> tuple[str | None, Usage]:
        """One request: inside the concurrency limiter, then the rate limiter (ratelimit.py), sent at once."""
        mode, ticket, rate = JSON_SCHEMA, None, self._rate
        if not self._holding:  # used again after aclose
            rate.hold(self, self.settings.rpm, self.settings.tpm)
            self._holding = True
        try:
            async with self._limiter:
                payload, mode, tokens = build()
                ticket = await rate.acquire(tokens, give_up_after=self.settings.rate_limit_wait_s)
                if _working_modes.get(self._endpoint, JSON_SCHEMA) != mode:  # learnt while this call queued
                    payload, mode, _ = build()
                reply = await self._send(payload)
        except RateLimitExhausted:
            raise
        except Exception as e:  # classify at the boundary, decide in the caller
            err = _classify(e)
            if err.kind == "rate_limit" and _out_of_quota(e):  # waiting never helps: stops the run
                raise self._latch(err, QUOTA_ERROR) from e
            if err.kind == "rate_limit":
                rate.rate_limited(ticket, _retry_after(e))
            if err.kind != "auth" and _refuses_format(e, err.status_code):
                self._answered = True
                raise _FormatRefused(str(err), mode=mode, status_code=err.status_code,
                                     guess=getattr(e, "format_guess", False)) from e
            if err.kind == "auth":
                raise self._latch(err) from e
            self._answered = True
            raise err from e
        self._answered = True
        _accepted_credentials.add(self._credential)
        if rate.counts_tokens:
            used = reply[1]
            rate.succeeded(ticket, used.prompt_tokens + used.completion_tokens if used.prompt_tokens else None)
        else:
            rate.succeeded(ticket, None)
        return reply

    def _latch(self, err: LLMError, template: str = AUTH_ERROR) -> LLMAuthError:
        """Remember the first refusal of the credentials (or of an account out of quota); every later call raises it
        without a request, and the run stops (see pipeline/simulation.py)."""
        if self.auth_error is None:
            self.auth_error = LLMAuthError(
                template.format(model=self.model, detail=err, variable=key_variable(self.settings)),
                status_code=err.status_code,
            )
            log.error("%s", self.auth_error)
        return self._refusal(Usage())

    def _refusal(self, usage: Usage) -> LLMAuthError:
        assert self.auth_error is not None
        return LLMAuthError(str(self.auth_error), status_code=self.auth_error.status_code, usage=usage)


# (model, api_base, SHA-256 of the key sent) that got a reply in this process: later backends skip the one-at-a-time
# first call. A digest, never the key; a key revoked since fails as before (the first 401 latches).
_accepted_credentials: set[tuple[str, str | None, str]] = set()


# --- structured-output modes ------------------------------------------------------------------------

JSON_SCHEMA, JSON_OBJECT, TEXT = "json_schema", "json_object", "text"
_MODES = (JSON_SCHEMA, JSON_OBJECT, TEXT)  # structured-output modes, best first
JSON_OBJECT_FORMAT = {"type": "json_object"}


_working_modes: dict[tuple[str | None, str], str] = {}  # (api_base, model) -> the mode it accepted; in-process


class _FormatRefused(LLMError):
    """The endpoint refused the request's `response_format` (`mode`): fall back to the next mode, never retry."""

    def __init__(self, message: str, *, mode: str, status_code: int | None, guess: bool = False):
        super().__init__(message, retryable=False, status_code=status_code, kind="other")
        self.mode = mode
        self.guess = guess  # the refusal did not say it was the format (litellm's 422 with no body): tried, not learnt


_FORMAT_TEXT = re.compile(r"(?i)response_format|json_schema|json_object")


def _refuses_format(e: Exception, status: int | None) -> bool:
    """A 400, 422 or 500 naming the response format: llama-cpp-python answers 500, older vLLM and Ollama 400."""
    return status in (400, 422, 500) and bool(_FORMAT_TEXT.search(str(e)))


@functools.lru_cache(maxsize=512)
def response_format_of(schema: type[BaseModel]) -> dict[str, Any]:
    """The `response_format` asking for `schema` (a strict class) as OpenAI's API spells it, computed once per schema.

    The same dict litellm builds from the class on every call (`type_to_response_format_param`): pydantic's JSON
    schema of a strict class already has every field required and `additionalProperties: false`. Shared: never
    mutate it (litellm gets a copy)."""
    return {"type": "json_schema",
            "json_schema": {"schema": schema.model_json_schema(), "name": schema.__name__, "strict": True}}


@functools.lru_cache(maxsize=256)
def _schema_instructions(schema: type[BaseModel]) -> str:
    return SCHEMA_INSTRUCTIONS.format(schema=json.dumps(schema.model_json_schema(), separators=(",", ":")))


def _with_schema(messages: list[dict[str, Any]], schema: type[BaseModel], mode: str) -> list[dict[str, Any]]:
    """Without `json_schema`, the schema goes at the end of the system message, so the prefix stays cacheable."""
    if mode == JSON_SCHEMA:
        return messages
    instructions = _schema_instructions(schema)
    first = messages[0] if messages else None
    if first and first.get("role") == "system" and isinstance(first.get("content"), str):
        return [{**first, "content": f"{first['content']}\n\n{instructions}"}, *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]


# --- error kinds ------------------------------------------------------------------------------------

_AUTH_TEXT = re.compile(r"(?i)invalid[ _-]?(?:x-)?api[ _-]?key|incorrect api key|api key not valid|missing credentials|"
                        r"no api key|api[ _-]?key (?:is )?(?:missing|required)")


_CONTEXT_TEXT = re.compile(r"(?i)context_length_exceeded|maximum context length|context window|prompt is too long")


# A 429 that is not a rate: OpenAI's insufficient_quota code (its message, "You exceeded your current quota, please
# check your plan and billing details", is also Gemini's for a per-minute limit, so that wording alone is not enough),
# and providers' wordings of an empty balance, unless the reply says when to retry (then it is a rate limit).
_QUOTA_CODE = re.compile(r"(?i)insufficient_quota")
_NO_CREDIT = re.compile(r"(?i)credit balance is too low|out of credits")
_RETRY_HINT = re.compile(r"(?i)retry ?in\b|retrydelay|per ?minute|perminute|rate_limit_exceeded")


def _out_of_quota(e: Exception) -> bool:
    """A 429 naming OpenAI's insufficient_quota, or saying the balance is empty with no hint that waiting helps."""
    text = str(e)
    body = getattr(getattr(e, "response", None), "text", "") or ""
    if isinstance(body, str):
        text = f"{text} {body[:2000]}"
    if _QUOTA_CODE.search(text):
        return True
    return bool(_NO_CREDIT.search(text)) and not _RETRY_HINT.search(text) and _retry_after(e) is None


_SERVER_ERRORS = frozenset({"InternalServerError", "ServiceUnavailableError", "BadGatewayError"})


def _classify(e: Exception) -> LLMError:
    """Translate a transport's exception (litellm's, openai's, openai_http's) into LLMError with its kind, retryable
    or not (its message is redacted)."""
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
    """Seconds from the error response's Retry-After (or retry-after-ms) header, if any."""
    for headers in (getattr(getattr(e, "response", None), "headers", None), getattr(e, "litellm_response_headers", None)):
        seconds = retry_after_seconds(headers)
        if seconds is not None:
            return seconds
    return None


# --- replies ----------------------------------------------------------------------------------------

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
