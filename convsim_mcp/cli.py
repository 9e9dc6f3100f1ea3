"""`convsim-mcp`: serve the MCP server, or run the same jobs from a terminal or CI.

    convsim-mcp serve [--transport stdio|sse|http] [--host 127.0.0.1 --port 8000]
                      [--auth-token TOKEN (or $CONVSIM_AUTH_TOKEN)] [--allowed-host HOST ...]
    convsim-mcp test-agent TARGET [--num-test-cases N --guidance G --max-turns N --model M
                                   --report report.html|.md|.json --json report.json --junit results.xml
                                   --fail-on high|medium|low --user-agent pkg.mod:Class]
    convsim-mcp rerun RUN_ID [--issue ISSUE_ID] [--target TARGET] [--junit PATH]
    convsim-mcp compare BASE CANDIDATE [--json PATH] [--report PATH] [--junit PATH] [--fail-on-regression]
    convsim-mcp generate [--description D] [--target T] [--from-run RUN_ID | --file F] [-o cases.yaml]
    convsim-mcp simulate TARGET CASES [--max-turns N --model M --concurrency N --repeats N --junit PATH]
                      (CASES: a file, a test set id, or inline JSON: '[{"goal": "..."}]')
    convsim-mcp simulate TARGET --from-run RUN_ID [--replay [--continue-after-replay]]   (test-agent too)
    (test-agent, generate, simulate, score: [--cache | --no-cache] [--temperature T] [--seed N] [--rpm N --tpm N];
     rerun: [--rpm N --tpm N])
    convsim-mcp score (RUN_ID | --file FILE | --session ID ...) [--scorer NAME ...] [--model M] [--junit PATH]
    convsim-mcp runs list | show RUN_ID | export RUN_ID [-o FILE] | import FILE | resume RUN_ID
    convsim-mcp runs export RUN_ID --format mlflow --tracking-uri URI --experiment NAME
    convsim-mcp runs import --from-mlflow --tracking-uri URI --experiment NAME
    convsim-mcp cache stats | clear
    convsim-mcp demo

Results go to stdout, progress and logs to stderr (with `serve --transport
stdio`, stdout is the protocol wire and nothing else may write there).
Errors exit non-zero with `Type: message`, never a traceback. `--report PATH` writes the format its
extension names: .md (Markdown), .html (one self-contained page) or .json.

Exit codes of simulate, test-agent, score and rerun:
    0  done
    1  an issue at or above --fail-on (rerun: an issue still reproduces)
    2  bad input (nothing ran)
    3  could not test: a session ended simulator_error, or a judge's model could not give a verdict
       (beyond --allow-untested), or a model failure stopped the job
A found failure (1) is reported before an incomplete run (3).
--junit PATH writes the results as JUnit XML (engine/reports/junit.py) whatever the exit code.
compare exits 0, or 1 with --fail-on-regression when a pass rate fell with p < 0.05 or a new high issue
appeared, or 2 for bad input (an unknown or malformed run id).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import anyio

from engine import ConvsimError, CouldNotTest, InvalidOption, LLMError, JobRegistry, RunSummary, Store, UserInputError, Workspace
from engine import secrets
from engine.models import SEVERITY_ORDER, Report, ScorerSummary, TrialsSummary
from engine.pipeline._shared import MAX_CONCURRENCY
from engine.text import one_line
from engine._lazy import deferred

# The commands' entry points, imported when a command runs: `serve` answers `tools/list` without the stacks behind
# the tools (engine/_lazy.py).
describe_target, run_summary, score_sessions, simulate = deferred("engine.pipeline", "describe_target", "run_summary",
                                                                  "score_sessions", "simulate")
test_agent = deferred("engine.pipeline.agent_test", "test_agent")
resume = deferred("engine.pipeline.resume", "resume")
rerun_issues, rerun_json = deferred("engine.pipeline.rerun", "rerun_issues", "rerun_json")
compare_runs, comparison_markdown = deferred("engine.pipeline.compare", "compare_runs", "comparison_markdown")
build_test_set, export_test_set = deferred("engine.pipeline.generation", "build_test_set", "export_test_set")
comparison_html, run_report_html = deferred("engine.reports.html", "comparison_html", "run_report_html")
junit_xml = deferred("engine.reports.junit", "junit_xml")

from .progress import ProgressBar

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNTESTED = 0, 1, 2, 3
REPORT_FORMATS = {".md": "markdown", ".html": "html", ".json": "json"}  # --report's extension -> its format
REPORT_FORMATS_HELP = "the extension picks the format: .md (Markdown), .html (a self-contained page) or .json"
REPORT_HELP = "write the report here; " + REPORT_FORMATS_HELP
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    secrets.refresh_from_env()
    if getattr(args, "func", None) is not _serve:  # with stdio serving, stdout is the protocol wire: left alone
        sys.stdout = _RedactingStream(sys.stdout)
    sys.stderr = _RedactingStream(sys.stderr)
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    secrets.install_log_redaction()
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return args.func(args) or 0
    except UserInputError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (CouldNotTest, LLMError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_UNTESTED
    except ConvsimError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted; completed turns are stored", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convsim-mcp", description="Test conversational agents with simulated users.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    sub = p.add_subparsers(metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the MCP server")
    serve.add_argument("--transport", choices=["stdio", "sse", "http"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--auth-token", help="sse/http: bearer token every request must carry "
                                            "('Authorization: Bearer TOKEN'), 16+ characters; required for a "
                                            "non-loopback --host. Default $CONVSIM_AUTH_TOKEN (safer: the command "
                                            "line is visible to other local users)")
    serve.add_argument("--allowed-host", action="append", dest="allowed_hosts", metavar="HOST",
                       help="sse/http: also accept this Host header (and its Origin), e.g. the name clients or a "
                            "proxy use to reach a 0.0.0.0 bind; 'name', 'name:port' or 'name:*' (repeatable)")
    serve.add_argument("--db", help="SQLite file (default $CONVSIM_HOME/convsim.sqlite)")
    serve.add_argument("--allow-code", action="store_true",
                       help="over sse/http, accept Python import paths (agents, user agents, code scorers) and file "
                            "arguments from clients (refused by default; stdio always accepts them)")
    serve.add_argument("--allow-agent-host", action="append", default=[], metavar="HOST",
                       help="over sse/http, let clients test HTTP agents on HOST (default: loopback only; repeatable)")
    _add_root(serve)
    serve.set_defaults(func=_serve)

    ta = sub.add_parser("test-agent", help="generate cases, simulate, score, and report issues (CI: --fail-on)")
    ta.add_argument("target", help="'pkg.module:func', 'path/to/file.py:func', an http(s) URL, or a JSON object")
    ta.add_argument("--description", help="what the agent is for (optional)")
    ta.add_argument("--cases", help="your own test cases file (or test set id), run besides the generated ones")
    ta.add_argument("--num-test-cases", type=int, default=7)
    ta.add_argument("--guidance", help="what to focus the generated cases on")
    ta.add_argument("--adversarial", type=float, default=0.0, help="share of red-team cases, 0-1")
    ta.add_argument("--max-turns", type=int, default=8)
    ta.add_argument("--model", help="model for every role ('provider/model' or 'offline')")
    ta.add_argument("--user-model")
    ta.add_argument("--judge-model")
    ta.add_argument("--generator-model")
    ta.add_argument("--scorer", action="append", dest="scorers", help="repeatable; default: the default set")
    ta.add_argument("--repeats", type=int, default=1)
    ta.add_argument("--concurrency", type=int, default=8,
                    help=f"conversations at the same time, 1-{MAX_CONCURRENCY} (default 8)")
    ta.add_argument("--no-ask-agent", action="store_true", help="do not ask the agent to describe itself")
    ta.add_argument("--shrink", action=argparse.BooleanOptionalAction, default=None,
                    help="shrink each issue's reproducing case (default: on when user and judge are offline)")
    ta.add_argument("--report", help=REPORT_HELP)
    ta.add_argument("--json", dest="json_path", help="write the full report as JSON here")
    _add_junit(ta)
    ta.add_argument("--fail-on", choices=["high", "medium", "low"],
                    help="exit 1 when an agent issue of this severity or worse is found")
    _add_user_agent(ta)
    _add_replay_options(ta)
    _add_allow_untested(ta)
    _add_sampling(ta)
    ta.add_argument("--db")
    _add_root(ta)
    ta.set_defaults(func=_test_agent)

    rr = sub.add_parser("rerun", help="after a fix: re-run a test_agent run's issues and say which still reproduce")
    rr.add_argument("run_id")
    rr.add_argument("--issue", help="one issue id (default: every case of the run)")
    rr.add_argument("--target", help="the agent, if different from the run's")
    rr.add_argument("--max-turns", type=int)
    rr.add_argument("--model")
    rr.add_argument("--repeats", type=int,
                    help="re-runs per case (default: the run's; at least 3 for an issue seen in only some sessions)")
    rr.add_argument("--json", dest="json_path", help="write {run_id, issues: [{id, status, reason, sessions}], "
                                                     "new_issues} here")
    _add_junit(rr)
    _add_rate_limits(rr, default="the run's, else $CONVSIM_LLM_RPM")
    _add_allow_untested(rr)
    rr.add_argument("--db")
    _add_root(rr)
    rr.set_defaults(func=_rerun)

    cmp = sub.add_parser("compare", help="compare two runs of the same test cases: better, worse, how sure")
    cmp.add_argument("base", help="the earlier run (e.g. before the change)")
    cmp.add_argument("candidate", help="the run to judge against it")
    cmp.add_argument("--json", dest="json_path", help="write {base, candidate, scorers, flipped, issues, regression, "
                                                      "...} here")
    cmp.add_argument("--report", help="write the comparison here: " + REPORT_FORMATS_HELP)
    _add_junit(cmp)
    cmp.add_argument("--fail-on-regression", action="store_true",
                     help="exit 1 when a scorer's pass rate fell with p < 0.05 or a new high issue appeared")
    cmp.add_argument("--db")
    cmp.set_defaults(func=_compare)

    gen = sub.add_parser("generate", help="write test cases and store them as a test set")
    gen.add_argument("--description")
    gen.add_argument("--target", help="the agent (asked to describe itself; Python source is read)")
    gen.add_argument("--from-run", dest="run_id", help="distill cases from this run's conversations")
    gen.add_argument("--file", help="distill cases from a JSONL file of conversations")
    gen.add_argument("--num-test-cases", type=int, default=7)
    gen.add_argument("--guidance")
    gen.add_argument("--adversarial", type=float, default=0.0)
    gen.add_argument("--model")
    gen.add_argument("-o", "--output", help="also write the cases to this .yaml, .json or .jsonl file")
    _add_sampling(gen)
    gen.add_argument("--db")
    _add_root(gen)
    gen.set_defaults(func=_generate)

    sim = sub.add_parser("simulate", help="simulate conversations with an agent")
    sim.add_argument("target", help="'pkg.module:func', 'path/to/file.py:func', an http(s) URL, or a JSON object")
    sim.add_argument("cases_file", nargs="?", help="test cases: .json, .jsonl, .yaml or .yml, a test set id, or "
                                                   "inline JSON ('[{\"goal\": \"...\"}]') (not with --from-run)")
    _add_run_options(sim)
    _add_replay_options(sim)
    sim.set_defaults(func=_simulate)

    score = sub.add_parser("score", help="judge stored or exported conversations")
    score.add_argument("run_id", nargs="?", help="score every session of this run")
    score.add_argument("--file", help="a JSONL file of conversations (export format or message lists)")
    score.add_argument("--session", action="append", dest="session_ids", help="a stored session id (repeatable)")
    score.add_argument("--scorer", action="append", dest="scorers",
                       help="built-in name, 'pkg.mod:fn', or a JSON object (repeatable; default: the default set)")
    score.add_argument("--model", help="judges' model ('provider/model' or 'offline')")
    score.add_argument("--concurrency", type=int, default=8,
                       help=f"judge calls at the same time, 1-{MAX_CONCURRENCY} (default 8)")
    score.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_junit(score)
    _add_allow_untested(score)
    _add_sampling(score)
    score.add_argument("--db")
    _add_root(score)
    score.set_defaults(func=_score)

    runs = sub.add_parser("runs", help="inspect stored runs").add_subparsers(metavar="ACTION")
    ls = runs.add_parser("list", help="recent runs")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--db")
    ls.set_defaults(func=_runs_list)
    show = runs.add_parser("show", help="a run's summary")
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.add_argument("--db")
    show.set_defaults(func=_runs_show)
    export = runs.add_parser("export", help="a run's sessions as JSONL (one session per line), or as MLflow traces")
    export.add_argument("run_id")
    export.add_argument("-o", "--output", help="file to write (default stdout)")
    export.add_argument("--format", choices=["jsonl", "mlflow"], default="jsonl",
                        help="mlflow: one trace per turn, grouped by session, verdicts as assessments "
                             "(needs convsim-mcp[mlflow], --tracking-uri and --experiment)")
    _add_mlflow(export)
    export.add_argument("--db")
    _add_root(export)
    export.set_defaults(func=_runs_export)
    res = runs.add_parser("resume", help="continue an interrupted or cancelled run from its last stored turns")
    res.add_argument("run_id")
    res.add_argument("--target", help="the agent again, when its stored spec had a secret masked (a literal header "
                                      "value): pass it with ${VAR} references")
    res.add_argument("--json", dest="json_path", help="write the summary (simulate) or the full report (test_agent) "
                                                      "as JSON here")
    res.add_argument("--report", help="test_agent: " + REPORT_HELP)
    res.add_argument("--fail-on", choices=["high", "medium", "low"],
                     help="test_agent: exit 1 when an agent issue of this severity or worse is found")
    _add_allow_untested(res)
    _add_junit(res)
    res.add_argument("--db")
    _add_root(res)
    res.set_defaults(func=_runs_resume)
    imp = runs.add_parser("import", help="store sessions from a JSONL file, or an MLflow experiment's traces, as a new run")
    imp.add_argument("file", nargs="?", help="a JSONL file (export format or message lists)")
    imp.add_argument("--from-mlflow", action="store_true",
                     help="read traces grouped by session from --tracking-uri and --experiment instead")
    _add_mlflow(imp)
    imp.add_argument("--db")
    _add_root(imp)
    imp.set_defaults(func=_runs_import)

    cache = sub.add_parser("cache", help="the response cache (--cache, CONVSIM_CACHE=1)").add_subparsers(metavar="ACTION")
    stats = cache.add_parser("stats", help="how many replies are cached and how often they were served")
    stats.add_argument("--db")
    stats.set_defaults(func=_cache_stats)
    clear = cache.add_parser("clear", help="delete every cached reply (the next runs ask the models again)")
    clear.add_argument("--db")
    clear.set_defaults(func=_cache_clear)

    demo = sub.add_parser("demo", help="test_agent on the bundled example agent (offline unless --model)")
    demo.add_argument("--model", help="model for every role (default: offline, no API key needed)")
    demo.add_argument("--max-turns", type=int, default=6)
    demo.add_argument("--report", help="also " + REPORT_HELP)
    demo.add_argument("--db")
    _add_root(demo)
    demo.set_defaults(func=_demo)
    return p


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}")
    return value


def _add_allow_untested(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-untested", type=_fraction, default=0.0, metavar="FRACTION",
                   help="exit 0 (not 3) while at most this share of sessions could not be tested because a model "
                        "failed, e.g. 0.1 for a flaky provider (default 0: any untested session exits 3)")


def _untested_exit(untested: int, total: int, allowed: float) -> int:
    """EXIT_UNTESTED when more than `allowed` of `total` sessions could not be tested, saying so on stderr."""
    if untested and untested > allowed * total:
        print(f"{untested} of {total} session(s) could not be tested (the simulated user or a judge's model "
              f"failed, or the simulated user broke its role; see the report): exit {EXIT_UNTESTED}. "
              "--allow-untested FRACTION tolerates a share.",
              file=sys.stderr)
        return EXIT_UNTESTED
    return EXIT_OK


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-turns", type=int, default=10)
    p.add_argument("--model", help="simulated user's model ('provider/model', 'provider:/model' or 'offline')")
    p.add_argument("--concurrency", type=int, default=8,
                   help=f"conversations at the same time, 1-{MAX_CONCURRENCY} (default 8)")
    p.add_argument("--repeats", type=int, default=1)
    _add_user_agent(p)
    p.add_argument("--scorer", action="append", dest="scorers",
                   help="score sessions as they finish: built-in name, 'pkg.mod:fn' or JSON object (repeatable)")
    p.add_argument("--judge-model", help="judges' model (default: the user's model)")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON instead of a table")
    _add_junit(p)
    _add_allow_untested(p)
    _add_sampling(p)
    p.add_argument("--db", help="SQLite file (default $CONVSIM_HOME/convsim.sqlite)")
    _add_root(p)


def _add_user_agent(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user-agent", help="custom simulated user: 'pkg.mod:Class' or 'path/to/file.py:Class' "
                                        "subclassing engine.SimulatedUser, from a file under the workspace roots")


def _add_junit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--junit", metavar="PATH", help="also write the results as JUnit XML here, for CI test reports "
                                                   "(a testcase per session x scorer and per issue; sessions that "
                                                   "could not be tested are errors)")


def _write_junit(args: argparse.Namespace, store: Store, **results: Any) -> None:
    """With --junit, the command's results as JUnit XML (see engine.reports.junit.junit_xml for `results`)."""
    path = getattr(args, "junit", None)
    if path:
        _write(path, anyio.run(lambda: junit_xml(store, **results)))
        print(f"wrote {path}", file=sys.stderr)


def _add_replay_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-run", metavar="RUN_ID", help="re-test on this earlier run's test cases (same ids); "
                                                        "new simulated users play them unless --replay")
    p.add_argument("--replay", action="store_const", const="replay", dest="mode",
                   help="with --from-run: send the earlier sessions' user messages verbatim, in order; a session "
                        "whose recorded messages run out first ends replay_end")
    p.add_argument("--continue-after-replay", action="store_true",
                   help="with --replay: when the recorded messages run out, the simulated user takes over")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="answer model requests seen before from the database's response cache and store new replies "
                        "(default: $CONVSIM_CACHE, off)")
    p.add_argument("--temperature", type=float, help="sampling temperature of every model call, 0-2 "
                                                     "(default: $CONVSIM_TEMPERATURE, else the provider's)")
    p.add_argument("--seed", type=int, help="sampling seed sent with every model call (default: $CONVSIM_SEED)")
    _add_rate_limits(p)


def _add_rate_limits(p: argparse.ArgumentParser, default: str = "$CONVSIM_LLM_RPM, else unpaced") -> None:
    p.add_argument("--rpm", type=float, help="most requests per minute to each model: queued, evenly paced, slowed "
                                             f"on 429 (default: {default})")
    p.add_argument("--tpm", type=float, help="most tokens per minute to each model "
                                             f"(default: {default.replace('RPM', 'TPM')})")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"cache": args.cache, "temperature": args.temperature, "seed": args.seed, "rpm": args.rpm,
            "tpm": args.tpm}


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", action="append", default=[], metavar="DIR",
                   help="another workspace root: code and files are used only from under the working directory, "
                        "these roots and CONVSIM_ROOTS (repeatable)")


def _workspace(args: argparse.Namespace) -> Workspace:
    return Workspace.default(getattr(args, "root", []) or [])


# --- commands -----------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    # the MCP SDK costs ~1 s to import; other commands skip it
    from . import transport
    from .server import build_server

    network = None
    if args.transport != "stdio":
        network = transport.network_config(args.host, args.port, args.auth_token, args.allowed_hosts)
    elif args.auth_token or args.allowed_hosts:
        print("note: --auth-token and --allowed-host apply to --transport sse/http only", file=sys.stderr)
    # The registry is owned here, for the life of the process: with SSE each connection enters the
    # server's lifespan separately, and a background run must outlive the connection that started it.
    registry = JobRegistry()
    workspace = _workspace(args)
    if network is not None:  # a network client is anyone who can reach the port: the operator decides
        workspace = workspace.restricted(args.transport, allow_code=args.allow_code,
                                         agent_hosts=args.allow_agent_host)
    server = build_server(Store(args.db), registry, workspace=workspace,
                          server_options=network.server_options() if network else None)
    if network is None:
        sys.stdout.reconfigure(line_buffering=True)
        serve = partial(transport.serve_stdio, server)
    else:
        serve = partial(transport.serve_network, server, args.transport, network)

    async def run() -> None:
        async with registry.running():
            await serve()

    anyio.run(run)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    store = Store(args.db)
    summary = _run_simulation(store, args.target, args.cases_file, args)
    print(summary.model_dump_json(indent=2) if args.json else render_summary(summary))
    _write_junit(args, store, run_id=summary.run_id, scorers=[s.scorer for s in summary.scores] or None)
    return _untested_exit(summary.untested, summary.sessions_total, args.allow_untested)


def _demo(args: argparse.Namespace) -> int:
    """test_agent on the bundled example agent, with its seed cases besides the generated ones."""
    target = str(EXAMPLES / "support_agent.py") + ":support_agent"
    cases = EXAMPLES / "support_cases.yaml"
    if not cases.is_file():
        raise UserInputError(f"the bundled examples are not at {EXAMPLES}; run the demo from a clone of the repository")
    report_format(args.report)
    model = args.model or "offline"
    if model == "offline":
        print("No model given: the offline backend plays every role (heuristic users, judges and generator, "
              "not an LLM). Pass --model provider/model for the real thing.", file=sys.stderr)
    print(f"Testing the bundled example agent {target}: 5 generated cases + {cases.name}.", file=sys.stderr)
    ns = argparse.Namespace(target=target, description=None, cases=str(cases), num_test_cases=5, guidance=None,
                            adversarial=0.0, max_turns=args.max_turns, model=model, user_model=None,
                            judge_model=None, generator_model=None, scorers=None, repeats=1, concurrency=8,
                            no_ask_agent=False, shrink=None, report=args.report, json_path=None, junit=None, fail_on=None,
                            user_agent=None, db=args.db,
                            root=[*args.root, str(EXAMPLES)], allow_untested=0.0, from_run=None, mode=None,
                            continue_after_replay=False, cache=None, temperature=None,
                            seed=None, rpm=None, tpm=None)
    return _test_agent(ns)


def _test_agent(args: argparse.Namespace) -> int:
    report_format(args.report)
    store = Store(args.db)
    bar = ProgressBar()
    report = anyio.run(lambda: test_agent(
        store, args.target, progress=bar.update, description=args.description, test_cases=args.cases,
        num_test_cases=args.num_test_cases, guidance=args.guidance, adversarial=args.adversarial,
        max_turns=args.max_turns, repeats=args.repeats, concurrency=args.concurrency, scorers=args.scorers,
        model=args.model, user_model=args.user_model, judge_model=args.judge_model,
        generator_model=args.generator_model, ask_agent=not args.no_ask_agent, shrink=args.shrink,
        user_agent=args.user_agent,
        workspace=_workspace(args), from_run=args.from_run, mode=args.mode,
        continue_after_replay=args.continue_after_replay,
        **_sampling(args),
    ))
    bar.close()
    return _finish_report(store, report, args)


def _finish_report(store: Store, report: Report, args: argparse.Namespace) -> int:
    """Print and write a test_agent run's report; the exit code of --fail-on and --allow-untested."""
    _, markdown = anyio.run(lambda: store.get_report(report.run_id))
    print(markdown)
    if args.report:
        _write_report(args.report, markdown=lambda: markdown, json_text=lambda: report.model_dump_json(indent=2),
                      html=lambda: anyio.run(lambda: run_report_html(store, report.run_id)))
    if args.json_path:
        _write(args.json_path, report.model_dump_json(indent=2))
        print(f"wrote {args.json_path}", file=sys.stderr)
    _write_junit(args, store, run_id=report.run_id, scorers=[s.scorer for s in report.scores] or None,
                 issues=[*report.issues, *report.simulator_issues])
    if args.fail_on:
        worst = [i for i in report.issues if SEVERITY_ORDER[i.severity] <= SEVERITY_ORDER[args.fail_on]]
        if worst:
            print(f"{len(worst)} issue(s) at or above '{args.fail_on}': failing (--fail-on)", file=sys.stderr)
            return EXIT_FAILED
    return _untested_exit(report.untested, len(report.sessions), args.allow_untested)


def _rerun(args: argparse.Namespace) -> int:
    store = Store(args.db)
    bar = ProgressBar()
    outcome = anyio.run(lambda: rerun_issues(store, args.run_id, issue_id=args.issue, target=args.target,
                                             max_turns=args.max_turns, model=args.model, repeats=args.repeats,
                                             workspace=_workspace(args), progress=bar.update, rpm=args.rpm,
                                             tpm=args.tpm))
    bar.close()
    rows = [[c.id, c.severity, c.status.upper() if c.reproduces else c.status, one_line(c.title, 50),
             one_line(c.reason, 70)] for c in outcome.issues]
    print(f"re-ran {args.run_id} as {outcome.run_id}")
    print(_table(["issue", "severity", "status", "title", "reason"], rows) if rows else "no issues to check")
    if outcome.new_issues:
        print(f"{len(outcome.new_issues)} new issue(s), not seen in {args.run_id}:")
        print(_table(["issue", "severity", "title", "frequency"],
                     [[i.id, i.severity, one_line(i.title, 60), i.frequency] for i in outcome.new_issues]))
    if args.json_path:
        _write(args.json_path, json.dumps(rerun_json(outcome), indent=2, ensure_ascii=False) + "\n")
    _write_junit(args, store, run_id=outcome.run_id, rerun=outcome)
    if any(c.reproduces for c in outcome.issues):
        return EXIT_FAILED
    summary = anyio.run(lambda: run_summary(store, outcome.run_id))
    return _untested_exit(summary.untested, summary.sessions_total, args.allow_untested)


def _compare(args: argparse.Namespace) -> int:
    report_format(args.report)
    store = Store(args.db)
    c = anyio.run(lambda: compare_runs(store, args.base, args.candidate))
    rows = [[s.scorer, _rate(s.base_pass_rate), _rate(s.candidate_pass_rate),
             "-" if s.delta is None else f"{s.delta * 100:+.0f} pts",
             "-" if s.p_value is None else f"{s.p_value:.3g}", s.verdict, str(s.pairs)] for s in c.scorers]
    print(f"compared {c.candidate} with {c.base}: {c.pairs} paired session(s)")
    print(_table(["scorer", "base", "candidate", "change", "p", "verdict", "pairs"], rows))
    print(f"flipped: {len(c.flipped.pass_to_fail)} pass->fail, {len(c.flipped.fail_to_pass)} fail->pass; issues: "
          f"{len(c.issues.new)} new, {len(c.issues.fixed)} fixed, {len(c.issues.persisting)} persisting")
    for line in c.regression_reasons:
        print(f"regression: {line}")
    if args.json_path:
        _write(args.json_path, json.dumps(c.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n")
    if args.report:
        _write_report(args.report, markdown=lambda: comparison_markdown(c),
                      json_text=lambda: json.dumps(c.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n",
                      html=lambda: anyio.run(lambda: comparison_html(store, c)))
    _write_junit(args, store, comparison=c)
    if c.regression and args.fail_on_regression:
        print("regression: failing (--fail-on-regression)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.0f}%"


def _generate(args: argparse.Namespace) -> int:
    store = Store(args.db)
    test_set = anyio.run(lambda: build_test_set(
        store, description=args.description, target=args.target, run_id=args.run_id, file=args.file,
        num_test_cases=args.num_test_cases, guidance=args.guidance, adversarial=args.adversarial,
        model=args.model, workspace=_workspace(args), **_sampling(args),
    ))
    if args.output:
        export_test_set(test_set, args.output)
        print(f"wrote {len(test_set.cases)} cases to {args.output}", file=sys.stderr)
    rows = [[c.id or f"#{i}", one_line(c.goal, 90)] for i, c in enumerate(test_set.cases, 1)]
    print(f"test set {test_set.id} ({len(test_set.cases)} cases{', offline templates' if test_set.offline else ''})")
    print(_table(["id", "goal"], rows))
    print(f"run them: convsim-mcp simulate TARGET {test_set.id}")
    return 0


def _run_simulation(store: Store, target: str, cases: str | None, opts: argparse.Namespace) -> RunSummary:
    bar = ProgressBar()
    summary = anyio.run(lambda: simulate(
        store, target, cases, progress=bar.update, max_turns=opts.max_turns, model=opts.model,
        concurrency=opts.concurrency, repeats=opts.repeats, user_agent=opts.user_agent, scorers=opts.scorers,
        judge_model=opts.judge_model, workspace=_workspace(opts), from_run=opts.from_run, mode=opts.mode,
        continue_after_replay=opts.continue_after_replay,
        **_sampling(opts),
    ))
    bar.close()
    return summary


def _score(args: argparse.Namespace) -> int:
    store = Store(args.db)
    bar = ProgressBar()
    result = anyio.run(lambda: score_sessions(
        store, progress=bar.update, run_id=args.run_id, session_ids=args.session_ids, file=args.file,
        scorers=args.scorers, model=args.model, concurrency=args.concurrency, workspace=_workspace(args),
        **_sampling(args),
    ))
    bar.close()
    print(result.model_dump_json(indent=2) if args.json else render_scores(result.scorers, result.note))
    _write_junit(args, store, session_ids=args.session_ids, run_id=None if args.session_ids else result.run_ids[0],
                 scorers=[s.scorer for s in result.scorers])
    return _untested_exit(result.untested, result.sessions, args.allow_untested)


def _runs_list(args: argparse.Namespace) -> int:
    runs = anyio.run(lambda: Store(args.db).list_runs(args.limit))
    rows = [[r["id"], r["kind"], r["status"], time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])),
             str(r["sessions_total"]), r["model"], describe_target(r["target"])]
            for r in runs]
    print(_table(["run", "kind", "status", "created", "sessions", "model", "target"], rows) if rows else "no runs yet")
    return 0


def _runs_show(args: argparse.Namespace) -> int:
    summary = anyio.run(lambda: run_summary(Store(args.db), args.run_id))
    print(summary.model_dump_json(indent=2) if args.json else render_summary(summary))
    return 0


def _add_mlflow(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking URI: sqlite:///mlflow.db (under the roots), a "
                                          "directory, or http(s)://server")
    p.add_argument("--experiment", help="MLflow experiment name (created on export when missing)")


def _mlflow_target(args: argparse.Namespace, *, must_exist: bool) -> str:
    from engine.store.mlflow import check_tracking_uri

    if not args.tracking_uri or not args.experiment:
        raise UserInputError("MLflow needs --tracking-uri URI and --experiment NAME")
    return check_tracking_uri(args.tracking_uri, _workspace(args), must_exist=must_exist)


def _runs_export(args: argparse.Namespace) -> int:
    store = Store(args.db)
    if args.format == "mlflow":
        from engine.store.mlflow import export_run

        if args.output:
            raise UserInputError("--output is for JSONL; an MLflow export goes to --tracking-uri")
        uri = _mlflow_target(args, must_exist=False)
        n = anyio.run(lambda: export_run(store, args.run_id, tracking_uri=uri, experiment=args.experiment))
        print(f"wrote {n['sessions']} sessions as {n['traces']} traces with {n['assessments']} assessments to "
              f"MLflow experiment {args.experiment!r} at {args.tracking_uri}", file=sys.stderr)
        return 0
    if args.tracking_uri or args.experiment:
        raise UserInputError("--tracking-uri and --experiment go with --format mlflow")

    async def export() -> int:  # a page of sessions at a time: a big run exports in flat memory
        await store.get_run(args.run_id)  # NotFound before any output file is created
        with open(args.output, "w", encoding="utf-8") if args.output else nullcontext(sys.stdout) as out:
            n = 0
            async for line in store.iter_export(args.run_id):
                out.write(line + "\n")
                n += 1
            return n

    n = anyio.run(export)
    if args.output:
        print(f"wrote {n} sessions to {args.output}", file=sys.stderr)
    return 0


def _runs_resume(args: argparse.Namespace) -> int:
    """Finish a run as its own command would have: a simulate run's summary, a test_agent run's report."""
    report_format(args.report)
    store = Store(args.db)
    bar = ProgressBar()
    outcome = anyio.run(lambda: resume(store, args.run_id, target=args.target,
                                       workspace=_workspace(args), progress=bar.update))
    bar.close()
    if isinstance(outcome, RunSummary):
        print(render_summary(outcome))
        if args.json_path:
            _write(args.json_path, outcome.model_dump_json(indent=2))
        _write_junit(args, store, run_id=outcome.run_id, scorers=[s.scorer for s in outcome.scores] or None)
        return _untested_exit(outcome.untested, outcome.sessions_total, args.allow_untested)
    return _finish_report(store, outcome, args)  # --junit too


def _runs_import(args: argparse.Namespace) -> int:
    if args.from_mlflow:
        from engine.store.mlflow import import_experiment

        if args.file:
            raise UserInputError("give a FILE or --from-mlflow, not both")
        uri = _mlflow_target(args, must_exist=True)
        print(anyio.run(lambda: import_experiment(Store(args.db), tracking_uri=uri, experiment=args.experiment)))
        return 0
    if not args.file:
        raise UserInputError("runs import needs a FILE (JSONL), or --from-mlflow with --tracking-uri and --experiment")
    if args.tracking_uri or args.experiment:
        raise UserInputError("--tracking-uri and --experiment go with --from-mlflow")
    path = _workspace(args).resolve_file(args.file, what="file to import")
    run_id = anyio.run(lambda: Store(args.db).import_file(path, source=str(path)))
    print(run_id)
    return 0


def _cache_stats(args: argparse.Namespace) -> int:
    stats = anyio.run(lambda: Store(args.db).cache_stats())
    print(f"{stats['entries']} cached replies, served {stats['hits']} times")
    return 0


def _cache_clear(args: argparse.Namespace) -> int:
    n = anyio.run(lambda: Store(args.db).clear_cache())
    print(f"deleted {n} cached replies")
    return 0


# --- output -------------------------------------------------------------------------------------


class _RedactingStream:
    """stdout/stderr with every known secret masked: results, progress and errors alike."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(secrets.redact(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def report_format(path: str | None, flag: str = "--report") -> str | None:
    """The format `path`'s extension names ('markdown', 'html' or 'json'); InvalidOption for any other, so a
    command checks it before it runs anything."""
    if path is None:
        return None
    ext = Path(path).suffix.lower()
    if ext not in REPORT_FORMATS:
        raise InvalidOption(f"{flag} {path!r}: unknown extension {ext or '(none)'!r}; {REPORT_FORMATS_HELP}")
    return REPORT_FORMATS[ext]


def _write_report(path: str, *, markdown: Callable[[], str], json_text: Callable[[], str],
                  html: Callable[[], str]) -> None:
    """Write the report in the format `path`'s extension names; only that one is rendered."""
    render = {"markdown": markdown, "json": json_text, "html": html}[report_format(path)]
    _write(path, render())
    print(f"wrote {path}", file=sys.stderr)


def _write(path: str, text: str) -> None:
    """A result file (report, export) written by the CLI: redacted like everything else it outputs."""
    Path(path).write_text(secrets.redact(text), encoding="utf-8")


def render_summary(s: RunSummary) -> str:
    """A run summary as a plain-text table for terminals and CI logs."""
    head = f"run {s.run_id}  {s.status.value}  target {s.target}  user model {s.model}"
    counts = ", ".join(f"{k} {v}" for k, v in sorted(s.stop_reasons.items())) or "none"
    lines = [head]
    if s.resumed:
        lines.append(f"resumed {s.resumed} time(s), last at {time.strftime('%Y-%m-%d %H:%M', time.localtime(s.resumed_at))}")
    if s.untested:
        lines.append(f"COULD NOT TEST {s.untested} of {s.sessions_total} session(s): the simulated user's or a "
                     "judge's model failed (not passes, not agent issues)")
        lines += [f"  {u.session_id}: {one_line(u.reason, 110)}" for u in s.untested_sessions[:5]]
    lines.append(f"sessions {s.sessions_done}/{s.sessions_total} ({s.progress:.0%}), turns {s.turns_done}; "
                 f"stop reasons: {counts}")
    if s.cache or s.temperature is not None or s.seed is not None:
        lines.append(f"sampling: temperature {'default' if s.temperature is None else s.temperature}, seed "
                     f"{'none' if s.seed is None else s.seed}, cache {'on' if s.cache else 'off'}")
    for role, u in s.usage.items():
        cost = f", ${u.cost_usd:.4f}" if u.cost_usd else ""
        failed = f", {u.failed_calls} failed ({_kinds(u.failures)})" if u.failed_calls else ""
        hits = f", {u.cache_hits} cache hits" if u.cache_hits else ""
        lines.append(f"usage {role}: {u.calls} calls{failed}{hits}, {u.prompt_tokens} prompt + {u.completion_tokens} "
                     f"completion tokens{cost}")
    rows = []
    for x in s.sessions:
        last = x.error or x.last_agent_reply or ""
        rows.append([x.session_id, x.case_id or f"#{x.case_index + 1}", x.stop_reason.value if x.stop_reason else "running",
                     str(x.turns), one_line(last, 70)])
    lines += ["", _table(["session", "case", "stop reason", "turns", "last agent reply / error"], rows)]
    if s.scores:
        lines += ["", render_scores(s.scores)]
    if s.trials:
        lines += ["", render_trials(s.trials)]
    if s.error:
        lines.append(f"error: {s.error}")
    if s.note:
        lines.append(f"note: {s.note}")
    lines.append(f"transcripts: convsim-mcp runs export {s.run_id}")
    return "\n".join(lines)


def render_trials(t: TrialsSummary) -> str:
    """A repeated run in a line or two: pass^1..pass^k (the first five and k), then the flaky cases."""
    shown = [p for p in t.pass_hat if p.k <= 5 or p.k == t.repeats]
    hats = ", ".join(f"pass^{p.k} {'-' if p.value is None else f'{p.value:.0%}'}" for p in shown)
    untested = f", {t.untested} untested (left out)" if t.untested else ""
    lines = [f"trials: {t.passed} of {t.trials} passed over {t.cases} case(s) x {t.repeats}{untested}; {hats}"]
    if t.flaky:
        listed = ", ".join(t.flaky_cases[:10]) + (", ..." if t.flaky > 10 else "")
        lines.append(f"FLAKY {t.flaky} case(s), trials disagree: {listed}")
    return "\n".join(lines)


def _kinds(failures: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(failures.items())) or "unclassified"


def render_scores(scores: list[ScorerSummary], note: str | None = None) -> str:
    """Per scorer a line of counts, then its failing sessions with the turn and a one-line rationale."""
    rows = [[x.scorer, "-" if x.pass_rate is None else f"{x.pass_rate:.0%}", str(x.passed), str(x.failed),
             str(x.unscored), x.judged_by] for x in scores]
    lines = [_table(["scorer", "pass rate", "passed", "failed", "unscored", "judged by"], rows)]
    for x in scores:
        for f in x.failing:
            where = f" turn {f.turn}" if f.turn else ""
            lines.append(f"  FAIL {x.scorer} {f.session_id}{where}: {one_line(f.rationale, 110)}")
        for e in x.errors[:3]:
            lines.append(f"  UNSCORED {x.scorer} {e.session_id}: {one_line(e.rationale, 110)}")
    if note:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


if __name__ == "__main__":
    sys.exit(main())
