"""Servers without `response_format: json_schema`: fall back to json_object, then to plain text, once per endpoint."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import anyio
import pytest

from engine import LLMError, LLMOutputError, Role, UserTurn
from engine.llm.ratelimit import estimate_tokens
from tests.conftest import ROOT
from tests.fake_llm import FakeReply, example_for_schema

MESSAGES = [{"role": "system", "content": "You are a customer."}, {"role": "user", "content": "Hello"}]

# What llama-cpp-python's server answers (HTTP 500) and what older vLLM builds answer (HTTP 400).
LLAMA_CPP = (500, "1 validation error for CreateChatCompletionRequest\nresponse_format\n  Input tag 'json_schema' "
                  "found using 'type' does not match any of the expected tags: 'text', 'json_object'")
VLLM = (400, "[{'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
             "'msg': \"Input should be 'text' or 'json_object'\"}]")
NO_JSON_OBJECT = (400, "response_format type json_object is not supported")

# HTTP 422, as FastAPI-based servers answer a request failing their validation ({"detail": [...]}), and as
# text-generation-inference does ({"error": "...", "error_type": "validation"}). litellm handles a 422 itself first
# (with drop_params it resends once without the parameters the body names, then returns no response).
FASTAPI_422 = {"detail": [{"type": "literal_error", "loc": ["body", "response_format", "type"],
                           "msg": "Input should be 'text' or 'json_object'", "input": "json_schema"}]}
TGI_422 = {"error": "Input validation error: response_format json_schema is not supported", "error_type": "validation"}


def turn(message: str) -> dict:
    return {"message": message, "goal_achieved": False, "end_conversation": False, "reason": "r"}


from tests.transports import TRANSPORTS, backend, make  # noqa: E402,F401  (the `transport` fixture: conftest.py)


def mode_of(request: dict) -> str:
    fmt = request.get("response_format")
    return fmt["type"] if isinstance(fmt, dict) else "text"


def schema_in_instructions(request: dict) -> dict:
    """The JSON schema the fallback put at the end of the system message (fails if it is not there)."""
    system = request["messages"][0]
    assert system["role"] == "system", request["messages"]
    line = next(x for x in system["content"].splitlines() if x.startswith("JSON schema: "))
    return json.loads(line.removeprefix("JSON schema: "))


def refusing(json_schema: tuple[int, str], json_object: tuple[int, str] | None = None, reply=None):
    """A server that refuses json_schema (and json_object when given) and answers the rest from the schema it was
    shown in the instructions."""
    def handle(request: dict) -> FakeReply:
        mode = mode_of(request)
        refusal = {"json_schema": json_schema, "json_object": json_object}.get(mode)
        if refusal:
            return FakeReply(status=refusal[0], content=refusal[1])
        content = reply if reply is not None else example_for_schema(schema_in_instructions(request))
        return FakeReply(content=content)
    return handle


@pytest.mark.anyio
@pytest.mark.parametrize("refusal", [LLAMA_CPP, VLLM], ids=["llama-cpp-500", "vllm-400"])
async def test_a_refused_json_schema_falls_back_to_json_object_once_per_endpoint(fake_llm, refusal, transport):
    fake_llm.set_handler(refusing(refusal, reply=turn("hi there")))
    llm = backend(fake_llm)
    result = await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    assert result.output.message == "hi there"
    assert [mode_of(r) for r in fake_llm.requests] == ["json_schema", "json_object"]  # the refusal is not retried
    assert result.usage.calls == 2 and result.usage.failed_calls == 1
    schema = schema_in_instructions(fake_llm.requests[1])
    assert set(schema["required"]) == {"message", "goal_achieved", "end_conversation", "reason"}
    assert fake_llm.requests[1]["messages"][0]["content"].startswith("You are a customer.\n\n")  # prefix unchanged
    assert fake_llm.requests[1]["messages"][1:] == MESSAGES[1:]

    await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    await backend(fake_llm).complete(MESSAGES, UserTurn, role=Role.USER)  # another backend, same (api_base, model)
    assert [mode_of(r) for r in fake_llm.requests] == ["json_schema", "json_object", "json_object", "json_object"]

    await backend(fake_llm, model="openai/other-model").complete(MESSAGES, UserTurn, role=Role.USER)
    assert [mode_of(r) for r in fake_llm.requests[4:]] == ["json_schema", "json_object"]  # per model too


@pytest.mark.anyio
async def test_a_server_refusing_json_object_too_gets_plain_text_parsed_strictly(fake_llm, transport):
    fake_llm.set_handler(refusing(LLAMA_CPP, NO_JSON_OBJECT, reply=f"```json\n{json.dumps(turn('plain'))}\n```"))
    llm = backend(fake_llm)
    result = await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    assert result.output.message == "plain" and result.usage.calls == 3
    assert [mode_of(r) for r in fake_llm.requests] == ["json_schema", "json_object", "text"]
    assert "response_format" not in fake_llm.requests[2]
    assert schema_in_instructions(fake_llm.requests[2])["additionalProperties"] is False

    await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    assert [mode_of(r) for r in fake_llm.requests[3:]] == ["text"]

    fake_llm.set_handler(refusing(LLAMA_CPP, NO_JSON_OBJECT, reply={"message": "no other fields"}))
    with pytest.raises(LLMOutputError, match="goal_achieved"):  # the same strict validation: repair, then refused
        await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    assert [mode_of(r) for r in fake_llm.requests[4:]] == ["text", "text"]


@pytest.mark.anyio
async def test_concurrent_first_calls_pay_the_refusal_once(fake_llm, transport):
    fake_llm.set_handler(refusing(LLAMA_CPP, reply=turn("ok")))
    llm = backend(fake_llm)
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(functools.partial(llm.complete, MESSAGES, UserTurn, role=Role.USER))
    assert sorted(mode_of(r) for r in fake_llm.requests) == ["json_object"] * 5 + ["json_schema"]


@pytest.mark.anyio
async def test_a_500_not_naming_the_response_format_is_still_retried(fake_llm, transport):
    fake_llm.set_handler(lambda req: FakeReply(status=500, content="upstream overloaded"))
    llm = backend(fake_llm)
    with pytest.raises(LLMError) as info:
        await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    assert info.value.retryable and info.value.kind == "server_error"
    assert [mode_of(r) for r in fake_llm.requests] == ["json_schema"] * 3  # the call and its 2 retries, no fallback
    fake_llm.set_handler(None)
    await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    assert mode_of(fake_llm.requests[-1]) == "json_schema"


@pytest.mark.anyio
async def test_a_refusal_in_the_last_mode_is_raised_without_retries(fake_llm, transport):
    fake_llm.set_handler(lambda req: FakeReply(status=400, content="response_format is required"))
    with pytest.raises(LLMError) as info:
        await backend(fake_llm).complete(MESSAGES, UserTurn, role=Role.USER)
    assert not info.value.retryable and info.value.usage.failed_calls == 3
    assert [mode_of(r) for r in fake_llm.requests] == ["json_schema", "json_object", "text"]


@pytest.mark.slow
def test_a_simulate_run_completes_against_a_server_without_json_schema(tmp_path, fake_llm):
    fake_llm.set_handler(refusing(LLAMA_CPP))
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"goal": "Ask about refunds."}, {"goal": "Ask where order A1 is."}]))
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(ROOT), CONVSIM_HOME=str(tmp_path / "home"), CONVSIM_ROOTS=str(tmp_path),
               CONVSIM_API_BASE=fake_llm.url, CONVSIM_API_KEY="sk-test-not-a-real-key", CONVSIM_LLM_RETRIES="2")
    proc = subprocess.run([sys.executable, "-m", "convsim_mcp", "simulate", "tests.agents:echo", str(cases),
                           "--model", "openai/fake-model", "--max-turns", "2", "--json", "--scorer", "goal_achievement",
                           "--db", str(tmp_path / "db.sqlite")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "completed", summary
    modes = [mode_of(r) for r in fake_llm.requests]
    models = {r["model"] for r in fake_llm.requests}
    assert modes.count("json_schema") == len(models) and modes.count("json_object") >= 4, modes
    assert "Traceback" not in proc.stderr


def refusing_422(body: dict, modes: tuple[str, ...], reply=None):
    """A server answering HTTP 422 with `body` to a request in any of `modes`, and the rest from the instructions."""
    def handle(request: dict) -> FakeReply:
        if mode_of(request) in modes:
            return FakeReply(status=422, error_body=body)
        content = reply if reply is not None else example_for_schema(schema_in_instructions(request))
        return FakeReply(content=content)
    return handle


def collapsed(modes: list[str]) -> list[str]:
    return [m for i, m in enumerate(modes) if i == 0 or modes[i - 1] != m]


@pytest.mark.anyio
@pytest.mark.parametrize("body", [FASTAPI_422, TGI_422], ids=["fastapi-422", "tgi-422"])
async def test_a_422_falls_back_to_json_object_then_text_and_is_never_retried(fake_llm, body, transport):
    fake_llm.set_handler(refusing_422(body, ("json_schema", "json_object"), reply=turn("plain")))
    llm = backend(fake_llm, max_retries=3)
    result = await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    assert result.output.message == "plain"
    modes = [mode_of(r) for r in fake_llm.requests]
    assert collapsed(modes) == ["json_schema", "json_object", "text"], modes
    # at most litellm's own resend of a 422; a retry as a transient error would send 1 + max_retries = 4
    assert all(modes.count(m) <= 2 for m in ("json_schema", "json_object")), modes
    assert modes.count("text") == 1 and "response_format" not in fake_llm.requests[-1]
    assert schema_in_instructions(fake_llm.requests[-1])["additionalProperties"] is False
    assert result.usage.failed_calls == 2 and not any(k in result.usage.failures for k in ("server_error", "timeout"))

    seen = len(fake_llm.requests)
    await backend(fake_llm).complete(MESSAGES, UserTurn, role=Role.USER)  # remembered for (api_base, model)
    assert [mode_of(r) for r in fake_llm.requests[seen:]] == ["text"]


@pytest.mark.anyio
async def test_a_422_in_every_mode_is_raised_without_retries(fake_llm, transport):
    fake_llm.set_handler(refusing_422(FASTAPI_422, ("json_schema", "json_object", "text")))
    with pytest.raises(LLMError, match="422") as info:
        await backend(fake_llm, max_retries=3).complete(MESSAGES, UserTurn, role=Role.USER)
    assert not info.value.retryable and info.value.status_code == 422
    modes = [mode_of(r) for r in fake_llm.requests]
    assert collapsed(modes) == ["json_schema", "json_object", "text"] and len(modes) <= 6, modes


@pytest.mark.anyio
async def test_a_422_about_something_else_leaves_the_endpoint_in_json_schema_mode(fake_llm, transport):
    """litellm swallows a 422's body: stepping down is then a guess, tried for the call and learnt only if it works.
    A 422 about another parameter fails every mode, and the next call asks in json_schema again."""
    other = {"detail": [{"type": "value_error", "loc": ["body", "temperature"], "msg": "temperature out of range"}]}
    fake_llm.set_handler(refusing_422(other, ("json_schema", "json_object", "text")))
    with pytest.raises(LLMError, match="422"):
        await backend(fake_llm, model="openai/fake-422-other").complete(MESSAGES, UserTurn, role=Role.USER)
    fake_llm.set_handler(lambda request: FakeReply(content=turn("fine")))
    seen = len(fake_llm.requests)
    result = await backend(fake_llm, model="openai/fake-422-other").complete(MESSAGES, UserTurn, role=Role.USER)
    assert result.output.message == "fine"
    assert [mode_of(r) for r in fake_llm.requests[seen:]] == ["json_schema"]


@pytest.mark.anyio
async def test_a_simulate_run_completes_against_a_server_answering_422(store, fake_llm):
    from engine import StopReason, simulate
    from tests.conftest import agent

    fake_llm.set_handler(refusing_422(FASTAPI_422, ("json_schema",), reply=turn("Where is my order?")))
    summary = await simulate(store, agent("echo"), [{"goal": "Ask where order A1 is."}, {"goal": "Ask about refunds."}],
                             llm=backend(fake_llm), max_turns=3, concurrency=2, workspace=ROOT, cache=False)
    assert summary.status == "completed"
    assert [s.stop_reason for s in summary.sessions] == [StopReason.MAX_TURNS] * 2
    modes = [mode_of(r) for r in fake_llm.requests]
    assert collapsed(modes) == ["json_schema", "json_object"] and modes.count("json_schema") <= 2, modes
    assert modes.count("json_object") == 6  # one call per turn once the run learnt the mode


@pytest.mark.anyio
async def test_the_token_rate_limit_counts_the_schema_a_fallback_puts_in_the_prompt(fake_llm, transport):
    """With tpm, each request is charged the prompt it sends: in json_object mode, the schema instructions too."""
    fake_llm.set_handler(refusing(LLAMA_CPP, reply=turn("hi there")))
    llm = backend(fake_llm, model="openai/fake-tpm-fallback", tpm=10_000_000)
    charged = []
    acquire = llm._rate.acquire

    async def recording(tokens=0, **kw):
        charged.append(tokens)
        return await acquire(tokens, **kw)
    llm._rate.acquire = recording
    await llm.complete(MESSAGES, UserTurn, role=Role.USER)
    assert charged[0] == estimate_tokens(MESSAGES)  # json_schema: the messages as given
    assert charged[1] == estimate_tokens(fake_llm.requests[1]["messages"]) > charged[0] + 50  # with the schema
