"""The offline backend: no model, no network; runs the caller's deterministic heuristic."""

from __future__ import annotations

from ..errors import LLMError
from ..models import Usage
from .base import LLM, OFFLINE, LLMResult


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
