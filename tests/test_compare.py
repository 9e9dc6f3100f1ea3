"""Comparing two runs: statistics with known answers, pairing over real stored runs, the CLI and the MCP tool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client

from convsim_mcp.server import build_server
from engine import Comparison, InvalidOption, NotFound, compare_runs
from engine.models import Assessment, Message, Session, StopReason, TestCase
from engine.pipeline import simulate
from engine.pipeline.agent_test import test_agent
from engine.pipeline.compare import comparison_markdown
from engine.reports.comparison_stats import (
    MIN_PAIRS,
    NOT_ENOUGH_PAIRS,
    bootstrap_interval,
    compare_pairs,
    mcnemar_p,
    percentile,
)
from tests.conftest import ROOT

pytestmark = pytest.mark.anyio

SEEDS = str(ROOT / "examples" / "support_cases.yaml")
FLAWED = "examples/support_agent.py:support_agent"
FIXED = "tests.fixed_agent:support_agent"  # the gift-card crash fixed, nothing else
TWO_STEP_CASES = [{"goal": "Ask about refunds. Then ask about shipping.", "id": f"case-{i}"} for i in range(7)]
REQUIRED_JSON = {"base", "candidate", "scorers", "flipped", "issues", "regression"}


# --- statistics on constructed pairs -----------------------------------------------------------------

def pairs(both_pass: int = 0, both_fail: int = 0, base_only: int = 0, candidate_only: int = 0):
    return ([(True, True)] * both_pass + [(False, False)] * both_fail + [(True, False)] * base_only
            + [(False, True)] * candidate_only)


@pytest.mark.parametrize("b, c, p", [
    pytest.param(0, 10, 2 / 1024, id="ten-flips-one-way"),
    pytest.param(10, 0, 2 / 1024, id="symmetric"),
    pytest.param(5, 5, 1.0, id="balanced"),
    pytest.param(0, 0, 1.0, id="no-discordant-pairs"),
    pytest.param(1, 9, 2 * (1 + 10) / 1024, id="one-against-nine"),  # tail C(10,0) + C(10,1)
    pytest.param(0, 6, 2 / 64, id="six-one-way-just-significant"),
    pytest.param(0, 5, 2 / 32, id="five-one-way-never-significant"),
    pytest.param(3, 4, 1.0, id="near-balanced-capped-at-one"),
])
def test_exact_mcnemar_p_value_matches_the_binomial_tail(b, c, p):
    assert mcnemar_p(b, c) == pytest.approx(p, abs=1e-15)


def test_mcnemar_refuses_negative_counts():
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_p(-1, 3)


def test_below_the_minimum_there_is_no_p_value_and_no_interval():
    r = compare_pairs(pairs(candidate_only=MIN_PAIRS - 1))
    assert r.verdict == NOT_ENOUGH_PAIRS and r.p_value is None and r.interval is None
    assert (r.pairs, r.base_pass_rate, r.candidate_pass_rate, r.delta) == (MIN_PAIRS - 1, 0.0, 1.0, 1.0)
    assert compare_pairs([]).verdict == NOT_ENOUGH_PAIRS and compare_pairs([]).delta is None


def test_at_the_minimum_a_clean_sweep_is_significant():
    r = compare_pairs(pairs(base_only=MIN_PAIRS))
    assert r.verdict == "worse" and r.p_value == pytest.approx(2 / 2 ** MIN_PAIRS) and r.p_value < 0.05
    assert r.interval == (-1.0, -1.0) and r.delta == -1.0


def test_ten_fixes_out_of_twenty_pairs_is_better_with_the_exact_p():
    r = compare_pairs(pairs(both_pass=6, both_fail=4, candidate_only=10))
    assert (r.base_only, r.candidate_only) == (0, 10)
    assert r.p_value == pytest.approx(2 / 1024) and r.verdict == "better"
    assert (r.base_pass_rate, r.candidate_pass_rate, r.delta) == (0.3, 0.8, 0.5)
    assert r.interval[0] <= r.delta <= r.interval[1] and r.interval[0] > 0


def test_balanced_flips_are_no_significant_change():
    r = compare_pairs(pairs(both_pass=10, base_only=5, candidate_only=5))
    assert r.p_value == 1.0 and r.verdict == "no significant change" and r.delta == 0.0
    assert r.interval[0] < 0 < r.interval[1]


def test_bootstrap_is_reproducible_with_its_seed_and_contains_the_delta():
    data = pairs(both_pass=20, both_fail=5, base_only=3, candidate_only=9)
    delta = (29 - 23) / 37
    first, again = bootstrap_interval(data, seed=7), bootstrap_interval(data, seed=7)
    assert first == again
    assert first[0] <= delta <= first[1] and first[0] < first[1]
    assert bootstrap_interval(data, seed=8) != first or bootstrap_interval(data, seed=9) != first
    assert bootstrap_interval(pairs(both_pass=4, both_fail=4)) == (0.0, 0.0)  # no disagreement, no spread


def test_nearest_rank_percentiles():
    values = [float(v) for v in range(10, 0, -1)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (5.0, 10.0, 10.0)
    assert percentile([], 50) is None


# --- pipeline: two real stored runs ---------------------------------------------------------------

async def seeded(store, target):
    return await test_agent(store, target, test_cases=SEEDS, num_test_cases=0, model="offline", workspace=ROOT,
                            max_turns=6)


async def test_a_fixed_crash_flips_its_case_and_fixes_its_issue(store):
    before, after = await seeded(store, FLAWED), await seeded(store, FIXED)
    c = await compare_runs(store, before.run_id, after.run_id)
    crash = next(i for i in before.issues if i.signals[0] == "agent_error")
    assert c.regression is False and c.pairs == len(before.sessions) == 6
    [flip] = c.flipped.fail_to_pass
    by_case = {s.case_id: s.session_id for s in before.sessions}
    assert (flip.case_id, flip.repeat) == ("gift-card-refund", 0)
    assert flip.base_session == by_case["gift-card-refund"] and "agent_error" in flip.failed
    assert flip.candidate_session in {s.session_id for s in after.sessions}
    assert c.flipped.pass_to_fail == []
    assert [i.signature for i in c.issues.fixed] == [crash.signature] and c.issues.new == []
    assert {i.signature for i in c.issues.persisting} == {i.signature for i in before.issues} - {crash.signature}
    overall = c.scorers[0]
    assert overall.scorer == "overall" and overall.delta > 0 and overall.passed_only_in_candidate == 1
    assert overall.p_value == 1.0 and overall.verdict == "no significant change"
    assert c.changes.stop_reasons["agent_error"] == -1
    assert c.runs["base"].issues_from == "report" and c.runs["base"].latency_p50_ms is not None
    page = comparison_markdown(c)
    assert "No regression" in page and "fixed high issue" in page and "gift-card-refund" in page


async def test_the_crash_coming_back_is_a_regression_by_its_new_high_issue(store):
    before, after = await seeded(store, FIXED), await seeded(store, FLAWED)
    c = await compare_runs(store, before.run_id, after.run_id)
    assert c.regression and [i.severity for i in c.issues.new] == ["high"]
    assert any(r.startswith("new high issue") for r in c.regression_reasons)
    assert [f.case_id for f in c.flipped.pass_to_fail] == ["gift-card-refund"]
    assert "**Regression.**" in comparison_markdown(c)


async def test_every_case_crashing_is_a_significant_drop_with_computed_issues(store):
    good = await simulate(store, "tests.agents:echo", TWO_STEP_CASES, max_turns=3, model="offline")
    bad = await simulate(store, "tests.agents:crashes_on_turn_2", TWO_STEP_CASES, max_turns=3, model="offline")
    c = await compare_runs(store, good.run_id, bad.run_id)
    overall = c.scorers[0]
    assert (overall.pairs, overall.passed_only_in_base, overall.passed_only_in_candidate) == (7, 7, 0)
    assert overall.p_value == pytest.approx(2 / 128) and overall.verdict == "worse"
    assert overall.interval == [-1.0, -1.0]
    assert c.regression and any(r.startswith("overall: pass rate fell") for r in c.regression_reasons)
    assert c.runs["candidate"].issues_from == "computed"
    assert [i.signature.split("|")[0] for i in c.issues.new] == ["agent_error"]
    assert c.runs["candidate"].stop_reasons == {"agent_error": 7}


def _session(sid: str, case_id: str, repeat: int, *, stop=StopReason.MAX_TURNS) -> Session:
    return Session(id=sid, test_case=TestCase(goal="Ask.", id=case_id), repeat=repeat, stop_reason=stop, turns=1,
                   messages=[Message(role="user", content="question", turn=1),
                             Message(role="assistant", content="answer", turn=1, latency_ms=10.0)])


async def test_untestable_and_unpaired_sessions_are_left_out_and_counted(store):
    base = await store.import_sessions([
        _session("b-a0", "a", 0), _session("b-a1", "a", 1), _session("b-b0", "b", 0),
        _session("b-c0", "c", 0, stop=StopReason.SIMULATOR_ERROR), _session("b-only", "z", 0)])
    cand = await store.import_sessions([
        _session("c-a0", "a", 0), _session("c-a1", "a", 1), _session("c-b0", "b", 0), _session("c-c0", "c", 0),
        _session("c-new", "n", 0)])
    await store.save_assessments([
        Assessment(session_id="b-a0", scorer="polite", passed=True), Assessment(session_id="c-a0", scorer="polite",
                                                                               passed=False),
        Assessment(session_id="b-a1", scorer="polite", passed=True),
        Assessment(session_id="c-a1", scorer="polite", passed=None, error="judge timed out", error_kind="model")])
    c = await compare_runs(store, base, cand)
    assert c.pairs == 3 and c.left_out == {"untested": 1, "only_in_base": 1, "only_in_candidate": 1}
    assert c.runs["base"].untested == 1
    polite = next(s for s in c.scorers if s.scorer == "polite")
    assert polite.pairs == 1 and polite.verdict == NOT_ENOUGH_PAIRS  # a1 unscored in the candidate: not a pair
    assert [(f.case_id, f.repeat, f.base_session, f.candidate_session) for f in c.flipped.pass_to_fail] == \
        [("a", 0, "b-a0", "c-a0")]
    assert "c" not in {f.case_id for f in c.flipped.pass_to_fail + c.flipped.fail_to_pass}


@pytest.mark.parametrize("base, candidate, error, text", [
    pytest.param("run-nope", "RUN", NotFound, "base: no run with id 'run-nope'", id="unknown"),
    pytest.param("x' OR 1=1 --", "RUN", InvalidOption, "base must be a run id", id="injection"),
    pytest.param("RUN", "../../etc/passwd", InvalidOption, "candidate must be a run id", id="traversal"),
    pytest.param("RUN", "r" * 65, InvalidOption, "at most 64 characters", id="too-long"),
    pytest.param("RUN", "", InvalidOption, "candidate must be a run id", id="empty"),
    pytest.param("RUN", "RUN", InvalidOption, "the same run", id="same-run"),
])
async def test_bad_run_ids_are_refused_by_name(store, base, candidate, error, text):
    run = (await simulate(store, "tests.agents:echo", TWO_STEP_CASES[:1], max_turns=1, model="offline")).run_id
    with pytest.raises(error) as info:
        await compare_runs(store, base.replace("RUN", run), candidate.replace("RUN", run))
    assert text in str(info.value)


async def test_the_json_form_has_the_documented_keys(store):
    before, after = await seeded(store, FLAWED), await seeded(store, FIXED)
    data = (await compare_runs(store, before.run_id, after.run_id)).model_dump(mode="json")
    assert REQUIRED_JSON <= set(data) and set(data["flipped"]) == {"pass_to_fail", "fail_to_pass"}
    assert set(data["issues"]) == {"new", "fixed", "persisting"}
    assert {"scorer", "base_pass_rate", "candidate_pass_rate", "delta", "p_value", "interval"} <= set(data["scorers"][0])
    assert Comparison.model_validate(data).base == before.run_id


# --- CLI ------------------------------------------------------------------------------------------

def convsim(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    env.update(CONVSIM_HOME=str(home), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "convsim_mcp", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
async def two_runs(tmp_path):
    from engine import Store

    db = tmp_path / "cli.sqlite"
    store = Store(db)
    try:
        flawed, fixed = (await seeded(store, FLAWED)).run_id, (await seeded(store, FIXED)).run_id
    finally:
        store.close()
    return str(db), flawed, fixed


@pytest.mark.slow
async def test_cli_compare_writes_json_and_report_and_gates_on_regression(two_runs, tmp_path):
    db, flawed, fixed = two_runs
    home = tmp_path / "home"
    out, report = tmp_path / "cmp.json", tmp_path / "cmp.md"
    better = convsim("compare", flawed, fixed, "--db", db, "--json", str(out), "--report", str(report),
                     "--fail-on-regression", home=home)
    assert better.returncode == 0, better.stderr
    assert "1 fixed" in better.stdout and "overall" in better.stdout
    data = json.loads(out.read_text())
    assert REQUIRED_JSON <= set(data) and data["regression"] is False
    assert data["base"] == flawed and data["candidate"] == fixed
    assert "## Better" in report.read_text() and "## How sure we are" in report.read_text()
    worse = convsim("compare", fixed, flawed, "--db", db, "--fail-on-regression", home=home)
    assert worse.returncode == 1 and "new high issue" in worse.stdout
    assert convsim("compare", fixed, flawed, "--db", db, home=home).returncode == 0  # no gate asked for


@pytest.mark.slow
@pytest.mark.parametrize("base, text", [
    pytest.param("run-000000000000", "NotFound: base: no run with id 'run-000000000000'", id="unknown"),
    pytest.param("run-1; DROP TABLE runs", "InvalidOption: base must be a run id", id="malformed"),
])
async def test_cli_compare_exits_2_on_bad_input_with_one_line(two_runs, tmp_path, base, text):
    db, _, fixed = two_runs
    proc = convsim("compare", base, fixed, "--db", db, "--fail-on-regression", home=tmp_path / "home")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and text in proc.stderr


# --- MCP ------------------------------------------------------------------------------------------

async def test_compare_runs_over_mcp_with_the_resources(store):
    before, after = await seeded(store, FIXED), await seeded(store, FLAWED)
    async with Client(build_server(store)) as client:
        result = (await client.call_tool("compare_runs", {"base": before.run_id,
                                                          "candidate": after.run_id})).structured_content
        whole = json.loads((await client.read_resource(result["resources"]["comparison"])).contents[0].text)
        page = (await client.read_resource(result["resources"]["report_md"])).contents[0].text
        bad = await client.call_tool("compare_runs", {"base": "run-nope", "candidate": after.run_id})
        hostile = await client.call_tool("compare_runs", {"base": "a/../../b", "candidate": after.run_id})
        templates = [t.uri_template for t in (await client.list_resource_templates()).resource_templates]
    assert result["regression"] is True and result["pass_to_fail"] == 1
    assert [i["severity"] for i in result["new_issues"]] == ["high"] and result["persisting_issues"] == 2
    assert result["resources"]["comparison"] == f"convsim://compare/{before.run_id}/{after.run_id}"
    assert whole["flipped"]["pass_to_fail"][0]["case_id"] == "gift-card-refund"
    assert REQUIRED_JSON <= set(whole) and whole["regression"] is True
    assert page.startswith(f"# Comparison: {before.run_id} -> {after.run_id}") and "## Worse" in page
    assert bad.is_error and "no run with id 'run-nope'" in bad.content[0].text
    assert hostile.is_error and "base must be a run id" in hostile.content[0].text
    assert "convsim://compare/{base}/{candidate}" in templates
