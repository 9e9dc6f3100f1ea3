"""The model simulated user, hardened: its rules are in the prompt and the parser enforces them (fake LLM server)."""

from __future__ import annotations

import pytest

from engine import StopReason
from engine.simulation.user import SIMULATED_USER_PROMPT, is_goodbye, message_problem
from engine.simulation.turns import UserTurn
from tests.conftest import agent
from tests.test_simulator import run, turn

pytestmark = pytest.mark.anyio


def test_prompt_carries_the_rules():
    p = " ".join(SIMULATED_USER_PROMPT.lower().split())
    assert "confirm it and wait for the action" in p and "until the assistant states the outcome" in p
    assert "do not state the whole goal in your first message" in p
    assert "no reasoning, no stop decision, no json" in p
    assert "a goodbye ends the conversation" in p and "never say goodbye twice" in p


@pytest.mark.parametrize("text", [
    'Sure. {"message": "hi", "goal_achieved": false}', "As the user, I will ask about my order.",
    "As a simulated user I want a refund.", "My order is late. goal_achieved: false",
    "Fine.\nReasoning: the agent answered", "THOUGHT: stop now", "Decision : end", "AS A TEST USER, hi",
    "END_CONVERSATION", "as the ſimulated uſer, i will ask",  # long s: the regex's case folding matches it
])
def test_leaked_reasoning_or_json_is_a_problem(text):
    assert message_problem(UserTurn(message=text))
    assert message_problem(UserTurn(message="Where is my order A1234?")) is None


def test_goodbyes():
    assert is_goodbye("Thanks, goodbye!") and is_goodbye("Bye") and is_goodbye("Great, have a nice day.")
    assert not is_goodbye("Could you say bye to my brother?") and not is_goodbye("Where is my order?")


async def test_a_leaking_message_is_repaired_once(store, fake_llm):
    fake_llm.queue(turn(message="As the user, I will ask about my order."), turn(message="Where is my order?"),
                   turn(goal_achieved=True))
    summary = await run(store, fake_llm, [{"goal": "g"}], target=agent("echo"))
    session = await store.get_session(summary.sessions[0].session_id)
    assert [m.content for m in session.messages if m.role == "user"] == ["Where is my order?"]
    repair = fake_llm.requests[1]["messages"][-1]["content"]
    assert "no reasoning, no JSON" in repair
    assert session.stop_reason == StopReason.GOAL_ACHIEVED


async def test_a_message_still_leaking_after_repair_is_a_simulator_error_never_sent(store, fake_llm):
    fake_llm.set_handler(lambda req: turn(message='{"message": "hi", "goal_achieved": false}'))
    summary = await run(store, fake_llm, [{"goal": "g"}], target=agent("echo"))
    s = summary.sessions[0]
    assert s.stop_reason == StopReason.SIMULATOR_ERROR and "even after one repair" in s.stop_detail
    session = await store.get_session(s.session_id)
    assert not [m for m in session.messages if m.role == "user"]
    assert fake_llm.calls == 2


async def test_no_second_goodbye(store, fake_llm):
    fake_llm.set_handler(lambda req: turn(message="Thanks, goodbye!"))
    summary = await run(store, fake_llm, [{"goal": "g"}], target=agent("echo"), max_turns=5)
    s = summary.sessions[0]
    session = await store.get_session(s.session_id)
    assert [m.content for m in session.messages if m.role == "user"] == ["Thanks, goodbye!"]
    assert s.stop_reason == StopReason.USER_ENDED


async def test_goodbye_keeps_the_models_goal_decision(store, fake_llm):
    fake_llm.queue(turn(message="Bye!"), turn(goal_achieved=True, reason="done"))
    summary = await run(store, fake_llm, [{"goal": "g"}], target=agent("echo"))
    assert summary.sessions[0].stop_reason == StopReason.GOAL_ACHIEVED


@pytest.mark.parametrize("first", [True, False])
async def test_an_empty_simulated_message_is_a_simulator_error_not_an_agent_error(store, fake_llm, first):
    replies = [turn(message="   ")] if first else [turn(message="hello"), turn(message="")]
    fake_llm.queue(*replies)
    summary = await run(store, fake_llm, [{"goal": "g"}], target=agent("echo"))
    s = summary.sessions[0]
    assert s.stop_reason == StopReason.SIMULATOR_ERROR and "empty message" in s.stop_detail
    session = await store.get_session(s.session_id)
    assert not any(m.error for m in session.messages)
