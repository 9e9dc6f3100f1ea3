"""The HTML report: one self-contained page per run and per comparison, escaped, from the CLI and MCP.

The page is parsed here into a small element tree (the standard library's HTMLParser) so that the tests
assert on elements, as a browser would see them, not on substrings; the browser test at the end renders it in
headless Chromium and asserts on the DOM after its script ran.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
from mcp import Client

from convsim_mcp.server import build_server
from engine import Store, compare_runs
from engine.pipeline.agent_test import test_agent
from engine.reports import html as html_report
from engine.reports.html import comparison_html, render_html, run_report_html
from tests.conftest import ROOT
from tests.html_agents import HOSTILE_REPLY

pytestmark = pytest.mark.anyio

HOSTILE = "tests.html_agents:hostile"
FLAWED = "examples/support_agent.py:support_agent"
FIXED = "tests.fixed_agent:support_agent"
SEEDS = str(ROOT / "examples" / "support_cases.yaml")
HOSTILE_GOAL = "Ask how long shipping takes. </details><script>alert(1)</script>"
CASES = [{"id": "gift-card", "goal": "Ask for a refund to a gift card.",
          "scripted_turns": ["Hello there.", "Please refund order A1 to a gift card."]},
         {"id": "<b>shipping</b>", "goal": HOSTILE_GOAL}]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# --- a small element tree -----------------------------------------------------------------------------


@dataclass
class El:
    tag: str
    attrs: dict[str, str]
    children: list["El | str"] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, El):
                yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list["El"]:
        return [e for e in self.iter() if (tag is None or e.tag == tag) and (cls is None or cls in e.classes)
                and all(e.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def find(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> "El":
        found = self.find_all(tag, cls, **attrs)
        assert found, f"no <{tag} class={cls} {attrs}>"
        return found[0]


class _Builder(HTMLParser):
    """A strict tree: every non-void element must close in order, or the page's structure is broken."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = El("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        el = El(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(el)
        if tag not in VOID:
            self.stack.append(el)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(El(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(page: str) -> El:
    b = _Builder()
    b.feed(page)
    b.close()
    assert [e.tag for e in b.stack] == ["#document"], "unclosed elements"
    return b.root


# --- runs ---------------------------------------------------------------------------------------------


async def hostile_run(store: Store):
    return await test_agent(store, HOSTILE, test_cases=CASES, num_test_cases=0, model="offline", workspace=ROOT,
                            max_turns=3)


async def support_run(store: Store, target: str = FLAWED):
    return await test_agent(store, target, test_cases=SEEDS, num_test_cases=0, model="offline", workspace=ROOT,
                            max_turns=6)


def assert_self_contained(doc: El, page: str) -> None:
    """Nothing to fetch: no src, only in-page links, no CSS import or url(), a CSP that allows nothing else."""
    for el in doc.iter():
        assert "src" not in el.attrs and "srcset" not in el.attrs, el.tag
        assert not el.attrs.get("href", "#").strip() or el.attrs.get("href", "#").startswith("#"), el.attrs
        assert not [a for a in el.attrs if a.startswith("on")], (el.tag, el.attrs)
    style = doc.find("style").text
    assert "url(" not in style and "@import" not in style
    csp = doc.find("meta", http_equiv="Content-Security-Policy").attrs["content"]
    assert csp.startswith("default-src 'none';")
    [script] = doc.find_all("script")
    digest = base64.b64encode(hashlib.sha256(script.text.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp  # only our own script may run
    assert re.findall(r"https?://[^\s\"'<>]+", page) == ["http://www.w3.org/2000/svg"] * page.count("<svg ")


# --- the run page -------------------------------------------------------------------------------------


async def test_the_run_page_has_the_numbers_charts_issues_and_every_transcript(store):
    report = await support_run(store)
    page = await run_report_html(store, report.run_id)
    doc = parse(page)
    assert_self_contained(doc, page)
    cards = {c.attrs["data-key"]: c.find(cls="num").text for c in doc.find_all(cls="card")}
    assert cards["sessions"] == str(len(report.sessions)) == "6"
    assert cards["turns"] == str(sum(s.turns for s in report.sessions))
    assert cards["issues"] == str(len(report.issues)) and cards["untested"] == "0"
    assert doc.find(id="verdict").text.startswith(f"{len(report.issues)} issues: ")

    rows = doc.find("svg", id="pass-rates").find_all("g", cls="chart-row")
    assert [r.attrs["data-scorer"] for r in rows] == [s.scorer for s in report.scores]
    for row, s in zip(rows, report.scores):
        bar = row.find("rect", cls="bar")
        assert float(bar.attrs["width"]) == pytest.approx(s.pass_rate * html_report.BAR_W, abs=0.1)
        assert f"{s.pass_rate:.0%} ({s.passed}/{s.passed + s.failed})" in row.text
    stops = {g.attrs["data-reason"]: int(g.attrs["data-count"])
             for g in doc.find("svg", id="stop-reasons").find_all("g", cls="chart-row")}
    assert stops == {r.value: sum(s.stop_reason == r for s in report.sessions)
                     for r in {s.stop_reason for s in report.sessions}}

    titles = [h.text for h in doc.find(id="issues").find_all("h3", cls="issue-title")]
    assert titles == [f"{i.severity.upper()}{i.id}: {i.title}" for i in report.issues]
    crash = next(i for i in report.issues if i.signals == ["agent_error"])
    article = doc.find("article", id=f"issue-{crash.id}")
    link = article.find("ul", cls="evidence").find("a")
    ev = crash.evidence[0]
    assert link.attrs["href"] == f"#s-{ev.session_id}-t{ev.turn}" and doc.find_all(id=link.attrs["href"][1:])
    assert crash.reproduction.scripted_turns[-1] in article.find("pre", cls="repro").text

    sessions = doc.find(id="transcripts").find_all("details", cls="session")
    assert [d.attrs["data-session"] for d in sessions] == [s.session_id for s in report.sessions]
    crashed = doc.find("details", id=f"s-{ev.session_id}")
    assert "failed" in crashed.classes and "open" in crashed.attrs
    failing = crashed.find_all("section", cls="failing")
    assert [t.attrs["id"] for t in failing] == [f"s-{ev.session_id}-t{ev.turn}"]
    assert "KeyError" in failing[0].find(cls="error").text and crash.title in failing[0].text
    stored = await store.get_session(ev.session_id)
    shown = [float(x.attrs["data-ms"]) for x in crashed.find_all("span", cls="latency")]
    assert shown == [round(m.latency_ms, 1) for m in stored.messages if m.latency_ms is not None]
    assert any("passed" in d.classes and "open" not in d.attrs for d in sessions)


async def test_a_failing_verdict_highlights_its_turn_with_the_scorer_and_rationale(store):
    report = await support_run(store)
    issue = next(i for i in report.issues if "knowledge_retention" in i.signals)
    ev = issue.evidence[0]
    doc = parse(await run_report_html(store, report.run_id))
    turn = doc.find("section", id=f"s-{ev.session_id}-t{ev.turn}")
    assert "failing" in turn.classes
    flags = [f.text for f in turn.find_all(cls="flag")]
    assert any(f.startswith("\u26a0 knowledge_retention failed: ") for f in flags)
    assert any(issue.id in f for f in flags)
    agent = [m.find("div", cls="content").text for m in turn.find_all("div", cls="role-assistant")]
    assert agent and ev.quote in agent[0]
    passing = [t for t in doc.find("details", id=f"s-{ev.session_id}").find_all("section", cls="turn")
               if t.attrs["data-turn"] == "1"]
    assert passing and "failing" not in passing[0].classes


async def test_hostile_replies_case_ids_and_errors_are_text_never_markup(store):
    report = await hostile_run(store)
    page = await run_report_html(store, report.run_id)
    doc = parse(page)  # strict: a reply's </details> closing the transcript early would fail here
    assert_self_contained(doc, page)
    assert [e.tag for e in doc.iter() if e.tag in ("img", "b", "i")] == []
    assert len(doc.find_all("style")) == 1 and len(doc.find_all("details")) == 2
    replies = [c.text for c in doc.find_all("div", cls="content")]
    assert HOSTILE_REPLY in replies  # shown exactly as written, its "&amp;" as those five characters
    assert any(d.text.endswith(HOSTILE_GOAL) for d in doc.find_all("div") if d.text.startswith("Goal:"))
    assert "<b>shipping</b>" in [c.text for c in doc.find_all("code")]
    assert any("<i>gift_card</i>" in e.text for e in doc.find_all(cls="error"))
    assert any("<i>gift_card</i>" in h.text for h in doc.find_all("h3", cls="issue-title"))


async def test_a_big_run_shows_the_sessions_its_issues_point_to_and_counts_the_rest(store, monkeypatch):
    report = await support_run(store)
    monkeypatch.setattr(html_report, "MAX_SESSIONS_SHOWN", 2)
    doc = parse(await run_report_html(store, report.run_id))
    shown = [d.attrs["data-session"] for d in doc.find_all("details", cls="session")]
    assert len(shown) == 2 and shown[0] == report.issues[0].evidence[0].session_id
    order = [s.session_id for s in report.sessions]
    assert shown == sorted(shown, key=order.index)  # run order
    assert doc.find(cls="more").text.startswith(f"{len(order) - 2} more sessions in the store")


async def test_render_html_from_memory_matches_the_stored_page(store):
    report = await support_run(store)
    sessions = await store.get_sessions(report.run_id)
    verdicts = await store.get_assessments([s.id for s in sessions])
    assert render_html(report, sessions, verdicts) == await run_report_html(store, report.run_id)


# --- the comparison page -------------------------------------------------------------------------------


async def test_the_comparison_page_has_before_after_charts_and_the_flipped_cases(store):
    before, after = await support_run(store, FLAWED), await support_run(store, FIXED)
    c = await compare_runs(store, before.run_id, after.run_id)
    page = await comparison_html(store, c)
    doc = parse(page)
    assert_self_contained(doc, page)
    pairs = doc.find("svg", id="cmp-pass-rates").find_all("g", cls="chart-pair")
    assert [g.attrs["data-label"] for g in pairs] == [s.scorer for s in c.scorers]
    for g, s in zip(pairs, c.scorers):
        widths = {r.attrs["data-side"]: float(r.attrs["width"]) for r in g.find_all("rect", cls="bar")}
        full = html_report.BAR_W
        assert widths == pytest.approx({"base": s.base_pass_rate * full, "candidate": s.candidate_pass_rate * full},
                                       abs=0.1)
    stop_rows = {g.attrs["data-label"] for g in doc.find("svg", id="cmp-stop-reasons").find_all("g", cls="chart-pair")}
    assert "agent_error" in stop_rows
    [flip] = c.flipped.fail_to_pass
    section = doc.find("section", id="fail-to-pass")
    assert section.find("tr", cls="flip").find("code").text == "gift-card-refund"
    transcripts = [d.attrs["data-session"] for d in section.find_all("details", cls="session")]
    assert transcripts == [flip.base_session, flip.candidate_session]
    base_turn = section.find("details", id=f"s-{flip.base_session}").find_all("section", cls="failing")
    assert base_turn and "KeyError" in base_turn[0].text
    assert doc.find("section", id="pass-to-fail").find("h2").text.endswith("(0)")
    fixed = doc.find(id="issue-changes").find_all(cls="issue-title")
    assert [i.title for i in c.issues.fixed][0] in [t.text for t in fixed]
    assert "No regression." in doc.find(id="verdict").text


# --- CLI ------------------------------------------------------------------------------------------------


def convsim(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    env.update(CONVSIM_HOME=str(home), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "convsim_mcp", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


TEST_AGENT = ("test-agent", FLAWED, "--cases", "examples/support_cases.yaml", "--num-test-cases", "0",
              "--max-turns", "6", "--model", "offline")


@pytest.mark.slow
def test_cli_report_format_follows_the_extension(tmp_path):
    db, home = str(tmp_path / "cli.sqlite"), tmp_path / "home"
    page, data = tmp_path / "r.html", tmp_path / "r.json"
    proc = convsim(*TEST_AGENT, "--db", db, "--report", str(page), home=home)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {page}" in proc.stderr
    doc = parse(page.read_text(encoding="utf-8"))
    run_id = doc.find("code").text
    assert len(doc.find_all("details", cls="session")) == 6 and doc.find("svg", id="pass-rates")
    assert run_id.startswith("run-") and doc.find("h1").text == FLAWED
    again = convsim(*TEST_AGENT, "--db", db, "--report", str(data), home=home)  # .md: tests/test_cli.py
    assert again.returncode == 0, again.stderr
    written = json.loads(data.read_text())
    assert written["run_id"] != run_id and written["issues"][0]["evidence"] and "sessions" in written


@pytest.mark.slow
@pytest.mark.parametrize("command, name", [
    pytest.param(TEST_AGENT, "report.txt", id="test-agent"),
    pytest.param(TEST_AGENT, "report", id="no-extension"),
    pytest.param(TEST_AGENT, "report.htm", id="htm"),
    pytest.param(("compare", "run-000000000000", "run-000000000001"), "report.txt", id="compare"),
    pytest.param(("runs", "resume", "run-000000000000"), "report.txt", id="resume"),
    pytest.param(("demo",), "report.txt", id="demo"),
])
def test_cli_unknown_report_extension_is_refused_before_anything_runs(tmp_path, command, name):
    db, home = str(tmp_path / "cli.sqlite"), tmp_path / "home"
    proc = convsim(*command, "--db", db, "--report", str(tmp_path / name), home=home)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"InvalidOption: --report '{tmp_path / name}': unknown extension")
    assert ".md" in line and ".html" in line and ".json" in line
    assert not (tmp_path / name).exists()
    assert convsim("runs", "list", "--db", db, home=home).stdout.strip() == "no runs yet"


@pytest.mark.slow
def test_cli_compare_writes_the_html_page(tmp_path):
    import anyio

    db, home = tmp_path / "cli.sqlite", tmp_path / "home"

    async def two() -> tuple[str, str]:
        s = Store(db)
        try:
            return (await support_run(s, FLAWED)).run_id, (await support_run(s, FIXED)).run_id
        finally:
            s.close()

    base, cand = anyio.run(two)
    page = tmp_path / "cmp.html"
    proc = convsim("compare", base, cand, "--db", str(db), "--report", str(page), home=home)
    assert proc.returncode == 0, proc.stderr
    doc = parse(page.read_text(encoding="utf-8"))
    assert doc.find("svg", id="cmp-pass-rates") and doc.find("section", id="fail-to-pass").find("tr", cls="flip")


# --- MCP ------------------------------------------------------------------------------------------------


async def test_the_html_pages_are_mcp_resources(store):
    before, after = await support_run(store, FLAWED), await support_run(store, FIXED)
    async with Client(build_server(store)) as client:
        run_page = (await client.read_resource(f"convsim://runs/{before.run_id}/report.html")).contents[0]
        cmp_page = (await client.read_resource(
            f"convsim://compare/{before.run_id}/{after.run_id}/report.html")).contents[0]
        templates = {t.uri_template: t.mime_type for t in (await client.list_resource_templates()).resource_templates}
        unknown = None
        try:
            await client.read_resource("convsim://runs/run-000000000000/report.html")
        except Exception as e:  # the client raises the server's error
            unknown = str(e)
    assert templates["convsim://runs/{run_id}/report.html"] == "text/html"
    assert templates["convsim://compare/{base}/{candidate}/report.html"] == "text/html"
    assert run_page.mime_type == "text/html" and cmp_page.mime_type == "text/html"
    assert run_page.text == await run_report_html(store, before.run_id)
    assert parse(cmp_page.text).find("svg", id="cmp-pass-rates")
    assert unknown and "run-000000000000" in unknown


# --- in a browser ---------------------------------------------------------------------------------------


def chromium_or_skip(tmp_path: Path) -> list[str]:
    """The headless Chromium command, or a skip that says why it cannot run here."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it when it can)")
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    probe = tmp_path / "probe.html"
    probe.write_text("<p id=p>ok</p>", encoding="utf-8")
    try:
        proc = subprocess.run([*cmd, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=90)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"chromium cannot start here: {e}")
    if proc.returncode != 0 or 'id="p"' not in proc.stdout:
        pytest.skip(f"chromium cannot start here (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return cmd


def test_without_chromium_the_browser_test_is_skipped_saying_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        chromium_or_skip(tmp_path)
    broken = tmp_path / "chromium"
    broken.write_text("#!/bin/sh\necho 'cannot open display' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(pytest.skip.Exception, match=r"chromium cannot start here \(exit 1\): cannot open display"):
        chromium_or_skip(tmp_path)


@pytest.mark.slow
async def test_the_page_in_headless_chromium(store, tmp_path):
    cmd = chromium_or_skip(tmp_path)
    report = await support_run(store)
    hostile = await hostile_run(store)
    pages = {}
    for name, r in (("support", report), ("hostile", hostile)):
        pages[name] = tmp_path / f"{name}.html"
        pages[name].write_text(await run_report_html(store, r.run_id), encoding="utf-8")
    crash = next(i for i in report.issues if i.signals == ["agent_error"])
    ev = crash.evidence[0]

    dom = subprocess.run([*cmd, "--dump-dom", pages["support"].as_uri() + f"#s-{ev.session_id}-t{ev.turn}"],
                         capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0, dom.stderr[-500:]
    doc = parse_dom(dom.stdout)
    html_el = doc.find("html")
    assert html_el.attrs.get("data-ready") == "1"  # our script ran, under the page's CSP
    assert [h.text for h in doc.find(id="issues").find_all("h3", cls="issue-title")] == \
        [f"{i.severity.upper()}{i.id}: {i.title}" for i in report.issues]
    assert len(doc.find("svg", id="pass-rates").find_all("rect", cls="bar")) == len(report.scores)
    assert doc.find("svg", id="stop-reasons").find_all("g", cls="chart-row")
    turn = doc.find("section", id=f"s-{ev.session_id}-t{ev.turn}")
    assert "failing" in turn.classes and "KeyError" in turn.text
    assert doc.find(id="transcript-tools").attrs.get("hidden") is None  # the script showed its toolbar
    assert doc.find(id="shown-count").text == f"{len(report.sessions)} shown"

    hostile_dom = subprocess.run([*cmd, "--dump-dom", pages["hostile"].as_uri()], capture_output=True, text=True,
                                 timeout=90)
    hdoc = parse_dom(hostile_dom.stdout)
    assert "data-pwned" not in hdoc.find("html").attrs and hdoc.find("html").attrs.get("data-ready") == "1"
    assert HOSTILE_REPLY in [c.text for c in hdoc.find_all("div", cls="content")]
    assert not hdoc.find_all("img") and len(hdoc.find_all("script")) == 1

    shot = tmp_path / "html-report.png"
    subprocess.run([*cmd, f"--screenshot={shot}", "--window-size=1200,1800", "--hide-scrollbars",
                    pages["support"].as_uri()], capture_output=True, text=True, timeout=90)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshot of the HTML report: {shot}")


def parse_dom(dom: str) -> El:
    """Chromium's serialised DOM: the same tree, read leniently (the serialiser omits nothing we assert on)."""
    b = _Builder()
    b.handle_endtag = lambda tag: _lenient_close(b, tag)  # type: ignore[method-assign]
    b.feed(dom)
    b.close()
    return b.root


def _lenient_close(b: _Builder, tag: str) -> None:
    if tag in VOID:
        return
    for i in range(len(b.stack) - 1, 0, -1):
        if b.stack[i].tag == tag:
            del b.stack[i:]
            return
