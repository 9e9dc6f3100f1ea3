"""The LLM layer: model resolution, retries, timeouts, cost, lazy import."""

from __future__ import annotations

import subprocess
import sys

import threading

import anyio
import pytest
from pydantic import ValidationError

from engine import InvalidOption, LLMAuthError, LLMError, LLMOutputError, OfflineBackend, Role, Usage, UserTurn, parse_scorers, resolve_llm, resolve_model
from engine.llm.base import LLMSettings, strict_schema
from engine.llm.providers import key_variable
from tests.conftest import ROOT
from tests.fake_llm import FakeReply

MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


def turn(message: str) -> dict:
    return {"message": message, "goal_achieved": False, "end_conversation": False, "reason": "r"}


from tests.transports import TRANSPORTS, backend, make  # noqa: E402,F401  (the `transport` fixture: conftest.py)


@pytest.mark.parametrize(
    "arg, env, expected",
    [
        pytest.param("openai:/gpt-4o-mini", {}, "openai/gpt-4o-mini", id="mlflow-style"),
        pytest.param("anthropic/claude-x", {"CONVSIM_MODEL": "openai/ignored"}, "anthropic/claude-x", id="explicit-wins"),
        pytest.param(None, {"CONVSIM_MODEL": "ollama:/llama3"}, "ollama/llama3", id="env"),
        pytest.param(None, {"ANTHROPIC_API_KEY": "x"}, "anthropic/claude-3-5-haiku-latest", id="key-default"),
        pytest.param(None, {}, "offline", id="nothing-configured"),
    ],
)
def test_model_resolution_order(monkeypatch, arg, env, expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert resolve_model(arg) == expected


def test_offline_is_chosen_without_keys_and_a_bare_model_name_is_rejected():
    assert isinstance(resolve_llm(None), OfflineBackend)
    with pytest.raises(InvalidOption, match="provider prefix"):
        resolve_llm("gpt-4o")


def test_api_base_and_key_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CONVSIM_API_BASE", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("CONVSIM_API_KEY", "env-key")
    llm = resolve_llm("openai/x")
    assert (llm.settings.api_base, llm.settings.api_key) == ("http://127.0.0.1:9/v1", "env-key")
    assert resolve_llm("openai/x", api_base="http://per-call/v1").settings.api_base == "http://per-call/v1"


@pytest.mark.anyio
async def test_a_timed_out_call_is_retried(fake_llm, transport):
    fake_llm.queue(FakeReply(content=turn("slow"), delay_s=2), turn("fast"))
    result = await backend(fake_llm, timeout_s=0.3).complete(MESSAGES, UserTurn, role=Role.USER)
    assert result.output.message == "fast"
    assert result.usage.calls == 2


@pytest.mark.anyio
async def test_retries_give_up_with_a_retryable_error(fake_llm, transport):
    fake_llm.set_handler(lambda req: FakeReply(status=503, content="overloaded"))
    with pytest.raises(LLMError) as info:
        await backend(fake_llm).complete(MESSAGES, UserTurn, role=Role.USER)
    assert info.value.retryable and fake_llm.calls == 3


@pytest.mark.anyio
async def test_a_fatal_error_is_not_retried(fake_llm, transport):
    fake_llm.set_handler(lambda req: FakeReply(status=400, content="bad request"))
    with pytest.raises(LLMError) as info:
        await backend(fake_llm).complete(MESSAGES, UserTurn, role=Role.USER)
    assert not info.value.retryable and fake_llm.calls == 1


@pytest.mark.anyio
async def test_cost_is_counted_for_priced_models_and_flagged_for_unknown_ones(fake_llm, transport):
    fake_llm.set_handler(lambda req: FakeReply(content=turn("m"), prompt_tokens=1000, completion_tokens=100))
    priced = await backend(fake_llm, model="openai/gpt-4o-mini").complete(MESSAGES, UserTurn, role=Role.USER)
    unknown = await backend(fake_llm, model="openai/no-such-model").complete(MESSAGES, UserTurn, role=Role.USER)
    assert priced.usage.cost_usd > 0 and priced.usage.cost_unknown_calls == 0
    assert unknown.usage.cost_usd == 0 and unknown.usage.cost_unknown_calls == 1


@pytest.mark.anyio
async def test_the_request_carries_a_strict_json_schema(fake_llm, transport):
    await backend(fake_llm).complete(MESSAGES, UserTurn, role=Role.USER)
    fmt = fake_llm.requests[0]["response_format"]
    assert fmt["type"] == "json_schema" and "goal_achieved" in fmt["json_schema"]["schema"]["properties"]
    assert fake_llm.requests[0]["model"] == "fake-user"


def test_building_the_server_does_not_import_litellm(tmp_path):
    code = ("import sys; from convsim_mcp.server import build_server; from engine import Store; "
            "build_server(Store(sys.argv[1])); print('litellm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "db.sqlite")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_model_calls_in_flight_follow_the_run_concurrency(monkeypatch):
    monkeypatch.setenv("CONVSIM_PROVIDERS", "openai")
    assert resolve_llm("openai/x", max_concurrency=50)._limiter.max_value == 50
    monkeypatch.setenv("CONVSIM_LLM_CONCURRENCY", "3")
    assert resolve_llm("openai/x")._limiter.max_value == 3
    assert resolve_llm("openai/x", max_concurrency=50)._limiter.max_value == 3  # the environment only lowers it


@pytest.mark.anyio
async def test_keys_echoed_by_the_provider_are_redacted_from_errors(fake_llm, monkeypatch, transport):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-0123456789")
    fake_llm.set_handler(lambda req: FakeReply(status=401, content="Incorrect API key: k-secret-42 / sk-env-0123456789"))
    llm = make(LLMSettings(model="openai/x", api_base=fake_llm.url, api_key="k-secret-42", max_retries=0))
    with pytest.raises(LLMError) as info:
        await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    assert "k-secret-42" not in str(info.value) and "sk-env-0123456789" not in str(info.value)
    assert "Incorrect API key" in str(info.value)


# --- strict replies -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_reply_of_the_wrong_shape_is_repaired_once_then_refused_naming_the_fields(fake_llm, transport):
    fake_llm.set_handler(lambda req: {"totally": "wrong"})
    with pytest.raises(LLMOutputError) as info:
        await backend(fake_llm).complete(MESSAGES, UserTurn, role=Role.USER)
    message = str(info.value)
    assert "goal_achieved: Field required" in message and "totally: Extra inputs are not permitted" in message
    assert fake_llm.calls == 2
    assert "message: Field required" in fake_llm.requests[1]["messages"][-1]["content"]  # the repair names it
    u = info.value.usage
    assert (u.calls, u.failed_calls, u.failures) == (2, 2, {"invalid_output": 2})


@pytest.mark.anyio
async def test_the_model_is_asked_for_every_field_and_nothing_else(fake_llm, transport):
    await backend(fake_llm).complete(MESSAGES, UserTurn, role=Role.USER)
    schema = fake_llm.requests[0]["response_format"]["json_schema"]["schema"]
    assert set(schema["required"]) == {"message", "goal_achieved", "end_conversation", "reason"}
    assert schema["additionalProperties"] is False
    assert not any("default" in p for p in schema["properties"].values())


def test_python_classes_keep_their_defaults_and_the_wire_schema_is_a_strict_subclass():
    assert UserTurn(message="hi").goal_achieved is False and UserTurn(goal_achieved=True).message == ""
    wire = strict_schema(UserTurn)
    assert issubclass(wire, UserTurn) and wire.__name__ == "UserTurn" and strict_schema(UserTurn) is wire
    with pytest.raises(ValidationError):
        wire.model_validate({"message": "hi"})


def test_nested_models_of_a_verdict_are_strict_too():
    verdict = strict_schema(parse_scorers(["goal_achievement"])[0].output.verdict_model())
    good = {"value": True, "rationale": "r", "evidence": [{"turn": 1, "role": "assistant", "quote": "q"}]}
    assert verdict.model_validate(good).evidence[0].quote == "q"
    for bad in ({"value": True}, {**good, "evidence": [{"turn": 1, "quote": "q"}]}, {**good, "extra": 1}):
        with pytest.raises(ValidationError):
            verdict.model_validate(bad)


# --- failure kinds and usage --------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, kind, attempts",
    [
        pytest.param(FakeReply(status=503), "server_error", 3, id="503"),
        pytest.param(FakeReply(status=401, content="Incorrect API key provided"), "auth", 1, id="401"),
        pytest.param(FakeReply(status=403, content="not allowed"), "auth", 1, id="403"),
        pytest.param(FakeReply(status=400, content="API key not valid. Please pass a valid API key."), "auth", 1,
                     id="400-invalid-key"),
        pytest.param(FakeReply.context_length_exceeded(), "context_length", 1, id="context-length"),
        pytest.param(FakeReply(status=404, content="no such model"), "other", 1, id="404"),
    ],
)
@pytest.mark.anyio
async def test_each_failure_has_a_kind_and_its_attempts_are_counted(fake_llm, reply, kind, attempts, transport):
    fake_llm.set_handler(lambda req: reply)
    with pytest.raises(LLMError) as info:
        await backend(fake_llm).complete(MESSAGES, UserTurn, role=Role.USER)
    assert info.value.kind == kind and fake_llm.calls == attempts
    u = info.value.usage
    assert (u.calls, u.failed_calls, u.failures) == (attempts, attempts, {kind: attempts})


@pytest.mark.anyio
async def test_connection_and_timeout_failures_are_told_apart(fake_llm, transport):
    fake_llm.queue(FakeReply(content=turn("slow"), delay_s=2))
    with pytest.raises(LLMError) as timed_out:
        await backend(fake_llm, timeout_s=0.3, max_retries=0).complete(MESSAGES, UserTurn, role=Role.USER)
    refused = make(LLMSettings(model="openai/x", api_base="http://127.0.0.1:9/v1", api_key="k",
                               max_retries=0, timeout_s=5))
    with pytest.raises(LLMError) as unreachable:
        await refused.complete(MESSAGES, UserTurn, role=Role.USER)
    assert (timed_out.value.kind, unreachable.value.kind) == ("timeout", "connection")
    assert timed_out.value.retryable and unreachable.value.retryable


@pytest.mark.anyio
async def test_a_repaired_reply_counts_the_unusable_one_as_failed(fake_llm, transport):
    fake_llm.queue("not json at all", turn("hi"))
    result = await backend(fake_llm).complete(MESSAGES, UserTurn, role=Role.USER)
    u = result.usage
    assert result.output.message == "hi"
    assert (u.calls, u.failed_calls, u.failures) == (2, 1, {"invalid_output": 1})


def test_usage_add_sums_failures_by_kind():
    a = Usage(calls=2, failed_calls=1, failures={"timeout": 1})
    b = Usage(calls=3, failed_calls=3, failures={"timeout": 1, "server_error": 2})
    total = a.add(b)
    assert (total.calls, total.failed_calls, total.failures) == (5, 4, {"timeout": 2, "server_error": 2})
    assert a.failures == {"timeout": 1} and total.minus(a) == b  # the operands are left alone


# --- refused credentials ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_refused_key_is_latched_and_later_calls_make_no_request(fake_llm, transport):
    fake_llm.set_handler(lambda req: FakeReply(status=401, content="Incorrect API key provided"))
    llm = backend(fake_llm)
    with pytest.raises(LLMAuthError) as first:
        await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    with pytest.raises(LLMAuthError) as later:
        await llm.complete(MESSAGES, UserTurn, role=Role.JUDGE)
    assert fake_llm.calls == 1
    assert "openai/fake-user" in str(first.value) and "CONVSIM_API_KEY" in str(first.value)
    assert "Incorrect API key provided" in str(first.value)
    assert str(later.value) == str(first.value) and later.value.usage.calls == 0
    assert llm.auth_error is not None


@pytest.mark.anyio
async def test_a_429_saying_the_quota_is_used_up_stops_at_once_instead_of_waiting(fake_llm, transport):
    """OpenAI's insufficient_quota is a 429 that no wait cures: latched like a refused key, the limiter left alone."""
    quota = FakeReply(status=429, error_code="insufficient_quota", headers={"Retry-After": "20"},
                      content="You exceeded your current quota, please check your plan and billing details.")
    fake_llm.set_handler(lambda req: quota)
    llm = backend(fake_llm, model="openai/fake-quota", rate_limit_wait_s=300)
    with anyio.fail_after(10):
        with pytest.raises(LLMAuthError, match="quota is used up") as first:
            await llm.complete(MESSAGES, UserTurn, role=Role.USER)
        with pytest.raises(LLMAuthError):
            await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    assert fake_llm.calls == 1 and "CONVSIM_API_KEY" in str(first.value)
    assert llm._rate.rate_limited_count == 0


@pytest.mark.anyio
async def test_a_per_minute_limit_worded_like_a_quota_is_waited_out(fake_llm, transport):
    """Gemini words its per-minute limit "You exceeded your current quota" too, with a retry delay: a rate limit."""
    fake_llm.queue(FakeReply(status=429, headers={"Retry-After": "0"},
                             content="You exceeded your current quota, please check your plan and billing details. "
                                     "Quota: GenerateRequestsPerMinutePerProjectPerModel-FreeTier. Please retry in 0s."))
    fake_llm.set_handler(lambda req: turn("after the wait"))
    llm = backend(fake_llm, model="openai/fake-per-minute")
    result = await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    assert result.output.message == "after the wait" and llm.auth_error is None and fake_llm.calls == 2


@pytest.mark.anyio
async def test_concurrent_first_calls_with_a_refused_key_make_one_request(fake_llm, transport):
    fake_llm.set_handler(lambda req: FakeReply(status=401, content="bad key", delay_s=0.1))
    llm = backend(fake_llm)
    errors = []

    async def call():
        try:
            await llm.complete(MESSAGES, UserTurn, role=Role.USER)
        except LLMAuthError as e:
            errors.append(e)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(call)
    assert len(errors) == 5 and fake_llm.calls == 1


def all_at_once(n: int):
    """A handler that answers only once `n` requests are at the fake together (else a 500 after 10 s)."""
    arrived = threading.Barrier(n, timeout=10)

    def handle(request):
        arrived.wait()
        return turn("together")
    return handle


async def call_concurrently(llm, n: int) -> list[str]:
    replies: list[str] = []

    async def one():
        replies.append((await llm.complete(MESSAGES, UserTurn, role=Role.USER)).output.message)
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return replies


@pytest.mark.anyio
async def test_after_a_first_answer_calls_are_concurrent_again(fake_llm, transport):
    fake_llm.set_handler(lambda req: turn("hi"))
    llm = backend(fake_llm, max_retries=0)
    await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    fake_llm.set_handler(all_at_once(5))
    assert await call_concurrently(llm, 5) == ["together"] * 5


@pytest.mark.anyio
async def test_a_key_accepted_in_this_process_is_not_checked_again_by_a_later_backend(fake_llm, transport):
    """A later run (a new backend) with the same model, endpoint and key sends its first calls at once; another
    key still goes one at a time until its first answer."""
    fake_llm.set_handler(lambda req: turn("hi"))
    await backend(fake_llm, max_retries=0).complete(MESSAGES, UserTurn, role=Role.USER)
    fake_llm.set_handler(all_at_once(5))
    assert await call_concurrently(backend(fake_llm, max_retries=0), 5) == ["together"] * 5
    fake_llm.set_handler(lambda req: FakeReply(status=401, content="bad key", delay_s=0.05))
    other_key = make(LLMSettings(model="openai/fake-user", api_base=fake_llm.url, api_key="another-key-1234",
                                 max_retries=0))
    calls = fake_llm.calls
    with pytest.raises(ExceptionGroup) as refused:
        await call_concurrently(other_key, 5)
    assert refused.group_contains(LLMAuthError) and fake_llm.calls == calls + 1  # one request for the five


@pytest.mark.parametrize(
    "model, api_base, variable",
    [
        ("openai/gpt-4o-mini", None, "OPENAI_API_KEY"),
        ("anthropic/claude-3-5-haiku-latest", None, "ANTHROPIC_API_KEY"),
        ("gemini/gemini-2.0-flash", None, "GEMINI_API_KEY"),
        ("mistral/mistral-small-latest", None, "MISTRAL_API_KEY"),
        ("groq/llama-3.1-8b-instant", None, "GROQ_API_KEY"),
        ("some_provider/x", None, "SOME_PROVIDER_API_KEY"),
        ("openai/llama3.1", "http://127.0.0.1:11434/v1", "CONVSIM_API_KEY"),
    ],
)
def test_the_variable_to_fix_follows_the_provider_or_the_api_base(model, api_base, variable):
    assert key_variable(LLMSettings(model=model, api_base=api_base)) == variable
