"""`--junit PATH`: results as JUnit XML, valid against the Ant JUnit schema CI systems read.

Every test runs the real command line (offline backend) and validates the file against
tests/data/JUnit.xsd, the Apache Ant JUnit schema (windyroad/JUnit-Schema), with `xmlschema`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from engine.models import Assessment, Evidence, Session, StopReason, TestCase
from engine.reports.junit import JUnitSuite, render_junit, verdict_cases

xmlschema = pytest.importorskip("xmlschema", reason="xmlschema is in the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = xmlschema.XMLSchema(str(ROOT / "tests" / "data" / "JUnit.xsd"))
FLAWED = "examples/support_agent.py:support_agent"
CONTROL = "examples/travel_agent.py:travel_agent"
FIXED = "tests.fixed_agent:support_agent"
SEEDS = "examples/support_cases.yaml"

pytestmark = [pytest.mark.slow]


def convsim(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.endswith("_API_KEY") and not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    base.update(CONVSIM_HOME=str(home), PYTHONPATH=str(ROOT), CONVSIM_ROOTS=str(home.parent), **(env or {}))
    return subprocess.run([sys.executable, "-m", "convsim_mcp", *args], cwd=ROOT, env=base, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def read_junit(path: Path) -> ET.Element:
    """The document, validated against the schema, with every testsuite's counts checked against its testcases."""
    SCHEMA.validate(str(path))
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    for suite in root.iter("testsuite"):
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        for tag, attr in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            assert int(suite.get(attr)) == sum(1 for c in cases if c.find(tag) is not None), attr
        assert float(suite.get("time")) == pytest.approx(sum(float(c.get("time")) for c in cases), abs=0.002)
    return root


def outcome(case: ET.Element) -> str:
    return next((tag for tag in ("failure", "error", "skipped") if case.find(tag) is not None), "passed")


def suite_named(root: ET.Element, suffix: str) -> ET.Element:
    return next(s for s in root.iter("testsuite") if s.get("name").endswith(suffix))


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


def test_test_agent_on_a_flawed_agent_fails_per_case_and_scorer_and_per_issue(tmp_path, home):
    xml, js = tmp_path / "results.xml", tmp_path / "report.json"
    proc = convsim("test-agent", FLAWED, "--cases", SEEDS, "--num-test-cases", "0", "--max-turns", "6",
                   "--model", "offline", "--fail-on", "high", "--junit", str(xml), "--json", str(js),
                   "--db", str(tmp_path / "db.sqlite"), home=home)
    assert proc.returncode == 1, proc.stderr  # --fail-on still decides the exit code; the file is written anyway
    report = json.loads(js.read_text())
    root = read_junit(xml)
    verdicts = suite_named(root, report["run_id"])
    cases = verdicts.findall("testcase")
    scorers = [s["scorer"] for s in report["scores"]]
    assert len(cases) == len(report["sessions"]) * len(scorers)  # one per test case x scorer
    failed = {(c.get("classname").rsplit(".", 1)[1], c.get("name")): c.find("failure")
              for c in cases if outcome(c) == "failure"}
    assert len(failed) == sum(s["failed"] for s in report["scores"])
    forgot = failed[("remember-name", "knowledge_retention")]
    assert "Dana" in forgot.get("message") and "turn 4" in forgot.get("message")  # the rationale and the quote
    assert "evidence:" in forgot.text and "turn 4 (assistant)" in forgot.text and "goal:" in forgot.text
    crash = failed[("gift-card-refund", "goal_achievement")]
    assert "KeyError" in crash.get("message")
    issues = suite_named(root, ".issues").findall("testcase")
    assert [c.get("name").split()[0] for c in issues] == [i["id"] for i in report["issues"]]
    assert all(outcome(c) == "failure" for c in issues)
    first = issues[0].find("failure")
    assert first.get("message").startswith("[high]") and "reproducing case:" in first.text


def test_a_flawless_agent_passes_every_testcase(tmp_path, home):
    xml = tmp_path / "results.xml"
    proc = convsim("test-agent", CONTROL, "--num-test-cases", "5", "--max-turns", "6", "--model", "offline",
                   "--fail-on", "low", "--junit", str(xml), "--db", str(tmp_path / "db.sqlite"), home=home)
    assert proc.returncode == 0, proc.stderr
    root = read_junit(xml)
    cases = list(root.iter("testcase"))
    assert len(cases) >= 5 and {outcome(c) for c in cases} == {"passed"}
    assert all(s.get("failures") == s.get("errors") == "0" for s in root.iter("testsuite"))


BROKEN_USER = '''
from engine import SimulatedUser, UserTurn


class BreaksOnTurnTwo(SimulatedUser):
    """Says one thing, then fails: the agent answered once, but the conversation could not test it."""

    async def next_turn(self, context):
        if context.is_first_turn:
            return UserTurn(message="Hello, where is my order A1234?")
        raise RuntimeError("the simulated user fell over")
'''


def test_a_session_the_simulated_user_broke_is_an_error_not_a_failure(tmp_path, home):
    (tmp_path / "broken_user.py").write_text(BROKEN_USER)
    xml = tmp_path / "results.xml"
    proc = convsim("simulate", FLAWED, '[{"goal": "Ask for the status of order A1234. Then ask about shipping."}]',
                   "--user-agent", f"{tmp_path / 'broken_user.py'}:BreaksOnTurnTwo", "--scorer", "goal_achievement",
                   "--scorer", "latency", "--model", "offline", "--junit", str(xml),
                   "--db", str(tmp_path / "db.sqlite"), home=home)
    assert proc.returncode == 3, proc.stderr  # could not test
    cases = list(read_junit(xml).iter("testcase"))
    assert [c.get("name") for c in cases] == ["goal_achievement", "latency"]
    for case in cases:  # even the latency verdict, which passed on the one turn, is no pass
        error = case.find("error")
        assert error is not None and case.find("failure") is None
        assert error.get("type") == "simulator_error" and "fell over" in error.get("message")


def test_a_verdict_no_model_could_give_is_an_error(tmp_path, home):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]) + "\n")
    judge = json.dumps({"name": "polite", "instructions": "Polite? {{ conversation }}"})
    xml = tmp_path / "results.xml"
    proc = convsim("score", "--file", str(path), "--scorer", judge, "--junit", str(xml),
                   "--db", str(tmp_path / "db.sqlite"), home=home)
    assert proc.returncode == 3, proc.stderr
    [case] = read_junit(xml).iter("testcase")
    assert case.get("name") == "polite" and case.find("error").get("type") == "judge_error"
    assert "needs a model" in case.find("error").get("message")


HOSTILE_AGENT = '''
import os


def respond(messages, **context):
    key = os.environ["HOSTILE_API_KEY"]
    return ("I'm sorry, I can't help with that. \\x00\\x07\\x1b[31m <![CDATA[ ]]> </failure> & \\ufffe "
            f"my key is {key}")
'''


def test_hostile_replies_make_valid_xml_without_secrets(tmp_path, home):
    (tmp_path / "hostile_agent.py").write_text(HOSTILE_AGENT)
    secret = "sk-hostile-0123456789abcdef"
    xml = tmp_path / "results.xml"
    proc = convsim("simulate", f"{tmp_path / 'hostile_agent.py'}:respond",
                   '[{"goal": "Cancel my order A1234.", "id": "cancel <&> \\u0001"}]', "--max-turns", "2",
                   "--scorer", "conversation_completeness", "--model", "offline", "--junit", str(xml),
                   "--db", str(tmp_path / "db.sqlite"), home=home, env={"HOSTILE_API_KEY": secret})
    assert proc.returncode == 0, proc.stderr
    text = xml.read_text(encoding="utf-8")
    assert secret not in text and "***" in text
    [case] = read_junit(xml).iter("testcase")
    failure = case.find("failure")
    assert failure is not None and "</failure> &" in failure.text and "]]>" in failure.text
    assert "\x00" not in failure.text and "\ufffd" in failure.text
    assert case.get("classname").endswith("cancel <&> \ufffd")


def test_rerun_and_compare_write_junit(tmp_path, home):
    db, js = str(tmp_path / "db.sqlite"), tmp_path / "report.json"
    common = ("--cases", SEEDS, "--num-test-cases", "0", "--max-turns", "6", "--model", "offline", "--db", db)
    assert convsim("test-agent", FLAWED, *common, "--json", str(js), home=home).returncode == 0
    report = json.loads(js.read_text())
    crash = report["issues"][0]["id"]

    still, fixed = tmp_path / "still.xml", tmp_path / "fixed.xml"
    assert convsim("rerun", report["run_id"], "--issue", crash, "--junit", str(still), "--db", db,
                   home=home).returncode == 1
    [check] = suite_named(read_junit(still), ".rerun").findall("testcase")
    assert check.get("name").startswith(crash) and check.find("failure").get("message").startswith("reproduces")
    assert convsim("rerun", report["run_id"], "--issue", crash, "--target", FIXED, "--junit", str(fixed),
                   "--db", db, home=home).returncode == 0
    root = read_junit(fixed)
    assert outcome(suite_named(root, ".rerun").findall("testcase")[0]) == "passed"
    assert root.find("testsuite").findall("testcase")  # the re-run's own sessions x scorers come first

    candidate = tmp_path / "candidate.json"
    assert convsim("test-agent", FIXED, *common, "--json", str(candidate), home=home).returncode == 0
    cmp_xml = tmp_path / "compare.xml"
    proc = convsim("compare", report["run_id"], json.loads(candidate.read_text())["run_id"], "--junit", str(cmp_xml),
                   "--db", db, home=home)
    assert proc.returncode == 0, proc.stderr
    cases = list(read_junit(cmp_xml).iter("testcase"))
    flipped = [c for c in cases if c.get("classname").endswith(".flipped")]
    assert [(c.get("name"), outcome(c)) for c in flipped] == [("gift-card-refund", "passed")]
    fixed_issue = next(c for c in cases if c.get("name").startswith(crash))
    assert outcome(fixed_issue) == "passed"
    assert any(c.get("classname").endswith(".scorers") and c.get("name") == "overall" for c in cases)


def test_a_testsuites_counts_follow_its_cases_without_a_store():
    """The writer alone: a session of each kind, counted and valid."""
    case = TestCase(goal="g", id="c1")
    sessions = [Session(id=f"s{i}", run_id="run-x", case_index=0, repeat=i, test_case=case, stop_reason=reason,
                        started_at=10.0, finished_at=10.5, turns=1)
                for i, reason in enumerate([StopReason.GOAL_ACHIEVED, StopReason.MAX_TURNS, StopReason.CANCELLED])]
    verdicts = [Assessment(session_id="s0", scorer="a", passed=True),
                Assessment(session_id="s1", scorer="a", passed=False, rationale="wrong",
                           evidence=[Evidence(turn=1, role="assistant", quote="no")]),
                Assessment(session_id="s1", scorer="b", value="meh")]
    suite = JUnitSuite(name="convsim.run-x", timestamp=0.0, cases=verdict_cases(sessions, verdicts, suite="convsim.run-x"))
    text = render_junit([suite])
    SCHEMA.validate(ET.fromstring(text.split("\n", 1)[1]))
    root = ET.fromstring(text.split("\n", 1)[1])
    got = [(c.get("classname"), c.get("name"), outcome(c)) for c in root.iter("testcase")]
    assert got == [("convsim.run-x.c1", "a", "passed"), ("convsim.run-x.c1 repeat 2", "a", "failure"),
                   ("convsim.run-x.c1 repeat 2", "b", "skipped"), ("convsim.run-x.c1 repeat 3", "session", "skipped")]
    s = root.find("testsuite")
    assert (s.get("tests"), s.get("failures"), s.get("errors"), s.get("skipped"), s.get("time")) == \
        ("4", "1", "0", "2", "2.000")  # each testcase: its session's 0.5 s
