"""The litellm transport: any provider litellm knows, through the shared model path of chat.py.

litellm is imported when a run starts (`prepare`, off the event loop), not on the first call; its callback lists are
cleared, its telemetry off, and it makes no retries of its own. The response format goes as the dict computed once per
schema (chat.response_format_of), a fresh copy per call since litellm's provider adapters may edit it, instead of a
pydantic class it would turn into a schema on every call. What is left costs about 8 ms of CPU per call and has no
switch: litellm's per-call setup, the pricing and logging payload it builds for every reply, its response objects.
That is why `openai/*` models take the direct path (openai_http.py); cost here is read from litellm's result."""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from typing import Any

import anyio

from ..models import Usage
from .base import log
from .chat import ChatBackend


class _NoResponse(Exception):
    """litellm returned None after an HTTP 422 (see `_send`); classified like the 422 it stands for."""

    status_code = 422
    format_guess = True  # its message names response_format because it might be it: chat.py tries, not learns


class LiteLLMBackend(ChatBackend):
    """Any litellm provider; strict schema-validated JSON output with one repair retry."""

    async def prepare(self) -> None:
        await anyio.to_thread.run_sync(_import_litellm)

    def _payload(self, messages: list[dict[str, Any]], response_format: dict[str, Any] | None) -> dict[str, Any]:
        s = self.settings
        kwargs: dict[str, Any] = dict(model=s.model, messages=messages, timeout=s.timeout_s, num_retries=0)
        if response_format is not None:
            kwargs["response_format"] = copy.deepcopy(response_format)  # shared: litellm's adapters may edit theirs
        if s.api_base:
            kwargs["api_base"] = s.api_base
        if s.api_key:
            kwargs["api_key"] = s.api_key
        if s.temperature is not None:
            kwargs["temperature"] = s.temperature
        if s.seed is not None:
            kwargs["seed"] = s.seed
        return kwargs

    async def _send(self, payload: dict[str, Any]) -> tuple[str | None, Usage]:
        resp = await _import_litellm().acompletion(**payload)
        if resp is None:  # litellm gives up this way after a 422 it retried with parameters dropped
            # litellm swallowed the 422's message (it resends once without the parameters the body names, then
            # returns None). A 422 is a validation error, never transient, and the structured-output mode is the
            # part of the request that differs between endpoints: with a response_format set, the message names
            # it, so the shared path steps down a mode for this call (chat._refuses_format), and the endpoint keeps
            # the lower mode only once it answers there. A 422 about something else then fails the last mode (no
            # response_format) too, and is raised, leaving the endpoint's mode as it was.
            raise _NoResponse(f"model {self.model}: the server refused the request (HTTP 422) and litellm returned "
                              "no response" + (" (response_format refused?)" if "response_format" in payload else ""))
        return _content(resp), _usage_of(resp)


_litellm = None  # importing litellm costs seconds: done once, when the first run that needs it starts
_import_lock = threading.Lock()


def _import_litellm():
    """Import litellm once, hardened: no network fetch at import, no .env loading, no stdout logs, no callbacks."""
    global _litellm
    if _litellm is not None:
        return _litellm
    with _import_lock:
        if _litellm is None:
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            os.environ.setdefault("LITELLM_MODE", "PRODUCTION")
            os.environ.setdefault("LITELLM_LOG", "WARNING")
            started = time.perf_counter()
            import litellm

            litellm.suppress_debug_info = True
            litellm.drop_params = True  # providers without e.g. temperature support don't fail the call
            litellm.telemetry = False
            for hooks in ("callbacks", "success_callback", "failure_callback", "_async_success_callback",
                          "_async_failure_callback", "input_callback", "service_callback"):
                if isinstance(getattr(litellm, hooks, None), list):
                    getattr(litellm, hooks).clear()
            for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
                logger = logging.getLogger(name)
                for handler in list(logger.handlers):
                    logger.removeHandler(handler)
                logger.propagate = True
            log.debug("imported litellm in %.2fs", time.perf_counter() - started)
            _litellm = litellm
    return _litellm


def _content(resp: Any) -> str | None:
    try:
        return resp.choices[0].message.content or ""
    except (AttributeError, IndexError):
        return None


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
