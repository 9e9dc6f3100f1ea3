"""The response cache: a re-run against an agent with the same replies asks no model and reproduces the run.

Every model call goes to the fake OpenAI-compatible server on 127.0.0.1, which counts the requests it gets.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client
from pydantic import BaseModel

from convsim_mcp.server import build_server
from engine import secrets
from engine.errors import InvalidOption, LLMOutputError
from engine.llm import CachedLLM, LiteLLMBackend
from engine.llm.base import LLMSettings
from engine.llm.cache import request_key
from engine.models import Role
from engine.pipeline import score_sessions, simulate
from engine.pipeline.agent_test import test_agent as run_test_agent
from engine.pipeline.generation import build_test_set
from engine.pipeline.rerun import rerun_issues
from tests.conftest import agent
from tests.fake_llm import FakeReply, _default_handler

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.anyio

MODEL = "openai/fake-model"
CASES = [{"goal": "Ask about refunds. Then ask about shipping.", "id": "refund"},
         {"goal": "Track order A1.", "id": "track"}]


def scripted(request: dict) -> FakeReply:
    """A deterministic model: the simulated user asks numbered questions and stops after three; judges get a
    schema-valid verdict. The same request always gets the same reply."""
    schema = ((request.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}
    if "goal_achieved" in (schema.get("properties") or {}):
        n = sum(m["role"] == "assistant" for m in request["messages"])  # the user's own earlier messages
        return FakeReply(content={"message": f"question {n + 1}", "goal_achieved": n >= 3, "end_conversation": False,
                                  "reason": f"after {n} questions"})
    if "cases" in (schema.get("properties") or {}):
        return FakeReply(content={"cases": [{"id": "refund-late", "kind": "normal", "goal": "Ask for a late refund.",
                                             "persona": "A patient customer", "simulation_guidelines": [],
                                             "expected_outcome": "The refund policy is explained."}]})
    return _default_handler(request)


@pytest.fixture
def fake(fake_llm, monkeypatch):
    fake_llm.set_handler(scripted)
    monkeypatch.setenv("CONVSIM_API_BASE", fake_llm.url)
    monkeypatch.setenv("CONVSIM_API_KEY", "sk-test-cache-key-0001")
    monkeypatch.setenv("CONVSIM_LLM_RETRIES", "1")
    for name in ("CONVSIM_CACHE", "CONVSIM_TEMPERATURE", "CONVSIM_SEED"):
        monkeypatch.delenv(name, raising=False)
    return fake_llm


async def run(store, **options):
    options.setdefault("max_turns", 5)
    return await simulate(store, agent("echo"), CASES, model=MODEL, scorers=["goal_achievement"], **options)


async def transcripts(store, run_id: str) -> list[tuple]:
    sessions = await store.get_sessions(run_id)
    return [(s.case_index, s.repeat, s.stop_reason, s.stop_detail, [(m.role, m.content) for m in s.messages])
            for s in sessions]


async def verdicts(store, run_id: str) -> list[tuple]:
    sessions = await store.get_sessions(run_id, with_messages=False)
    order = {s.id: (s.case_index, s.repeat) for s in sessions}
    found = await store.get_assessments(list(order))
    return sorted((order[a.session_id], a.scorer, a.value, a.passed, a.rationale) for a in found)


async def test_a_cached_rerun_makes_no_model_calls_and_reproduces_the_run(store, fake):
    first = await run(store, cache=True)
    calls = fake.calls
    assert calls > 0 and first.usage["simulated_user"].cache_hits == 0
    second = await run(store, cache=True)
    assert fake.calls == calls  # not one request reached the model
    assert await transcripts(store, second.run_id) == await transcripts(store, first.run_id)
    assert await verdicts(store, second.run_id) == await verdicts(store, first.run_id)
    for role in ("simulated_user", "judge"):
        was, now = first.usage[role], second.usage[role]
        assert now.calls == now.prompt_tokens == now.completion_tokens == 0 and now.cost_usd == 0
        assert now.cache_hits == was.calls > 0
    assert second.cache and first.cache


async def test_without_the_cache_a_rerun_calls_the_model_again(store, fake):
    await run(store)
    calls = fake.calls
    second = await run(store)
    assert fake.calls == 2 * calls
    assert not second.cache and second.usage["simulated_user"].cache_hits == 0


@pytest.mark.parametrize("change", [{"temperature": 0.7}, {"seed": 8}], ids=["temperature", "seed"])
async def test_a_changed_temperature_or_seed_misses(store, fake, change):
    base = {"temperature": 0.2, "seed": 7}
    first = await run(store, cache=True, **base)
    assert (first.temperature, first.seed) == (0.2, 7)
    assert {(r.get("temperature"), r.get("seed")) for r in fake.requests} == {(0.2, 7)}  # sent with every call
    calls = fake.calls
    second = await run(store, cache=True, **{**base, **change})
    assert fake.calls == 2 * calls and second.usage["simulated_user"].cache_hits == 0
    assert (second.temperature, second.seed) == (change.get("temperature", 0.2), change.get("seed", 7))
    again = await run(store, cache=True, **{**base, **change})  # and the changed request is cached in turn
    assert fake.calls == 2 * calls and again.usage["simulated_user"].cache_hits > 0


async def test_temperature_and_seed_default_from_the_environment_and_are_recorded(store, fake, monkeypatch):
    monkeypatch.setenv("CONVSIM_TEMPERATURE", "0.5")
    monkeypatch.setenv("CONVSIM_SEED", "42")
    summary = await run(store)
    assert (summary.temperature, summary.seed) == (0.5, 42)
    options = (await store.get_run(summary.run_id))["options"]
    assert {k: options[k] for k in ("temperature", "seed", "cache")} == {"temperature": 0.5, "seed": 42, "cache": False}
    assert {(r["temperature"], r["seed"]) for r in fake.requests} == {(0.5, 42)}


@pytest.mark.parametrize("bad", [{"temperature": 3}, {"temperature": "hot"}, {"seed": -1}, {"seed": 1.5},
                                 {"cache": "yes"}])
async def test_bad_sampling_options_are_refused_before_anything_runs(store, fake, bad):
    with pytest.raises(InvalidOption, match=next(iter(bad))):
        await run(store, **bad)
    assert fake.calls == 0


@pytest.mark.parametrize("failure", [
    pytest.param(FakeReply(status=500, content="upstream overloaded", headers={"Retry-After": "0"}), id="http-500"),
    pytest.param(FakeReply(content="this is not JSON at all"), id="garbage"),
    pytest.param(FakeReply(content={"message": " ", "goal_achieved": False, "end_conversation": False, "reason": ""}),
                 id="valid-but-empty-message"),
])
async def test_a_failed_call_is_not_cached(store, fake, failure):
    fake.set_handler(lambda request: failure)
    broken = await run(store, cache=True)
    assert set(broken.stop_reasons) == {"simulator_error"}
    failed_calls = fake.calls
    assert broken.untested == len(CASES)
    fake.set_handler(scripted)
    healthy = await run(store, cache=True)
    assert fake.calls > failed_calls and healthy.usage["simulated_user"].cache_hits == 0
    assert set(healthy.stop_reasons) == {"goal_achieved"}
    entries = (await store.cache_stats())["entries"]
    assert entries > 0
    rows = sqlite3.connect(store.path).execute("SELECT output FROM llm_cache").fetchall()
    assert not any("not JSON" in r[0] or "overloaded" in r[0] for r in rows)


async def test_a_reply_its_caller_cannot_use_is_not_cached(store, fake):
    def no_cases(request: dict) -> FakeReply:
        reply = scripted(request)
        if isinstance(reply.content, dict) and "cases" in reply.content:
            reply.content["cases"] = []  # valid JSON, but no test case in it
        return reply

    fake.set_handler(no_cases)
    for calls in (2, 3):  # the profile, then the generation; the second time the profile is a hit
        with pytest.raises(LLMOutputError, match="no usable test case"):
            await build_test_set(store, description="A shop's support bot.", num_test_cases=2, model=MODEL,
                                 cache=True)
        assert fake.calls == calls
    assert (await store.cache_stats())["entries"] == 1  # the profile only


async def test_repeats_of_a_case_are_separate_trials_not_copies(store, fake):
    summary = await run(store, cache=True, repeats=2)
    per_trial = {}
    for r in fake.requests:
        if "goal_achieved" in json.dumps(r.get("response_format")):
            per_trial[r["messages"][0]["content"]] = per_trial.get(r["messages"][0]["content"], 0) + 1
    assert summary.usage["simulated_user"].cache_hits == 0  # trial 1 did not reuse trial 0's replies
    assert set(per_trial.values()) == {8}  # per case: 2 trials x 4 turns, each asked of the model


async def test_a_reply_holding_a_secret_is_not_cached_and_no_secret_is_stored(store, fake):
    secret = "sk-live-very-secret-0123456789"
    secrets.register(secret)

    def leaky(request: dict) -> FakeReply:
        reply = scripted(request)
        if isinstance(reply.content, dict) and "message" in reply.content:
            reply.content["message"] += f" my key is {secret}"
        return reply

    fake.set_handler(leaky)
    await run(store, cache=True, max_turns=2)
    calls = fake.calls
    second = await run(store, cache=True, max_turns=2)
    assert second.usage["simulated_user"].cache_hits == 0  # every user turn held the secret: none was stored
    assert second.usage["judge"].cache_hits > 0  # the judges' replies held none: those were
    assert fake.calls > calls
    store.close()
    raw = b"".join(p.read_bytes() for p in store.path.parent.glob(store.path.name + "*"))
    assert secret.encode() not in raw and b"sk-test-cache-key-0001" not in raw


async def test_the_offline_backend_behaves_the_same_with_the_cache_on(store, fake):
    plain = await simulate(store, agent("echo"), CASES, model="offline", scorers=["goal_achievement"], max_turns=4)
    with_cache = await simulate(store, agent("echo"), CASES, model="offline", scorers=["goal_achievement"],
                                max_turns=4, cache=True)
    assert await transcripts(store, with_cache.run_id) == await transcripts(store, plain.run_id)
    assert await verdicts(store, with_cache.run_id) == await verdicts(store, plain.run_id)
    assert with_cache.usage == plain.usage and (await store.cache_stats())["entries"] == 0
    assert fake.calls == 0


async def test_scoring_and_generation_are_cached_too(store, fake):
    sim = await run(store, max_turns=2)
    before = fake.calls
    first = await score_sessions(store, run_id=sim.run_id, scorers=["user_frustration"], model=MODEL, cache=True)
    scored = fake.calls
    assert scored > before
    second = await score_sessions(store, run_id=sim.run_id, scorers=["user_frustration"], model=MODEL, cache=True)
    assert fake.calls == scored
    assert [s.model_dump(exclude={"usage"}) for s in second.scorers] == [s.model_dump(exclude={"usage"})
                                                                          for s in first.scorers]
    one = await build_test_set(store, description="A shop's support bot.", num_test_cases=2, model=MODEL, cache=True)
    generated = fake.calls
    two = await build_test_set(store, description="A shop's support bot.", num_test_cases=2, model=MODEL, cache=True)
    assert fake.calls == generated and two.cases == one.cases
    assert two.usage["generator"].calls == 0 and two.usage["generator"].cache_hits > 0


async def test_a_cached_test_agent_rerun_makes_no_model_calls(store, fake):
    options = dict(description="A shop's support bot.", test_cases=CASES, num_test_cases=1, max_turns=3,
                   model=MODEL, scorers=["goal_achievement", "user_frustration"], shrink=False, cache=True)
    first = await run_test_agent(store, agent("echo"), **options)
    calls = fake.calls
    second = await run_test_agent(store, agent("echo"), **options)
    assert fake.calls == calls
    assert {r: u.calls for r, u in second.usage.items()} == {r: 0 for r in first.usage}
    assert {r: u.cache_hits for r, u in second.usage.items()} == {r: u.calls for r, u in first.usage.items()}
    assert [i.title for i in second.issues] == [i.title for i in first.issues]
    assert await transcripts(store, second.run_id) == await transcripts(store, first.run_id)
    outcome = await rerun_issues(store, first.run_id, repeats=1)  # cached like its run, with its temperature and seed
    assert fake.calls == calls
    assert (await store.get_run(outcome.run_id))["options"]["cache"] is True
    assert await transcripts(store, outcome.run_id) == await transcripts(store, first.run_id)


async def test_the_mcp_tools_take_cache_temperature_and_seed(store, fake):
    server = build_server(store)
    args = {"target": agent("echo"), "test_cases": CASES, "max_turns": 4, "model": MODEL,
            "scorers": ["goal_achievement"], "cache": True, "seed": 3, "temperature": 0.0}
    async with Client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        for name in ("simulate_conversations", "test_agent", "score_sessions", "generate_test_cases"):
            assert {"cache", "seed", "temperature"} <= set(tools[name].input_schema["properties"]), name
        first = await client.call_tool("simulate_conversations", args)
        assert not first.is_error, first.content
        calls = fake.calls
        second = await client.call_tool("simulate_conversations", args)
        bad = await client.call_tool("simulate_conversations", {**args, "seed": -5})
    assert fake.calls == calls
    run = second.structured_content
    assert run["cache"] is True and (run["seed"], run["temperature"]) == (3, 0.0)
    assert run["usage"]["simulated_user"]["calls"] == 0
    assert run["usage"]["simulated_user"]["cache_hits"] == first.structured_content["usage"]["simulated_user"]["calls"]
    assert bad.is_error and "seed must be an integer" in bad.content[0].text


def cli_command(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(ROOT), CONVSIM_HOME=str(tmp_path / "home"))
    return subprocess.run([sys.executable, "-m", "convsim_mcp", *args, "--db", str(tmp_path / "db.sqlite")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def cli(tmp_path: Path, fake, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.endswith("_API_KEY") and not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    base.update(PYTHONPATH=str(ROOT), CONVSIM_HOME=str(tmp_path / "home"), CONVSIM_ROOTS=str(tmp_path),
                CONVSIM_API_BASE=fake.url, CONVSIM_API_KEY="sk-test-cache-key-0001", CONVSIM_LLM_RETRIES="1", **env)
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(CASES))
    return subprocess.run([sys.executable, "-m", "convsim_mcp", "simulate", agent("echo"), str(cases), "--model", MODEL,
                           "--max-turns", "5", "--scorer", "goal_achievement", "--json", "--db",
                           str(tmp_path / "db.sqlite"), *args], cwd=ROOT, env=base, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.parametrize("how", [pytest.param(({"CONVSIM_CACHE": "1"}, ()), id="CONVSIM_CACHE=1"),
                                 pytest.param(({}, ("--cache",)), id="--cache")])
def test_the_cli_caches_with_the_flag_or_the_environment(tmp_path, fake, how):
    env, flags = how
    first = cli(tmp_path, fake, *flags, **env)
    assert first.returncode == 0, first.stderr
    calls = fake.calls
    second = cli(tmp_path, fake, *flags, **env)
    assert second.returncode == 0, second.stderr
    assert fake.calls == calls
    summary = json.loads(second.stdout)
    assert summary["cache"] is True and summary["usage"]["simulated_user"]["calls"] == 0
    hits, calls_before = summary["usage"]["simulated_user"]["cache_hits"], json.loads(first.stdout)["usage"]
    assert hits == calls_before["simulated_user"]["calls"] > 0
    off = cli(tmp_path, fake, "--no-cache", **env)  # the flag beats the environment
    assert off.returncode == 0 and fake.calls > calls
    stats = cli_command(tmp_path, "cache", "stats")
    served = sum(u["cache_hits"] for u in summary["usage"].values())
    assert stats.returncode == 0 and f"served {served} times" in stats.stdout, stats.stderr
    cleared = cli_command(tmp_path, "cache", "clear")
    assert cleared.returncode == 0 and "deleted" in cleared.stdout
    assert "0 cached replies" in cli_command(tmp_path, "cache", "stats").stdout


@pytest.mark.slow
def test_the_cli_refuses_a_bad_convsim_cache_or_seed(tmp_path, fake):
    bad_env = cli(tmp_path, fake, CONVSIM_CACHE="maybe")
    assert bad_env.returncode == 2 and "CONVSIM_CACHE='maybe'" in bad_env.stderr and "Traceback" not in bad_env.stderr
    bad_seed = cli(tmp_path, fake, "--seed", "-3")
    assert bad_seed.returncode == 2 and "seed" in bad_seed.stderr and "Traceback" not in bad_seed.stderr
    assert fake.calls == 0


def backend(**settings) -> LiteLLMBackend:
    return LiteLLMBackend(LLMSettings(**{"model": MODEL, "api_base": "http://127.0.0.1:9/v1", "api_key": "sk-a-0000000",
                                         **settings}))


class Reply(BaseModel):
    text: str


class OtherReply(BaseModel):
    text: str
    extra: int = 0


MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("change", [
    pytest.param(lambda: (backend(model="openai/other-model"), MESSAGES, Reply, 0), id="model"),
    pytest.param(lambda: (backend(api_base="http://127.0.0.1:10/v1"), MESSAGES, Reply, 0), id="endpoint"),
    pytest.param(lambda: (backend(temperature=0.3), MESSAGES, Reply, 0), id="temperature"),
    pytest.param(lambda: (backend(seed=1), MESSAGES, Reply, 0), id="seed"),
    pytest.param(lambda: (backend(), [{"role": "user", "content": "hi!"}], Reply, 0), id="messages"),
    pytest.param(lambda: (backend(), MESSAGES, OtherReply, 0), id="schema"),
    pytest.param(lambda: (backend(), MESSAGES, Reply, 1), id="trial"),
])
def test_the_key_changes_with_each_part_of_the_request(change):
    llm, messages, schema, trial = change()
    base = request_key(backend().cache_identity(), MESSAGES, Reply, 0)
    assert request_key(llm.cache_identity(), messages, schema, trial) != base


def test_the_api_key_is_not_part_of_the_key():
    a, b = backend(api_key="sk-first-key-000"), backend(api_key="sk-second-key-00")
    assert request_key(a.cache_identity(), MESSAGES, Reply) == request_key(b.cache_identity(), MESSAGES, Reply)
    assert "sk-first-key-000" not in json.dumps(a.cache_identity())


class BrokenCache:
    async def cache_get(self, key):
        raise sqlite3.OperationalError("disk I/O error")

    async def cache_put(self, key, output, **info):
        raise sqlite3.OperationalError("database is locked")


async def test_an_unusable_cache_costs_calls_not_the_run(fake):
    llm = CachedLLM(LiteLLMBackend(LLMSettings(model=MODEL, api_base=fake.url, api_key="test-key")), BrokenCache())
    fake.set_handler(lambda request: FakeReply(content={"text": "hello"}))
    result = await llm.complete(MESSAGES, Reply, role=Role.JUDGE)
    assert result.output.text == "hello" and result.usage.calls == 1 and fake.calls == 1


async def test_a_stored_reply_that_no_longer_validates_is_asked_again(store, fake):
    llm = CachedLLM(LiteLLMBackend(LLMSettings(model=MODEL, api_base=fake.url, api_key="test-key")), store)
    await store.cache_put(request_key(llm.cache_identity(), MESSAGES, Reply), '{"wrong": 1}', model=MODEL,
                          role="judge", schema="Reply")
    fake.set_handler(lambda request: FakeReply(content={"text": "fresh"}))
    result = await llm.complete(MESSAGES, Reply, role=Role.JUDGE)
    assert result.output.text == "fresh" and result.usage.cache_hits == 0 and fake.calls == 1
    again = await llm.complete(MESSAGES, Reply, role=Role.JUDGE)  # the fresh reply replaced the stale one
    assert again.output.text == "fresh" and again.usage.cache_hits == 1 and fake.calls == 1
