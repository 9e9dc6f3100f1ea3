"""Prompt caching: every model call starts with fixed instructions, byte-identical across the turns and sessions of a
test case, so providers' prompt caches apply (requests captured at the real-HTTP fake LLM server)."""

from __future__ import annotations

import re

import pytest

from engine.judging.judges import JUDGE_INSTRUCTIONS
from engine.simulation.user import KICKOFF, SIMULATED_USER_RULES
from tests.fake_llm import FakeReply, example_for_schema
from tests.test_llm_fallback import LLAMA_CPP, mode_of, refusing, schema_in_instructions
from tests.test_simulator import run, turn

pytestmark = pytest.mark.anyio

CASES = [
    {"goal": "Ask where order A1234 is.", "persona": "A terse engineer.",
     "simulation_guidelines": ["Give the order number only when asked."]},
    {"goal": "Ask for a refund of order B77.", "persona": "A polite retiree."},
]

_PER_TURN = re.compile(r"\b(?:turn|round) \d|\d{4}-\d{2}-\d{2}|\d{2}:\d{2}:\d{2}|[0-9a-f]{16,}", re.I)


def user_calls(fake) -> list[list[dict]]:
    """The simulated user's requests (each its list of messages), in order."""
    return [r["messages"] for r in fake.requests if r["messages"][0]["content"].startswith(SIMULATED_USER_RULES)]


def sessions_of(calls: list[list[dict]]) -> list[list[list[dict]]]:
    """The calls grouped by session: a run with concurrency 1 plays one session at a time, and each session's
    first call is the system message and the kick-off alone."""
    sessions: list[list[list[dict]]] = []
    for messages in calls:
        if len(messages) == 2 and messages[1]["content"] == KICKOFF:
            sessions.append([])
        sessions[-1].append(messages)
    return sessions


def assert_cacheable(sessions: list[list[list[dict]]], n_cases: int) -> None:
    by_case: dict[str, list[str]] = {}
    for calls in sessions:
        systems = {m[0]["content"] for m in calls}
        assert len(systems) == 1, "the system message changed between the turns of a session"
        (system,) = systems
        assert system.startswith(SIMULATED_USER_RULES + "\n\n")  # the fixed rules first, then the case
        assert not _PER_TURN.search(system[len(SIMULATED_USER_RULES):]), system
        for earlier, later in zip(calls, calls[1:]):  # each call extends the previous one: a growing cached prefix
            assert later[:len(earlier)] == earlier
        by_case.setdefault(system, []).append(system)
    assert len(by_case) == n_cases  # one system message per case, shared by all its sessions (repeats)
    assert all(len(v) == 2 for v in by_case.values())


async def test_the_user_prompt_prefix_is_byte_identical_across_turns_and_sessions_of_a_case(store, fake_llm):
    fake_llm.set_handler(lambda req: turn(message="And what happens next?"))
    summary = await run(store, fake_llm, CASES, max_turns=4, repeats=2, concurrency=1, cache=False)
    assert summary.turns_done == 16
    sessions = sessions_of(user_calls(fake_llm))
    assert [len(s) for s in sessions] == [4, 4, 4, 4]
    assert_cacheable(sessions, n_cases=2)
    assert "{" not in SIMULATED_USER_RULES.split("Reply with a JSON object")[0]  # no placeholder left in the rules


async def test_the_json_object_fallback_keeps_the_prefix_stable(store, fake_llm):
    """Without json_schema the schema goes at the end of the system message: the same text on every call."""
    fake_llm.set_handler(refusing(LLAMA_CPP, reply=turn(message="And what happens next?")))
    await run(store, fake_llm, CASES, max_turns=3, repeats=2, concurrency=1, cache=False)
    calls = [r for r in fake_llm.requests if mode_of(r) == "json_object"]
    assert len(calls) == 12  # the first call's refusal paid once for the run
    schema = schema_in_instructions(calls[0])
    assert set(schema["required"]) == {"message", "goal_achieved", "end_conversation", "reason"}
    assert all(r["messages"][0]["content"].endswith(calls[0]["messages"][0]["content"].rsplit("\n\n", 1)[1])
               for r in calls)
    assert_cacheable(sessions_of([r["messages"] for r in calls]), n_cases=2)


async def test_judge_system_messages_are_the_same_for_every_session(store, fake_llm):
    def handle(req: dict) -> FakeReply:
        fmt = req.get("response_format") or {}
        if req["messages"][0]["content"].startswith(SIMULATED_USER_RULES):
            return FakeReply(content=turn(message="Anything else?"))
        return FakeReply(content=example_for_schema(fmt["json_schema"]["schema"]))

    fake_llm.set_handler(handle)
    await run(store, fake_llm, [CASES[0], {**CASES[1], "expectations": {"expected_outcome": "A refund."}}],
              max_turns=2, repeats=2, concurrency=1, cache=False,
              scorers=["goal_achievement", "knowledge_retention",
                       {"name": "polite", "instructions": "Was the assistant polite? {{ conversation }}"}])
    judge_calls = [r["messages"] for r in fake_llm.requests if r["messages"][0]["content"].startswith(JUDGE_INSTRUCTIONS)]
    assert len(judge_calls) == 4 * 3
    systems: dict[str, set[str]] = {}
    for messages in judge_calls:
        system = messages[0]["content"]
        name = re.search(r'<criterion name="([^"]+)">', system).group(1)
        systems.setdefault(name, set()).add(system)
        assert re.search(r"<turn number> is 1-\d+\.$", messages[-1]["content"])  # the session's own range, last
        assert not _PER_TURN.search(system), system
    assert {k: len(v) for k, v in systems.items()} == {"goal_achievement": 1, "knowledge_retention": 1, "polite": 1}
