"""The Acme Outfitters support agent (examples/support_agent.py) served over HTTP.

Standard library only. It has the same planted flaws as the Python agent
(forgets the user's name from the 3rd user message on, crashes on gift-card
refunds, refuses cancellations); a crash becomes an HTTP 500.

Routes
    POST /v1/chat/completions   OpenAI-compatible and stateless: body {"model", "messages"};
                                replies with a chat.completion object. Agent crash -> 500
                                {"error": {"message": ..., "type": "server_error"}}.
    POST /chat                  stateful JSON agent: body {"message": str, "session_id": str,
                                "context": {...}}; the server keeps each session's history.
                                Replies {"reply": {"text": ...}, "session_id": ...}.
                                Missing/empty message -> 400, agent crash -> 500, both {"error": "..."}.
    GET  /health                {"ok": true}

If a token is set (--token or $AGENT_TOKEN), every POST must carry
`Authorization: Bearer <token>`, else 401.

Run it:
    python examples/http_agent.py --port 8765 [--token SECRET]

or from Python (tests):
    server, base_url = start_server(0)      # daemon thread, random free port
    ...
    stop_server(server)
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

if __package__:  # imported as examples.http_agent (or python -m examples.http_agent)
    from .support_agent import stateful_reply, support_agent
else:  # run as a script, or loaded from its file path
    _HERE = os.path.dirname(os.path.abspath(__file__))
    if _HERE not in sys.path:
        sys.path.insert(0, _HERE)
    from support_agent import stateful_reply, support_agent  # type: ignore[no-redef]

MAX_BODY_BYTES = 1_000_000
DEFAULT_MODEL = "acme-support-agent"


class AgentServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the bearer token and the /chat sessions."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], token: str | None = None, log_errors: bool = False):
        self.token = token or None
        self.log_errors = log_errors
        self.sessions: dict[str, dict[str, Any]] = {}
        self.sessions_lock = threading.Lock()
        super().__init__(address, _Handler)


class _AgentServer6(AgentServer):
    address_family = socket.AF_INET6


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in separate writes: no delayed-ACK stall
    server_version = "AcmeSupportAgent/1.0"
    server: AgentServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the access log
        pass

    # ------------------------------------------------------------------ plumbing

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(65537)
                try:
                    size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                except ValueError:
                    self.close_connection = True
                    raise _BadRequest(400, "malformed chunked body") from None
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    self.close_connection = True
                    raise _BadRequest(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise _BadRequest(400, "invalid Content-Length") from None
        if length < 0:
            self.close_connection = True
            raise _BadRequest(400, "invalid Content-Length")
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise _BadRequest(413, "request body too large")
        return self.rfile.read(length) if length else b""

    def _authorized(self) -> bool:
        token = self.server.token
        if not token:
            return True
        header = self.headers.get("Authorization") or ""
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())

    def _log_exception(self) -> None:
        if self.server.log_errors:
            traceback.print_exc(file=sys.stderr)

    # ------------------------------------------------------------------ routes

    def do_GET(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path.rstrip("/") or "/"
        if path == "/health":
            self._send_json(200, {"ok": True})
        else:
            self._send_json(404, {"error": f"no route GET {path}; try GET /health"})

    def do_POST(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path.rstrip("/") or "/"
        openai_style = path == "/v1/chat/completions"
        try:
            raw = self._read_body()  # always consume the body, so keep-alive stays in sync
            if path not in ("/v1/chat/completions", "/chat"):
                raise _BadRequest(404, f"no route POST {path}; use /v1/chat/completions or /chat")
            if not self._authorized():
                raise _BadRequest(401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')")
            try:
                body = json.loads(raw.decode("utf-8")) if raw else None
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise _BadRequest(400, f"request body is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise _BadRequest(400, "request body must be a JSON object")
        except _BadRequest as exc:
            self._send_error(exc.status, str(exc), openai_style)
            return
        if openai_style:
            self._chat_completions(body)
        else:
            self._chat(body)

    def _send_error(self, status: int, message: str, openai_style: bool) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        if self.close_connection:
            headers["Connection"] = "close"
        if openai_style:
            kind = {401: "authentication_error", 404: "not_found_error"}.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            )
            payload: Any = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        else:
            payload = {"error": message}
        self._send_json(status, payload, headers)

    def _chat_completions(self, body: dict[str, Any]) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            self._send_error(400, "'messages' must be a list of {role, content} objects", True)
            return
        try:
            reply = support_agent(messages)
        except Exception as exc:  # the agent's own bugs become HTTP 500
            self._log_exception()
            self._send_error(500, f"agent error: {type(exc).__name__}: {exc}", True)
            return
        model = body.get("model") if isinstance(body.get("model"), str) and body.get("model") else DEFAULT_MODEL
        self._send_json(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            },
        )

    def _chat(self, body: dict[str, Any]) -> None:
        message = body.get("message")
        if not isinstance(message, str) or not message.strip():
            self._send_error(400, "'message' is required and must be a non-empty string", False)
            return
        session_id = body.get("session_id")
        if session_id is None or session_id == "":
            session_id = f"sess-{uuid.uuid4().hex[:12]}"
        elif not isinstance(session_id, (str, int)):
            self._send_error(400, "'session_id' must be a string", False)
            return
        session_id = str(session_id)
        context = body.get("context")
        if context is None:
            context = {}
        elif not isinstance(context, dict):
            self._send_error(400, "'context' must be a JSON object", False)
            return

        with self.server.sessions_lock:
            state = self.server.sessions.get(session_id)
            if state is None:
                state = {"session_id": session_id, "messages": [], "lock": threading.Lock()}
                self.server.sessions[session_id] = state
        try:
            with state["lock"]:  # one turn at a time per session
                reply = stateful_reply(state, message, **context)
        except Exception as exc:
            self._log_exception()
            self._send_error(500, f"agent error: {type(exc).__name__}: {exc}", False)
            return
        self._send_json(200, {"reply": {"text": reply}, "session_id": session_id})


def _make_server(host: str, port: int, token: str | None, log_errors: bool = False) -> AgentServer:
    cls = _AgentServer6 if ":" in host else AgentServer
    return cls((host, port), token=token, log_errors=log_errors)


def _base_url(server: AgentServer, host: str) -> str:
    port = server.server_address[1]
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def start_server(port: int = 0, token: str | None = None, host: str = "127.0.0.1") -> tuple[ThreadingHTTPServer, str]:
    """Serve the agent in a daemon thread. Returns (server, base_url), e.g. "http://127.0.0.1:54321".

    Port 0 picks a free port. Stop it with `stop_server(server)`.
    """
    server = _make_server(host, port, token)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="acme-support-agent", daemon=True
    )
    thread.start()
    return server, _base_url(server, host)


def stop_server(server: ThreadingHTTPServer) -> None:
    """Stop a server started by `start_server` and release its port."""
    server.shutdown()
    server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Acme Outfitters example support agent over HTTP.")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765; 0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument(
        "--token",
        default=os.environ.get("AGENT_TOKEN") or None,
        help="require 'Authorization: Bearer TOKEN' on every POST (default: $AGENT_TOKEN, else no auth)",
    )
    args = parser.parse_args(argv)
    server = _make_server(args.host, args.port, args.token, log_errors=True)
    url = _base_url(server, args.host)
    auth = " (bearer token required)" if args.token else ""
    print(
        f"Acme support agent listening on {url}{auth}\n"
        f"  OpenAI-compatible: POST {url}/v1/chat/completions\n"
        f"  JSON (stateful):   POST {url}/chat\n"
        f"  health:            GET  {url}/health",
        file=sys.stderr,
        flush=True,
    )
    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)  # stop cleanly on `kill PID` as on Ctrl-C
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
