"""The response cache: a wrapper around any `LLM` that answers a request it has seen from storage.

    llm = CachedLLM(resolve_llm(model), store)    # store: any ResponseCache (engine.store.Store is one)

Why: re-testing an agent against the same scenarios should cost nothing where nothing changed. With
the cache on, a second run against an agent that gives the same replies sends the simulated user,
the judges, the generator and the analyst exactly the requests of the first run, so every one of them
is answered from the database: zero model calls, the same transcripts and the same verdicts. A hit
counts in `Usage.cache_hits` (not in `calls`; no tokens, no cost), under the role that asked.

The key is a SHA-256 over everything that decides a reply and nothing secret:
- the backend's `cache_identity()`: backend, model, temperature, seed (and, for litellm, the endpoint);
  never an API key, so rotating a key keeps the cache and no key is derivable from the table;
- the messages as sent, before redaction: two requests that differ only in a secret are two requests
  (hashing the redacted text would let one answer stand in for the other). The digest gives nothing
  away: testing a guess at a secret needs the whole rest of the request, and a key is high-entropy;
- the JSON schema of the reply (the strict one the model is asked for);
- the trial (`CACHE_TRIAL`, a session's repeat index): the repeats of one test case send identical
  first requests, and must stay independent trials rather than copies of trial 0.

Only a reply that was parsed and validated is stored: a failed call (an error after retries, an
invalid reply after the repair attempt, a refused key) raises through and leaves nothing behind, so
the next run asks the model again. A reply that parsed but that its caller could not use (no usable
test case, a verdict outside the judge's range, an empty user message) is dropped again by the caller
(`LLM.discard`), for the same reason. What is stored is the validated reply as JSON, and only when
redaction leaves it unchanged: a reply that holds a known secret is not stored at all. Storing it
redacted would keep the secret out of the database but make a hit differ from the reply the first run
acted on (the agent would see '***' where it saw the text), breaking "a re-run reproduces the run".
Only a hash of the request is kept, never the messages.

The offline backend is never wrapped (`cached()` returns it as it is): its heuristics are already
deterministic and free, so a run behaves identically with the cache on.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import logging
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from .. import secrets
from ..errors import LLMAuthError
from ..models import Usage
from .base import LLM, LLMResult, strict_schema

log = logging.getLogger("convsim.llm.cache")

KEY_VERSION = 1  # bump when the key material changes: old entries then simply miss

# The trial a request belongs to: the repeat index of the session that makes it (0 outside a session).
CACHE_TRIAL: contextvars.ContextVar[int] = contextvars.ContextVar("convsim_cache_trial", default=0)


class ResponseCache(Protocol):
    """Where cached replies live (`engine.store.Store` implements it in SQLite)."""

    async def cache_get(self, key: str) -> str | None:
        """The stored reply JSON for `key`, or None."""

    async def cache_put(self, key: str, output: str, *, model: str, role: str, schema: str) -> None:
        """Store a validated reply (JSON) under `key`; `model`, `role` and `schema` are for people reading it."""

    async def cache_delete(self, key: str) -> None:
        """Drop the entry of `key`, if any."""


@functools.lru_cache(maxsize=512)
def _schema_digest(schema: type[BaseModel]) -> str:
    wire = strict_schema(schema).model_json_schema()
    return hashlib.sha256(json.dumps(wire, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def request_key(identity: dict[str, Any], messages: list[dict[str, Any]], schema: type[BaseModel],
                trial: int = 0) -> str:
    """The cache key of one request (hex SHA-256); see the module docstring for what goes in."""
    material = {"v": KEY_VERSION, "llm": identity, "messages": messages, "schema": _schema_digest(schema),
                "trial": trial}
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class CachedLLM(LLM):
    """`inner` with a response cache in front: a hit makes no request; a validated miss is stored."""

    def __init__(self, inner: LLM, cache: ResponseCache):
        self.inner = inner
        self.cache = cache

    @property  # type: ignore[override]
    def model(self) -> str:
        return self.inner.model

    @property  # type: ignore[override]
    def offline(self) -> bool:
        return self.inner.offline

    @property  # type: ignore[override]
    def temperature(self) -> float | None:
        return self.inner.temperature

    @property  # type: ignore[override]
    def seed(self) -> int | None:
        return self.inner.seed

    @property  # type: ignore[override]
    def auth_error(self) -> LLMAuthError | None:
        return self.inner.auth_error

    def cache_identity(self) -> dict[str, Any]:
        return self.inner.cache_identity()

    async def prepare(self) -> None:
        await self.inner.prepare()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def complete(self, messages, schema, *, role, offline=None):
        key = request_key(self.cache_identity(), messages, schema, CACHE_TRIAL.get())
        hit = await self._get(key)
        if hit is not None:
            try:
                output = strict_schema(schema).model_validate_json(hit)
            except ValidationError:  # written by another version of a schema with the same digest: ask again
                log.warning("cached %s reply no longer validates; asking the model", schema.__name__)
            else:
                return LLMResult(output=output, usage=Usage(cache_hits=1), model=self.inner.model, cache_key=key)
        result = await self.inner.complete(messages, schema, role=role, offline=offline)  # failures raise: not cached
        if not result.heuristic and await self._put(key, result, role=getattr(role, "value", str(role)),
                                                    schema=schema.__name__):
            result.cache_key = key
        return result

    async def discard(self, result: LLMResult[Any]) -> None:
        if result.cache_key is None:
            return
        try:
            await self.cache.cache_delete(result.cache_key)
        except Exception as e:
            log.warning("could not drop an unusable reply from the response cache: %s", e)
        result.cache_key = None

    async def _get(self, key: str) -> str | None:
        try:
            return await self.cache.cache_get(key)
        except Exception as e:  # the cache saves calls; a database that cannot be read must not fail the run
            log.warning("response cache unreadable, asking the model: %s", e)
            return None

    async def _put(self, key: str, result: LLMResult, *, role: str, schema: str) -> bool:
        """Store the reply; False when it was not stored (it holds a secret, or the store failed)."""
        output = result.output.model_dump_json()
        if secrets.redact(output) != output:
            log.info("a %s reply holds a secret: not cached (a redacted copy would not replay the run)", schema)
            return False
        try:
            await self.cache.cache_put(key, output, model=self.inner.model, role=role, schema=schema)
        except Exception as e:
            log.warning("could not store a reply in the response cache: %s", e)
            return False
        return True


def cached(llm: LLM, cache: ResponseCache | None) -> LLM:
    """`llm` behind the response cache, or `llm` itself when there is no cache, it is offline, or it is
    wrapped already."""
    if cache is None or llm.offline or isinstance(llm, CachedLLM):
        return llm
    return CachedLLM(llm, cache)
