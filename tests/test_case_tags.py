"""TestCase.tags: labels kept with a case (files, store, exports) that judges and the simulated user never see."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine import OfflineBackend, TestCase, simulate
from engine.cases import load_test_cases
from engine.judging.judges import JUDGE_CRITERIA, BuiltinJudge, CustomJudge, context_sections
from engine.limits import MAX_LIST_ITEMS
from engine.records import record_to_session, session_to_record
from tests.conftest import ROOT

pytestmark = pytest.mark.anyio

EXAMPLE_FILE = "examples/support_agent.py:support_agent"


@pytest.mark.parametrize("name", ["support_cases.yaml", "support_cases.json"])
def test_example_labels_are_tags_not_expectations(name):
    cases = {c.id: c for c in load_test_cases(str(ROOT / "examples" / name))}
    assert cases["remember-name"].tags == ["planted_flaw:forgets_user_name"]
    assert all("planted_flaw" not in c.expectations for c in cases.values())
    assert sum(bool(c.tags) for c in cases.values()) == 3


def test_tags_are_bounded_like_other_lists():
    with pytest.raises(ValidationError):
        TestCase(goal="g", tags=["x"] * (MAX_LIST_ITEMS + 1))
    with pytest.raises(ValidationError):
        TestCase(goal="g", tags=["  "])
    assert TestCase(goal="g").tags == []


async def test_tags_survive_the_store_and_exports_but_never_reach_a_judge(store):
    (case,) = [c for c in load_test_cases(str(ROOT / "examples" / "support_cases.yaml")) if c.id == "remember-name"]
    summary = await simulate(store, EXAMPLE_FILE, [case.model_dump()], llm=OfflineBackend(), workspace=ROOT,
                             max_turns=4)
    assert [c.tags for c in await store.get_test_cases(summary.run_id)] == [["planted_flaw:forgets_user_name"]]
    (session,) = await store.get_sessions(summary.run_id)
    assert session.test_case.tags == ["planted_flaw:forgets_user_name"]
    again = record_to_session(session_to_record(session), 1)  # export, then import
    assert again.test_case.tags == ["planted_flaw:forgets_user_name"]
    run_id = await store.import_sessions([again])
    (imported,) = await store.get_sessions(run_id)
    assert imported.test_case.tags == ["planted_flaw:forgets_user_name"]
    sections = context_sections(session, role="A support bot.")
    assert "planted_flaw" not in sections and "forgets_user_name" not in sections
    assert "<goal>" in sections and "<expectations>" in sections
    assert all("planted_flaw" not in (m.content or "") for m in session.messages)
    prompts = [BuiltinJudge(name, {"guidelines": ["Be polite."]} if name == "guidelines" else None).messages(session)
               for name in JUDGE_CRITERIA]
    prompts.append(CustomJudge("mine", "Goal {{ goal }}, expected {{ expectations }}: {{ conversation }}").messages(session))
    for messages in prompts:
        text = " ".join(m["content"] for m in messages)
        assert "planted_flaw" not in text and "forgets_user_name" not in text
