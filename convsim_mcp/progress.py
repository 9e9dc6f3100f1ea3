"""The CLI's progress on stderr: a live bar on a terminal (tqdm), one line per finished session elsewhere.

On a terminal the bar shows sessions done of all (turns while no session has ended), turns, failures so far,
elapsed time and the ETA; other stages (describe, generate, discover) show as its description. In CI logs and
pipes a redrawn bar is noise, so then each finished session prints one line, as `[done/total] ...`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from engine import Progress
from engine.text import one_line

BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} sessions [elapsed {elapsed}, ETA {remaining}]{postfix}"
STEPS_FORMAT = "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [elapsed {elapsed}, ETA {remaining}]{postfix}"


class ProgressBar:
    """`update` is a job's progress callback; `close` ends the bar (call it however the job ended)."""

    def __init__(self, stream: Any = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar: Any = None
        self._by_sessions = False

    async def update(self, p: Progress) -> None:
        if not self.tty:
            if "ended" in p.message:
                failed = f" ({p.failures} failed so far)" if p.failures else ""
                print(f"[{p.done}/{p.total}] {p.message}{failed}", file=self.stream)
            return
        by_sessions = p.sessions_total is not None
        if self._bar is None or by_sessions != self._by_sessions:
            self._open(p, by_sessions)
        bar = self._bar
        total, done = (p.sessions_total, p.sessions_done or 0) if by_sessions else (p.total, p.done)
        if bar.total != total:
            bar.total = total
        bar.n = min(done, total or done)
        stage = p.message.split(":", 1)[0] if ":" in p.message else ""
        bar.set_description_str(f"{stage} " if stage and not by_sessions else "", refresh=False)
        parts = [f"turns {p.done}/{p.total}"] if by_sessions else [one_line(p.message, 40)]
        if p.failures is not None:
            parts.append(f"failures {p.failures}")
        postfix = ", ".join(parts)  # tqdm puts ", " before it
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()

    def _open(self, p: Progress, by_sessions: bool) -> None:
        from tqdm import tqdm

        if self._bar is not None:
            self._bar.close()
        columns, rows = _size(self.stream)
        self._by_sessions = by_sessions
        self._bar = tqdm(total=p.sessions_total if by_sessions else p.total, file=self.stream, leave=True,
                         ncols=columns, nrows=rows, bar_format=BAR_FORMAT if by_sessions else STEPS_FORMAT,
                         mininterval=0.1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _size(stream: Any) -> tuple[int, int]:
    """The terminal's columns and rows; 100 x 24 where it reports none (a pseudo-terminal never sized says 0 x 0,
    and tqdm then draws nothing)."""
    try:
        size = os.get_terminal_size(stream.fileno())
        columns, rows = size.columns, size.lines
    except (AttributeError, OSError, ValueError):
        columns, rows = 0, 0
    return (columns if columns >= 40 else 100), (rows if rows >= 2 else 24)
