"""The direct OpenAI-compatible transport: which models take it, what it sends, its pool, its HTTP client."""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import threading

import anyio
import pytest
from pydantic import BaseModel

from engine import InvalidOption, LLMError, OfflineBackend, Role, UserTurn, parse_scorers, resolve_llm, simulate
from engine.llm import http1
from engine.llm.base import LLMSettings, strict_schema
from engine.llm.litellm_backend import LiteLLMBackend
from engine.llm.openai_http import OpenAIHTTPBackend, _ProxiedOrigin, proxy_for
from engine.pipeline.scoring import score_sessions
from tests.conftest import ROOT
from tests.fake_llm import FakeReply

MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


def turn(message: str) -> dict:
    return {"message": message, "goal_achieved": False, "end_conversation": False, "reason": "r"}


def direct(fake, model="openai/fake-user", **settings) -> OpenAIHTTPBackend:
    settings = {"max_retries": 0, "timeout_s": 10, **settings}
    return OpenAIHTTPBackend(LLMSettings(model=model, api_base=fake.url, api_key="k-direct-1", **settings))


# --- which models take the direct path -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "model, expected",
    [
        pytest.param("openai/gpt-4o-mini", OpenAIHTTPBackend, id="openai"),
        pytest.param("openai:/gpt-4o-mini", OpenAIHTTPBackend, id="mlflow-spelling"),
        pytest.param("openai/meta-llama/Llama-3.1-8B-Instruct", OpenAIHTTPBackend, id="local-server-model"),
        pytest.param("openai/o3-mini", LiteLLMBackend, id="reasoning-model"),
        pytest.param("openai/gpt-5-mini", LiteLLMBackend, id="gpt-5"),
        pytest.param("anthropic/claude-3-5-haiku-latest", LiteLLMBackend, id="other-provider"),
        pytest.param("ollama/llama3.1", LiteLLMBackend, id="ollama-native"),
    ],
)
def test_openai_models_take_the_direct_path_and_the_rest_litellm(monkeypatch, model, expected):
    monkeypatch.setenv("CONVSIM_PROVIDERS", "openai,anthropic,ollama")
    assert type(resolve_llm(model, api_base="http://127.0.0.1:9/v1")) is expected
    assert type(resolve_llm(model)) is expected


def test_the_transport_setting_sends_everything_through_litellm_or_is_refused(monkeypatch):
    monkeypatch.setenv("CONVSIM_PROVIDERS", "openai")
    monkeypatch.setenv("CONVSIM_LLM_TRANSPORT", "litellm")
    assert type(resolve_llm("openai/gpt-4o-mini")) is LiteLLMBackend
    monkeypatch.setenv("CONVSIM_LLM_TRANSPORT", "fastest")
    with pytest.raises(InvalidOption, match="CONVSIM_LLM_TRANSPORT"):
        resolve_llm("openai/gpt-4o-mini")


def test_the_api_base_and_key_follow_litellm_s_rules_for_openai(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-key-000000")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    llm = OpenAIHTTPBackend(LLMSettings(model="openai/gpt-4o-mini"))
    assert (llm._base, llm._headers["Authorization"]) == ("http://127.0.0.1:9/v1", "Bearer sk-env-key-000000")
    llm = OpenAIHTTPBackend(LLMSettings(model="openai/x", api_base="http://127.0.0.1:8/v1", api_key="given-key-1"))
    assert (llm._base, llm._headers["Authorization"]) == ("http://127.0.0.1:8/v1", "Bearer given-key-1")
    monkeypatch.delenv("OPENAI_API_KEY")
    assert "Authorization" not in OpenAIHTTPBackend(LLMSettings(model="openai/x", api_base="http://h/v1"))._headers


# --- what it sends ---------------------------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_both_transports_send_the_same_request(fake_llm):
    verdict = strict_schema(parse_scorers(["goal_achievement"])[0].output.verdict_model())
    fake_llm.set_handler(None)
    for schema in (UserTurn, verdict):
        await direct(fake_llm, temperature=0.5, seed=7).complete(MESSAGES, schema, role=Role.USER)
        await LiteLLMBackend(LLMSettings(model="openai/fake-user", api_base=fake_llm.url, api_key="k-direct-1",
                                         max_retries=0, temperature=0.5, seed=7)).complete(MESSAGES, schema,
                                                                                           role=Role.USER)
    for ours, theirs in (fake_llm.requests[0:2], fake_llm.requests[2:4]):
        assert ours["response_format"] == theirs["response_format"]
        assert {k: ours[k] for k in ("model", "messages", "temperature", "seed")} == \
               {k: theirs[k] for k in ("model", "messages", "temperature", "seed")}
        assert not ours.get("stream")  # a structured reply is read whole: no streaming


@pytest.mark.anyio
@pytest.mark.parametrize("make", [direct, lambda fake: LiteLLMBackend(LLMSettings(
    model="openai/fake-user", api_base=fake.url, api_key="k", max_retries=0))], ids=["direct", "litellm"])
async def test_each_schema_s_json_is_computed_once(fake_llm, monkeypatch, make):
    class Fresh(BaseModel):  # a class of its own: no schema cached for it yet
        message: str

    wire = strict_schema(Fresh)
    calls = []
    original = wire.model_json_schema.__func__

    def counting(cls, *args, **kwargs):
        calls.append(1)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(wire, "model_json_schema", classmethod(counting))
    fake_llm.set_handler(lambda req: {"message": "hi"})
    llm = make(fake_llm)
    for _ in range(4):
        assert (await llm.complete(MESSAGES, Fresh, role=Role.USER)).output.message == "hi"
    assert len(calls) == 1 and fake_llm.calls == 4


@pytest.mark.anyio
async def test_cost_is_litellm_s_for_a_priced_model(fake_llm):
    fake_llm.set_handler(lambda req: FakeReply(content=turn("m"), prompt_tokens=1000, completion_tokens=100))
    ours = await direct(fake_llm, model="openai/gpt-4o-mini").complete(MESSAGES, UserTurn, role=Role.USER)
    theirs = await LiteLLMBackend(LLMSettings(model="openai/gpt-4o-mini", api_base=fake_llm.url, api_key="k",
                                              max_retries=0)).complete(MESSAGES, UserTurn, role=Role.USER)
    assert ours.usage.cost_usd == pytest.approx(theirs.usage.cost_usd) and ours.usage.cost_usd > 0
    assert (ours.usage.prompt_tokens, ours.usage.completion_tokens) == (1000, 100)


# --- the pool ----------------------------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_as_many_requests_are_in_flight_as_the_run_s_concurrency(fake_llm):
    n = 150  # above httpx's default pool of 100 connections
    everyone_arrived = threading.Barrier(n, timeout=60)

    def handle(request):
        everyone_arrived.wait()  # raises (a 500 for that request) unless all n are at the fake at once
        return turn("together")

    llm = direct(fake_llm, max_concurrency=n, timeout_s=90)
    await llm.prepare()
    await llm.complete(MESSAGES, UserTurn, role=Role.USER)  # the first answer lifts the one-at-a-time key check
    fake_llm.set_handler(handle)
    replies = []

    async def call():
        replies.append((await llm.complete(MESSAGES, UserTurn, role=Role.USER)).output.message)

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(call)
    await llm.aclose()
    assert replies == ["together"] * n and not fake_llm.errors


@pytest.mark.anyio
async def test_no_more_requests_are_in_flight_than_the_concurrency(fake_llm):
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def handle(request):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            return FakeReply(content=turn("ok"), delay_s=0.05)
        finally:
            with lock:
                state["now"] -= 1

    fake_llm.set_handler(handle)
    llm = direct(fake_llm, max_concurrency=4)
    async with anyio.create_task_group() as tg:
        for _ in range(12):
            tg.start_soon(functools.partial(llm.complete, MESSAGES, UserTurn, role=Role.USER))
    assert fake_llm.calls == 12 and state["most"] <= 4


@pytest.mark.anyio
async def test_connections_are_kept_alive_and_reused(fake_llm):
    llm = direct(fake_llm, max_concurrency=2)
    for _ in range(5):
        await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    assert len(llm._client._idle) == 1  # one connection carried all five requests


@pytest.mark.anyio
async def test_a_finished_run_closes_its_model_connections(fake_llm, store):
    """Kept-alive connections belong to the run's event loop: the job closes them when it ends, every one."""
    fake_llm.set_handler(lambda request: turn("Where is my order?"))
    llm = direct(fake_llm, max_concurrency=3)
    opened = []
    new_client = llm._new_client

    def recording_client():
        opened.append(new_client())
        return opened[-1]
    llm._new_client = recording_client
    summary = await simulate(store, "tests.agents:echo", [{"goal": "Ask where order A1 is."}] * 3, llm=llm,
                             max_turns=2, concurrency=3, workspace=ROOT, cache=False)
    assert summary.status == "completed" and fake_llm.calls == 6
    assert llm._client is None and len(opened) == 1 and opened[0]._idle == []


def test_a_proxy_in_the_environment_sends_requests_through_httpx(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert proxy_for("https://api.openai.com/v1") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert proxy_for("https://api.openai.com/v1") == "http://127.0.0.1:3128"
    assert proxy_for("http://127.0.0.1:8000/v1") is None
    llm = OpenAIHTTPBackend(LLMSettings(model="openai/gpt-4o-mini", api_key="k"))
    assert isinstance(llm._new_client(), _ProxiedOrigin)
    monkeypatch.setenv("NO_PROXY", "api.openai.com")
    assert proxy_for("https://api.openai.com/v1") is None
    assert isinstance(llm._new_client(), http1.Origin)


# --- the HTTP/1.1 client, against a raw server ---------------------------------------------------------------------

class RawServer:
    """An asyncio TCP server answering each request with the next scripted bytes, then doing `after` with the
    connection ("keep" it open, or "close" it)."""

    def __init__(self, replies: list[tuple[bytes, str]]):
        self.replies = list(replies)
        self.requests: list[bytes] = []
        self.connections = 0

    async def __aenter__(self) -> "RawServer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                self.requests.append(head + await reader.readexactly(length))
                reply, after = self.replies.pop(0)
                writer.write(reply)
                await writer.drain()
                if after == "close":
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()


def completion(message: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": json.dumps(turn(message))}}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode()


def chunked(body: bytes) -> bytes:
    half = len(body) // 2
    return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
            + f"{half:x}\r\n".encode() + body[:half] + b"\r\n" + f"{len(body) - half:x};x=1\r\n".encode()
            + body[half:] + b"\r\n0\r\n\r\n")


def sized(body: bytes, *, status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


@pytest.mark.anyio
async def test_chunked_replies_are_read_and_the_connection_reused():
    async with RawServer([(chunked(completion("one")), "keep"), (sized(completion("two")), "keep")]) as server:
        llm = OpenAIHTTPBackend(LLMSettings(model="openai/x", api_base=server.url, api_key="k-raw-0001",
                                            max_retries=0))
        first = await llm.complete(MESSAGES, UserTurn, role=Role.USER)
        second = await llm.complete(MESSAGES, UserTurn, role=Role.USER)
        await llm.aclose()
    assert (first.output.message, second.output.message, server.connections) == ("one", "two", 1)
    assert server.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"Authorization: Bearer k-raw-0001\r\n" in server.requests[0]


@pytest.mark.anyio
async def test_a_connection_the_server_closed_while_idle_is_replaced_without_a_retry():
    async with RawServer([(sized(completion("one")), "close"), (sized(completion("two")), "keep")]) as server:
        llm = OpenAIHTTPBackend(LLMSettings(model="openai/x", api_base=server.url, api_key="k", max_retries=0))
        await llm.complete(MESSAGES, UserTurn, role=Role.USER)
        await anyio.sleep(0.05)
        second = await llm.complete(MESSAGES, UserTurn, role=Role.USER)
        await llm.aclose()
    assert second.output.message == "two" and second.usage.calls == 1 and server.connections == 2


@pytest.mark.anyio
async def test_a_reply_cut_short_is_a_connection_error_and_retried():
    cut = sized(completion("whole"))[:-10]
    async with RawServer([(cut, "close"), (sized(completion("whole")), "keep")]) as server:
        llm = OpenAIHTTPBackend(LLMSettings(model="openai/x", api_base=server.url, api_key="k", max_retries=1,
                                            backoff_s=0.01))
        result = await llm.complete(MESSAGES, UserTurn, role=Role.USER)
        await llm.aclose()
    assert result.output.message == "whole" and result.usage.failures == {"connection": 1}


@pytest.mark.anyio
async def test_retry_after_on_a_429_is_read_from_the_reply():
    limited = sized(b'{"error": {"message": "slow down", "type": "rate_limit_error"}}', status="429 Too Many",
                    extra="Retry-After: 0\r\n")
    async with RawServer([(limited, "keep"), (sized(completion("later")), "keep")]) as server:
        llm = OpenAIHTTPBackend(LLMSettings(model="openai/x", api_base=server.url, api_key="k", max_retries=1,
                                            backoff_s=30))  # without Retry-After the back-off would be 15-30 s
        with anyio.fail_after(10):
            result = await llm.complete(MESSAGES, UserTurn, role=Role.USER)
        await llm.aclose()
    assert result.output.message == "later" and result.usage.failures == {"rate_limit": 1}


@pytest.mark.anyio
async def test_a_gzip_reply_is_decoded_though_identity_was_asked_for():
    body = gzip.compress(completion("zipped"))
    async with RawServer([(sized(body, extra="Content-Encoding: gzip\r\n"), "keep")]) as server:
        llm = OpenAIHTTPBackend(LLMSettings(model="openai/x", api_base=server.url, api_key="k", max_retries=0))
        result = await llm.complete(MESSAGES, UserTurn, role=Role.USER)
        await llm.aclose()
    assert result.output.message == "zipped" and b"Accept-Encoding: identity\r\n" in server.requests[0]


@pytest.mark.anyio
async def test_a_body_that_is_not_a_completion_is_an_error_of_kind_other():
    async with RawServer([(sized(b"<html>proxy page</html>"), "keep")]) as server:
        llm = OpenAIHTTPBackend(LLMSettings(model="openai/x", api_base=server.url, api_key="k", max_retries=2))
        with pytest.raises(LLMError) as info:
            await llm.complete(MESSAGES, UserTurn, role=Role.USER)
        await llm.aclose()
    assert info.value.kind == "other" and "proxy page" in str(info.value) and len(server.requests) == 1


# --- readied when a run starts ---------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_prepare_makes_the_client_and_reads_the_price_before_any_request(fake_llm):
    from engine.llm.openai_http import _prices

    llm = direct(fake_llm, model="openai/gpt-4o-mini")
    await llm.prepare()
    client = llm._client
    assert client is not None and "openai/gpt-4o-mini" in _prices and fake_llm.calls == 0
    await llm.prepare()  # a second job on the same backend keeps its connections
    await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    assert llm._client is client
    await llm.aclose()


class RecordingOffline(OfflineBackend):
    """The offline backend, noting when it is readied and when it is asked."""

    def __init__(self):
        self.events: list[str] = []

    async def prepare(self) -> None:
        self.events.append("prepare")

    async def complete(self, messages, schema, *, role, offline=None):
        self.events.append("complete")
        return await super().complete(messages, schema, role=role, offline=offline)


@pytest.mark.anyio
async def test_simulation_and_scoring_jobs_ready_their_model_before_the_first_call(store):
    llm = RecordingOffline()
    summary = await simulate(store, "tests.agents:echo", [{"goal": "Ask about refunds."}], max_turns=2, llm=llm,
                             workspace=ROOT)
    assert llm.events[0] == "prepare" and llm.events.count("prepare") == 1 and "complete" in llm.events
    judge = RecordingOffline()
    await score_sessions(store, run_id=summary.run_id, scorers=["goal_achievement"], llm=judge)
    assert judge.events[:1] == ["prepare"] and judge.events.count("prepare") == 1
