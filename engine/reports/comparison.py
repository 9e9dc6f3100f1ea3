"""The comparison of two runs, as data (`Comparison`) and as a page a person reads in a minute.

`Comparison` is what `engine.pipeline.compare.compare_runs` returns and what `--json` writes: per scorer
the paired pass rates, their difference, the exact McNemar p-value and a bootstrap interval
(`comparison_stats`); the test cases that flipped; the issues that are new, fixed or persisting; cost,
tokens, latency and stop reasons side by side. `render_comparison` puts the verdict first, then what got
worse, what got better, how sure we are, and the costs. Everything comes from stored, already redacted
runs; nothing here adds data.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from .comparison_stats import ALPHA, BOOTSTRAP_RESAMPLES, MIN_PAIRS, NOT_ENOUGH_PAIRS

OVERALL = "overall"  # the row for "the session had no agent failure at all" (any scorer, crash or empty reply)
MAX_LISTED = 10  # flipped cases and issues listed per section of the Markdown page


class ScorerChange(BaseModel):
    """One scorer over the pairs both runs scored: rates, difference (candidate - base), p-value, interval."""

    scorer: str
    base_pass_rate: float | None
    candidate_pass_rate: float | None
    delta: float | None = Field(description="candidate_pass_rate - base_pass_rate, over the same pairs.")
    p_value: float | None = Field(description=f"Exact two-sided McNemar p on the discordant pairs; None below "
                                              f"{MIN_PAIRS} pairs (not enough pairs).")
    interval: list[float] | None = Field(description="Bootstrap 95% interval of delta (seeded); None below the "
                                                     "minimum.")
    pairs: int = Field(description="Pairs (same test case, same repeat) that both runs scored with this scorer.")
    passed_only_in_base: int
    passed_only_in_candidate: int
    verdict: str = Field(description="'better', 'worse' (p < 0.05), 'no significant change' or 'not enough pairs'.")


class FlippedCase(BaseModel):
    case_id: str
    repeat: int
    base_session: str
    candidate_session: str
    failed: list[str] = Field(default_factory=list, description="What failed in the failing run's session.")


class Flipped(BaseModel):
    pass_to_fail: list[FlippedCase] = Field(default_factory=list)
    fail_to_pass: list[FlippedCase] = Field(default_factory=list)


class IssueChange(BaseModel):
    id: str
    signature: str
    title: str
    severity: str = Field(description="The candidate's severity, or the base's for a fixed issue.")
    base_sessions: int = Field(0, description="Sessions it affected in the base run.")
    candidate_sessions: int = Field(0, description="Sessions it affected in the candidate run.")


class IssueChanges(BaseModel):
    new: list[IssueChange] = Field(default_factory=list, description="In the candidate, not in the base.")
    fixed: list[IssueChange] = Field(default_factory=list, description="In the base, not seen in the candidate.")
    persisting: list[IssueChange] = Field(default_factory=list)


class RunFacts(BaseModel):
    """One side of the comparison in numbers."""

    run_id: str
    kind: str
    target: str
    sessions: int
    untested: int = Field(description="Sessions left out of pass rates: the simulated user failed or broke "
                                      "its role, or the session never finished.")
    issues_from: str = Field(description="'report' (the run's stored issues) or 'computed' (from its failures).")
    calls: int
    tokens: int
    cost_usd: float
    cost_unknown_calls: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    stop_reasons: dict[str, int]


class Changes(BaseModel):
    """candidate - base."""

    cost_usd: float
    tokens: int
    calls: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    stop_reasons: dict[str, int] = Field(description="Per stop reason, sessions in candidate minus in base "
                                                     "(reasons that did not change are left out).")


class Comparison(BaseModel):
    """Base run vs candidate run, paired by test case id and repeat index."""

    base: str
    candidate: str
    scorers: list[ScorerChange]
    flipped: Flipped
    issues: IssueChanges
    regression: bool = Field(description="A scorer's pass rate fell with p < 0.05, or a new high issue appeared.")
    regression_reasons: list[str] = Field(default_factory=list)
    improvements: list[str] = Field(default_factory=list)
    pairs: int = Field(description="Test case + repeat played by both runs, both tested.")
    left_out: dict[str, int] = Field(default_factory=dict, description="Pairs not compared: 'untested' (a side "
                                     "could not test the agent), 'only_in_base', 'only_in_candidate'.")
    runs: dict[str, RunFacts]
    changes: Changes
    method: str
    seed: int


def method_note(seed: int) -> str:
    return (f"Sessions are paired by test case id and repeat index. p: exact two-sided McNemar test on the pairs "
            f"that disagree; below {MIN_PAIRS} pairs no p-value or interval is given ({NOT_ENOUGH_PAIRS}). "
            f"Interval: percentile bootstrap (95%, {BOOTSTRAP_RESAMPLES} resamples of the pairs, seed {seed}). "
            f"Significant means p < {ALPHA}.")


def render_comparison(c: Comparison) -> str:
    """Markdown: verdict, worse, better, how sure, costs. Readable in a minute."""
    base, cand = c.runs["base"], c.runs["candidate"]
    verdict = "**Regression.**" if c.regression else "**No regression.**"
    lines = [f"# Comparison: {c.base} -> {c.candidate}", "",
             f"{verdict} {c.pairs} paired session(s) (same test case, same repeat); "
             f"{_left_out(c.left_out)}.", "",
             f"- base `{c.base}`: {base.target} ({base.sessions} sessions)",
             f"- candidate `{c.candidate}`: {cand.target} ({cand.sessions} sessions)", ""]

    worse = list(c.regression_reasons)
    worse += [f"{s.scorer}: {_pct(s.base_pass_rate)} -> {_pct(s.candidate_pass_rate)} ({_unsure(s)})"
              for s in c.scorers if s.delta is not None and s.delta < 0 and s.verdict != "worse"]
    worse += [f"new {i.severity} issue {i.id}: {i.title} ({i.candidate_sessions} session(s))"
              for i in c.issues.new if i.severity != "high"]
    lines += ["## Worse", ""] + _bullets(worse, "nothing") + [""]
    lines += _flips("Passed in base, failed in candidate", c.flipped.pass_to_fail)

    better = list(c.improvements)
    better += [f"{s.scorer}: {_pct(s.base_pass_rate)} -> {_pct(s.candidate_pass_rate)} ({_unsure(s)})"
               for s in c.scorers if s.delta is not None and s.delta > 0 and s.verdict != "better"]
    lines += ["## Better", ""] + _bullets(better, "nothing") + [""]
    lines += _flips("Failed in base, passed in candidate", c.flipped.fail_to_pass)
    if c.issues.persisting:
        lines += ["Still there: " + ", ".join(f"{i.id} ({i.severity}) {i.title}"
                                             for i in c.issues.persisting[:MAX_LISTED])
                  + (" ..." if len(c.issues.persisting) > MAX_LISTED else ""), ""]

    lines += ["## How sure we are", "",
              "| scorer | base | candidate | change | p | 95% interval | verdict |",
              "|---|---|---|---|---|---|---|"]
    for s in c.scorers:
        interval = f"{_signed(s.interval[0])} to {_signed(s.interval[1])}" if s.interval else "-"
        p = f"{s.p_value:.3g}" if s.p_value is not None else "-"
        lines.append(f"| {s.scorer} | {_pct(s.base_pass_rate)} | {_pct(s.candidate_pass_rate)} | "
                     f"{_signed(s.delta)} | {p} | {interval} | {s.verdict} ({s.pairs} pairs) |")
    lines += ["", c.method, ""]

    lines += ["## Cost, tokens, latency, stop reasons", "",
              "| | base | candidate | change |", "|---|---|---|---|",
              f"| cost (USD) | {base.cost_usd:.4f} | {cand.cost_usd:.4f} | {c.changes.cost_usd:+.4f} |",
              f"| tokens | {base.tokens} | {cand.tokens} | {c.changes.tokens:+d} |",
              f"| model calls | {base.calls} | {cand.calls} | {c.changes.calls:+d} |",
              f"| agent latency p50 (ms) | {_ms(base.latency_p50_ms)} | {_ms(cand.latency_p50_ms)} | "
              f"{_ms(c.changes.latency_p50_ms, signed=True)} |",
              f"| agent latency p95 (ms) | {_ms(base.latency_p95_ms)} | {_ms(cand.latency_p95_ms)} | "
              f"{_ms(c.changes.latency_p95_ms, signed=True)} |"]
    for reason in sorted(set(base.stop_reasons) | set(cand.stop_reasons)):
        b, k = base.stop_reasons.get(reason, 0), cand.stop_reasons.get(reason, 0)
        lines.append(f"| stop: {reason} | {b} | {k} | {k - b:+d} |")
    if base.cost_unknown_calls or cand.cost_unknown_calls:
        lines += ["", "Cost leaves out calls to models with no known price "
                      f"({base.cost_unknown_calls} in base, {cand.cost_unknown_calls} in candidate)."]
    return "\n".join(lines) + "\n"


def _unsure(s: ScorerChange) -> str:
    if s.p_value is None:
        return f"{NOT_ENOUGH_PAIRS}: {s.pairs} of at least {MIN_PAIRS}"
    return f"p = {s.p_value:.3g}, not significant"


def _left_out(left: dict[str, int]) -> str:
    parts = [f"{n} {what.replace('_', ' ')}" for what, n in left.items() if n]
    return "left out: " + ", ".join(parts) if parts else "nothing left out"


def _bullets(items: list[str], empty: str) -> list[str]:
    return [f"- {x}" for x in items] if items else [f"- {empty}"]


def _flips(title: str, flips: list[FlippedCase]) -> list[str]:
    if not flips:
        return []
    out = [f"{title} ({len(flips)}):", ""]
    for f in flips[:MAX_LISTED]:
        failed = f" - failed: {', '.join(f.failed)}" if f.failed else ""
        out.append(f"- `{f.case_id}` repeat {f.repeat}: base `{f.base_session}`, candidate `{f.candidate_session}`"
                   f"{failed}")
    if len(flips) > MAX_LISTED:
        out.append(f"- ... and {len(flips) - MAX_LISTED} more (see the JSON)")
    return out + [""]


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.0f}%"


def _signed(delta: float | None) -> str:
    return "-" if delta is None else f"{delta * 100:+.0f} pts"


def _ms(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.0f}" if signed else f"{value:.0f}"
