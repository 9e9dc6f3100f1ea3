"""Structured model calls: one interface; the direct OpenAI-compatible, litellm and offline backends.

    llm = resolve_llm(model)             # "offline", "openai/gpt-4o-mini", "openai:/gpt-4o-mini", ...
    result = await llm.complete(messages, UserTurn, role=Role.USER, offline=heuristic)
    result.output                        # a validated UserTurn
    result.usage                         # calls, tokens, cost of this call (retries included)

`OpenAIHTTPBackend` (openai_http.py) talks to `openai/*` models, at OpenAI or at any OpenAI-compatible
`api_base`, over one httpx client; `LiteLLMBackend` to any other provider litellm knows. Both share one
model path (chat.py: retries, error kinds, auth latch, format fallback, strict parsing); `resolve_llm`
picks. `LLM.prepare()` readies a backend when a run starts (litellm's import, the HTTP pool), off the
event loop, so the first turn pays nothing extra. `OfflineBackend` calls no model: the
caller passes `offline=`, a deterministic heuristic that lives beside the
prompt it replaces, and the result is marked `heuristic=True`. That keeps the
demo, CI and tests free of keys and network, and keeps each heuristic next to
the prompt whose job it does.

Retries (429, 5xx, timeouts, connection errors) are ours, not litellm's or httpx's, so
that Retry-After is honoured and every attempt is counted: `Usage.calls` counts
each request, `failed_calls` / `failures` the ones that gave nothing usable, and
an `LLMError` carries the usage spent before it was raised (`error.usage`).

Replies are strict: the model is asked for `strict_schema(schema)` (every field
required, no other keys) and its reply is parsed with the same schema, so
`{"totally": "wrong"}` is an invalid reply (repair retry, then LLMOutputError)
rather than a model full of defaults. The Python classes keep their defaults.

An endpoint that refuses `response_format: json_schema` (a 400, 422 or 500 naming it) gets the same call
again in `json_object` mode, then as plain text, with the schema at the end of the system message; the
mode that worked is remembered per (api_base, model) in-process. Such a refusal is never retried.

A refused key stops the backend: the first authentication error is latched
(`auth_error`) and every later `complete()` raises `LLMAuthError` at once
without a request. Until one reply has shown the credentials are not refused,
requests go one at a time, so a bad key costs one request, not one per
conversation; after that, calls run concurrently as usual.

`CachedLLM` (cache.py) wraps any backend with a response cache keyed by the request (model, messages,
schema, temperature, seed, trial); the jobs wrap theirs when asked (`cache=True`, CONVSIM_CACHE=1).
"""

from __future__ import annotations

from .base import LLM, LLMResult, close_models, prepare_models
from .cache import CACHE_TRIAL, CachedLLM, ResponseCache, cached
from .litellm_backend import LiteLLMBackend
from .offline import OfflineBackend
from .openai_http import OpenAIHTTPBackend
from .providers import resolve_model
from .resolve import resolve_llm

__all__ = [
    "CACHE_TRIAL",
    "CachedLLM",
    "LLM",
    "LLMResult",
    "LiteLLMBackend",
    "OfflineBackend",
    "OpenAIHTTPBackend",
    "ResponseCache",
    "cached",
    "close_models",
    "prepare_models",
    "resolve_llm",
    "resolve_model",
]
