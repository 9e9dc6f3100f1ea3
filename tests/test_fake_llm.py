"""Checks that the HTTP fake LLMs (threaded and asyncio) behave like an OpenAI endpoint over a real socket."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

try:  # works whether or not tests/ is a package
    from tests.fake_llm import AsyncFakeLLMServer, FakeLLMServer, FakeReply, example_for_schema, last_user_text
except ImportError:  # pragma: no cover - depends on pytest rootdir/import mode
    from fake_llm import AsyncFakeLLMServer, FakeLLMServer, FakeReply, example_for_schema, last_user_text


SCHEMA = {
    "$defs": {
        "Mood": {"enum": ["calm", "angry"], "type": "string"},
        "Turn": {
            "type": "object",
            "properties": {
                "text": {"type": "string", "minLength": 12},
                "mood": {"$ref": "#/$defs/Mood"},
                "note": {"anyOf": [{"type": "null"}, {"type": "string"}]},
                "optional": {"type": "integer"},
            },
            "required": ["text", "mood", "note"],
            "additionalProperties": False,
        },
    },
    "type": "object",
    "properties": {
        "turn": {"$ref": "#/$defs/Turn"},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "done": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    },
    "required": ["turn", "score", "done", "tags"],
}


@pytest.fixture(params=[FakeLLMServer, AsyncFakeLLMServer], ids=["threaded", "asyncio"])
def fake(request) -> Iterator[FakeLLMServer]:
    """Both servers answer alike: the threaded one the tests use, the lean asyncio one the benchmark uses."""
    with request.param() as server:
        yield server


def _chat(url: str, body: dict, timeout: float = 5.0, client: httpx.Client | None = None) -> httpx.Response:
    payload = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **body}
    if client is not None:
        return client.post(f"{url}/chat/completions", json=payload, timeout=timeout)
    return httpx.post(f"{url}/chat/completions", json=payload, timeout=timeout)


def test_default_answer_is_schema_valid(fake: FakeLLMServer) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "Out", "schema": SCHEMA, "strict": True}}
    resp = _chat(fake.url, {"response_format": fmt, "model": "m-echo"})
    assert resp.status_code == 200
    data = resp.json()
    assert data["object"] == "chat.completion" and data["model"] == "m-echo"
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    out = json.loads(choice["message"]["content"])
    assert out == {
        "turn": {"text": "fake textxxx", "mood": "calm", "note": "fake text"},
        "score": 1,
        "done": False,
        "tags": ["fake text"],
    }
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] >= 2
    assert _chat(fake.url, {"response_format": {"type": "json_object"}}).json()["choices"][0]["message"]["content"] == "{}"
    assert _chat(fake.url, {}).json()["choices"][0]["message"]["content"] == "fake reply"


def test_example_for_schema_without_required_lists_all_properties() -> None:
    schema = {"properties": {"a": {"const": 7}, "b": {"type": "number", "exclusiveMinimum": 2}}}
    assert example_for_schema(schema) == {"a": 7, "b": 3}


def test_queue_is_fifo_then_handler(fake: FakeLLMServer) -> None:
    fake.set_handler(lambda req: f"echo: {last_user_text(req)}")
    fake.queue("first", {"k": 1}, FakeReply(tool_calls=[{"function": {"name": "f", "arguments": {"x": 1}}}]))
    with httpx.Client() as client:  # one keep-alive connection for all four calls
        contents = [_chat(fake.url, {}, client=client).json()["choices"][0] for _ in range(4)]
    assert [c["message"]["content"] for c in contents] == ["first", '{"k": 1}', None, "echo: hi"]
    assert contents[2]["finish_reason"] == "tool_calls"
    call = contents[2]["message"]["tool_calls"][0]
    assert call["type"] == "function" and json.loads(call["function"]["arguments"]) == {"x": 1}


def test_rate_limit_error_carries_header_and_body(fake: FakeLLMServer) -> None:
    fake.queue(FakeReply(status=429, content="slow down", headers={"Retry-After": "0"}))
    resp = _chat(fake.url, {})
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "0"
    assert resp.json()["error"] == {
        "message": "slow down", "type": "rate_limit_error", "code": "rate_limit_exceeded", "param": None
    }
    assert _chat(fake.url, {}).status_code == 200


def test_delay_triggers_client_timeout_and_server_survives(fake: FakeLLMServer) -> None:
    fake.queue(FakeReply(content="late", delay_s=0.5))
    with pytest.raises(httpx.ReadTimeout):
        _chat(fake.url, {}, timeout=0.2)
    assert _chat(fake.url, {}).json()["choices"][0]["message"]["content"] == "fake reply"


def test_stream_returns_sse_chunks(fake: FakeLLMServer) -> None:
    fake.queue("streamed text")
    resp = _chat(fake.url, {"stream": True})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in resp.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "streamed text"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["total_tokens"] > 0


def test_requests_are_recorded_and_unknown_paths_404(fake: FakeLLMServer) -> None:
    _chat(fake.url, {"temperature": 0.3})
    _chat(fake.url.removesuffix("/v1"), {"n": 1})  # litellm may post without the /v1 prefix
    assert fake.calls == 2
    assert fake.requests[0]["temperature"] == 0.3 and fake.requests[1]["n"] == 1
    assert httpx.get(f"{fake.url}/models").json()["object"] == "list"
    missing = httpx.post(f"{fake.url}/nope", json={})
    assert missing.status_code == 404 and "error" in missing.json()
    assert fake.calls == 2


def test_context_length_error_looks_like_openais(fake: FakeLLMServer) -> None:
    fake.queue(FakeReply.context_length_exceeded(limit=8192, tokens=9000))
    resp = _chat(fake.url, {})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "context_length_exceeded",
                                                             "messages")
    assert error["message"].startswith("This model's maximum context length is 8192 tokens.")


@pytest.mark.anyio
async def test_the_asyncio_fake_starts_from_inside_a_running_event_loop() -> None:
    """The benchmark starts it in-process, under anyio.run: its loop lives in its own thread."""
    with AsyncFakeLLMServer() as server:
        async with httpx.AsyncClient() as client:
            resp = await client.post(f"{server.url}/chat/completions",
                                     json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.json()["choices"][0]["message"]["content"] == "fake reply"


def test_stopping_with_a_reply_pending_closes_the_client_s_connection(fake: FakeLLMServer) -> None:
    """The client sees its connection end at stop (not a read timeout): both servers."""
    import threading

    fake.queue(FakeReply(content="never sent", delay_s=30))
    threading.Timer(0.3, fake.stop).start()
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        _chat(fake.url, {}, timeout=20)
