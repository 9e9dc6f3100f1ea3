"""test_agent end to end, and the fix loop: reproducing cases reproduce, fixed issues show as fixed."""

from __future__ import annotations

import pytest

from engine import RunError
from engine.llm.litellm_backend import LiteLLMBackend
from engine.llm.base import LLMSettings
from engine.pipeline.agent_test import prepare_agent_test, test_agent
from engine.pipeline.rerun import rerun_issues
from engine.pipeline.generation import build_test_set, export_test_set
from engine.cases.loading import load_test_cases
from tests.conftest import ROOT
from tests.fake_llm import FakeReply, example_for_schema

pytestmark = pytest.mark.anyio

AGENT = "examples/support_agent.py:support_agent"
SEEDS = str(ROOT / "examples" / "support_cases.yaml")


async def offline_report(store, **options):
    options = {"test_cases": SEEDS, "num_test_cases": 3, "model": "offline", "workspace": ROOT, "max_turns": 6,
               **options}
    return await test_agent(store, AGENT, **options)


async def test_offline_test_agent_finds_the_crash_and_the_memory_flaw(store):
    report = await offline_report(store)
    crash = report.issues[0]
    assert (crash.severity, crash.category, crash.signals[0]) == ("high", "robustness", "agent_error")
    assert "KeyError" in crash.title and crash.frequency.endswith(f"of {len(report.sessions)} sessions")
    assert crash.evidence[0].turn == 2 and crash.reproduction.scripted_turns[-1].lower().count("gift card")
    memory = next(i for i in report.issues if i.category == "memory")
    assert memory.signals[0] == "knowledge_retention" and memory.evidence[0].turn == 4
    assert report.offline and "offline" in report.note
    assert len(report.test_cases) == 3 + 6 and report.test_set_id.startswith("set-")
    assert {"simulated_user", "generator"} <= set(report.usage)
    stored, markdown = await store.get_report(report.run_id)
    assert stored.issues[0].id == crash.id and markdown.startswith("# ")


async def test_issue_ids_are_stable_across_runs(store):
    first = await offline_report(store, num_test_cases=0)
    second = await offline_report(store, num_test_cases=0)
    assert [i.id for i in first.issues] == [i.id for i in second.issues]


async def test_reproducing_case_reproduces_and_a_fix_shows_as_fixed(store):
    report = await offline_report(store, num_test_cases=0)
    crash = report.issues[0]
    unchanged = await rerun_issues(store, report.run_id, issue_id=crash.id, workspace=ROOT)
    assert [c.status for c in unchanged.issues] == ["reproduces"]
    assert crash.signature in unchanged.issues[0].reason
    fixed = await rerun_issues(store, report.run_id, issue_id=crash.id, target="tests.fixed_agent:support_agent",
                               workspace=ROOT)
    assert [c.status for c in fixed.issues] == ["fixed"]
    assert "reached the failing turn" in fixed.issues[0].reason


async def test_rerun_of_all_cases_checks_every_issue(store):
    report = await offline_report(store, num_test_cases=0)
    outcome = await rerun_issues(store, report.run_id, target="tests.fixed_agent:support_agent", workspace=ROOT)
    by_id = {c.id: c for c in outcome.issues}
    assert set(by_id) == {i.id for i in report.issues}
    assert by_id[report.issues[0].id].status == "fixed"  # the crash was fixed
    memory = next(i for i in report.issues if i.category == "memory")
    assert by_id[memory.id].status == "reproduces"  # the forgetting was not
    assert (await store.get_run(outcome.run_id))["kind"] == "rerun"


async def test_rerun_rejects_unknown_issues_and_runs_without_reports(store):
    report = await offline_report(store, num_test_cases=0)
    with pytest.raises(Exception, match="has no issue 'ISS-nope'"):
        await rerun_issues(store, report.run_id, issue_id="ISS-nope", workspace=ROOT)
    with pytest.raises(Exception, match="no run with id"):
        await rerun_issues(store, "run-missing")


@pytest.mark.parametrize(
    "options, message",
    [({"num_test_cases": 0, "test_cases": None}, "nothing to test"), ({"adversarial": 2}, "adversarial"),
     ({"max_turns": 0}, "max_turns"), ({"num_test_cases": 99}, "num_test_cases")],
)
async def test_bad_requests_are_rejected_before_a_run_exists(store, options, message):
    with pytest.raises(Exception, match=message):
        await prepare_agent_test(store, AGENT, **{"test_cases": SEEDS, "model": "offline", "workspace": ROOT, **options})
    assert await store.list_runs() == []


async def test_test_agent_through_litellm_uses_every_role(store, fake_llm):
    """With a model for every role: the fake answers schema-valid defaults; the pipeline must still finish."""
    llm = LiteLLMBackend(LLMSettings(model="openai/fake", api_base=fake_llm.url, api_key="k", max_retries=0))
    cases = [{"goal": "Get a refund to a gift card", "scripted_turns": ["Refund order A1234 to a gift card"]},
             {"goal": "Ask about shipping", "id": "shipping"}]
    report = await test_agent(store, AGENT, test_cases=cases, num_test_cases=0, llm=llm, workspace=ROOT, max_turns=2,
                              scorers=["goal_achievement", "knowledge_retention"])
    assert not report.offline
    assert {"simulated_user", "judge"} <= set(report.usage)
    crash = next(i for i in report.issues if "agent_error" in i.signals)
    assert crash.severity == "high"
    schemas = {r["response_format"]["json_schema"]["name"] for r in fake_llm.requests}
    assert {"UserTurn", "JudgeVerdict"} <= schemas


async def test_generation_failure_marks_the_run_failed(store, fake_llm):
    fake_llm.set_handler(lambda req: "not json")
    llm = LiteLLMBackend(LLMSettings(model="openai/fake", api_base=fake_llm.url, api_key="k", max_retries=0))
    job = await prepare_agent_test(store, AGENT, description="A support bot", num_test_cases=2, llm=llm,
                                   workspace=ROOT, ask_agent=False)
    with pytest.raises(RunError, match="failed"):
        await job.run()
    run = await store.get_run(job.run_id)
    assert run["status"] == "failed" and run["error"]


async def test_generated_test_set_is_stored_exported_and_runnable_by_id(store, tmp_path):
    from engine import simulate

    test_set = await build_test_set(store, target=AGENT, num_test_cases=4, model="offline", workspace=ROOT)
    assert len(test_set.cases) == 4 and test_set.profile.tools and test_set.offline
    assert any(s.startswith("source:") for s in test_set.sources)
    for suffix in ("yaml", "json", "jsonl"):
        path = export_test_set(test_set, tmp_path / f"cases.{suffix}")
        assert [c.goal for c in load_test_cases(str(path), workspace=tmp_path)] == [c.goal for c in test_set.cases]
    summary = await simulate(store, AGENT, test_set.id, model="offline", workspace=ROOT, max_turns=6)
    assert summary.sessions_total == 4


async def test_distilling_from_a_run_gives_one_case_per_distinct_conversation(store):
    report = await offline_report(store, num_test_cases=0)
    test_set = await build_test_set(store, run_id=report.run_id, model="offline")
    assert 1 <= len(test_set.cases) <= 6
    assert any("transcripts" in s for s in test_set.sources)


async def test_distilling_from_a_jsonl_file_replays_each_conversation(store, tmp_path):
    import json

    conversations = [
        [{"role": "user", "content": "Hi, where is my order?"},
         {"role": "assistant", "content": "Could you give me your order number?"},
         {"role": "user", "content": "It's C9012."},
         {"role": "assistant", "content": "Order C9012 arrives Thursday."}],
        [{"role": "user", "content": "How do I reset my password?"},
         {"role": "assistant", "content": "Use the 'Forgot password' link."}],
        [{"role": "user", "content": "Hi, where is my order?"},
         {"role": "assistant", "content": "Could you give me your order number?"},
         {"role": "user", "content": "It's C9012."},
         {"role": "assistant", "content": "Order C9012 arrives Thursday."}],
    ]
    path = tmp_path / "prod.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    test_set = await build_test_set(store, file=str(path), model="offline", workspace=tmp_path)
    assert len(test_set.cases) == 2  # the repeated conversation is a near-duplicate
    order = test_set.cases[0]
    assert "order" in order.goal.lower() and order.persona and order.simulation_guidelines
    assert any("C9012" in g or "order number" in g for g in order.simulation_guidelines)


async def test_rerun_keeps_the_original_runs_models(store, monkeypatch):
    report = await offline_report(store, num_test_cases=0)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-would-pick-a-real-model")
    outcome = await rerun_issues(store, report.run_id, issue_id=report.issues[0].id, workspace=ROOT)
    run = await store.get_run(outcome.run_id)
    assert run["offline"] and run["model"] == "offline" and run["options"]["judge_model"] == "offline"


# --- a refused key stops everything -------------------------------------------------------------

CASES = [{"goal": "Ask about shipping", "id": "shipping"}, {"goal": "Check order A1234", "id": "order"},
         {"goal": "Ask about returns", "id": "returns"}]


def refused(request):
    return FakeReply(status=401, content="Incorrect API key provided")


def key_checked_by_model(bad_model):
    """The judge's (or another role's) model refuses the key; the user's works."""
    def reply(request):
        if request["model"] == bad_model:
            return refused(request)
        fmt = request["response_format"]["json_schema"]
        if fmt["name"] == "UserTurn":
            done = len(request["messages"]) > 3
            return {"message": "" if done else "Hello", "goal_achieved": done, "end_conversation": False,
                    "reason": "r"}
        return example_for_schema(fmt["schema"])
    return reply


@pytest.mark.parametrize("generate", [False, True], ids=["given-cases", "generated-cases"])
async def test_a_refused_key_fails_test_agent_after_one_request(store, fake_llm, generate):
    fake_llm.set_handler(refused)
    llm = LiteLLMBackend(LLMSettings(model="openai/fake", api_base=fake_llm.url, api_key="k", max_retries=2))
    options = {"description": "A support bot", "num_test_cases": 3, "ask_agent": False} if generate \
        else {"test_cases": CASES, "num_test_cases": 0}
    job = await prepare_agent_test(store, AGENT, llm=llm, workspace=ROOT, max_turns=3, **options)
    with pytest.raises(RunError, match="CONVSIM_API_KEY"):
        await job.run()
    assert fake_llm.calls == 1  # generator, users, judges and analyst share the model: one request in all
    run = await store.get_run(job.run_id)
    assert run["status"] == "failed"
    assert run["error"].startswith("model openai/fake: the provider refused the credentials")
    assert "Set CONVSIM_API_KEY" in run["error"]
    sessions = await store.get_sessions(job.run_id)
    assert {s.stop_reason.value for s in sessions} <= {"simulator_error"} and len(sessions) == (0 if generate else 3)
    assert not await store.get_assessments([s.id for s in sessions])  # no judge ran


async def test_a_judge_with_a_refused_key_fails_test_agent(store, fake_llm, monkeypatch):
    monkeypatch.setenv("CONVSIM_API_BASE", fake_llm.url)
    monkeypatch.setenv("CONVSIM_API_KEY", "k-for-the-fake")
    fake_llm.set_handler(key_checked_by_model("fake-judge"))
    job = await prepare_agent_test(store, AGENT, test_cases=CASES, num_test_cases=0, model="openai/fake-user",
                                   judge_model="openai/fake-judge", workspace=ROOT, max_turns=3, concurrency=1)
    with pytest.raises(RunError, match="openai/fake-judge"):
        await job.run()
    run = await store.get_run(job.run_id)
    assert run["status"] == "failed" and "openai/fake-judge" in run["error"] and "CONVSIM_API_KEY" in run["error"]
    assert sum(r["model"] == "fake-judge" for r in fake_llm.requests) == 1
    assert {s.stop_reason.value for s in await store.get_sessions(job.run_id)} <= {"goal_achieved", "simulator_error"}


async def test_an_analyst_with_a_refused_key_fails_test_agent(store, fake_llm, monkeypatch):
    monkeypatch.setenv("CONVSIM_API_BASE", fake_llm.url)
    monkeypatch.setenv("CONVSIM_API_KEY", "k-for-the-fake")
    fake_llm.set_handler(key_checked_by_model("fake-analyst"))
    job = await prepare_agent_test(store, AGENT, test_cases=CASES[:1], num_test_cases=0, model="openai/fake-user",
                                   judge_model="openai/fake-analyst", scorers=["tests.code_scorers:mentions_order"],
                                   workspace=ROOT, max_turns=3)
    with pytest.raises(RunError, match="openai/fake-analyst"):
        await job.run()  # the code scorer fails (no order number): the analyst's one call is refused
    run = await store.get_run(job.run_id)
    assert run["status"] == "failed" and run["error"].startswith("model openai/fake-analyst")
    assert sum(r["model"] == "fake-analyst" for r in fake_llm.requests) == 1


async def test_a_rerun_with_a_refused_key_fails_instead_of_calling_issues_fixed(store, fake_llm):
    report = await offline_report(store, num_test_cases=0)
    fake_llm.set_handler(refused)
    llm = LiteLLMBackend(LLMSettings(model="openai/fake", api_base=fake_llm.url, api_key="k", max_retries=0))
    with pytest.raises(RunError, match="CONVSIM_API_KEY"):
        await rerun_issues(store, report.run_id, issue_id=report.issues[0].id, workspace=ROOT, llm=llm)
    assert fake_llm.calls == 1
