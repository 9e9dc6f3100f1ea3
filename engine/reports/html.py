"""The report as one self-contained HTML page, for a person with a browser (or a CI artifact viewer).

    await run_report_html(store, run_id) -> str        a test_agent run: numbers, charts, issues, transcripts
    await comparison_html(store, comparison) -> str    two runs: before/after charts, flipped cases

The page carries everything it shows: inline CSS, inline SVG charts drawn here, and a small inline
script (filter and expand the transcripts); nothing is fetched when it is viewed, and its
Content-Security-Policy allows nothing else: no network, and only this module's own style and script
(by hash), so even a stray tag in a transcript could not run.

Every value is escaped. Transcripts are hostile text: an agent's reply may hold `<script>` or a
closing `</details>`, a simulated user may quote anything; they are shown as text, never as markup.
Transcripts are read from the store a page of sessions at a time; a run bigger than
MAX_SESSIONS_SHOWN shows the sessions its issues point to first, then the rest in run order up to the
cap, and says how many more are in the store. Everything comes from stored, already redacted runs.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import time
from collections import Counter
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Iterable

from ..models import Assessment, Issue, Message, Report, Session, StopReason
from ..store import Store
from .comparison import Comparison, FlippedCase, IssueChange, method_note
from .markdown import JUDGED_BY_SUFFIX, OFFLINE_NOTE, _reproduction, _usage, backends, ROLE_NAMES, verdict

MAX_SESSIONS_SHOWN = 200  # transcripts on one page; the rest are counted, and stay in the store
MAX_MESSAGE_CHARS = 8000  # one message shown; the whole of it stays in the store
MAX_FLIPS_SHOWN = 20  # flipped cases per direction whose two transcripts a comparison page shows
LABEL_CHARS = 28  # a chart's row label; the whole of it is the row's tooltip
LABEL_W, BAR_W = 210, 180  # a chart's label column and full bar, in pixels

STYLE = """
:root{--fg:#1d2430;--muted:#5b6576;--line:#d9dee7;--bg:#f6f7f9;--card:#fff;--pass:#2f9e5b;--fail:#d64545;
--base:#8a94a6;--cand:#3b6fd8;--high:#c62828;--medium:#e07b00;--low:#8d8d20;--hl:#fff1e0;--hlline:#e07b00}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:1180px;margin:0 auto;padding:24px}h1{font-size:22px;margin:0 0 4px}
h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid var(--line);padding-bottom:4px}
h3{font-size:15px;margin:0 0 6px}.muted{color:var(--muted)}
code,pre{font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre{background:#f0f2f5;padding:8px;border-radius:4px;overflow-x:auto;white-space:pre-wrap;word-break:break-word}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:10px 14px;min-width:130px}
.card .num{font-size:22px;font-weight:600}.card .label{color:var(--muted);font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:16px}
.chart{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:10px}
.chart-svg{max-width:100%;height:auto}svg text{font:12px system-ui,sans-serif;fill:var(--fg)}
svg .track{fill:#edf0f4}svg .bar-pass{fill:var(--pass)}svg .bar-none{fill:#c9ced8}svg .bar-stop{fill:#6d7fa3}
svg .bar-stop-agent_error,svg .bar-stop-agent_empty{fill:var(--fail)}svg .bar-stop-simulator_error{fill:#a06cd5}
svg .bar-base{fill:var(--base)}svg .bar-candidate{fill:var(--cand)}
.legend span{display:inline-block;margin-right:12px}
.sw{display:inline-block;width:10px;height:10px;margin-right:4px}.sw-base{background:var(--base)}
.sw-candidate{background:var(--cand)}table{border-collapse:collapse;background:var(--card)}
th,td{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}th{background:#eef1f5}
.issue{background:var(--card);border:1px solid var(--line);border-left:5px solid var(--low);border-radius:6px;
padding:12px;margin:10px 0}.issue.sev-high{border-left-color:var(--high)}
.issue.sev-medium{border-left-color:var(--medium)}.sev{display:inline-block;font-size:11px;font-weight:700;
color:#fff;background:var(--low);border-radius:3px;padding:1px 6px;margin-right:6px}
.sev-high .sev,.sev.sev-high{background:var(--high)}.sev-medium .sev,.sev.sev-medium{background:var(--medium)}
.issue dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:6px 0}.issue dt{color:var(--muted)}
.issue dd{margin:0}.evidence li{margin:2px 0}.toolbar{margin:8px 0;display:flex;gap:10px;align-items:center}
.toolbar[hidden]{display:none}
details.session{background:var(--card);border:1px solid var(--line);border-radius:6px;margin:8px 0}
details.session>summary{cursor:pointer;padding:8px 12px;list-style-position:inside}
details.session.failed>summary{background:#fdf0f0}.only-failing details.session:not(.failed){display:none}
.status{font-weight:700;font-size:11px;border-radius:3px;padding:1px 6px;color:#fff;background:var(--pass)}
.failed .status{background:var(--fail)}.untested .status{background:#a06cd5}.session-body{padding:4px 12px 12px}
.turn{border-left:3px solid transparent;padding:2px 0 2px 10px;margin:6px 0}
.turn.failing{background:var(--hl);border-left-color:var(--hlline)}.flag{color:#8a3b00;font-weight:600;margin:4px 0}
.msg{margin:4px 0}.msg .meta{font-size:12px;color:var(--muted)}.msg .content{white-space:pre-wrap;
word-break:break-word;background:#f4f6fa;border-radius:6px;padding:6px 10px;display:block}
.msg.role-assistant .content{background:#eaf1ff}
.msg.role-tool .content,.msg.role-system .content{background:#f3f0e8}.msg .error{color:var(--fail);font-weight:600}
.latency{font-variant-numeric:tabular-nums}
.note{background:#fffbe6;border:1px solid #eadfa8;padding:8px;border-radius:6px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:10px}
"""

SCRIPT = """
(function () {
  var only = document.getElementById("only-failing");
  var shown = document.getElementById("shown-count");
  function count() {
    if (!shown) return;
    var sel = "details.session" + (only && only.checked ? ".failed" : "");
    shown.textContent = document.querySelectorAll(sel).length + " shown";
  }
  function setAll(open) {
    document.querySelectorAll("details.session").forEach(function (d) { d.open = open; });
  }
  function openTarget() {
    var id = decodeURIComponent(location.hash.slice(1));
    var el = id ? document.getElementById(id) : null;
    for (var p = el; p; p = p.parentElement) { if (p.tagName === "DETAILS") p.open = true; }
    if (el) el.scrollIntoView();
  }
  var bar = document.getElementById("transcript-tools");
  if (bar) bar.hidden = false;
  if (only) only.addEventListener("change", function () {
    document.body.classList.toggle("only-failing", only.checked); count();
  });
  var ex = document.getElementById("expand-all"), co = document.getElementById("collapse-all");
  if (ex) ex.addEventListener("click", function () { setAll(true); });
  if (co) co.addEventListener("click", function () { setAll(false); });
  window.addEventListener("hashchange", openTarget);
  openTarget(); count();
  document.documentElement.setAttribute("data-ready", "1");
})();
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Nothing is loaded from anywhere; only this module's own style and script run.
CSP = (f"default-src 'none'; style-src {_sha256(STYLE)}; script-src {_sha256(SCRIPT)}; img-src data:; "
       "base-uri 'none'; form-action 'none'")


def _e(value: object) -> str:
    """Any value as HTML text (and attribute value): every <, >, &, " and ' escaped."""
    return html.escape("" if value is None else str(value), quote=True)


def _anchor(session_id: str) -> str:
    """A safe element id for a session: its id when plain, else a readable part plus a hash."""
    plain = re.sub(r"[^A-Za-z0-9_-]", "_", session_id)[:60]
    if plain == session_id:
        return f"s-{plain}"
    return f"s-{plain}-{hashlib.sha1(session_id.encode()).hexdigest()[:8]}"


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_e(CSP)}\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<meta name=\"generator\" content=\"convsim-mcp\"><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body><main>\n{body}\n"
            "<p class=\"muted\">Written by convsim-mcp. This page is self-contained: it loads nothing.</p>"
            f"</main><script>{SCRIPT}</script></body></html>\n")


# --- charts (inline SVG) ----------------------------------------------------------------------------


@dataclass
class _Row:
    label: str
    fraction: float | None  # 0-1 of the bar's full width; None: no bar (nothing to measure)
    text: str  # shown right of the bar
    kind: str  # the bar's CSS class suffix
    data: dict[str, str] = field(default_factory=dict)


def _bar_chart(chart_id: str, title: str, rows: list[_Row], *, label_w: int = LABEL_W, bar_w: int = BAR_W) -> str:
    """One horizontal bar per row, each a <g class="chart-row"> with its label, track, bar and value."""
    row_h, text_w = 24, 120
    height = row_h * max(len(rows), 1) + 8
    width = label_w + bar_w + text_w
    out = [f"<svg id=\"{chart_id}\" class=\"chart-svg\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" "
           f"height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"{_e(title)}\">"
           f"<title>{_e(title)}</title>"]
    for i, r in enumerate(rows):
        y = 4 + i * row_h
        data = "".join(f" data-{k}=\"{_e(v)}\"" for k, v in r.data.items())
        bar = ("" if r.fraction is None else
               f"<rect class=\"bar bar-{r.kind}\" x=\"{label_w}\" y=\"{y + 4}\" "
               f"width=\"{max(0.0, min(r.fraction, 1.0)) * bar_w:.1f}\" height=\"{row_h - 10}\"/>")
        out.append(f"<g class=\"chart-row\"{data}><title>{_e(r.label)}: {_e(r.text)}</title>"
                   f"<text x=\"{label_w - 8}\" y=\"{y + 15}\" text-anchor=\"end\">{_e(_clip(r.label))}</text>"
                   f"<rect class=\"track\" x=\"{label_w}\" y=\"{y + 4}\" width=\"{bar_w}\" height=\"{row_h - 10}\"/>"
                   f"{bar}<text x=\"{label_w + bar_w + 8}\" y=\"{y + 15}\">{_e(r.text)}</text></g>")
    if not rows:
        out.append("<text x=\"8\" y=\"20\">nothing to show</text>")
    out.append("</svg>")
    return "".join(out)


def _paired_chart(chart_id: str, title: str, rows: list[tuple[str, float | None, float | None, str, str]],
                  *, label_w: int = LABEL_W, bar_w: int = BAR_W) -> str:
    """Per row two bars, base (before) over candidate (after): <g class="chart-pair"> with bar-base, bar-candidate."""
    row_h, text_w = 34, 140
    height = row_h * max(len(rows), 1) + 8
    width = label_w + bar_w + text_w
    out = [f"<svg id=\"{chart_id}\" class=\"chart-svg\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" "
           f"height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"{_e(title)}\">"
           f"<title>{_e(title)}</title>"]
    for i, (label, before, after, before_text, after_text) in enumerate(rows):
        y = 4 + i * row_h
        bars = []
        for j, (side, frac, text) in enumerate((("base", before, before_text), ("candidate", after, after_text))):
            top = y + 3 + j * 13
            if frac is not None:
                bars.append(f"<rect class=\"bar bar-{side}\" data-side=\"{side}\" x=\"{label_w}\" y=\"{top}\" "
                            f"width=\"{max(0.0, min(frac, 1.0)) * bar_w:.1f}\" height=\"11\"/>")
            bars.append(f"<text x=\"{label_w + bar_w + 8}\" y=\"{top + 10}\">{side}: {_e(text)}</text>")
        out.append(f"<g class=\"chart-pair\" data-label=\"{_e(label)}\"><title>{_e(label)}: base {_e(before_text)}, "
                   f"candidate {_e(after_text)}</title>"
                   f"<text x=\"{label_w - 8}\" y=\"{y + 18}\" text-anchor=\"end\">{_e(_clip(label))}</text>"
                   f"<rect class=\"track\" x=\"{label_w}\" y=\"{y + 2}\" width=\"{bar_w}\" height=\"27\"/>"
                   + "".join(bars) + "</g>")
    if not rows:
        out.append("<text x=\"8\" y=\"20\">nothing to show</text>")
    out.append("</svg>")
    return "".join(out)


def _pass_rate_chart(report: Report) -> str:
    rows = [_Row(s.scorer + JUDGED_BY_SUFFIX.get(s.judged_by, ""), s.pass_rate,
                 (f"{s.pass_rate:.0%} ({s.passed}/{s.passed + s.failed})" if s.pass_rate is not None else "n/a")
                 + (f", {s.unscored} unscored" if s.unscored else ""),
                 "pass" if s.pass_rate is not None else "none", {"scorer": s.scorer})
            for s in report.scores]
    return _bar_chart("pass-rates", "Pass rate per scorer", rows)


def _stop_chart(stops: Counter[str], chart_id: str = "stop-reasons") -> str:
    total, top = sum(stops.values()), max(stops.values(), default=0)
    rows = [_Row(reason, n / top if top else 0.0, f"{n} ({n / total:.0%})", f"stop bar-stop-{_slug(reason)}",
                 {"reason": reason, "count": str(n)}) for reason, n in stops.most_common()]
    return _bar_chart(chart_id, "Sessions per stop reason", rows)


# --- the run report -----------------------------------------------------------------------------------


@dataclass
class _Flags:
    """What failed in one session, by turn (None: no turn given), each as a line to show."""

    by_turn: dict[int | None, list[str]] = field(default_factory=dict)
    failed_scorers: list[str] = field(default_factory=list)

    def add(self, turn: int | None, line: str) -> None:
        lines = self.by_turn.setdefault(turn, [])
        if line not in lines:
            lines.append(line)


async def run_report_html(store: Store, run_id: str) -> str:
    """The HTML page of a finished test_agent run, its transcripts read from the store a page at a time."""
    report, _ = await store.get_report(run_id)
    ids = await store.session_ids(run_id)
    shown = _pick_sessions(ids, report, MAX_SESSIONS_SHOWN)
    flags = await _stored_flags(store, shown, report)
    untested = {u.session_id for u in report.untested_sessions}
    transcripts, latencies = [], []
    async with aclosing(store.iter_sessions(session_ids=shown)) as pages:
        async for page in pages:
            for s in page:
                transcripts.append(_transcript(s, flags.get(s.id), untested=s.id in untested))
                latencies += [m.latency_ms for m in s.messages if m.role == "assistant" and m.latency_ms is not None]
    return _run_page(report, transcripts, left_out=len(ids) - len(shown), latencies=latencies)


def render_html(report: Report, sessions: Iterable[Session], assessments: Iterable[Assessment] = (),
                *, left_out: int = 0) -> str:
    """The same page from sessions and verdicts in memory (a small run, or a test)."""
    flags = _flags(assessments, [*report.issues, *report.simulator_issues])
    untested = {u.session_id for u in report.untested_sessions}
    transcripts, latencies = [], []
    for s in sessions:
        transcripts.append(_transcript(s, flags.get(s.id), untested=s.id in untested))
        latencies += [m.latency_ms for m in s.messages if m.role == "assistant" and m.latency_ms is not None]
    return _run_page(report, transcripts, left_out=left_out, latencies=latencies)


def _pick_sessions(ids: list[str], report: Report, cap: int) -> list[str]:
    """Every session when they fit; else those the issues point to first, then run order, shown in run order."""
    if len(ids) <= cap:
        return ids
    wanted: list[str] = []
    for issue in [*report.issues, *report.simulator_issues]:
        wanted += [e.session_id for e in issue.evidence] + issue.session_ids
    known = set(ids)
    chosen = set([sid for sid in dict.fromkeys(wanted) if sid in known][:cap])
    for sid in ids:
        if len(chosen) >= cap:
            break
        chosen.add(sid)
    return [sid for sid in ids if sid in chosen]


async def _stored_flags(store: Store, session_ids: list[str], report: Report) -> dict[str, _Flags]:
    flags = _flags((), [*report.issues, *report.simulator_issues])
    async with aclosing(store.iter_assessments(session_ids)) as pages:
        async for page in pages:
            _add_verdicts(flags, page)
    return flags


def _flags(assessments: Iterable[Assessment], issues: list[Issue]) -> dict[str, _Flags]:
    """Per session, the failing turns: the issues' evidence, and failed verdicts (their turn, or their first
    agent evidence, as the scores summary points)."""
    flags: dict[str, _Flags] = {}
    for issue in issues:
        for e in issue.evidence:
            flags.setdefault(e.session_id, _Flags()).add(e.turn, f"{issue.id} [{issue.severity}]: {issue.title}")
    _add_verdicts(flags, assessments)
    return flags


def _add_verdicts(flags: dict[str, _Flags], assessments: Iterable[Assessment]) -> None:
    for a in assessments:
        if a.passed is not False:
            continue
        ev = next((e for e in a.evidence if e.role == "assistant"), a.evidence[0] if a.evidence else None)
        turn = a.turn if a.turn is not None else (ev.turn if ev else None)
        f = flags.setdefault(a.session_id, _Flags())
        f.add(turn, f"{a.scorer} failed: {a.rationale}" if a.rationale else f"{a.scorer} failed")
        if a.scorer not in f.failed_scorers:
            f.failed_scorers.append(a.scorer)


def _run_page(report: Report, transcripts: list[str], *, left_out: int, latencies: list[float]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(report.created_at))
    head = [f"<header><h1>{_e(report.target)}</h1><p class=\"verdict\" id=\"verdict\"><strong>{_e(verdict(report))}"
            f"</strong></p><p class=\"muted\">Run <code>{_e(report.run_id)}</code>, {_e(when)}.</p>"]
    if report.offline and (report.note or OFFLINE_NOTE) == OFFLINE_NOTE:
        head.append(f"<p class=\"note\">Produced by {_e(OFFLINE_NOTE)}</p>")
    elif report.note:
        head.append(f"<p class=\"note\">{_e(report.note)}</p>")
    head.append("</header>")
    parts = ["".join(head), _summary(report), _charts(report), _trials(report), _issues(report)]
    if report.untested_sessions:
        items = "".join(f"<li><a href=\"#{_anchor(u.session_id)}\"><code>{_e(u.session_id)}</code></a>: "
                        f"{_e(u.reason)}</li>" for u in report.untested_sessions)
        parts.append("<section id=\"untested\"><h2>Sessions that could not be tested</h2><p>The simulated user or a "
                     "judge's model failed, or the simulated user broke its role: neither passes nor agent issues."
                     f"</p><ul>{items}</ul></section>")
    parts.append(_transcripts_section(report, transcripts, left_out, latencies))
    if report.test_cases:
        parts.append("<section id=\"cases\"><h2>Test cases</h2><ol>" + "".join(
            f"<li><code>{_e(c.id or f'#{i}')}</code>: {_e(c.goal)}</li>" for i, c in enumerate(report.test_cases, 1))
            + "</ol></section>")
    return _page(f"convsim report: {report.target}", "\n".join(p for p in parts if p))


def _summary(report: Report) -> str:
    sessions = report.sessions
    by_sev = Counter(i.severity for i in report.issues)
    calls = sum(u.calls for u in report.usage.values())
    tokens = sum(u.prompt_tokens + u.completion_tokens for u in report.usage.values())
    cost = sum(u.cost_usd for u in report.usage.values())
    cards = [("sessions", len(sessions), f"sessions from {len(report.test_cases)} test case(s)"),
             ("turns", sum(s.turns for s in sessions), "turns"),
             ("issues", len(report.issues), ", ".join(f"{by_sev[s]} {s}" for s in ("high", "medium", "low")
                                                      if by_sev[s]) or "agent issues"),
             ("untested", report.untested, "could not be tested"),
             ("duration", _duration(report.duration_s), "duration"),
             ("calls", calls, f"model calls, {tokens:,} tokens" + (f", ${cost:.4f}" if cost else ""))]
    if report.simulator_issues:
        cards.insert(3, ("simulator_issues", len(report.simulator_issues), "simulator issues (not the agent)"))
    html_cards = "".join(f"<div class=\"card\" data-key=\"{k}\"><div class=\"num\">{_e(v)}</div>"
                         f"<div class=\"label\">{_e(label)}</div></div>" for k, v, label in cards)
    rows = "".join(f"<tr><td>{_e(ROLE_NAMES.get(role, role))}</td><td>{_e(b)}</td><td>"
                   f"{_e(_usage(report.usage[role])) if role in report.usage else '-'}</td></tr>"
                   for role, b in backends(report.models).items())
    table = (f"<table class=\"backends\"><tr><th>role</th><th>backend</th><th>usage</th></tr>{rows}</table>"
             if rows else "")
    return f"<section id=\"summary\"><h2>Numbers</h2><div class=\"cards\">{html_cards}{table}</div></section>"


def _charts(report: Report) -> str:
    stops = Counter(s.stop_reason.value if s.stop_reason else "running" for s in report.sessions)
    return ("<section id=\"charts\"><h2>Pass rates and stop reasons</h2><div class=\"charts\">"
            f"<div class=\"chart\"><h3>Pass rate per scorer</h3>{_pass_rate_chart(report)}</div>"
            f"<div class=\"chart\"><h3>Stop reasons</h3>{_stop_chart(stops)}</div></div></section>")


def _trials(report: Report) -> str:
    t = report.trials
    if t is None:
        return ""
    rows = "".join(f"<tr><td>{p.k}</td><td>{_e(_rate(p.value))}</td><td>{p.cases}</td></tr>" for p in t.pass_hat)
    flaky = "".join(f"<li><code>{_e(c.case_id or f'#{(c.case_index or 0) + 1}')}</code>: passed {c.passed} of "
                    f"{c.trials}</li>" for c in t.case_results if c.flaky)
    return (f"<section id=\"trials\"><h2>Repeated trials</h2><p>Each of {t.cases} test case(s) ran {t.repeats} times; "
            f"{t.passed} of {t.trials} trials passed ({_e(t.definition)}).</p><table><tr><th>k</th><th>pass^k</th>"
            f"<th>test cases</th></tr>{rows}</table>"
            + (f"<p><strong>{t.flaky} flaky test case(s)</strong>:</p><ul>{flaky}</ul>" if flaky else "")
            + "</section>")


def _issues(report: Report) -> str:
    if report.issues:
        body = "".join(_issue(i) for i in report.issues)
    else:
        body = "<p>No issues found: no scorer failed and no session crashed or returned an empty reply.</p>"
    out = f"<section id=\"issues\"><h2>Issues ({len(report.issues)})</h2>{body}</section>"
    if report.simulator_issues:
        out += ("<section id=\"simulator-issues\"><h2>Simulator issues (test harness, not the agent)</h2><p>The "
                "simulated user, not the agent, caused these: the affected sessions did not test what they were "
                "meant to.</p>" + "".join(_issue(i) for i in report.simulator_issues) + "</section>")
    return out


def _issue(issue: Issue) -> str:
    facts = [("Why " + issue.severity, issue.severity_reason), ("Category", issue.category),
             ("Frequency", issue.frequency), ("Signals", ", ".join(issue.signals)),
             ("Also seen", ", ".join(issue.also_seen)), ("What happens", issue.description),
             ("Suspected cause", issue.suspected_cause), ("Suggested fix", issue.suggested_fix)]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts if v)
    evidence = "".join(
        f"<li><a href=\"#{_anchor(e.session_id)}{f'-t{e.turn}' if e.turn is not None else ''}\"><code>"
        f"{_e(e.session_id)}</code>{f', turn {e.turn}' if e.turn is not None else ''}</a>"
        f"{f' ({_e(e.scorer)})' if e.scorer else ''}{': <q>' + _e(e.quote) + '</q>' if e.quote else ''}</li>"
        for e in issue.evidence)
    repro = ""
    if issue.reproduction:
        shrunk = (f" It was shrunk from {issue.reproduction_shrunk_from} to "
                  f"{len(issue.reproduction.scripted_turns)} user turns." if issue.reproduction_shrunk_from else "")
        yaml_text = _reproduction(issue.reproduction).split("\n", 1)[1].rsplit("\n", 1)[0]  # without the fence
        repro = (f"<p>Reproduce with this test case (<code>{_e(issue.reproduction.id)}</code>):{_e(shrunk)}</p>"
                 f"<pre class=\"repro\">{_e(yaml_text)}</pre>")
    return (f"<article class=\"issue sev-{_e(issue.severity)}\" id=\"issue-{_e(_slug(issue.id))}\">"
            f"<h3 class=\"issue-title\"><span class=\"sev\">{_e(issue.severity.upper())}</span>{_e(issue.id)}: "
            f"{_e(issue.title)}</h3><dl>{dl}</dl>"
            + (f"<div>Evidence:</div><ul class=\"evidence\">{evidence}</ul>" if evidence else "")
            + repro + "</article>")


def _transcripts_section(report: Report, transcripts: list[str], left_out: int, latencies: list[float]) -> str:
    lat = ""
    if latencies:
        ordered = sorted(latencies)
        p50, p95 = ordered[(len(ordered) - 1) // 2], ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        lat = (f"<p class=\"muted\">Agent reply latency over the turns shown: p50 {_ms(p50)}, p95 {_ms(p95)}, "
               f"slowest {_ms(ordered[-1])}.</p>")
    more = ""
    if left_out:
        more = (f"<p class=\"note more\">{left_out} more sessions in the store, not shown here (this page shows "
                f"{len(transcripts)}): <code>convsim-mcp runs export {_e(report.run_id)}</code> or the resource "
                f"<code>convsim://runs/{_e(report.run_id)}</code> has every transcript.</p>")
    tools = ("<div class=\"toolbar\" id=\"transcript-tools\" hidden><label><input type=\"checkbox\" "
             "id=\"only-failing\"> only failing sessions</label>"
             "<button type=\"button\" id=\"expand-all\">expand all</button>"
             "<button type=\"button\" id=\"collapse-all\">collapse all</button><span id=\"shown-count\" "
             "class=\"muted\"></span></div>")
    return (f"<section id=\"transcripts\"><h2>Transcripts ({len(transcripts)})</h2><p>Failing sessions are open; "
            "a failing turn is highlighted with what failed. Latency is the agent's reply time (and the simulated "
            f"user's).</p>{lat}{more}{tools}" + "\n".join(transcripts) + "</section>")


def _transcript(s: Session, flags: _Flags | None, *, untested: bool = False, open_: bool | None = None) -> str:
    """One session: a <details> with its header, test case and turns; failing turns highlighted."""
    flags = flags or _Flags()
    crashed = s.stop_reason in (StopReason.AGENT_ERROR, StopReason.AGENT_EMPTY)
    untested = untested or s.stop_reason == StopReason.SIMULATOR_ERROR
    failed = bool(flags.failed_scorers or flags.by_turn or crashed) and not untested
    status, cls = ("UNTESTED", "untested") if untested else ("FAIL", "failed") if failed else ("PASS", "passed")
    anchor = _anchor(s.id)
    case = s.test_case
    case_label = case.id if case and case.id else f"#{s.case_index + 1}" if s.case_index is not None else "-"
    what = ", ".join(flags.failed_scorers + ([s.stop_reason.value] if crashed and s.stop_reason else []))
    summary = (f"<summary><span class=\"status\">{status}</span> <code>{_e(s.id)}</code> &middot; case "
               f"<code>{_e(case_label)}</code>{f' repeat {s.repeat}' if s.repeat else ''} &middot; "
               f"{_e(s.stop_reason.value if s.stop_reason else 'running')} &middot; {s.turns} turn(s)"
               + (f" &middot; failed: {_e(what)}" if what else "") + "</summary>")
    info = []
    if case:
        info.append(f"<div><strong>Goal:</strong> {_e(case.goal)}</div>")
        if case.persona:
            info.append(f"<div><strong>Persona:</strong> {_e(case.persona)}</div>")
    if s.stop_detail:
        info.append(f"<div class=\"muted\">Stopped: {_e(s.stop_detail)}</div>")
    turns: dict[int, list[Message]] = {}
    for m in s.messages:
        turns.setdefault(m.turn or 0, []).append(m)
    body = []
    for turn, messages in turns.items():
        lines = flags.by_turn.get(turn, []) if turn else []
        errored = any(m.error for m in messages)
        failing = bool(lines) or (errored and turn > 0)
        tid = f" id=\"{anchor}-t{turn}\"" if turn else ""
        inner = "".join(_message(m, replayed=turn in s.replayed_turns) for m in messages)
        notes = "".join(f"<div class=\"flag\">&#9888; {_e(line)}</div>" for line in lines)
        label = f"<div class=\"meta muted\">turn {turn}</div>" if turn else ""
        body.append(f"<section class=\"turn{' failing' if failing else ''}\"{tid} data-turn=\"{turn}\">"
                    f"{label}{inner}{notes}</section>")
    loose = [line for t, ls in flags.by_turn.items() if t is None or t not in turns for line in ls]
    if loose:
        body.append("<div class=\"session-flags\">" + "".join(f"<div class=\"flag\">&#9888; {_e(line)}</div>"
                                                              for line in loose) + "</div>")
    is_open = failed if open_ is None else open_
    return (f"<details class=\"session {cls}\" id=\"{anchor}\" data-session=\"{_e(s.id)}\"{' open' if is_open else ''}>"
            f"{summary}<div class=\"session-body\">{''.join(info)}{''.join(body)}</div></details>")


def _message(m: Message, *, replayed: bool = False) -> str:
    who = {"user": "simulated user", "assistant": "agent", "tool": f"tool {m.name or ''}".strip(),
           "system": "system"}[m.role]
    meta = [who]
    if m.scripted:
        meta.append("scripted")
    if replayed and m.role == "user":
        meta.append("replayed")
    if m.latency_ms is not None:
        meta.append(f"<span class=\"latency\" data-ms=\"{m.latency_ms:.1f}\">{_ms(m.latency_ms)}</span>")
    if m.history_omitted:
        meta.append(f"written from a shortened history ({m.history_omitted} earlier messages left out)")
    parts = [f"<div class=\"meta\">{' &middot; '.join(x if x.startswith('<span') else _e(x) for x in meta)}</div>"]
    if m.content:
        parts.append(f"<div class=\"content\">{_e(_cap(m.content))}</div>")
    for tc in m.tool_calls or []:
        fn = tc.function or {}
        args = _cap(str(fn.get("arguments", "")))
        parts.append(f"<pre class=\"tool-call\">call {_e(fn.get('name', '?'))}({_e(args)})</pre>")
    if m.error:
        parts.append(f"<div class=\"error\">error: {_e(_cap(m.error))}</div>")
        if m.error_frames:
            parts.append("<pre class=\"frames\">" + _e("\n".join(m.error_frames)) + "</pre>")
    return f"<div class=\"msg role-{m.role}{' has-error' if m.error else ''}\">{''.join(parts)}</div>"


# --- the comparison -------------------------------------------------------------------------------------


async def comparison_html(store: Store, c: Comparison) -> str:
    """The HTML page of a comparison, with both transcripts of the first flipped cases each way."""
    flips = c.flipped.pass_to_fail[:MAX_FLIPS_SHOWN] + c.flipped.fail_to_pass[:MAX_FLIPS_SHOWN]
    ids = list(dict.fromkeys(sid for f in flips for sid in (f.base_session, f.candidate_session)))
    sessions = await store.get_sessions_by_ids(ids)
    assessments = await store.get_assessments(ids)
    return render_comparison_html(c, sessions, assessments)


def render_comparison_html(c: Comparison, sessions: Iterable[Session] = (),
                           assessments: Iterable[Assessment] = ()) -> str:
    """Before/after charts per scorer and stop reason, the flipped cases (with their transcripts), the issues."""
    base, cand = c.runs["base"], c.runs["candidate"]
    flags = _flags(assessments, [])
    by_id = {s.id: s for s in sessions}
    rows = [(s.scorer, s.base_pass_rate, s.candidate_pass_rate, _rate(s.base_pass_rate), _rate(s.candidate_pass_rate))
            for s in c.scorers]
    reasons = sorted(set(base.stop_reasons) | set(cand.stop_reasons))
    top = max([*base.stop_reasons.values(), *cand.stop_reasons.values(), 1])
    stop_rows = [(r, base.stop_reasons.get(r, 0) / top, cand.stop_reasons.get(r, 0) / top,
                  str(base.stop_reasons.get(r, 0)), str(cand.stop_reasons.get(r, 0))) for r in reasons]
    verdict_text = "Regression." if c.regression else "No regression."
    parts = [f"<header><h1>Comparison: {_e(c.base)} &rarr; {_e(c.candidate)}</h1><p class=\"verdict\" id=\"verdict\">"
             f"<strong>{verdict_text}</strong> {c.pairs} paired session(s) (same test case, same repeat)"
             + "".join(f"; {n} {_e(k.replace('_', ' '))}" for k, n in c.left_out.items() if n) + ".</p>"
             f"<p class=\"muted\">base <code>{_e(c.base)}</code>: {_e(base.target)} ({base.sessions} sessions); "
             f"candidate <code>{_e(c.candidate)}</code>: {_e(cand.target)} ({cand.sessions} sessions)</p></header>"]
    worse = list(c.regression_reasons) + [
        f"{s.scorer}: {_rate(s.base_pass_rate)} -> {_rate(s.candidate_pass_rate)} (not significant)"
        for s in c.scorers if s.delta is not None and s.delta < 0 and s.verdict != "worse"] + [
        f"new {i.severity} issue {i.id}: {i.title}" for i in c.issues.new if i.severity != "high"]
    better = list(c.improvements) + [
        f"{s.scorer}: {_rate(s.base_pass_rate)} -> {_rate(s.candidate_pass_rate)} (not significant)"
        for s in c.scorers if s.delta is not None and s.delta > 0 and s.verdict != "better"]
    parts.append("<section id=\"changes\"><h2>Worse and better</h2><div class=\"pair\"><div><h3>Worse</h3><ul>"
                 + ("".join(f"<li>{_e(x)}</li>" for x in worse) or "<li>nothing</li>") + "</ul></div>"
                 "<div><h3>Better</h3><ul>" + ("".join(f"<li>{_e(x)}</li>" for x in better)
                                                or "<li>nothing</li>") + "</ul></div></div></section>")
    legend = ("<p class=\"legend\"><span><i class=\"sw sw-base\"></i>base (before)</span><span><i class=\"sw "
              "sw-candidate\"></i>candidate (after)</span></p>")
    parts.append("<section id=\"charts\"><h2>Before and after</h2>" + legend + "<div class=\"charts\">"
                 "<div class=\"chart\"><h3>Pass rate per scorer</h3>"
                 + _paired_chart("cmp-pass-rates", "Pass rate per scorer, before and after", rows) + "</div>"
                 "<div class=\"chart\"><h3>Stop reasons</h3>"
                 + _paired_chart("cmp-stop-reasons", "Sessions per stop reason, before and after", stop_rows) + "</div>"
                 "</div></section>")
    table = "".join(
        f"<tr><td>{_e(s.scorer)}</td><td>{_e(_rate(s.base_pass_rate))}</td><td>{_e(_rate(s.candidate_pass_rate))}</td>"
        f"<td>{_e(_signed(s.delta))}</td><td>{'-' if s.p_value is None else f'{s.p_value:.3g}'}</td><td>"
        f"{_e(f'{_signed(s.interval[0])} to {_signed(s.interval[1])}' if s.interval else '-')}</td>"
        f"<td>{_e(s.verdict)} ({s.pairs} pairs)</td></tr>" for s in c.scorers)
    parts.append("<section id=\"stats\"><h2>How sure we are</h2><table><tr><th>scorer</th><th>base</th>"
                 "<th>candidate</th><th>change</th><th>p</th><th>95% interval</th><th>verdict</th></tr>"
                 f"{table}</table><p class=\"muted\">{_e(c.method or method_note(c.seed))}</p></section>")
    parts.append(_flips_section("pass-to-fail", "Passed in base, failed in candidate", c.flipped.pass_to_fail, by_id,
                                flags))
    parts.append(_flips_section("fail-to-pass", "Failed in base, passed in candidate", c.flipped.fail_to_pass, by_id,
                                flags))
    parts.append("<section id=\"issue-changes\"><h2>Issues</h2>" + _issue_changes("New", c.issues.new)
                 + _issue_changes("Fixed", c.issues.fixed) + _issue_changes("Still there", c.issues.persisting)
                 + "</section>")
    cost = [("cost (USD)", f"{base.cost_usd:.4f}", f"{cand.cost_usd:.4f}", f"{c.changes.cost_usd:+.4f}"),
            ("tokens", base.tokens, cand.tokens, f"{c.changes.tokens:+d}"),
            ("model calls", base.calls, cand.calls, f"{c.changes.calls:+d}"),
            ("agent latency p50", _ms(base.latency_p50_ms), _ms(cand.latency_p50_ms),
             _ms(c.changes.latency_p50_ms, signed=True)),
            ("agent latency p95", _ms(base.latency_p95_ms), _ms(cand.latency_p95_ms),
             _ms(c.changes.latency_p95_ms, signed=True))]
    parts.append("<section id=\"costs\"><h2>Cost, tokens, latency</h2><table><tr><th></th><th>base</th>"
                 "<th>candidate</th><th>change</th></tr>" + "".join(
                     f"<tr><td>{_e(a)}</td><td>{_e(b)}</td><td>{_e(k)}</td><td>{_e(d)}</td></tr>"
                     for a, b, k, d in cost)
                 + "</table></section>")
    return _page(f"convsim comparison: {c.base} -> {c.candidate}", "\n".join(parts))


def _flips_section(sid: str, title: str, flips: list[FlippedCase], by_id: dict[str, Session],
                   flags: dict[str, _Flags]) -> str:
    if not flips:
        return f"<section id=\"{sid}\" class=\"flips\"><h2>{_e(title)} (0)</h2><p>none</p></section>"
    rows, pairs = [], []
    for f in flips:
        rows.append(f"<tr class=\"flip\"><td><code>{_e(f.case_id)}</code></td><td>{f.repeat}</td><td><a href=\"#"
                    f"{_anchor(f.base_session)}\"><code>{_e(f.base_session)}</code></a></td><td><a href=\"#"
                    f"{_anchor(f.candidate_session)}\"><code>{_e(f.candidate_session)}</code></a></td><td>"
                    f"{_e(', '.join(f.failed))}</td></tr>")
        base_s, cand_s = by_id.get(f.base_session), by_id.get(f.candidate_session)
        if base_s and cand_s and len(pairs) < MAX_FLIPS_SHOWN:
            left, right = (_transcript(x, flags.get(x.id), open_=True) for x in (base_s, cand_s))
            pairs.append(f"<div class=\"pair\"><div><h3>base</h3>{left}</div>"
                         f"<div><h3>candidate</h3>{right}</div></div>")
    more = (f"<p class=\"muted\">Transcripts of the first {len(pairs)} shown; every flipped case is in the JSON "
            "comparison.</p>" if len(flips) > len(pairs) else "")
    return (f"<section id=\"{sid}\" class=\"flips\"><h2>{_e(title)} ({len(flips)})</h2><table><tr><th>case</th>"
            "<th>repeat</th><th>base session</th><th>candidate session</th><th>what failed</th></tr>"
            + "".join(rows) + "</table>" + more + "".join(pairs) + "</section>")


def _issue_changes(title: str, issues: list[IssueChange]) -> str:
    if not issues:
        return f"<h3>{_e(title)}: none</h3>"
    return (f"<h3>{_e(title)} ({len(issues)})</h3><ul>" + "".join(
        f"<li><span class=\"sev sev-{_e(i.severity)}\">{_e(i.severity.upper())}</span><code>{_e(i.id)}</code> "
        f"<span class=\"issue-title\">{_e(i.title)}</span> <span class=\"muted\">(base {i.base_sessions}, candidate "
        f"{i.candidate_sessions} session(s))</span></li>" for i in issues) + "</ul>")


# --- small formatting helpers ------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _clip(text: str, limit: int = LABEL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _cap(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return (text[:MAX_MESSAGE_CHARS] + f"\n... ({len(text) - MAX_MESSAGE_CHARS} more characters; the whole message "
            "is in the store)")


def _rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.0%}"


def _signed(delta: float | None) -> str:
    return "-" if delta is None else f"{delta * 100:+.0f} pts"


def _ms(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    if signed:
        return f"{value:+.0f} ms"
    if value < 10:
        return f"{value:.1f} ms"
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.1f} s"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s"
