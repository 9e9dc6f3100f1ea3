"""A crash points at the agent's own code; an HTTP error carries its status and a short redacted body excerpt."""

from __future__ import annotations

import json

import pytest

from engine import AgentError, Message, StopReason, simulate
from engine import secrets
from engine.simulation.targets import resolve_target
from tests.test_targets import http_agent  # noqa: F401  (the local HTTP fake fixture)

pytestmark = pytest.mark.anyio

AGENT = '''import json


def lookup(order):
    return {"A1": 1}[order]


def respond(messages):
    if len(messages) > 2:
        return lookup("Z9")
    return "first reply"


def parse(messages):
    return json.loads("{not json")
'''


def write_agent(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "support_agent.py").write_text(AGENT)


async def crash(tmp_path, name, history):
    target = resolve_target(f"pkg/support_agent.py:{name}", workspace=tmp_path)
    try:
        with pytest.raises(AgentError) as info:
            await target.respond(history, session_id="s", context={})
    finally:
        await target.aclose()
    return info.value


async def test_a_python_crash_carries_the_agents_own_frames(tmp_path):
    write_agent(tmp_path)
    history = [Message(role="user", content="a"), Message(role="assistant", content="b"),
               Message(role="user", content="c")]
    e = await crash(tmp_path, "respond", history)
    assert e.frames == ["pkg/support_agent.py:10 in respond", "pkg/support_agent.py:5 in lookup"]


async def test_stdlib_and_convsim_frames_are_left_out(tmp_path):
    write_agent(tmp_path)
    e = await crash(tmp_path, "parse", [Message(role="user", content="a")])
    assert e.frames == ["pkg/support_agent.py:15 in parse"]  # json's own frames are not there
    assert not any("engine/" in f or "json/" in f for f in e.frames)


async def test_frames_are_recorded_on_the_transcripts_error_message(store, tmp_path):
    write_agent(tmp_path)
    summary = await simulate(store, "pkg/support_agent.py:respond", [{"goal": "Ask about A. Ask about B. Ask about C."}],
                             model="offline", workspace=tmp_path, max_turns=4)
    s = summary.sessions[0]
    assert s.stop_reason == StopReason.AGENT_ERROR
    session = await store.get_session(s.session_id)
    failed = [m for m in session.messages if m.error]
    assert failed[0].error_frames == ["pkg/support_agent.py:10 in respond", "pkg/support_agent.py:5 in lookup"]


async def test_frames_are_redacted(tmp_path):
    secrets.register("supersecretdir1234")
    (tmp_path / "supersecretdir1234").mkdir()
    (tmp_path / "supersecretdir1234" / "a.py").write_text("def respond(messages):\n    raise RuntimeError('x')\n")
    target = resolve_target("supersecretdir1234/a.py:respond", workspace=tmp_path)
    with pytest.raises(AgentError) as info:
        await target.respond([Message(role="user", content="a")], session_id="s", context={})
    assert info.value.frames and "supersecretdir1234" not in json.dumps(info.value.frames)


async def test_an_http_error_carries_its_status_and_a_short_redacted_excerpt(http_agent):  # noqa: F811
    secrets.register("tok-9f8e7d6c5b4a")
    srv = http_agent(lambda path, body, headers: (502, {"error": "upstream tok-9f8e7d6c5b4a " + "x" * 500}))
    target = resolve_target(srv.url + "/v1/chat/completions")
    try:
        with pytest.raises(AgentError) as info:
            await target.respond([Message(role="user", content="a")], session_id="s", context={})
    finally:
        await target.aclose()
    e = info.value
    assert e.status == 502 and e.kind == "http" and "HTTP 502" in str(e)
    assert "tok-9f8e7d6c5b4a" not in str(e)
    excerpt = str(e).split(": ", 1)[1]
    assert len(excerpt) <= 203 and excerpt.endswith("...")
