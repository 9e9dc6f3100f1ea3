"""Model-backed issue clustering follows the same rules as the offline grouping: one issue per root cause,
each failing turn in exactly one issue, other signals at a turn carried as also_seen, offline signatures
kept, and a malformed analyst reply never loses a failure.

test_agent runs end to end in process: the example support agent, the offline simulated user, and the
judges and the analyst on a model served by the local fake OpenAI-compatible server.
"""

from __future__ import annotations

import json
import re

import pytest

from engine import LiteLLMBackend, OfflineBackend
from engine.issues import collect_failures, discover_issues, primary_causes
from engine.llm.base import LLMSettings
from engine.pipeline.agent_test import test_agent
from engine.pipeline.rerun import rerun_issues
from tests.conftest import ROOT
from tests.fake_llm import FakeReply

pytestmark = pytest.mark.anyio

SCORERS = ["knowledge_retention", "conversation_completeness", "goal_achievement"]
_CRITERION = re.compile(r'<criterion name="(\w+)">')
_TURN = re.compile(r"^\[turn (\d+)\] (USER|ASSISTANT|ASSISTANT FAILED): (.*)$", re.M)
_FAILURE = re.compile(r"^(f\d+) \| session (\S+) \| turn (\S+) \| signal (\S+) \|", re.M)


def verdict(value, rationale: str, *evidence: tuple[int, str, str]) -> FakeReply:
    return FakeReply(content={"value": value, "rationale": rationale,
                              "evidence": [{"turn": t, "role": r, "quote": q[:150]} for t, r, q in evidence]})


def judge(request: dict) -> FakeReply:
    """A model judge that sees what the support agent's flaws do: it forgets the name, refuses to cancel, crashes."""
    criterion = _CRITERION.search(request["messages"][0]["content"]).group(1)
    turns = [(int(t), who, text) for t, who, text in _TURN.findall(request["messages"][1]["content"])]
    forgot = next(((t, text) for t, who, text in turns if who == "ASSISTANT" and "don't know your name" in text), None)
    refused = next(((t, text) for t, who, text in turns if who == "ASSISTANT" and "can't help with" in text), None)
    crashed = next(((t, text) for t, who, text in turns if who == "ASSISTANT FAILED"), None)
    if criterion == "knowledge_retention" and forgot:
        return verdict(False, "It forgot the name Dana.", (1, "user", "My name is Dana."),
                       (forgot[0], "assistant", forgot[1]))
    if criterion == "conversation_completeness" and (forgot or refused or crashed):
        t, text = forgot or refused or crashed
        return verdict(False, "A request went unanswered.", (t, "assistant", text))
    if criterion == "goal_achievement" and (forgot or refused or crashed):
        last = max(t for t, _, _ in turns)
        return verdict(False, "The goal was not reached.", (last, "assistant", turns[-1][2]))
    return verdict(True, "Fine.")


def sensible_clusters(failures: list[tuple[str, str, str, str]]) -> dict:
    """What a good analyst answers: one cluster per root cause (here, per signal)."""
    by_signal: dict[str, list[str]] = {}
    for fid, _, _, signal in failures:
        by_signal.setdefault(signal, []).append(fid)
    return {"clusters": [{"title": f"Problem with {signal}", "description": "What goes wrong.", "failure_ids": ids,
                          "category": "correctness", "suspected_cause": "a cause", "suggested_fix": "a fix",
                          "caused_by_simulator": False} for signal, ids in by_signal.items()]}


def sloppy_clusters(failures: list[tuple[str, str, str, str]]) -> dict:
    """Valid JSON, careless content: the first id twice, an unknown id, and the last failure left out."""
    ids = [f[0] for f in failures]
    return {"clusters": [
        {"title": "Everything", "description": "d", "failure_ids": [ids[0], "f999"], "category": "vibes",
         "suspected_cause": "c", "suggested_fix": "f", "caused_by_simulator": False},
        {"title": "Again", "description": "d", "failure_ids": ids[:-1], "category": "memory",
         "suspected_cause": "c", "suggested_fix": "f", "caused_by_simulator": False}]}


def merging_clusters(failures: list[tuple[str, str, str, str]]) -> dict:
    """An analyst that sees one cause behind the forgotten name and the refusal: two offline keys, one issue."""
    judged = [f[0] for f in failures if f[3] != "agent_error"]
    crashes = [f[0] for f in failures if f[3] == "agent_error"]
    return {"clusters": [
        {"title": "Unhelpful replies after the first turn", "description": "d", "failure_ids": judged,
         "category": "correctness", "suspected_cause": "c", "suggested_fix": "f", "caused_by_simulator": False},
        {"title": "Gift card refunds crash", "description": "d", "failure_ids": crashes, "category": "robustness",
         "suspected_cause": "c", "suggested_fix": "f", "caused_by_simulator": False}]}


ANALYSTS = {
    "sensible": lambda failures: FakeReply(content=sensible_clusters(failures)),
    "sloppy": lambda failures: FakeReply(content=sloppy_clusters(failures)),
    "not-json": lambda failures: FakeReply(content="Here are the clusters: f1 and f2 belong together."),
    "wrong-shape": lambda failures: FakeReply(content={"clusters": [{"title": "x", "failure_ids": "f1"}]}),
    "server-error": lambda failures: FakeReply(status=500, content="analyst down"),
}
MERGING = {"merging": lambda failures: FakeReply(content=merging_clusters(failures))}


async def run(store, fake_llm, analyst: str):
    seen: list[list[tuple[str, str, str, str]]] = []

    def handler(request: dict) -> FakeReply:
        system = request["messages"][0]["content"]
        if "<criterion" in system:
            return judge(request)
        failures = _FAILURE.findall(request["messages"][1]["content"])
        seen.append(failures)
        return {**ANALYSTS, **MERGING}[analyst](failures)

    fake_llm.set_handler(handler)
    llm = LiteLLMBackend(LLMSettings(model="openai/fake-analyst", api_base=fake_llm.url, api_key="k", max_retries=1,
                                     backoff_s=0.01))
    report = await test_agent(store, "examples/support_agent.py:support_agent", test_cases="examples/support_cases.yaml",
                              num_test_cases=0, user_model="offline", generator_model="offline", llm=llm,
                              scorers=SCORERS, max_turns=6, workspace=ROOT, shrink=False)
    sessions = await store.get_sessions(report.run_id)
    assessments = await store.get_assessments([s.id for s in sessions])
    return report, sessions, assessments, seen, llm


def rows(issues) -> list[tuple[str, int | None]]:
    return sorted((e.session_id, e.turn) for i in issues for e in i.evidence)


@pytest.mark.parametrize("analyst", list(ANALYSTS))
async def test_model_clustering_keeps_one_issue_per_root_cause_and_every_failing_turn_once(store, fake_llm, analyst):
    report, sessions, assessments, seen, _ = await run(store, fake_llm, analyst)
    primary = primary_causes(collect_failures(sessions, assessments))
    assert seen and all(len(s) == len(primary) for s in seen)  # the analyst saw each primary cause once
    assert {f[3] for f in seen[0]} == {"agent_error", "conversation_completeness", "knowledge_retention"}
    # every failing turn is evidence of exactly one issue: none lost, none counted twice
    assert rows(report.issues) == sorted((f.session_id, f.turn) for f in primary)
    offline, _ = await discover_issues(sessions, assessments, OfflineBackend())
    # one issue per root cause, under the offline signature (and so the same id in every run)
    assert sorted((i.id, i.signature) for i in report.issues) == sorted((i.id, i.signature) for i in offline)
    by_signal = {i.signals[0]: i for i in report.issues}
    assert {"goal_achievement", "conversation_completeness"} <= set(by_signal["agent_error"].also_seen)
    assert {"goal_achievement", "conversation_completeness"} <= set(by_signal["knowledge_retention"].also_seen)
    assert report.issues and all(i.source == "agent" for i in report.issues)


async def test_a_malformed_analyst_reply_is_counted_and_falls_back_to_the_offline_grouping(store, fake_llm):
    report, *_ = await run(store, fake_llm, "not-json")
    analyst = report.usage["analyst"]
    assert analyst.failed_calls >= 1 and analyst.failures
    assert json.dumps(report.model_dump(mode="json"))  # the report is whole


async def test_an_issue_the_model_merged_from_two_root_causes_still_reproduces_on_a_rerun(store, fake_llm,
                                                                                           monkeypatch):
    report, *_ = await run(store, fake_llm, "merging")
    merged = next(i for i in report.issues if i.title == "Unhelpful replies after the first turn")
    assert merged.signature.startswith("model|") and sorted(merged.signatures) == [
        "conversation_completeness:refusal", "knowledge_retention"]
    # the run's own models again (the user offline, judges and analyst on the fake), against the unchanged agent
    monkeypatch.setenv("CONVSIM_API_BASE", fake_llm.url)
    monkeypatch.setenv("CONVSIM_API_KEY", "sk-test-not-a-real-key")
    outcome = await rerun_issues(store, report.run_id, workspace=ROOT)
    assert {c.title: c.status for c in outcome.issues} == {
        "Unhelpful replies after the first turn": "reproduces", "Gift card refunds crash": "reproduces"}
    assert outcome.new_issues == []
