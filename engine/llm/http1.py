"""A small HTTP/1.1 client for one origin: POST a body, read the whole reply, keep connections alive.

Why not httpx here: on the benchmark machine httpx's client and httpcore's pool cost about 2.3 ms of CPU per
request (request building, auth and redirect layers, cookie extraction, a scan of every pooled connection with a
socket poll each on every request), as much as the rest of the engine's turn twice over. This client does what the
model path needs and no more, over asyncio streams:
- `POST path` with fixed headers and a JSON body; replies framed by Content-Length, chunked, or read to the close;
- a pool of idle keep-alive connections (last used first, at most `max_idle`); a connection that was closed by the
  server while idle is noticed and the request sent once more on a new one, if nothing of a reply was read;
- TLS through `ssl` (system CAs, plus certifi's when it is installed, as httpx does); a deadline per request;
- `Accept-Encoding: identity`, and a gzip or deflate body decoded all the same.

Proxies are not its business: openai_http sends requests to an origin that an HTTP(S)_PROXY applies to through
httpx instead. Errors: `OSError` (cannot connect, reset), `TimeoutError` (the deadline), `ProtocolError` (a reply
that is not HTTP/1.1 as it should be).
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024  # status line and headers of a reply
MAX_BODY_BYTES = 64 * 1024 * 1024
CLOSE_WAIT_S = 2.0  # aclose waits this long for closed connections to be let go, then aborts them


class ProtocolError(Exception):
    """Raised when the server's reply is not well-formed HTTP/1.1, or the connection closed in the middle of it."""


@dataclass
class Response:
    status_code: int
    reason_phrase: str
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class Origin:
    """Keep-alive connections to the scheme, host and port of `base_url`; `post(path, body)` sends one request."""

    def __init__(self, base_url: str, *, headers: dict[str, str], timeout_s: float, max_idle: int,
                 ssl_context: ssl.SSLContext | None = None):
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.tls = url.scheme == "https"
        self.host = url.hostname
        self.port = url.port or (443 if self.tls else 80)
        self.base_path = url.path.rstrip("/")
        self.query = f"?{url.query}" if url.query else ""
        host_header = self.host if ":" not in self.host else f"[{self.host}]"
        if url.port and url.port != (443 if self.tls else 80):
            host_header = f"{host_header}:{url.port}"
        fixed = {"Host": host_header, "Accept-Encoding": "identity", **headers}
        self._head = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self.timeout_s = timeout_s
        self.max_idle = max_idle
        self._ssl = (ssl_context or default_ssl_context()) if self.tls else None
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> Response:
        """POST `body` to the base URL's path + `path`. Raises OSError, TimeoutError or ProtocolError."""
        request = (f"POST {self.base_path}{path}{self.query} HTTP/1.1\r\n".encode("latin-1") + self._head
                   + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        async with asyncio.timeout(self.timeout_s):  # asyncio's: half the cost of anyio.fail_after; no shield inside
            while self._idle:
                conn = self._idle.pop()
                if conn[1].is_closing() or conn[0].at_eof():
                    conn[1].close()
                    continue
                try:
                    return await self._exchange(conn, request)
                except _Stale:  # closed by the server while idle: send it on a new connection
                    continue
            return await self._exchange(await self._connect(), request, fresh=True)

    async def aclose(self) -> None:
        """Close the idle connections and wait until the loop has let go of them (no transport left half-closed)."""
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        try:
            async with asyncio.timeout(CLOSE_WAIT_S):  # a TLS peer that vanished never answers the close
                for _, writer in idle:
                    try:
                        await writer.wait_closed()
                    except OSError:  # reset by the server meanwhile: closed all the same
                        pass
        except TimeoutError:
            for _, writer in idle:
                writer.transport.abort()

    def __del__(self) -> None:
        for _, writer in self._idle:
            try:
                writer.close()
            except Exception:  # the event loop is gone already
                pass

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port, ssl=self._ssl,
                                             server_hostname=self.host if self.tls else None, limit=MAX_HEAD_BYTES)

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes, *,
                        fresh: bool = False) -> Response:
        reader, writer = conn
        started = False
        try:
            writer.write(request)
            await writer.drain()
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as e:
                    if not e.partial and not fresh:
                        raise _Stale() from e
                    raise ProtocolError("the server closed the connection before its reply was complete") from e
                except asyncio.LimitOverrunError as e:
                    raise ProtocolError(f"reply headers longer than {MAX_HEAD_BYTES} bytes") from e
                started = True
                status, reason, version, headers = _parse_head(head)
                if status >= 200 or status == 101:
                    break  # 1xx interim replies are skipped
            body, framed = await _read_body(reader, status, headers)
        except (ConnectionResetError, BrokenPipeError) as e:
            writer.close()
            if not started and not fresh:
                raise _Stale() from e
            raise
        except BaseException:
            writer.close()  # cancelled, timed out or broken in the middle: the connection cannot be reused
            raise
        if framed and version == "HTTP/1.1" and headers.get("connection", "").lower() != "close" \
                and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            writer.close()
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding in ("gzip", "x-gzip", "deflate"):  # asked for identity, but a server may compress anyway
            try:
                body = zlib.decompress(body, 47 if "gzip" in encoding else 15)
            except zlib.error as e:
                raise ProtocolError(f"reply body is not valid {encoding}: {e}") from e
        return Response(status, reason, headers, body)


class _Stale(Exception):
    """A kept-alive connection turned out closed before any of the reply came: the request goes on a new one."""


def _parse_head(head: bytes) -> tuple[int, str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolError(f"malformed reply header: {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), parts[2] if len(parts) > 2 else "", parts[0], headers


async def _read_body(reader: asyncio.StreamReader, status: int, headers: dict[str, str]) -> tuple[bytes, bool]:
    """The reply's body, and whether it was framed (so the connection can carry another request)."""
    if status in (204, 304) or 100 <= status < 200:
        return b"", True
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        size_total = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as e:
                raise ProtocolError(f"malformed chunk size: {line[:40]!r}") from e
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks), True
            size_total += size
            if size_total > MAX_BODY_BYTES:
                raise ProtocolError(f"reply body longer than {MAX_BODY_BYTES} bytes")
            chunks.append((await reader.readexactly(size + 2))[:-2])
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            raise ProtocolError(f"bad Content-Length: {length[:40]!r}")
        try:
            return await reader.readexactly(int(length)), True
        except asyncio.IncompleteReadError as e:
            raise ProtocolError("the server closed the connection before its reply was complete") from e
    chunks, total = [], 0  # no framing: the body runs to the close
    while chunk := await reader.read(65536):
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise ProtocolError(f"reply body longer than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks), False


_ssl_context: ssl.SSLContext | None = None


def default_ssl_context() -> ssl.SSLContext:
    """The system's CAs (SSL_CERT_FILE / SSL_CERT_DIR honoured), plus certifi's when installed; made once."""
    global _ssl_context
    if _ssl_context is None:
        context = ssl.create_default_context()
        try:
            import certifi

            context.load_verify_locations(certifi.where())
        except (ImportError, OSError):
            pass
        _ssl_context = context
    return _ssl_context
