"""The interface every backend implements: `LLM.complete(messages, schema)` -> `LLMResult`; strict schemas."""

from __future__ import annotations

import copy
import functools
import logging
import operator
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticUndefined

from ..errors import LLMAuthError
from ..models import Role, Usage

log = logging.getLogger("convsim.llm")


T = TypeVar("T", bound=BaseModel)


OFFLINE = "offline"


RETRYABLE_KINDS = frozenset({"rate_limit", "server_error", "timeout", "connection"})


@dataclass
class LLMResult(Generic[T]):
    output: T
    usage: Usage
    model: str
    heuristic: bool = False
    cache_key: str | None = None  # set by a cache: the entry `LLM.discard` drops


@dataclass(frozen=True)
class LLMSettings:
    """Options for the chat backends (direct and litellm). `api_key` is held in memory only, never stored."""

    model: str
    api_base: str | None = None
    api_key: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 1.0
    max_concurrency: int = 64
    temperature: float | None = None
    seed: int | None = None
    rpm: float | None = None  # requests per minute to this endpoint and model (None: unpaced until a 429)
    tpm: float | None = None  # tokens per minute (None: not counted)
    rate_limit_wait_s: float = 300.0  # 429s are waited out, not retried from the budget, until this long refused


class LLM:
    """A structured-completion backend.

    `offline` is the caller's deterministic stand-in for the model, used only by
    `OfflineBackend`. Raises `LLMError` (after retries) or `LLMOutputError`
    (unparseable reply).
    """

    model: str = ""
    offline: bool = False
    auth_error: LLMAuthError | None = None  # set once the provider refused the credentials: no more calls
    temperature: float | None = None  # sent with every request (None: the provider's default)
    seed: int | None = None  # sent with every request (None: none)

    def cache_identity(self) -> dict[str, Any]:
        """What, besides the messages and the schema, decides this backend's reply: part of a cache key.

        Never a credential: keys and tokens are not what a reply depends on, and the key must not hold them.
        """
        return {"backend": type(self).__name__, "model": self.model, "temperature": self.temperature,
                "seed": self.seed}

    async def prepare(self) -> None:
        """Get ready for a run's calls before its first turn (import a client library, open a connection pool):
        jobs call it when they start, so the first call pays nothing extra. Nothing to do for most backends."""

    async def aclose(self) -> None:
        """Close what the backend holds open (kept-alive connections); it opens them again if used again."""

    async def discard(self, result: LLMResult[Any]) -> None:
        """Forget a reply that parsed but that the caller could not use (no test case, an out-of-range verdict,
        an empty message): a cache drops it, so the next run asks the model again. Others have nothing to do."""

    async def complete(
        self,
        messages: list[dict[str, Any]],
        schema: type[T],
        *,
        role: Role,
        offline: Callable[[], T] | None = None,
    ) -> LLMResult[T]:
        raise NotImplementedError(f"{type(self).__name__} does not implement complete")


def _distinct(llms: tuple[LLM | None, ...]) -> list[LLM]:
    seen: list[LLM] = []
    for llm in llms:
        if llm is not None and not any(llm is other for other in seen):
            seen.append(llm)
    return seen


async def prepare_models(*llms: LLM | None) -> None:
    """`prepare()` each distinct backend given (a job's user and judge models may be one), one after another."""
    for llm in _distinct(llms):
        await llm.prepare()


async def close_models(*llms: LLM | None) -> None:
    """`aclose()` each distinct backend given, when a job ends: its kept-alive connections belong to this event loop.
    Shielded, so a cancelled job still closes them; a failure to close is logged, never raised over the result."""
    with anyio.CancelScope(shield=True):
        for llm in _distinct(llms):
            try:
                await llm.aclose()
            except Exception:
                log.warning("closing the %s backend failed", llm.model, exc_info=True)


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

