"""The LLM layer: model resolution, retries, timeouts, cost, lazy import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine import InvalidOption, LLMError, OfflineBackend, Role, UserTurn, resolve_llm, resolve_model
from engine.llm import LiteLLMBackend, LLMSettings
from tests.conftest import ROOT
from tests.fake_llm import FakeReply

MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


def backend(fake, model="openai/fake-user", **settings) -> LiteLLMBackend:
    settings = {"max_retries": 2, "backoff_s": 0.01, "timeout_s": 5, **settings}
    return LiteLLMBackend(LLMSettings(model=model, api_base=fake.url, api_key="k", **settings))


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
async def test_a_timed_out_call_is_retried(fake_llm):
    fake_llm.queue(FakeReply(content={"message": "slow"}, delay_s=2), {"message": "fast"})
    result = await backend(fake_llm, timeout_s=0.3).complete(MESSAGES, UserTurn, role=Role.USER)
    assert result.output.message == "fast"
    assert result.usage.calls == 2


@pytest.mark.anyio
async def test_retries_give_up_with_a_retryable_error(fake_llm):
    fake_llm.set_handler(lambda req: FakeReply(status=503, content="overloaded"))
    with pytest.raises(LLMError) as info:
        await backend(fake_llm).complete(MESSAGES, UserTurn, role=Role.USER)
    assert info.value.retryable and fake_llm.calls == 3


@pytest.mark.anyio
async def test_a_fatal_error_is_not_retried(fake_llm):
    fake_llm.set_handler(lambda req: FakeReply(status=400, content="bad request"))
    with pytest.raises(LLMError) as info:
        await backend(fake_llm).complete(MESSAGES, UserTurn, role=Role.USER)
    assert not info.value.retryable and fake_llm.calls == 1


@pytest.mark.anyio
async def test_cost_is_counted_for_priced_models_and_flagged_for_unknown_ones(fake_llm):
    fake_llm.set_handler(lambda req: FakeReply(content={"message": "m"}, prompt_tokens=1000, completion_tokens=100))
    priced = await backend(fake_llm, model="openai/gpt-4o-mini").complete(MESSAGES, UserTurn, role=Role.USER)
    unknown = await backend(fake_llm, model="openai/no-such-model").complete(MESSAGES, UserTurn, role=Role.USER)
    assert priced.usage.cost_usd > 0 and priced.usage.cost_unknown_calls == 0
    assert unknown.usage.cost_usd == 0 and unknown.usage.cost_unknown_calls == 1


@pytest.mark.anyio
async def test_the_request_carries_a_strict_json_schema(fake_llm):
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
    assert resolve_llm("openai/x", max_concurrency=50)._limiter.total_tokens == 50
    monkeypatch.setenv("CONVSIM_LLM_CONCURRENCY", "3")
    assert resolve_llm("openai/x")._limiter.total_tokens == 3
    assert resolve_llm("openai/x", max_concurrency=50)._limiter.total_tokens == 3  # the environment only lowers it


@pytest.mark.anyio
async def test_keys_echoed_by_the_provider_are_redacted_from_errors(fake_llm, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-0123456789")
    fake_llm.set_handler(lambda req: FakeReply(status=401, content="Incorrect API key: k-secret-42 / sk-env-0123456789"))
    llm = LiteLLMBackend(LLMSettings(model="openai/x", api_base=fake_llm.url, api_key="k-secret-42", max_retries=0))
    with pytest.raises(LLMError) as info:
        await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    assert "k-secret-42" not in str(info.value) and "sk-env-0123456789" not in str(info.value)
    assert "Incorrect API key" in str(info.value)
