"""The pytest plugin (convsim_mcp/pytest_plugin.py), run as a team would: pytester in a subprocess.

The plugin is found through its `pytest11` entry point (nothing passes `-p`), the agents are the bundled
examples copied into the test's own rootdir (its workspace), and the offline backend plays every role.
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

BROKEN_USER = '''
from engine import SimulatedUser


class BrokenUser(SimulatedUser):
    async def next_turn(self, context):
        raise RuntimeError("the simulated user broke")
'''


@pytest.fixture
def project(pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory) -> pytest.Pytester:
    """A team's project: two example agents and the flawed one's seed cases, and its own CONVSIM_HOME."""
    for name in ("support_agent.py", "travel_agent.py", "support_cases.yaml"):
        shutil.copy(EXAMPLES / name, pytester.path / name)
    pytester.makepyfile(broken_user=BROKEN_USER)
    pytester._monkeypatch.setenv("CONVSIM_HOME", str(tmp_path_factory.mktemp("convsim-home")))
    pytester._monkeypatch.delenv("CONVSIM_MODEL", raising=False)
    return pytester


def test_a_flawed_agent_fails_its_assert_and_a_flawless_one_passes(project: pytest.Pytester):
    project.makepyfile(test_bots='''
        def test_support_bot(convsim):
            report = convsim.test_agent("support_agent.py:support_agent", test_cases="support_cases.yaml",
                                        num_test_cases=0, max_turns=6)
            assert not report.issues_at_least("high"), report.summary()

        def test_travel_bot(convsim):
            report = convsim.test_agent("travel_agent.py:travel_agent", num_test_cases=3, max_turns=6)
            assert not report.issues_at_least("low"), report.summary()
            assert report.sessions_total == 3 and report.offline
    ''')
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--junitxml=results.xml")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "test_support_bot" in out and "[high]" in out  # the assert message is the report's summary
    assert "convsim-mcp runs show" in out
    # pytest's own terminal summary has a convsim section, one line per run
    assert "convsim" in out and "test_bots.py::test_travel_bot: run " in out and "no issues" in out
    suite = ET.parse(project.path / "results.xml").getroot()
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["test_support_bot"].find("failure") is not None
    assert cases["test_travel_bot"].find("failure") is None
    props = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")} for c in cases.values()}
    assert props["test_travel_bot"]["convsim_issues"] == "no issues"
    assert props["test_support_bot"]["convsim_run_id"] and "high" in props["test_support_bot"]["convsim_issues"]


def test_fail_on_fails_a_test_without_an_assert(project: pytest.Pytester):
    project.makepyfile(test_fail_on='''
        def test_support_bot(convsim):
            convsim.test_agent("support_agent.py:support_agent", test_cases="support_cases.yaml",
                               num_test_cases=0, max_turns=6)

        def test_travel_bot(convsim):
            convsim.test_agent("travel_agent.py:travel_agent", num_test_cases=2, max_turns=6)

        def test_unrelated():
            assert True
    ''')
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--convsim-fail-on", "high")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*issue(s) at or above 'high' (--convsim-fail-on)*"])
    # without the option, the same tests pass: the option decides, not the plugin
    project.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=3)


def test_a_run_that_could_not_test_is_never_green(project: pytest.Pytester):
    project.makepyfile(test_untested='''
        def test_bot(convsim):
            report = convsim.test_agent("travel_agent.py:travel_agent", num_test_cases=2, max_turns=4,
                                        user_agent="broken_user.py:BrokenUser")
            assert not report.issues_at_least("low")

        def test_bot_accepting_untested(convsim):
            report = convsim.test_agent("travel_agent.py:travel_agent", num_test_cases=2, max_turns=4,
                                        user_agent="broken_user.py:BrokenUser", allow_untested=True)
            assert report.untested == 2
    ''')
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*could not test: 2 of 2 session(s)*"])


def test_a_wrong_call_says_which_option(project: pytest.Pytester):
    project.makepyfile(test_wrong='''
        def test_bot(convsim):
            convsim.test_agent("travel_agent.py:travel_agent", num_test_cases=2, max_turns=0)

        def test_outside_the_workspace(convsim):
            convsim.test_agent("/etc/passwd.py:respond", num_test_cases=1)
    ''')
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    assert "convsim.test_agent: max_turns must be an integer from 1 to" in out
    assert "Traceback" not in out


def test_the_model_option_reaches_every_role(project: pytest.Pytester):
    project.makepyfile(test_model='''
        def test_bot(convsim):
            report = convsim.test_agent("travel_agent.py:travel_agent", num_test_cases=1, max_turns=2)
            assert set(report.models.values()) == {"offline"}, report.models
    ''')
    project.runpytest_subprocess("-p", "no:cacheprovider", "--convsim-model", "offline").assert_outcomes(passed=1)
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--convsim-fail-on", "severe")
    assert result.ret != 0 and "invalid choice" in result.stderr.str()


def test_an_async_test_awaits_the_run(project: pytest.Pytester):
    project.makepyfile(test_async='''
        import anyio
        import pytest

        def test_sync_call_from_a_loop_is_refused_with_the_fix(convsim):
            async def main():
                convsim.test_agent("travel_agent.py:travel_agent", num_test_cases=1, max_turns=2)
            with pytest.raises(RuntimeError, match="await convsim.atest_agent"):
                anyio.run(main)

        def test_awaited(convsim):
            async def main():
                return await convsim.atest_agent("travel_agent.py:travel_agent", num_test_cases=1, max_turns=2)
            assert not anyio.run(main).issues
    ''')
    project.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)
