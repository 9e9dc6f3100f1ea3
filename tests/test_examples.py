"""The bundled example agents (Python and HTTP) under simulation: their planted flaws surface."""

from __future__ import annotations

import pytest

from engine import simulate
from examples.http_agent import start_server, stop_server
from tests.conftest import ROOT

pytestmark = pytest.mark.anyio

CASES = ROOT / "examples" / "support_cases.yaml"
EXPECTED = {
    "remember-name": "user_ended",       # forgets the name, the user gives up after asking twice
    "gift-card-refund": "agent_error",   # KeyError inside the agent
    "cancel-order": "user_ended",        # refuses an in-scope cancellation
    "order-status-gold": "goal_achieved",
    "shipping-and-returns": "goal_achieved",
    "off-topic-then-password": "goal_achieved",
}


def by_case(summary) -> dict[str, str]:
    return {s.case_id: s.stop_reason.value for s in summary.sessions}


@pytest.fixture
def http_agent(monkeypatch):
    monkeypatch.setenv("AGENT_TOKEN", "tok-3f9a-secret")
    monkeypatch.setenv("CONVSIM_AGENT_ENV", "AGENT_TOKEN")
    server, url = start_server(0, token="tok-3f9a-secret")
    yield url
    stop_server(server)


async def test_python_example_agent_flaws_surface_offline(store):
    summary = await simulate(store, "examples/support_agent.py:support_agent", str(CASES), model="offline",
                             workspace=ROOT, max_turns=6)
    assert by_case(summary) == EXPECTED
    crash = next(s for s in summary.sessions if s.case_id == "gift-card-refund")
    assert "KeyError" in crash.error


async def test_gold_context_reaches_the_example_agent(store):
    summary = await simulate(store, "examples.support_agent:support_agent_async", str(CASES), model="offline",
                             workspace=ROOT, max_turns=6)
    session = next(s for s in await store.get_sessions(summary.run_id) if s.test_case.id == "order-status-gold")
    assert any("Gold member" in (m.content or "") for m in session.messages if m.role == "assistant")


async def test_http_example_agent_over_openai_protocol_with_env_token(store, http_agent):
    target = {"url": http_agent + "/v1", "headers": {"Authorization": "Bearer ${AGENT_TOKEN}"}}
    summary = await simulate(store, target, str(CASES), model="offline", max_turns=6)
    assert by_case(summary) == EXPECTED
    crash = next(s for s in summary.sessions if s.case_id == "gift-card-refund")
    assert "HTTP 500" in crash.error
    store._db.execute("PRAGMA wal_checkpoint(FULL)")
    assert b"tok-3f9a-secret" not in store.path.read_bytes()
    assert "${AGENT_TOKEN}" in str((await store.get_run(summary.run_id))["target"])


async def test_http_example_agent_over_stateful_json_protocol(store, http_agent):
    target = {"kind": "json", "url": http_agent + "/chat", "response_path": "reply.text",
              "headers": {"Authorization": "Bearer ${AGENT_TOKEN}"},
              "request": {"message": "{{message}}", "session_id": "{{session_id}}", "context": "{{context}}"}}
    summary = await simulate(store, target, str(CASES), model="offline", max_turns=6)
    assert by_case(summary) == EXPECTED  # the agent keeps its own history: it forgets the name the same way


async def test_wrong_token_is_an_agent_error_that_does_not_echo_the_token(store, http_agent):
    target = {"url": http_agent + "/v1", "headers": {"Authorization": "Bearer wrong-literal-token"}}
    summary = await simulate(store, target, [{"goal": "Ask about shipping."}], model="offline")
    (s,) = summary.sessions
    assert s.stop_reason.value == "agent_error" and "HTTP 401" in s.error
    assert "wrong-literal-token" not in s.error
    store._db.execute("PRAGMA wal_checkpoint(FULL)")
    assert b"wrong-literal-token" not in store.path.read_bytes()
