"""MLflow export and import (engine/store/mlflow.py) against a local MLflow SQLite store, no server.

Skipped, with the reason, when the `mlflow` extra is not installed (`.ci/run` installs it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install 'convsim-mcp[mlflow]'")

from engine import Store, test_agent  # noqa: E402
from engine.store.mlflow import SESSION_KEY  # noqa: E402

from .test_cli import convsim  # noqa: E402

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, str]:
    """An offline test_agent run of the flawed example agent, exported by the CLI to a local MLflow store."""
    import anyio

    home = tmp_path_factory.mktemp("home")
    db = home / "convsim.sqlite"

    async def main() -> str:
        store = Store(db)
        try:
            report = await test_agent(store, str(ROOT / "examples/support_agent.py") + ":support_agent",
                                      test_cases=str(ROOT / "examples/support_cases.yaml"), num_test_cases=0,
                                      max_turns=5, model="offline", workspace=ROOT)
            return report.run_id
        finally:
            store.close()

    run_id = anyio.run(main)
    uri = f"sqlite:///{home}/mlflow.db"
    proc = convsim("runs", "export", run_id, "--format", "mlflow", "--tracking-uri", uri, "--experiment", "bots",
                   home=home, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and "traces with" in proc.stderr  # the summary line is on stderr
    return run_id, home, uri


def _traces(uri: str, experiment: str) -> list:
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    return mlflow.search_traces(locations=[exp.experiment_id], return_type="list", max_results=1000)


def _sessions(db: Path, run_id: str):
    import anyio

    store = Store(db)
    try:
        sessions = anyio.run(lambda: store.get_sessions(run_id))
        return sessions, anyio.run(lambda: store.get_assessments([s.id for s in sessions]))
    finally:
        store.close()


def test_export_writes_a_trace_per_turn_grouped_by_session_with_verdicts_as_assessments(exported):
    run_id, home, uri = exported
    sessions, verdicts = _sessions(home / "convsim.sqlite", run_id)
    traces = _traces(uri, "bots")
    by_session: dict[str, list] = {}
    for t in traces:
        by_session.setdefault(t.info.trace_metadata[SESSION_KEY], []).append(t)
    assert set(by_session) == {s.id for s in sessions}
    for s in sessions:
        mine = sorted(by_session[s.id], key=lambda t: int(t.info.trace_metadata["convsim.turn"]))
        users = [m.content for m in s.messages if m.role == "user"]
        assert [t.data.spans[0].inputs["messages"][0]["content"] for t in mine] == users
        meta = mine[0].info.trace_metadata
        assert meta["convsim.goal"] == s.test_case.goal and meta["convsim.run_id"] == run_id
        assert meta["convsim.persona"] == (s.test_case.persona or "")
        assert [t.info.trace_metadata["convsim.turn"] for t in mine] == [str(i) for i in range(1, len(users) + 1)]
    # every scored verdict is an assessment on its session's first trace, failing ones with their rationale
    scored = [a for a in verdicts if (a.value if a.value is not None else a.passed) is not None]
    logged = [a for t in traces for a in t.info.assessments]
    assert len(logged) == len(scored) > 0
    crash = next(s for s in sessions if any(m.error for m in s.messages))
    failed = [a for t in by_session[crash.id] for a in t.info.assessments if a.value is False]
    assert failed and all(a.rationale for a in failed)
    assert any(t.info.state == "ERROR" for t in by_session[crash.id])  # the agent's failed turn


def test_an_export_imports_back_as_the_same_transcripts(exported):
    run_id, home, uri = exported
    proc = convsim("runs", "import", "--from-mlflow", "--tracking-uri", uri, "--experiment", "bots", home=home,
                   timeout=180)
    assert proc.returncode == 0, proc.stderr
    imported = proc.stdout.strip()
    before, _ = _sessions(home / "convsim.sqlite", run_id)
    after, _ = _sessions(home / "convsim.sqlite", imported)

    def talk(s):
        return (s.test_case.goal if s.test_case else None,
                tuple((m.role, m.content or "") for m in s.messages if m.role in ("user", "assistant")))

    assert sorted(map(talk, after)) == sorted(map(talk, before))
    # the imported run can be judged like any other
    scored = convsim("score", imported, "--model", "offline", home=home, timeout=120)
    assert scored.returncode in (0, 1), scored.stderr
    assert "goal_achievement" in scored.stdout


def test_native_mlflow_traces_import_grouped_by_session_in_order(exported, tmp_path):
    import anyio
    from mlflow.entities import SpanType

    from engine.store.mlflow import import_experiment

    uri = exported[2]  # the same store, another experiment: creating an MLflow database takes seconds
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment("native")

    def trace(inputs, outputs, session=None, start=0):
        t0 = 1_700_000_000_000_000_000 + start * 1_000_000_000
        span = mlflow.start_span_no_context("chat", span_type=SpanType.CHAIN, inputs=inputs,
                                            experiment_id=exp.experiment_id, start_time_ns=t0,
                                            metadata={SESSION_KEY: session} if session else None)
        span.set_outputs(outputs)
        span.end(end_time_ns=t0 + 1000)

    # MLflow's own docs shape, a chat shape with an OpenAI response, and a trace without a session
    trace({"user_input": "What is MLflow?"}, {"bot_response": "An ML platform."}, "s-1", 1)
    trace({"user_input": "How do I track runs?"}, {"bot_response": "mlflow.log_param()."}, "s-1", 2)
    trace({"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]},
          {"choices": [{"message": {"role": "assistant", "content": "hello!"}}]}, "s-2", 3)
    trace("a lone question", "a lone answer", None, 4)

    store = Store(tmp_path / "convsim.sqlite")
    try:
        run_id = anyio.run(lambda: import_experiment(store, tracking_uri=uri, experiment="native"))
        sessions = anyio.run(lambda: store.get_sessions(run_id))
    finally:
        store.close()
    talks = sorted([(m.role, m.content) for m in s.messages] for s in sessions)
    assert talks == sorted([
        [("user", "What is MLflow?"), ("assistant", "An ML platform."),
         ("user", "How do I track runs?"), ("assistant", "mlflow.log_param().")],
        [("user", "hi"), ("assistant", "hello!")],
        [("user", "a lone question"), ("assistant", "a lone answer")],
    ])


@pytest.mark.parametrize("args, message", [
    (["--tracking-uri", "sqlite:////etc/mlflow.db", "--experiment", "x"], "outside the workspace roots"),
    (["--experiment", "x"], "needs --tracking-uri URI and --experiment NAME"),
    (["--tracking-uri", "ftp://host/x", "--experiment", "x"], "expected sqlite:///PATH"),
])
def test_bad_mlflow_arguments_exit_2_with_the_fix(exported, args, message):
    run_id, home, _ = exported
    proc = convsim("runs", "export", run_id, "--format", "mlflow", *args, home=home)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_import_of_a_missing_experiment_or_store_says_so(exported, tmp_path):
    import anyio

    from engine import InvalidOption
    from engine.store.mlflow import import_experiment

    store = Store(tmp_path / "convsim.sqlite")
    uri = exported[2]
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("nothing-here")
    try:
        with pytest.raises(InvalidOption, match="no traces to import"):
            anyio.run(lambda: import_experiment(store, tracking_uri=uri, experiment="nothing-here"))
        with pytest.raises(InvalidOption, match="'absent' does not exist"):
            anyio.run(lambda: import_experiment(store, tracking_uri=uri, experiment="absent"))
    finally:
        store.close()


def test_import_of_a_store_that_is_not_there_exits_2(convsim_home, tmp_path):
    proc = convsim("runs", "import", "--from-mlflow", "--tracking-uri", f"sqlite:///{tmp_path}/none.db",
                   "--experiment", "x", home=convsim_home)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
