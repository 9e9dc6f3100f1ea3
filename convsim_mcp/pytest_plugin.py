"""The pytest plugin: test a conversational agent from a team's own test suite.

    def test_support_bot(convsim):
        report = convsim.test_agent("my_agent.py:respond", num_test_cases=5)
        assert not report.issues_at_least("high"), report.summary()

`convsim.test_agent` takes test_agent's options (engine.test_agent) and returns an `AgentReport`. Options:
`--convsim-model` (every role's model; default CONVSIM_MODEL, else the offline backend) and `--convsim-fail-on`
(a test that ran test_agent fails when an issue at or above that severity was found, assert or not). A run with
sessions that could not be tested fails its test: "could not test" is never green. Each run shows in pytest's
terminal summary and, as properties of its test, in `--junitxml`. Runs are stored where the CLI keeps them
($CONVSIM_HOME), so `convsim-mcp runs show RUN_ID` reads them afterwards.

Registered through the `pytest11` entry point, so it loads in every pytest run of an environment that has
convsim-mcp installed: importing it is cheap and the engine loads on the first `test_agent` call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from engine.models import Issue, Report

SEVERITIES = ("high", "medium", "low")  # most severe first, as engine.models.SEVERITY_ORDER
_RUNS = pytest.StashKey[list[tuple[str, "AgentReport"]]]()  # (test node id, report), in run order
_ITEM_RUNS = pytest.StashKey[list["AgentReport"]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("convsim", "convsim-mcp agent tests")
    group.addoption("--convsim-model", default=None, metavar="MODEL",
                    help="model for every role of convsim.test_agent (default CONVSIM_MODEL, else offline)")
    group.addoption("--convsim-fail-on", default=None, choices=SEVERITIES,
                    help="fail a test whose convsim.test_agent run found an issue at or above this severity")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RUNS] = []


class AgentReport:
    """A test_agent report, with the two questions a test asks of it. Other attributes are the Report's."""

    def __init__(self, report: Report, markdown: str):
        self.report = report
        self.markdown = markdown

    def __getattr__(self, name: str) -> Any:
        return getattr(self.report, name)

    def issues_at_least(self, severity: str) -> list[Issue]:
        """The agent's issues at `severity` or worse ("high", "medium" or "low"), most severe first."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}")
        worst = SEVERITIES.index(severity)
        return [i for i in self.report.issues if SEVERITIES.index(i.severity) <= worst]

    @property
    def sessions_total(self) -> int:
        return len(self.report.sessions)

    def counts(self) -> str:
        """"2 high, 1 medium" (or "no issues"), plus the untested sessions."""
        by = {s: sum(1 for i in self.report.issues if i.severity == s) for s in SEVERITIES}
        text = ", ".join(f"{n} {s}" for s, n in by.items() if n) or "no issues"
        if self.report.untested:
            text += f"; {self.report.untested} of {self.sessions_total} session(s) could not be tested"
        return text

    def summary(self) -> str:
        """A few lines a failing assert can print: the run, its issues and where to read more."""
        r = self.report
        lines = [f"convsim run {r.run_id} on {r.target}: {self.sessions_total} session(s), {self.counts()}"]
        for issue in r.issues:
            where = next(iter(issue.evidence), None)
            at = f" (session {where.session_id}, turn {where.turn})" if where is not None and where.turn else ""
            lines.append(f"  [{issue.severity}] {issue.id}: {issue.title}{at}")
        for s in r.scores:
            if s.pass_rate is not None:
                lines.append(f"  {s.scorer}: {s.pass_rate:.0%} pass")
        lines.append(f"  full report: convsim-mcp runs show {r.run_id}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<AgentReport {self.report.run_id}: {self.counts()}>"


class Convsim:
    """The `convsim` fixture: runs test_agent against the agent, from the test's rootdir as workspace."""

    def __init__(self, request: pytest.FixtureRequest):
        self._request = request
        self._config = request.config
        self.model: str | None = self._config.getoption("convsim_model")

    def test_agent(self, target: Any, *, allow_untested: bool = False, **options: Any) -> AgentReport:
        """Run test_agent and wait for its report. From an async test, use `await convsim.atest_agent(...)`."""
        import anyio
        import sniffio

        try:
            sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            return anyio.run(lambda: self.atest_agent(target, allow_untested=allow_untested, **options))
        raise RuntimeError("convsim.test_agent was called inside a running event loop: in an async test, "
                           "use `await convsim.atest_agent(...)`")

    test_agent.__test__ = False  # type: ignore[attr-defined]  # a method, not a pytest test

    async def atest_agent(self, target: Any, *, allow_untested: bool = False, **options: Any) -> AgentReport:
        """`test_agent` for async tests."""
        from engine import CouldNotTest, Store, UserInputError, test_agent
        from engine.workspace import Workspace

        if self.model is not None:
            options.setdefault("model", self.model)
        options.setdefault("workspace", Workspace.default(base=self._config.rootpath))
        store = Store()
        try:
            report = await test_agent(store, target, **options)
            _, markdown = await store.get_report(report.run_id)
        except CouldNotTest as e:  # a model failure stopped the run: no verdict on the agent
            pytest.fail(f"could not test: {e}", pytrace=False)
        except UserInputError as e:  # the test's own call is wrong: say which option, without our traceback
            pytest.fail(f"convsim.test_agent: {e}", pytrace=False)
        finally:
            store.close()
        result = AgentReport(report, markdown)
        self._record(result)
        if report.untested and not allow_untested:
            pytest.fail(f"could not test: {report.untested} of {result.sessions_total} session(s) of convsim run "
                        f"{report.run_id} could not be tested (the simulated user or a judge failed; not a verdict "
                        "on the agent). Pass allow_untested=True to accept that.\n" + result.summary(),
                        pytrace=False)
        return result

    def _record(self, result: AgentReport) -> None:
        node = self._request.node
        node.stash.setdefault(_ITEM_RUNS, []).append(result)
        self._config.stash[_RUNS].append((node.nodeid, result))
        r = result.report
        node.user_properties += [("convsim_run_id", r.run_id), ("convsim_issues", result.counts()),
                                 ("convsim_untested", r.untested)]


@pytest.fixture
def convsim(request: pytest.FixtureRequest) -> Convsim:
    """Test an agent: `convsim.test_agent(target, num_test_cases=5)` returns an AgentReport."""
    return Convsim(request)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """With --convsim-fail-on, a passing test whose run found an issue at or above it becomes a failure."""
    rep = yield
    fail_on = item.config.getoption("convsim_fail_on", None)
    runs = item.stash.get(_ITEM_RUNS, [])
    if call.when == "call" and rep.passed and fail_on and runs:
        failing = [(r, r.issues_at_least(fail_on)) for r in runs]
        failing = [(r, worst) for r, worst in failing if worst]
        if failing:
            rep.outcome = "failed"
            rep.longrepr = "\n".join(
                [f"{sum(len(w) for _, w in failing)} issue(s) at or above '{fail_on}' (--convsim-fail-on):"]
                + [r.summary() for r, _ in failing])
    return rep


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    runs = config.stash.get(_RUNS, [])
    if not runs:
        return
    terminalreporter.section("convsim")
    for nodeid, result in runs:
        terminalreporter.write_line(f"{nodeid}: run {result.report.run_id}: {result.sessions_total} session(s), "
                                    f"{result.counts()}")
    terminalreporter.write_line("read a run: convsim-mcp runs show RUN_ID  (database: "
                                f"{_db_path()})")


def _db_path() -> Path:
    from engine.store.sqlite import default_db_path

    return default_db_path()
