"""Offline generation from descriptions in several domains and forms: sentences, bullets, 'X: a, b, c'."""

from __future__ import annotations

import pytest

from engine import OfflineBackend
from engine.cases import dedupe_cases, describe_agent, generate_cases
from engine.simulation.offline_user import as_user_speech, goal_steps

pytestmark = pytest.mark.anyio

DOMAINS = {
    "travel-colon-list": ("Travel assistant: flights, hotels, changes and refunds",
                          ["flights", "hotels", "changes", "refunds"], ["booking_code", "date", "amount"]),
    "support-sentences": ("A customer support assistant for an online shop. It helps customers with order "
                          "tracking, returns and refunds, and delivery addresses. It never gives legal advice.",
                          ["order tracking", "returns and refunds", "delivery addresses"],
                          ["order_id", "amount", "address"]),
    "banking-bullets": ("Banking helper for Northbank customers.\nYou can:\n- check an account balance\n"
                        "- transfer money between accounts\n- block a lost card\n"
                        "Never share another customer's data.",
                        ["check an account balance", "transfer money between accounts", "block a lost card"],
                        ["account_number", "amount", "card_last_four"]),
    "recipe-verbs": ("A recipe bot. It suggests recipes from the ingredients you have. It can also convert "
                     "measurements and plan weekly meals.",
                     ["suggest recipes from the ingredients you have", "convert measurements", "plan weekly meals"],
                     ["ingredients", "quantity", "servings"]),
}


@pytest.mark.parametrize("name", list(DOMAINS))
async def test_every_capability_gets_a_case_with_its_details(name):
    description, capabilities, detail_keys = DOMAINS[name]
    llm = OfflineBackend()
    profile, _ = await describe_agent(llm, description=description)
    assert profile.capabilities == capabilities
    cases, _ = await generate_cases(profile, llm, num_test_cases=10, adversarial=0.2)
    assert len(cases) == 10
    assert len({c.goal for c in cases}) == 10 and dedupe_cases(cases) == cases
    for cap in capabilities:  # a case of its own (plain, memory or out-of-scope), not only within a combination
        assert any(c.tags[1:] == [f"capability:{cap}"] for c in cases), cap
    shapes = [c.tags[0] for c in cases]
    assert shapes.count("memory") >= 1 and shapes.count("out_of_scope") >= 1 and shapes.count("combined") >= 1
    assert shapes.count("adversarial") == 2
    keys = {k for c in cases for k in c.context}
    assert set(detail_keys) <= keys
    for case in cases:
        for value in case.context.values():  # every detail is also said in the goal, so the user can give it
            assert value in case.goal
            assert any(value in as_user_speech(s) for s in goal_steps(case.goal))


async def test_memory_and_out_of_scope_cases_say_what_is_expected():
    profile, _ = await describe_agent(OfflineBackend(), description=DOMAINS["travel-colon-list"][0])
    cases, _ = await generate_cases(profile, OfflineBackend(), num_test_cases=6)
    memory = next(c for c in cases if c.tags[0] == "memory")
    steps = goal_steps(memory.goal)
    assert steps[0].startswith("Introduce yourself as ") and "remembers your name" in memory.goal
    assert steps.index(next(s for s in steps if "remembers your name" in s)) > 1  # asked later, not at once
    out = next(c for c in cases if c.tags[0] == "out_of_scope")
    assert "politely declines" in out.expectations["expected_outcome"]
    assert "poem" in out.goal


async def test_a_description_without_capabilities_still_gives_distinct_goals():
    profile, _ = await describe_agent(OfflineBackend(), description="A friendly assistant.")
    cases, _ = await generate_cases(profile, OfflineBackend(), num_test_cases=6)
    assert len({c.goal for c in cases}) == len(cases) and dedupe_cases(cases) == cases
    assert sum("what it can do" in c.goal for c in cases) <= 3


class _SelfDescribing:
    """An agent whose only source is its own answer to the self-description question."""

    def __init__(self, text: str):
        from engine.models import TargetSpec
        self.spec = TargetSpec(kind="json", url="http://127.0.0.1:9/agent")
        self.text = text

    async def respond(self, history, *, session_id, context):
        class Reply:
            text = self.text
        return Reply()


async def test_capabilities_are_read_from_the_agents_self_description():
    agent = _SelfDescribing("I'm the Spokes bike shop bot. Repairs: booking a repair, spare parts and opening hours.")
    profile, _ = await describe_agent(OfflineBackend(), target=agent)
    assert profile.capabilities == ["booking a repair", "spare parts", "opening hours"]
    cases, _ = await generate_cases(profile, OfflineBackend(), num_test_cases=5)
    assert all(any(f"capability:{cap}" in c.tags for c in cases) for cap in profile.capabilities)
