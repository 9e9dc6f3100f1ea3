"""The CLI's progress: a live bar on a terminal (checked in a real pseudo-terminal), one line per session else."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

import anyio

from convsim_mcp.progress import ProgressBar
from engine import Progress

ROOT = Path(__file__).resolve().parent.parent


def _run_on_a_terminal(args: list[str], home: Path) -> tuple[int, str, str]:
    """The CLI with stderr on a pseudo-terminal (so isatty() is true there), stdout on a pipe."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    env.update(CONVSIM_HOME=str(home), PYTHONPATH=str(ROOT), CONVSIM_ROOTS=str(home.parent), COLUMNS="120")
    proc = subprocess.Popen([sys.executable, "-m", "convsim_mcp", *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # a pty's buffer is small: read while the child writes
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=120)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, out, b"".join(chunks).decode("utf-8", "replace")


def test_a_terminal_gets_a_live_bar_with_sessions_turns_failures_and_eta(tmp_path):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"goal": "Ask about refunds. Then ask about shipping.", "id": f"c{i}"}
                                 for i in range(4)] + [{"goal": "Ask for a gift card refund.", "id": "crash"}]))
    home = tmp_path / "home"
    code, out, err = _run_on_a_terminal(
        ["simulate", "examples/support_agent.py:support_agent", str(cases), "--max-turns", "3", "--model", "offline"],
        home)
    assert code in (0, 1), err
    frames = err.replace("\r\n", "\n").split("\r")
    last = [f for f in frames if "sessions" in f][-1]
    assert "5/5 sessions" in last and ", turns 15/15, failures 1" in last
    assert "elapsed" in last and "ETA" in last
    assert "\r" in err  # redrawn in place, not a line per update
    assert "ETA" not in out and "failures" not in out  # the bar is on stderr only; stdout holds the result


def test_without_a_terminal_each_finished_session_is_one_line(tmp_path):
    lines: list[str] = []

    class Pipe:
        def write(self, text: str) -> int:
            lines.append(text)
            return len(text)

        def isatty(self) -> bool:
            return False

        def flush(self) -> None:
            pass

    bar = ProgressBar(Pipe())

    async def main() -> None:
        await bar.update(Progress(1, 6, "sim-1 turn 1", sessions_done=0, sessions_total=2, failures=0))
        await bar.update(Progress(3, 6, "sim-1 ended: agent_error", sessions_done=1, sessions_total=2, failures=1))
        await bar.update(Progress(6, 6, "sim-2 ended: max_turns", sessions_done=2, sessions_total=2, failures=1))

    anyio.run(main)
    bar.close()
    text = "".join(lines)
    assert text.splitlines() == ["[3/6] sim-1 ended: agent_error (1 failed so far)",
                                 "[6/6] sim-2 ended: max_turns (1 failed so far)"]
    assert "\r" not in text


def test_the_simulation_counts_sessions_and_failures(tmp_path):
    from engine import OfflineBackend, Store, simulate

    seen: list[Progress] = []

    async def record(p: Progress) -> None:
        seen.append(p)

    async def main() -> None:
        store = Store(tmp_path / "db.sqlite")
        try:
            await simulate(store, "examples/support_agent.py:support_agent",
                           [{"goal": "Ask about refunds. Then ask about shipping."},
                            {"goal": "Ask for a gift card refund."}],
                           max_turns=3, llm=OfflineBackend(), workspace=ROOT, progress=record)
        finally:
            store.close()

    anyio.run(main)
    last = seen[-1]
    assert last.sessions_done == last.sessions_total == 2
    assert last.failures == 1  # the gift-card crash
    assert [p.sessions_done for p in seen] == sorted(p.sessions_done for p in seen)
