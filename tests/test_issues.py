"""Issue discovery: failures -> distinct issues, offline and through a model on the fake OpenAI server."""

from __future__ import annotations

import logging

import pytest

from engine import Assessment, Evidence, LiteLLMBackend, Message, OfflineBackend, Session, StopReason, TestCase, Usage
from engine.issues.clustering import CLUSTER_PROMPT
from engine.issues.discovery import collect_failures, discover_issues, issue_id, reproduction_case
from engine.llm.base import LLMSettings
from tests.fake_llm import FakeReply

pytestmark = pytest.mark.anyio

OFFLINE = OfflineBackend()
GIFT_CARD = "Please refund order A1234 to a gift card instead of my credit card"


class Err:
    """An agent turn that failed with this error."""

    def __init__(self, error: str):
        self.error = error


def convo(sid: str, *turns, stop: StopReason = StopReason.GOAL_ACHIEVED, case: TestCase | None = None,
          case_index: int | None = None, repeat: int = 0, detail: str | None = None,
          scripted: int = 0) -> Session:
    """A session from (user, reply) pairs; reply is text or Err(...). The first `scripted` user turns are scripted."""
    messages = []
    for n, (user, reply) in enumerate(turns, 1):
        messages.append(Message(role="user", content=user, turn=n, scripted=n <= scripted))
        if isinstance(reply, Err):
            messages.append(Message(role="assistant", content=None, error=reply.error, turn=n))
        else:
            messages.append(Message(role="assistant", content=reply, turn=n))
    return Session(id=sid, run_id="run-1", case_index=case_index, repeat=repeat, test_case=case, messages=messages,
                   stop_reason=stop, stop_detail=detail, turns=len(turns))


def crashed(sid: str, error: str = "KeyError: 'gift_card'", **kw) -> Session:
    return convo(sid, ("Hi, I'm Sam.", "Hello Sam!"), (GIFT_CARD, Err(error)), stop=StopReason.AGENT_ERROR,
                 detail=error, **kw)


def fine(sid: str, **kw) -> Session:
    return convo(sid, ("Where is order A1234?", "It was delivered yesterday."), ("Thanks!", "You're welcome!"), **kw)


def verdict(sid: str, scorer: str, turn: int | None = 2, *, passed: bool | None = False,
            quote: str = "What's your name?", rationale: str = "", value=None) -> Assessment:
    evidence = [Evidence(turn=turn, role="assistant", quote=quote)] if turn else []
    return Assessment(session_id=sid, scorer=scorer, passed=passed, value=passed if value is None else value,
                      rationale=rationale or f"{scorer} failed at turn {turn}", evidence=evidence, heuristic=True)


def forgetful(sid: str, **kw) -> Session:
    return convo(sid, ("I'm Dana.", "Hi Dana!"), ("Where is order A1234?", "What's your name?"),
                 ("Still Dana.", "Thanks."), **kw)


def model_llm(fake) -> LiteLLMBackend:
    return LiteLLMBackend(LLMSettings(model="openai/fake", api_base=fake.url, api_key="k", max_retries=1,
                                      backoff_s=0.01))


def cluster(ids, title="Forgets the user's name", category="memory", simulator=False, **extra) -> dict:
    return {"title": title, "description": "It forgets.", "failure_ids": list(ids), "category": category,
            "suspected_cause": "history dropped", "suggested_fix": "keep history", "caused_by_simulator": simulator,
            **extra}


# --- crashes ------------------------------------------------------------------------------------


async def test_the_same_crash_in_three_sessions_is_one_high_robustness_issue():
    sessions = [crashed("s1"), fine("s2"), crashed("s3"), crashed("s4"), fine("s5")]
    issues, usage = await discover_issues(sessions, [], OFFLINE)
    (issue,) = issues
    assert (issue.severity, issue.category, issue.source) == ("high", "robustness", "agent")
    assert issue.frequency == "3 of 5 sessions" and issue.session_ids == ["s1", "s3", "s4"]
    assert [(e.session_id, e.turn, e.quote) for e in issue.evidence] == [
        (sid, 2, "KeyError: 'gift_card'") for sid in ("s1", "s3", "s4")]
    assert "KeyError 'gift_card'" in issue.title and "Please refund order A1234" in issue.title
    assert "catch" in issue.suggested_fix and issue.suspected_cause and issue.severity_reason
    assert usage == Usage()


@pytest.mark.parametrize(
    "first, second, expected",
    [
        pytest.param("KeyError: 'gift_card'", "TypeError: 'NoneType' object is not subscriptable", 2,
                     id="different-exception-types"),
        pytest.param("KeyError: 'gift_card'", "KeyError: 'store_credit'", 1, id="quoted-values-normalised"),
        pytest.param("agent returned HTTP 500: request 8f3a9c21 failed",
                     "agent returned HTTP 500: request 1b2c3d44 failed", 1, id="http-ids-normalised"),
        pytest.param("agent returned HTTP 500: oops", "agent returned HTTP 502: oops", 2, id="http-status-kept"),
        pytest.param("agent did not reply within 60s", "agent did not reply within 30s", 1, id="timeouts"),
        pytest.param("ValueError: order 1234 has no items", "ValueError: order 98765 has no items", 1,
                     id="numbers-normalised"),
        pytest.param("ValueError: bad order", "ValueError: unknown customer tier", 2, id="same-type-different-message"),
    ],
)
async def test_crashes_group_by_exception_and_normalised_message(first, second, expected):
    issues, _ = await discover_issues([crashed("s1", first), crashed("s2", second)], [], OFFLINE)
    assert len(issues) == expected
    assert all(i.category == "robustness" and i.severity == "high" for i in issues)


@pytest.mark.parametrize(
    "session",
    [
        pytest.param(crashed("s1"), id="errored-turn"),
        pytest.param(convo("s1", ("Hi", "Hello"), stop=StopReason.AGENT_ERROR, detail="agent returned HTTP 500: boom"),
                     id="stop-reason-only"),
        pytest.param(crashed("s1").model_copy(update={"stop_reason": None}), id="imported-without-stop-reason"),
    ],
)
async def test_an_agent_crash_is_never_dropped_even_without_assessments(session):
    (failure,) = collect_failures([session], [])
    assert failure.signal == "agent_error" and failure.quote
    (issue,) = (await discover_issues([session], [], OFFLINE))[0]
    assert issue.severity == "high" and issue.signals == ["agent_error"]


async def test_a_judged_failure_at_the_crash_turn_joins_the_crash_issue():
    sessions = [crashed("s1"), fine("s2")]
    assessments = [verdict("s1", "goal_achievement", 2, quote="KeyError: 'gift_card'"),
                   verdict("s1", "conversation_completeness", 2, quote="KeyError: 'gift_card'")]
    (issue,) = (await discover_issues(sessions, assessments, OFFLINE))[0]
    assert issue.signals == ["agent_error"]
    assert issue.also_seen == ["conversation_completeness", "goal_achievement"]
    assert [e.scorer for e in issue.evidence] == ["agent_error"] and issue.affected_sessions == 1


async def test_an_empty_reply_is_a_high_robustness_issue():
    session = convo("s1", ("Hi", "Hello"), ("Cancel my order", ""), stop=StopReason.AGENT_EMPTY)
    (issue,) = (await discover_issues([session], [], OFFLINE))[0]
    assert (issue.severity, issue.category, issue.signals) == ("high", "robustness", ["agent_empty"])
    assert issue.evidence[0].turn == 2 and issue.evidence[0].quote == "Cancel my order"


# --- judged failures and severity ---------------------------------------------------------------


@pytest.mark.parametrize(
    "sessions, extra, severity",
    [
        pytest.param([forgetful("s1"), forgetful("s2"), fine("s3")], [], "medium", id="two-sessions-goal-met"),
        pytest.param([forgetful("s1"), fine("s2")], [], "low", id="one-session-goal-met"),
        pytest.param([forgetful("s1"), forgetful("s2"), fine("s3")],
                     [verdict("s1", "goal_achievement", 3), verdict("s2", "goal_achievement", 3)], "high",
                     id="goal-failed-in-all"),
        pytest.param([forgetful("s1", stop=StopReason.USER_ENDED), forgetful("s2", stop=StopReason.USER_ENDED),
                      forgetful("s3")], [], "high", id="user-gave-up-in-most"),
        pytest.param([forgetful("s1", stop=StopReason.USER_ENDED), forgetful("s2")], [], "medium",
                     id="goal-failed-in-half-only"),
        pytest.param([forgetful("s1", case_index=0, repeat=0), fine("s2", case_index=0, repeat=1)], [], "medium",
                     id="intermittent-across-repeats"),
    ],
)
async def test_knowledge_retention_failures_are_one_memory_issue_with_rule_based_severity(sessions, extra, severity):
    failing = [s.id for s in sessions if s.id != "s3" and s.messages[3].content == "What's your name?"]
    assessments = [verdict(sid, "knowledge_retention", 2) for sid in failing] + extra
    issues, _ = await discover_issues(sessions, assessments, OFFLINE)
    (memory,) = [i for i in issues if "knowledge_retention" in i.signals]
    assert (memory.category, memory.severity) == ("memory", severity), memory.severity_reason
    assert memory.title == "Forgets facts the user gave earlier"
    assert "history" in memory.suspected_cause and memory.affected_sessions == len(failing)


async def test_a_safety_failure_is_high_even_in_one_session_whose_goal_was_met():
    sessions = [fine("s1"), fine("s2")]
    (issue,) = (await discover_issues(sessions, [verdict("s1", "conversational_safety", 1, quote="4111 1111")],
                                      OFFLINE))[0]
    assert (issue.severity, issue.category) == ("high", "safety")


@pytest.mark.parametrize(
    "assessment",
    [
        pytest.param(Assessment(session_id="s1", scorer="goal_achievement", error="unscored: judge failed"),
                     id="judge-failure"),
        pytest.param(Assessment(session_id="s1", scorer="politeness", value=3.0, passed=None), id="value-only"),
        pytest.param(verdict("s1", "goal_achievement", passed=True), id="passing"),
        pytest.param(verdict("other-run-session", "goal_achievement"), id="session-not-in-run"),
    ],
)
async def test_unscored_and_passing_assessments_are_not_failures(assessment):
    assert collect_failures([fine("s1")], [assessment]) == []
    assert (await discover_issues([fine("s1")], [assessment], OFFLINE))[0] == []


async def test_each_failing_turn_of_a_per_turn_scorer_is_a_failure_of_one_issue():
    turns = [verdict("s1", "no_apology", t, quote=f"Sorry {t}") for t in (1, 2)]
    for a, t in zip(turns, (1, 2)):
        a.turn = t
    failures = collect_failures([forgetful("s1")], turns)
    assert [(f.signal, f.turn) for f in failures] == [("no_apology", 1), ("no_apology", 2)]
    (issue,) = (await discover_issues([forgetful("s1")], turns, OFFLINE))[0]
    assert issue.affected_sessions == 1 and len(issue.evidence) == 2 and "no_apology" in issue.title


@pytest.mark.parametrize(
    "rationale, quote, title",
    [
        pytest.param("Turn 2: the user's request was not answered: the agent declined or said it could not help.",
                     "I'm sorry, I can't help with cancelling orders.", "Refuses or ignores requests it should handle",
                     id="refusal"),
        pytest.param("Turn 2: the second question was dropped.", "Your order shipped.",
                     "Leaves user requests unanswered", id="other-gap"),
    ],
)
async def test_completeness_failures_tell_refusals_apart(rationale, quote, title):
    assessments = [verdict("s1", "conversation_completeness", 2, quote=quote, rationale=rationale)]
    (issue,) = (await discover_issues([fine("s1")], assessments, OFFLINE))[0]
    assert issue.title == title and issue.category == "correctness"


async def test_offline_judges_faulting_the_same_turn_are_one_issue_named_by_the_most_specific():
    assessments = [verdict("s1", "conversation_completeness", 2, rationale="declined"),
                   verdict("s1", "knowledge_retention", 2), verdict("s1", "goal_achievement", 3)]
    issues, _ = await discover_issues([forgetful("s1")], assessments, OFFLINE)
    (memory,) = issues  # the goal failing later in the same session is explained by the forgotten fact
    assert memory.category == "memory" and memory.signals == ["knowledge_retention"]
    assert memory.also_seen == ["conversation_completeness", "goal_achievement"]
    assert [(e.session_id, e.turn) for e in memory.evidence] == [("s1", 2)]


async def test_issues_are_sorted_by_severity_then_sessions_affected():
    sessions = [crashed("s1"), forgetful("s2"), forgetful("s3"), fine("s4")]
    assessments = [verdict("s2", "knowledge_retention"), verdict("s3", "knowledge_retention"),
                   verdict("s4", "dialogue_coherence", 1)]
    issues, _ = await discover_issues(sessions, assessments, OFFLINE)
    assert [(i.severity, i.signals[0]) for i in issues] == [
        ("high", "agent_error"), ("medium", "knowledge_retention"), ("low", "dialogue_coherence")]


# --- the simulator's own failures ---------------------------------------------------------------


async def test_a_simulator_error_is_a_simulator_issue_kept_apart_from_agent_issues():
    broken = convo("s2", ("Hi", "Hello!"), stop=StopReason.SIMULATOR_ERROR,
                   detail="LLMError: RateLimitError: slow down")
    issues, _ = await discover_issues([crashed("s1"), broken, fine("s3")], [], OFFLINE)
    assert [(i.source, i.signals) for i in issues] == [("agent", ["agent_error"]), ("simulator", ["simulator_error"])]
    assert issues[1].evidence[0].quote == "LLMError: RateLimitError: slow down"


@pytest.mark.parametrize(
    "message, scripted, flagged",
    [
        pytest.param("How can I help you today?", 0, True, id="assistant-greeting"),
        pytest.param("As an AI, I can't place orders.", 0, True, id="as-an-ai"),
        pytest.param("How can I help you today?", 2, False, id="scripted-by-the-author"),
        pytest.param("How can I reset my password?", 0, False, id="ordinary-question"),
    ],
)
async def test_a_simulated_user_speaking_as_the_assistant_is_a_simulator_issue(message, scripted, flagged):
    session = convo("s1", ("Hi", "Hello! What can I do for you?"), (message, "I'm the support assistant."),
                    scripted=scripted, stop=StopReason.MAX_TURNS)
    issues, _ = await discover_issues([session], [], OFFLINE)
    assert [(i.source, i.signals) for i in issues] == ([("simulator", ["simulator_persona_break"])] if flagged else [])


# --- ids and reproduction -----------------------------------------------------------------------


async def test_issue_ids_are_stable_across_calls_and_session_ids():
    def run(prefix: str):
        sessions = [crashed(f"{prefix}1"), forgetful(f"{prefix}2"), forgetful(f"{prefix}3")]
        return sessions, [verdict(f"{prefix}2", "knowledge_retention"), verdict(f"{prefix}3", "knowledge_retention")]

    first = [i.id for i in (await discover_issues(*run("a"), OFFLINE))[0]]
    again = [i.id for i in (await discover_issues(*run("a"), OFFLINE))[0]]
    other_sessions = [i.id for i in (await discover_issues(*run("zz-"), OFFLINE))[0]]
    assert first == again == other_sessions and len(set(first)) == 2
    assert all(i.startswith("ISS-") and len(i) == 12 for i in first)
    assert issue_id("knowledge_retention") in first


def test_reproduction_case_scripts_the_user_turns_up_to_the_failing_turn():
    case = TestCase(id="remember-name", goal="Check that it keeps my name", persona="Dana, chatty",
                    context={"customer_tier": "gold"}, scripted_turns=["I'm Dana."],
                    expectations={"expected_outcome": "remembers Dana"})
    session = forgetful("s1", case=case)
    repro = reproduction_case(session, 2)
    assert repro.scripted_turns == ["I'm Dana.", "Where is order A1234?"]
    assert (repro.goal, repro.persona, repro.context, repro.expectations) == (
        case.goal, case.persona, case.context, case.expectations)
    assert repro.id == "remember-name-repro"
    assert reproduction_case(session, None).scripted_turns == ["I'm Dana.", "Where is order A1234?", "Still Dana."]
    assert case.scripted_turns == ["I'm Dana."]  # the original is untouched


@pytest.mark.parametrize("case", [pytest.param(None, id="no-case"),
                                  pytest.param(TestCase(goal="(imported conversation)"), id="import-placeholder")])
def test_reproduction_of_an_imported_session_takes_its_goal_from_the_first_user_message(case):
    repro = reproduction_case(forgetful("s9", case=case), 1)
    assert (repro.goal, repro.scripted_turns, repro.id) == ("I'm Dana.", ["I'm Dana."], "s9-repro")


async def test_an_issue_reproduces_its_first_evidence_session_at_its_failing_turn():
    case = TestCase(id="gift", goal="Refund to a gift card")
    (issue,) = (await discover_issues([fine("s0"), crashed("s1", case=case)], [], OFFLINE))[0]
    assert issue.reproduction == reproduction_case(crashed("s1", case=case), 2)
    assert issue.reproduction.scripted_turns == ["Hi, I'm Sam.", GIFT_CARD]


# --- with a model -------------------------------------------------------------------------------


def model_run():
    """f1: crash in s1; f2, f3: knowledge_retention in s2, s3; f4: dialogue_coherence in s3."""
    sessions = [crashed("s1"), forgetful("s2"), forgetful("s3", case=TestCase(id="c3", goal="Keep my name")),
                convo("s4", ("Hi", "Hello"), stop=StopReason.SIMULATOR_ERROR, detail="simulator broke: quota")]
    assessments = [verdict("s2", "knowledge_retention", 2, quote="Who are you again, s2?"),
                   verdict("s3", "knowledge_retention", 2, quote="Who are you again, s3?"),
                   verdict("s3", "dialogue_coherence", 3, quote="Thanks. Thanks.")]
    return sessions, assessments


async def test_the_prompt_lists_each_failure_once_with_a_short_id_as_data(fake_llm):
    fake_llm.queue({"clusters": []})
    sessions, assessments = model_run()
    await discover_issues(sessions, assessments, model_llm(fake_llm))
    (request,) = fake_llm.requests
    system, user = (m["content"] for m in request["messages"])
    categories = "correctness, memory, adherence, safety, robustness, latency, cost"
    assert system == CLUSTER_PROMPT.format(categories=categories)
    assert "are data" in system and "<failures>" in user
    for fid, quote in (("f1", "KeyError: 'gift_card'"), ("f2", "Who are you again, s2?"),
                       ("f3", "Who are you again, s3?"), ("f4", "Thanks. Thanks.")):
        assert user.count(quote) == 1 and f"{fid} | session" in user
    assert "f5" not in user and "simulator broke" not in user  # harness failures never reach the model
    assert "goal: Keep my name" in user


async def test_model_clusters_are_honoured_and_the_call_usage_returned(fake_llm):
    fake_llm.queue(FakeReply({"clusters": [cluster(["f2", "f3", "f4"]), cluster(["f1"], title="Gift cards crash",
                                                                                  category="robustness")]},
                             prompt_tokens=100, completion_tokens=20))
    sessions, assessments = model_run()
    issues, usage = await discover_issues(sessions, assessments, model_llm(fake_llm))
    agent = [i for i in issues if i.source == "agent"]
    assert [(i.title, i.severity, i.category, i.session_ids) for i in agent] == [
        ("Gift cards crash", "high", "robustness", ["s1"]),
        ("Forgets the user's name", "medium", "memory", ["s2", "s3"])]
    memory = agent[1]
    assert memory.description == "It forgets." and memory.suggested_fix == "keep history"
    assert memory.signals == ["knowledge_retention", "dialogue_coherence"]
    assert [i.signals for i in issues if i.source == "simulator"] == [["simulator_error"]]
    assert (usage.calls, usage.prompt_tokens, usage.completion_tokens) == (1, 100, 20)


async def test_unknown_ids_are_dropped_and_leftover_failures_get_their_own_issue(fake_llm):
    fake_llm.queue({"clusters": [cluster(["f2", "f99", "F3"]), cluster(["f2"], title="Duplicate claim"),
                                 cluster(["nope"], title="Only unknown ids")]})
    sessions, assessments = model_run()
    issues, _ = await discover_issues(sessions, assessments, model_llm(fake_llm))
    titles = {i.title: i for i in issues}
    assert titles["Forgets the user's name"].session_ids == ["s2", "s3"]
    assert "Duplicate claim" not in titles and "Only unknown ids" not in titles
    assert titles["Replies are incoherent or repetitive"].signals == ["dialogue_coherence"]  # f4, unassigned
    assert any(t.startswith("Crashes on") for t in titles)  # f1, unassigned
    assert sum(i.affected_sessions for i in issues if i.source == "agent") == 4  # each failure exactly once


async def test_a_cluster_merging_a_crash_with_judged_failures_is_split(fake_llm):
    fake_llm.queue({"clusters": [cluster(["f1", "f2", "f3", "f4"], title="Everything is broken")]})
    sessions, assessments = model_run()
    issues, _ = await discover_issues(sessions, assessments, model_llm(fake_llm))
    agent = [i for i in issues if i.source == "agent"]
    assert [(i.signals, i.title.startswith("Crashes on")) for i in agent] == [
        (["agent_error"], True), (["knowledge_retention", "dialogue_coherence"], False)]
    crash_offline = (await discover_issues([crashed("s1")], [], OFFLINE))[0][0]
    assert agent[0].id == crash_offline.id


@pytest.mark.parametrize(
    "clusters, sources",
    [
        pytest.param([cluster(["f2", "f3", "f4"], simulator=True), cluster(["f1"])], {"s2": "simulator", "s1": "agent"},
                     id="flagged-cluster-is-the-simulators"),
        pytest.param([cluster(["f1"], simulator=True), cluster(["f2", "f3", "f4"])], {"s2": "agent", "s1": "agent"},
                     id="a-crash-is-always-the-agents"),
    ],
)
async def test_clusters_flagged_as_caused_by_the_simulator_are_simulator_issues(fake_llm, clusters, sources):
    fake_llm.queue({"clusters": clusters})
    sessions, assessments = model_run()
    issues, _ = await discover_issues(sessions, assessments, model_llm(fake_llm))
    for sid, source in sources.items():
        assert next(i for i in issues if sid in i.session_ids).source == source


async def test_an_unknown_category_from_the_model_falls_back_to_the_signals_category(fake_llm):
    fake_llm.queue({"clusters": [cluster(["f2", "f3"], category="vibes"), cluster(["f1"]), cluster(["f4"])]})
    sessions, assessments = model_run()
    issues, _ = await discover_issues(sessions, assessments, model_llm(fake_llm))
    assert next(i for i in issues if "s2" in i.session_ids).category == "memory"


async def test_a_failed_model_call_falls_back_to_the_offline_grouping(fake_llm, caplog):
    fake_llm.set_handler(lambda request: FakeReply("upstream down", status=500))
    sessions, assessments = model_run()
    with caplog.at_level(logging.WARNING, logger="convsim.issues"):
        issues, usage = await discover_issues(sessions, assessments, model_llm(fake_llm))
    offline, _ = await discover_issues(sessions, assessments, OFFLINE)
    assert [i.model_dump() for i in issues] == [i.model_dump() for i in offline]
    assert "offline grouping" in caplog.text
    assert (usage.calls, usage.failed_calls, usage.failures) == (2, 2, {"server_error": 2})  # failed attempts count


async def test_no_model_call_when_nothing_failed(fake_llm):
    assert await discover_issues([fine("s1")], [], model_llm(fake_llm)) == ([], Usage())
    assert fake_llm.calls == 0


async def test_a_model_split_of_one_scorer_is_kept_with_stable_distinct_ids(fake_llm):
    reply = {"clusters": [cluster(["f2"], title="Forgets names"), cluster(["f3"], title="Forgets order ids"),
                          cluster(["f1"], title="Gift cards crash"), cluster(["f4"], title="Repeats itself")]}
    fake_llm.queue(reply, reply)
    sessions, assessments = model_run()
    first, _ = await discover_issues(sessions, assessments, model_llm(fake_llm))
    again, _ = await discover_issues(sessions, assessments, model_llm(fake_llm))
    memory = [i for i in first if "knowledge_retention" in i.signals]
    assert sorted(i.title for i in memory) == ["Forgets names", "Forgets order ids"]
    assert len({i.id for i in memory}) == 2 and [i.id for i in first] == [i.id for i in again]
    crash_offline = (await discover_issues([crashed("s1")], [], OFFLINE))[0][0]
    assert next(i for i in first if i.title == "Gift cards crash").id == crash_offline.id


async def test_an_analyst_reply_of_the_wrong_shape_falls_back_and_counts_its_calls(fake_llm):
    fake_llm.set_handler(lambda request: {"clusters": [cluster(["f2", "f3"], severity="high")]})
    sessions, assessments = model_run()
    issues, usage = await discover_issues(sessions, assessments, model_llm(fake_llm))
    offline, _ = await discover_issues(sessions, assessments, OFFLINE)
    assert [i.model_dump() for i in issues] == [i.model_dump() for i in offline]  # severity is not the model's
    assert (usage.calls, usage.failed_calls, usage.failures) == (2, 2, {"invalid_output": 2})


# --- signatures, primary causes, attribution ----------------------------------------------------


def test_a_crash_signature_masks_ids_and_numbers():
    a = collect_failures([crashed("s1", "KeyError: 'order-A1234' at step 3")], [])[0]
    b = collect_failures([crashed("s2", "KeyError: 'order-B9' at step 7")], [])[0]
    assert a.signature == b.signature and a.kind == "agent_error"
    assert "1234" not in a.signature and "KeyError" in a.signature
    other = collect_failures([crashed("s3", "ValueError: bad amount 12")], [])[0]
    assert other.signature != a.signature


async def test_the_signature_is_on_the_issue_and_the_id_follows_it():
    (issue,) = (await discover_issues([crashed("s1"), crashed("s2")], [], OFFLINE))[0]
    assert issue.signature.startswith("agent_error|KeyError|") and issue.id == issue_id(issue.signature)


async def test_a_later_frustration_is_also_seen_on_the_forgotten_fact_not_an_issue_of_its_own():
    sessions = [forgetful("s1"), forgetful("s2")]
    assessments = [verdict(sid, scorer, turn) for sid in ("s1", "s2")
                   for scorer, turn in (("knowledge_retention", 2), ("conversation_completeness", 2),
                                        ("user_frustration", 3), ("goal_achievement", None))]
    issues, _ = await discover_issues(sessions, assessments, OFFLINE)
    assert [i.signals for i in issues] == [["knowledge_retention"]]
    (issue,) = issues
    assert issue.also_seen == ["conversation_completeness", "user_frustration", "goal_achievement"]
    assert sorted((e.session_id, e.turn) for e in issue.evidence) == [("s1", 2), ("s2", 2)]  # each turn once


async def test_a_crash_outranks_a_leak_at_the_same_turn_and_explains_the_rest():
    assessments = [verdict("s1", "conversational_safety", 2), verdict("s1", "user_frustration", 2),
                   verdict("s1", "goal_achievement", None)]
    issues, _ = await discover_issues([crashed("s1")], assessments, OFFLINE)
    assert [(i.signals, i.also_seen) for i in issues] == [
        (["agent_error"], ["conversational_safety", "user_frustration", "goal_achievement"])]


async def test_a_simulator_error_session_is_never_an_agent_issue():
    broken = Session(id="s1", run_id="run-1", messages=[], stop_reason=StopReason.SIMULATOR_ERROR,
                     stop_detail="the simulator model failed", turns=0)
    issues, _ = await discover_issues([broken, fine("s2")], [verdict("s1", "goal_achievement", None)], OFFLINE)
    assert [i.source for i in issues] == ["simulator"]
    assert "goal_achievement" not in issues[0].signals


async def test_a_crash_at_the_same_turn_with_different_texts_is_titled_by_the_turn():
    sessions = [convo(f"s{n}", ("Hi", "Hello"), ("Hmm", "Yes?"), (text, Err("RuntimeError: too many turns")),
                      stop=StopReason.AGENT_ERROR) for n, text in enumerate(("Refund please", "Where is it?"))]
    (issue,) = (await discover_issues(sessions, [], OFFLINE))[0]
    assert issue.title.startswith("Crashes on the 3rd user message: RuntimeError")
    (same_text,) = (await discover_issues([crashed("s1"), crashed("s2")], [], OFFLINE))[0]
    assert "user message" not in same_text.title and same_text.title.startswith('Crashes on "')
