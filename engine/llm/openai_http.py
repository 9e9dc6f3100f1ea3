"""The direct transport: OpenAI-compatible chat completions over HTTP/1.1 keep-alive connections, without litellm.

Why: through litellm a simulated turn cost the engine 10-12 ms of CPU on the 2-core benchmark machine, 80% of it
inside litellm (per-call setup and wrappers, cost and logging hooks, response objects), and its pool stopped at
500 connections; over httpx instead, 3.7-4.3 ms, 70% of it in httpx and httpcore's pool. Over http1.py it is
1.2-1.9 ms for the whole engine, the model path about 0.4 ms of it. This path builds the request, posts it and
reads the JSON reply; the retry loop, the error kinds, the auth latch, the response-format fallback and strict
parsing are chat.py's, the same as through litellm.

Which models take it (`takes_direct_path`; `resolve_llm` picks):
- `openai/<name>`, with or without an api_base (CONVSIM_API_BASE): OpenAI itself, or any server speaking the OpenAI
  chat-completions API (vLLM, llama.cpp, LM Studio, Ollama's /v1, proxies). The server gets `model: "<name>"`.
- not OpenAI's reasoning models (`o1`, `o3`, `o4-mini`, `gpt-5`, `codex-*`): litellm knows which parameters
  they refuse (a temperature other than 1, ...), so they stay on litellm;
- every other provider (`anthropic/...`, `gemini/...`, `ollama/...`, `azure/...`) stays on litellm;
- CONVSIM_LLM_TRANSPORT=litellm sends every model through litellm (the way out if an endpoint needs litellm's
  adaptations); the default, `auto`, is the rule above.

Where requests go and with which key, as litellm does for `openai/`: the api_base, else OPENAI_BASE_URL or
OPENAI_API_BASE, else https://api.openai.com/v1; the api_key (CONVSIM_API_KEY), else OPENAI_API_KEY; none sends no
Authorization header (a local server). OPENAI_ORGANIZATION goes as OpenAI-Organization.

One client per backend (an `http1.Origin`; an `httpx.AsyncClient` when an HTTP(S)_PROXY applies to the endpoint,
as http1 speaks no proxy protocol), keeping up to `settings.max_concurrency` connections alive. That is the run's
concurrency, which the backend's limiter also holds the calls in flight to, so a run of 2,000 conversations has
2,000 connections and never waits for one. It is made when the run starts (`prepare`) or on the first call, and
made again if the backend is used from another event loop. No streaming: a structured reply is parsed whole.

Cost: for a model in litellm's cost map (read from the map's JSON file, without importing litellm; once per model
and process, off the event loop), computed from the reply's usage (cached prompt tokens at the cache-read price);
any other model's cost is unknown (`Usage.cost_unknown_calls`), as through litellm.

Errors are raised as the OpenAI SDK names them (AuthenticationError, RateLimitError, APITimeoutError, ...), with the
server's error message redacted, so chat._classify gives them the kinds it gives litellm's; the response is kept on
the error for its Retry-After header.
"""

from __future__ import annotations

import importlib.util
import json
import re
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel

from .. import secrets
from ..models import Usage
from ..settings import env_str
from . import http1
from .base import LLMSettings, log
from .chat import ChatBackend

DEFAULT_API_BASE = "https://api.openai.com/v1"
CHAT_PATH = "/chat/completions"
USER_AGENT = "convsim-mcp"

TRANSPORTS = ("auto", "litellm")  # CONVSIM_LLM_TRANSPORT

# OpenAI's reasoning models: litellm maps the parameters they refuse, so they stay on litellm.
_REASONING_MODEL = re.compile(r"(?i)(?:o\d+(?:$|[-.])|gpt-5|codex)")


def takes_direct_path(settings: LLMSettings, transport: str = "auto") -> bool:
    """Whether `settings.model` goes through OpenAIHTTPBackend rather than litellm (see the module docstring)."""
    provider, _, name = settings.model.partition("/")
    return transport == "auto" and provider.lower() == "openai" and bool(name) and not _REASONING_MODEL.match(name)


class OpenAIHTTPBackend(ChatBackend):
    """An OpenAI-compatible chat-completions endpoint over HTTP; strict JSON output, with chat.py's retries."""

    def __init__(self, settings: LLMSettings):
        super().__init__(settings)
        self._wire_model = settings.model.partition("/")[2]
        self._base = (settings.api_base or env_str("OPENAI_BASE_URL") or env_str("OPENAI_API_BASE")
                      or DEFAULT_API_BASE).rstrip("/")
        key = settings.api_key or env_str("OPENAI_API_KEY")
        secrets.register(key)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": USER_AGENT}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        organization = env_str("OPENAI_ORGANIZATION")
        if organization:
            self._headers["OpenAI-Organization"] = organization
        self._client: Any = None  # an http1.Origin (or _ProxiedOrigin), made by prepare() or the first call
        self._client_loop: Any = None  # the event loop its connections belong to

    def _sent_key(self) -> str:
        return self.settings.api_key or env_str("OPENAI_API_KEY") or ""

    async def prepare(self) -> None:
        """Make the client (TLS context, proxy lookup) and read the model's price, off the event loop, before the
        run's first turn."""
        if self.settings.model not in _prices:
            await anyio.to_thread.run_sync(price_of, self.settings.model)
        loop = anyio.lowlevel.current_token()
        if self._client is None or self._client_loop != loop:  # a second job on this backend keeps its pool
            client = await anyio.to_thread.run_sync(self._new_client)
            if self._client is None or self._client_loop != loop:
                self._client, self._client_loop = client, loop

    async def aclose(self) -> None:
        """Close the pooled connections (the backend makes a new client if it is used again)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        await super().aclose()

    def _new_client(self) -> Any:
        n, timeout = self.settings.max_concurrency, self.settings.timeout_s
        if proxy_for(self._base):
            return _ProxiedOrigin(self._base, headers=self._headers, timeout_s=timeout, max_connections=n)
        return http1.Origin(self._base, headers=self._headers, timeout_s=timeout, max_idle=n)

    def _payload(self, messages: list[dict[str, Any]], response_format: dict[str, Any] | None) -> bytes:
        s = self.settings
        body: dict[str, Any] = {"model": self._wire_model, "messages": messages}
        if response_format is not None:
            body["response_format"] = response_format
        if s.temperature is not None:
            body["temperature"] = s.temperature
        if s.seed is not None:
            body["seed"] = s.seed
        return json.dumps(body, separators=(",", ":")).encode()

    async def _send(self, payload: bytes) -> tuple[str | None, Usage]:
        loop = anyio.lowlevel.current_token()
        if self._client is None or self._client_loop != loop:  # pooled connections belong to one event loop
            self._client, self._client_loop = self._new_client(), loop
        try:
            resp = await self._client.post(CHAT_PATH, payload)
        except TimeoutError as e:
            raise APITimeoutError(f"request timed out after {self.settings.timeout_s:g}s") from e
        except (OSError, http1.ProtocolError) as e:
            raise APIConnectionError(f"connection error: {type(e).__name__}: {e}") from e
        if resp.status_code >= 400:
            raise _status_error(resp)
        try:
            data = json.loads(resp.content)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise APIResponseError(f"HTTP {resp.status_code} with a body that is not a chat completion: "
                                   f"{resp.text[:200]!r}", response=resp)
        if self.settings.model not in _prices:  # no prepare(): read the price off the loop, once
            await anyio.to_thread.run_sync(price_of, self.settings.model)
        usage = self._usage(data)
        try:
            text = data["choices"][0]["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            return None, usage
        return (text if isinstance(text, str) else "" if text is None else json.dumps(text)), usage

    def _usage(self, data: dict[str, Any]) -> Usage:
        u = data.get("usage")
        u = u if isinstance(u, dict) else {}
        prompt, completion = _count(u.get("prompt_tokens")), _count(u.get("completion_tokens"))
        details = u.get("prompt_tokens_details")
        cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
        price = _prices.get(self.settings.model) or price_of(self.settings.model)
        if price is None:
            return Usage(calls=1, prompt_tokens=prompt, completion_tokens=completion, cost_unknown_calls=1)
        cost = ((prompt - min(cached, prompt)) * price[0] + min(cached, prompt) * price[1] + completion * price[2])
        return Usage(calls=1, prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


# --- errors, named as the OpenAI SDK names them (chat._classify reads the names and status codes) -----------------

class APIError(Exception):
    """Raised by OpenAIHTTPBackend._send; its message is redacted when it is made."""

    def __init__(self, message: str, *, response: Any = None, status_code: int | None = None):
        self.message = secrets.redact(message)
        super().__init__(self.message)
        self.response = response  # the httpx.Response, for Retry-After
        self.status_code = status_code


class APITimeoutError(APIError):
    """Raised when the server did not answer within the timeout."""


class APIConnectionError(APIError):
    """Raised when the server could not be reached or dropped the connection."""


class APIResponseError(APIError):
    """Raised when a successful status came with a body that is not a chat completion."""


class APIStatusError(APIError):
    """Raised when the server answered with an error status."""


class BadRequestError(APIStatusError): ...
class AuthenticationError(APIStatusError): ...
class PermissionDeniedError(APIStatusError): ...
class NotFoundError(APIStatusError): ...
class UnprocessableEntityError(APIStatusError): ...
class RateLimitError(APIStatusError): ...
class InternalServerError(APIStatusError): ...


_STATUS_ERRORS = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
                  422: UnprocessableEntityError, 429: RateLimitError}


def _status_error(resp: Any) -> APIStatusError:
    status = resp.status_code
    cls = _STATUS_ERRORS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    detail = ""
    try:
        body = json.loads(resp.content)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            detail = str(error.get("message") or "")
            code = error.get("code")
            if isinstance(code, str) and code and code not in detail:
                detail = f"{detail} ({code})" if detail else code
        elif isinstance(error, str):
            detail = error
        elif isinstance(body, dict) and isinstance(body.get("detail") or body.get("message"), str):
            detail = body.get("detail") or body.get("message")
    except ValueError:
        pass
    if not detail:
        detail = resp.text[:500].strip() or (resp.reason_phrase or "")
    return cls(f"HTTP {status}: {detail}", response=resp, status_code=status)


# --- proxies ------------------------------------------------------------------------------------------------------

def proxy_for(base_url: str) -> str | None:
    """The HTTP(S)_PROXY / ALL_PROXY that applies to `base_url` (NO_PROXY honoured), as httpx reads them, or None."""
    url = urlsplit(base_url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(url.hostname or "", proxies):
        return None
    return proxy


class _ProxiedOrigin:
    """http1.Origin's interface over httpx, for an endpoint reached through a proxy (which http1 does not speak)."""

    def __init__(self, base_url: str, *, headers: dict[str, str], timeout_s: float, max_connections: int):
        import httpx

        self._base = base_url
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s), follow_redirects=False,
                                         limits=httpx.Limits(max_connections=max_connections,
                                                             max_keepalive_connections=max_connections))

    async def post(self, path: str, body: bytes) -> Any:
        import httpx

        try:
            return await self._client.post(self._base + path, content=body)
        except httpx.TimeoutException as e:
            raise TimeoutError(str(e)) from e
        except httpx.TransportError as e:
            raise http1.ProtocolError(f"{type(e).__name__}: {e}") from e

    async def aclose(self) -> None:
        await self._client.aclose()


# --- prices -------------------------------------------------------------------------------------------------------

_prices: dict[str, tuple[float, float, float] | None] = {}  # model -> (input, cached input, output) USD per token
_PRICED_PROVIDERS = frozenset({"openai", "text-completion-openai"})


def price_of(model: str) -> tuple[float, float, float] | None:
    """(input, cached input, output) USD per token of `model` (`openai/<name>`) in litellm's cost map, or None when
    the map does not know it. Read once per model and process; blocking (a few MB of JSON): call it off the loop."""
    if model in _prices:
        return _prices[model]
    price = None
    path = _cost_map_path()
    name = model.partition("/")[2]
    if path is not None:
        try:
            with open(path, "rb") as f:
                cost_map = json.load(f)
        except (OSError, ValueError) as e:
            log.warning("could not read litellm's cost map (%s): cost of %s unknown", e, model)
            cost_map = {}
        for key in (model, name):
            entry = cost_map.get(key)
            if isinstance(entry, dict) and entry.get("litellm_provider") in _PRICED_PROVIDERS:
                try:
                    given = float(entry["input_cost_per_token"])
                    output = float(entry["output_cost_per_token"])
                    cached = float(entry.get("cache_read_input_token_cost") or given)
                except (KeyError, TypeError, ValueError):
                    continue
                price = (given, cached, output)
                break
        del cost_map
    _prices[model] = price
    return price


def _cost_map_path() -> Path | None:
    """litellm's bundled cost map, found without importing litellm (which costs seconds)."""
    try:
        spec = importlib.util.find_spec("litellm")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "model_prices_and_context_window_backup.json"
        if path.is_file():
            return path
    return None


def transport_setting() -> str:
    """CONVSIM_LLM_TRANSPORT, checked: 'auto' (the default) or 'litellm'."""
    from ..errors import InvalidOption

    value = (env_str("CONVSIM_LLM_TRANSPORT") or "auto").strip().lower()
    if value not in TRANSPORTS:
        raise InvalidOption(f"environment variable CONVSIM_LLM_TRANSPORT must be one of {', '.join(TRANSPORTS)}, "
                            f"got {value[:40]!r}")
    return value


__all__ = ["OpenAIHTTPBackend", "price_of", "takes_direct_path", "transport_setting"]
