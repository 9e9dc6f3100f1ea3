"""The offline simulated user: answers the agent's questions with details, resumes after scripted turns, ends."""

from __future__ import annotations

import pytest

from engine import StopReason, simulate
from engine.models import Message, TestCase
from engine.simulation.offline_user import offline_user_turn, requested_detail
from engine.simulation.turns import SimulatorContext

pytestmark = pytest.mark.anyio

ASKING_AGENT = '''
def respond(messages):
    last = messages[-1]["content"]
    if "A1234" in last:
        return "Thanks, order A1234 is refunded."
    if "refund" in last.lower():
        return "Sure. What is your order number?"
    return "Okay, noted."
'''

ECHO = '''
def respond(messages):
    return "Noted: " + messages[-1]["content"]
'''


async def users_of(store, tmp_path, source, case, max_turns=8):
    (tmp_path / "agent.py").write_text(source)
    summary = await simulate(store, "agent.py:respond", [case], model="offline", workspace=tmp_path,
                             max_turns=max_turns)
    session = await store.get_session(summary.sessions[0].session_id)
    return [m.content for m in session.messages if m.role == "user"], session


async def test_offline_user_gives_the_order_number_the_agent_asks_for(store, tmp_path):
    users, session = await users_of(store, tmp_path, ASKING_AGENT,
                                    {"goal": "Ask for a refund. Your order number is A1234."})
    assert users[1] == "My order number is A1234."
    assert session.stop_reason == StopReason.GOAL_ACHIEVED


async def test_offline_user_reads_details_from_the_case_context(store, tmp_path):
    users, _ = await users_of(store, tmp_path, ASKING_AGENT,
                              {"goal": "Ask for a refund.", "context": {"order_id": "A1234"}})
    assert "My order number is A1234." in users


async def test_after_scripted_turns_the_offline_user_goes_on_and_ends(store, tmp_path):
    goal = "Ask about the returns policy. Ask about shipping times. Ask whether the assistant ships abroad."
    users, session = await users_of(store, tmp_path, ECHO, {
        "goal": goal, "scripted_turns": ["Could you help me with the returns policy?"]})
    assert users == ["Could you help me with the returns policy?", "Could you help me with shipping times?",
                     "Do you ship abroad?"]
    assert session.stop_reason == StopReason.GOAL_ACHIEVED  # not a loop to max_turns


def test_detail_requests():
    assert requested_detail("What's your booking reference?", "Change booking XK9F2Q to Friday.", {}) == (
        "booking reference", "XK9F2Q")
    assert requested_detail("Which email should I use?", "Your email is dana@example.com.", {}) == (
        "email", "dana@example.com")
    assert requested_detail("What date would you like?", "Move the flight to 2026-03-14.", {}) == ("date", "2026-03-14")
    assert requested_detail("Okay.", "Order A1234", {}) is None  # not a question
    assert requested_detail("What is your order number?", "Ask about shipping.", {}) is None  # nothing to give


def test_the_offline_user_is_deterministic_and_does_not_repeat_a_said_step():
    case = TestCase(goal="Ask about the returns policy. Ask about shipping times.")
    msgs = [Message(role="user", content="Could you help me with the returns policy?", scripted=True),
            Message(role="assistant", content="30 days.")]
    a = offline_user_turn(SimulatorContext(case, "s", msgs, 2, 5))
    b = offline_user_turn(SimulatorContext(case, "s", msgs, 2, 5))
    assert a == b and a.message == "Could you help me with shipping times?"


async def test_a_detail_already_given_is_not_given_again(store, tmp_path):
    forgetful = '''
def respond(messages):
    if "remember" in messages[-1]["content"]:
        return "Sorry, I don't know your name. What is your name?"
    return "Okay."
'''
    users, session = await users_of(store, tmp_path, forgetful,
                                    {"goal": "Introduce yourself as Dana. Ask whether the assistant remembers your name."})
    assert users.count("Hi, my name is Dana.") == 1 and "My name is Dana." not in users
    assert session.stop_reason == StopReason.USER_ENDED


async def test_a_one_word_goal_is_said_once_then_the_user_ends(store, tmp_path):
    users, session = await users_of(store, tmp_path, ECHO, {"goal": "Say hi."})
    assert users == ["Hi."] and session.stop_reason == StopReason.GOAL_ACHIEVED
