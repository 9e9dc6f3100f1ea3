"""SQLite storage for runs, test cases, sessions and messages, and the response cache.

Every message is written as its turn completes, so a crashed agent, a failed
model call or a cancelled job keeps every completed turn. One connection, in
WAL mode, used from one worker thread (`worker.DbWorker`: one call at a time), so
the event loop never blocks on disk and writes never contend. The writes of a
running conversation (`add_message`, `finish_session`) are group-committed
(`_write`): those that arrive while a commit is under way go together in the
next transaction, and each caller returns once its own write is committed.

Nothing secret is stored: target specs arrive already redacted
(`targets.redacted_spec`), model API keys never reach this module, and every
text written passes through `secrets.redact` (`_clean`) on its way in, so a
key that an agent or a provider echoed is masked in the tables and the WAL.
The response cache (`llm_cache`, see engine/llm/cache.py) keeps a hash of each
request, never the request, and only replies that hold no known secret.

Big runs stay in constant memory: imports stream a file line by line and
insert in batches (a file over MAX_TRANSCRIPTS is refused after a counting
pass, before anything is stored); readers page sessions (`iter_sessions`,
`get_sessions_by_ids`) and aggregate in SQL (`session_totals`); no statement
binds more than MAX_SQL_PARAMS parameters.

A run left 'running' by a process that died reads 'interrupted' from every
reader (`get_run`, `list_runs`, the server's startup sweep). A run row keeps
its process's pid and, on Linux, the process start time (with the boot id),
so a recycled pid does not keep a dead run 'running'.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Sequence,
    TypeVar,
)

import anyio

from ..errors import InvalidOption, NotFound
from ..limits import MAX_TRANSCRIPTS
from ..models import (
    Assessment,
    Message,
    Report,
    RunStatus,
    Session,
    StopReason,
    TestCase,
    TestSet,
    Usage,
    add_usage,
)
from ..secrets import redact as _clean
from ..ids import new_run_id, new_session_id
from .jsonl import (
    _check_count,
    _count_file,
    _numbered,
    _parse_file,
    _parse_line,
    _take_batch,
)
from ..records import record_to_session, session_to_record
from .worker import DbWorker

R = TypeVar("R")


T = TypeVar("T")


log = logging.getLogger("convsim.store")


SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    target TEXT NOT NULL,          -- redacted spec, JSON
    options TEXT NOT NULL,         -- JSON
    model TEXT NOT NULL,
    offline INTEGER NOT NULL,
    sessions_total INTEGER NOT NULL,
    error TEXT,
    pid INTEGER,
    pid_start TEXT                 -- the process's start stamp (boot id:start time), against pid reuse
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE TABLE IF NOT EXISTS test_cases (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    case_index INTEGER,
    repeat INTEGER NOT NULL DEFAULT 0,
    stop_reason TEXT,
    stop_detail TEXT,
    turns INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL,
    usage TEXT NOT NULL DEFAULT '{}',
    metadata TEXT NOT NULL DEFAULT '{}',
    replayed_turns TEXT NOT NULL DEFAULT '[]'  -- JSON list of the turns replayed from an earlier run
);
CREATE INDEX IF NOT EXISTS sessions_run ON sessions(run_id);
CREATE TABLE IF NOT EXISTS messages (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    data TEXT NOT NULL,            -- Message JSON
    created_at REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS assessments (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    scorer TEXT NOT NULL,
    turn INTEGER NOT NULL,         -- -1 for session-level
    data TEXT NOT NULL,            -- Assessment JSON
    created_at REAL NOT NULL,
    PRIMARY KEY (session_id, scorer, turn)
);
CREATE TABLE IF NOT EXISTS test_sets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    data TEXT NOT NULL             -- TestSet JSON
);
CREATE TABLE IF NOT EXISTS reports (
    run_id TEXT PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
    data TEXT NOT NULL,            -- Report JSON
    markdown TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS llm_cache (
    key TEXT PRIMARY KEY,          -- SHA-256 of the request (engine/llm/cache.py); the request is not kept
    output TEXT NOT NULL,          -- the validated reply JSON (only replies that hold no secret are stored)
    model TEXT NOT NULL,
    role TEXT NOT NULL,            -- the role that first asked
    schema TEXT NOT NULL,          -- the reply's schema name
    created_at REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    last_hit_at REAL
);
"""


# (table, column, declaration) of the columns added to SCHEMA since its first release, for older databases
ADDED_COLUMNS = (
    ("runs", "pid_start", "TEXT"),
    ("sessions", "replayed_turns", "TEXT NOT NULL DEFAULT '[]'"),
    ("runs", "resumed", "INTEGER NOT NULL DEFAULT 0"),
    ("runs", "resumed_at", "REAL"),
    ("sessions", "trial_mark", "TEXT"),  # what its transcript says of it as a trial (issues.trials.transcript_mark)
)


MAX_SQL_PARAMS = 500  # parameters in one `IN (...)` list; longer lists are chunked


MAX_GROUP_COMMIT = 500  # writes committed in one transaction by `_write`; more wait for the next


PAGE_SESSIONS = 200  # sessions (with messages) read at a time by scoring and export ...


PAGE_BYTES = 32_000_000  # ... or fewer, once their messages hold this much JSON


def default_db_path() -> Path:
    home = os.environ.get("CONVSIM_HOME") or str(Path.home() / ".convsim")
    return Path(home).expanduser() / "convsim.sqlite"


@dataclass
class SessionTotals:
    """A run's sessions in aggregate, counted in SQL without reading a transcript."""

    sessions: int = 0
    done: int = 0  # sessions with a stop reason
    turns: int = 0
    steps: int = 0  # progress: max_turns per finished session, else its turns (at most max_turns)
    stop_reasons: dict[str, int] = field(default_factory=dict)
    usage: dict[str, Usage] = field(default_factory=dict)


@dataclass
class SessionRow:
    """One session for a summary: the session with only its last user and assistant messages, and the
    tally of its stored verdicts (per verdict: a per-turn scorer gives several)."""

    session: Session
    passed: int = 0
    failed: int = 0
    unscored: int = 0  # verdicts with no pass or fail (a value only, or an error)
    untested: int = 0  # verdicts that could not judge the agent: a judge's model failed, or the user broke its role


# Verdict tallies per session of one run (bound: the run id), read from the verdict JSON without parsing it
# in Python. A verdict stores `passed` only when it is not None (exclude_defaults); JSON true/false read 1/0.
_VERDICT_COUNTS = (
    "SELECT a.session_id, SUM(json_extract(a.data, '$.passed') = 1) AS passed, "
    "SUM(json_extract(a.data, '$.passed') = 0) AS failed, SUM(json_extract(a.data, '$.passed') IS NULL) AS unscored, "
    "SUM(COALESCE(json_extract(a.data, '$.error_kind') IN ('model', 'simulator'), 0)) AS untested "
    "FROM assessments a"
)
_VERDICT_TALLY = f"{_VERDICT_COUNTS} JOIN sessions x ON x.id = a.session_id WHERE x.run_id = ? GROUP BY a.session_id"
_FAILED_STOPS = ", ".join(f"'{r.value}'" for r in (StopReason.AGENT_ERROR, StopReason.AGENT_EMPTY))
_UNTESTED_STOPS = ", ".join(f"'{r.value}'" for r in (StopReason.SIMULATOR_ERROR, StopReason.CANCELLED))


class _Write:
    """One write waiting for a group commit (`Store._write`): the statements to run, then how it went."""

    __slots__ = ("fn", "args", "done", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]):
        self.fn, self.args = fn, args
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class Store:
    """Async facade over one SQLite database file."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser() if path else default_db_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise InvalidOption(f"cannot open the database at {self.path}: {e}; set CONVSIM_HOME or --db") from e
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._worker = DbWorker()
        self._pending: list[_Write] = []  # writes not yet handed to a commit
        self._committing: anyio.Event | None = None  # set when the commit under way has finished

    def _migrate(self) -> None:
        """Columns added since a database was created (another process may be adding them too)."""
        for table, column, decl in ADDED_COLUMNS:
            if column not in {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                try:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                except sqlite3.OperationalError:
                    if column not in {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                        raise

    async def _run(self, fn: Callable[..., R], *args: Any) -> R:
        return await self._worker.run(fn, *args)

    async def _write(self, fn: Callable[..., R], *args: Any) -> R:
        """Run `fn(*args)` (statements, no BEGIN/COMMIT of its own) in a transaction; return once committed.

        Group commit: while one commit is under way, the writes that arrive wait, and the first of them
        to wake commits them all in one transaction (in the order they came), so concurrent sessions
        share a worker-thread hop and a commit instead of paying one each. The caller returns (or raises
        what its own `fn` raised) only once its write is committed or rolled back. When a transaction of
        several fails, it is rolled back and each write runs again in its own, so one failing write
        fails alone. A write cancelled before its commit began is not made; one cancelled during its
        commit waits for it, as a thread call does.
        """
        write = _Write(fn, args)
        self._pending.append(write)
        try:
            while not write.done:
                if self._committing is None:
                    await self._commit_pending()
                else:
                    await self._committing.wait()
        except anyio.get_cancelled_exc_class():
            if write in self._pending:
                self._pending.remove(write)
            else:
                with anyio.CancelScope(shield=True):
                    while not write.done and self._committing is not None:
                        await self._committing.wait()
            raise
        if write.error is not None:
            raise write.error
        return write.result

    async def _commit_pending(self) -> None:
        batch, self._pending = self._pending[:MAX_GROUP_COMMIT], self._pending[MAX_GROUP_COMMIT:]
        committed = self._committing = anyio.Event()
        try:
            await self._run(self._commit, batch)
        finally:
            left = [w for w in batch if not w.done]
            if left:  # cancelled before its thread ran: the writes go to the next commit
                self._pending[:0] = left
            self._committing = None
            committed.set()

    def _commit(self, batch: list[_Write]) -> None:
        """(Worker thread.) The batch in one transaction; if that fails, each write in its own."""
        if len(batch) > 1:
            try:
                with self._db:
                    self._db.execute("BEGIN")
                    results = [w.fn(*w.args) for w in batch]
            except Exception:  # rolled back: which write failed, and why, is found one at a time below
                pass
            else:
                for w, result in zip(batch, results):
                    w.result, w.done = result, True
                return
        for w in batch:
            try:
                with self._db:
                    self._db.execute("BEGIN")
                    w.result = w.fn(*w.args)
            except Exception as e:
                w.error = e
            w.done = True

    def close(self) -> None:
        self._db.close()
        self._worker.stop()

    # --- runs -----------------------------------------------------------------------------------

    async def create_run(
        self,
        *,
        run_id: str,
        kind: str,
        target: dict[str, Any],
        options: dict[str, Any],
        model: str,
        offline: bool,
        test_cases: list[TestCase],
        sessions_total: int,
    ) -> None:
        def write() -> None:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute(
                    "INSERT INTO runs (id, kind, status, created_at, target, options, model, offline, sessions_total,"
                    " pid, pid_start) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, kind, RunStatus.RUNNING.value, time.time(), _clean(json.dumps(target)),
                     _clean(json.dumps(options)), model, int(offline), sessions_total, os.getpid(), _own_stamp()),
                )
                self._db.executemany(
                    "INSERT INTO test_cases (run_id, idx, data) VALUES (?, ?, ?)",
                    [(run_id, i, _clean(c.model_dump_json())) for i, c in enumerate(test_cases)],
                )

        await self._run(write)

    async def set_run_cases(self, run_id: str, test_cases: list[TestCase], sessions_total: int) -> None:
        """Attach test cases to a run created before they existed (test_agent generates them inside the run)."""

        def write() -> None:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute("DELETE FROM test_cases WHERE run_id = ?", (run_id,))
                self._db.executemany("INSERT INTO test_cases (run_id, idx, data) VALUES (?, ?, ?)",
                                     [(run_id, i, _clean(c.model_dump_json())) for i, c in enumerate(test_cases)])
                self._db.execute("UPDATE runs SET sessions_total = ? WHERE id = ?", (sessions_total, run_id))

        await self._run(write)

    async def finish_run(self, run_id: str, status: RunStatus, error: str | None = None) -> None:
        await self._run(
            lambda: self._db.execute(
                "UPDATE runs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                (status.value, _clean(error) if error else None, time.time(), run_id),
            )
        )

    async def update_run_options(self, run_id: str, **values: Any) -> None:
        """Add to a run's stored options what it learns as it goes (test_agent: its test set), for a resume."""

        def write() -> None:
            with self._db:
                self._db.execute("BEGIN")
                row = self._db.execute("SELECT options FROM runs WHERE id = ?", (run_id,)).fetchone()
                if row is not None:
                    options = {**json.loads(row["options"]), **values}
                    self._db.execute("UPDATE runs SET options = ? WHERE id = ?", (_clean(json.dumps(options)), run_id))

        await self._run(write)

    async def reopen_run(self, run_id: str, reopen: Sequence[str], drop: dict[str, int]) -> bool:
        """Take an interrupted or cancelled run back into this process to resume it, in one transaction.

        The run becomes 'running' under this process (so a kill leaves it 'interrupted' again), its
        `resumed` count goes up; the sessions `reopen` lose their stop reason (they are played on), and
        the messages of `drop` (session id -> first seq to discard: a partial reply) are deleted.
        False, with nothing changed, when the run is no longer interrupted or cancelled (another
        process took it first).
        """

        def write() -> bool:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                changed = self._db.execute(
                    "UPDATE runs SET status = ?, error = NULL, finished_at = NULL, pid = ?, pid_start = ?, "
                    "resumed = resumed + 1, resumed_at = ? WHERE id = ? AND status IN (?, ?)",
                    (RunStatus.RUNNING.value, os.getpid(), _own_stamp(), time.time(), run_id,
                     RunStatus.INTERRUPTED.value, RunStatus.CANCELLED.value)).rowcount
                if not changed:
                    return False
                for chunk in _chunks(list(reopen), MAX_SQL_PARAMS - 1):
                    self._db.execute(f"UPDATE sessions SET stop_reason = NULL, stop_detail = NULL, finished_at = NULL "
                                     f"WHERE run_id = ? AND id IN ({_marks(chunk)})", [run_id, *chunk])
                for session_id, seq in drop.items():
                    self._db.execute("DELETE FROM messages WHERE session_id = ? AND seq >= ?", (session_id, seq))
                return True

        return await self._run(write)

    async def get_run(self, run_id: str) -> dict[str, Any]:
        """One run; 'interrupted' if it was left running by a process that has died."""

        def read() -> dict[str, Any] | None:
            dead = self._sweep([run_id])
            row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            return _run_row(row, dead) if row is not None else None

        run = await self._run(read)
        if run is None:
            raise NotFound(f"no run with id '{run_id}'; call list_runs to see the runs there are")
        return run

    async def list_runs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The most recent runs, newest first (dead processes' runs read 'interrupted')."""

        def read() -> list[dict[str, Any]]:
            dead = self._sweep()
            rows = self._db.execute("SELECT * FROM runs ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
            return [_run_row(r, dead) for r in rows]

        return await self._run(read)

    async def get_test_cases(self, run_id: str) -> list[TestCase]:
        rows = await self._run(
            lambda: self._db.execute("SELECT data FROM test_cases WHERE run_id = ? ORDER BY idx", (run_id,)).fetchall()
        )
        return [TestCase.model_validate_json(r["data"]) for r in rows]

    async def mark_interrupted(self) -> int:
        """Runs left 'running' by a process that no longer exists become 'interrupted'. Returns how many."""
        return await self._run(lambda: len(self._sweep()))

    def _sweep(self, run_ids: Sequence[str] | None = None) -> set[str]:
        """Mark runs whose process has died 'interrupted' (of `run_ids`, or all); returns their ids.

        Cheap enough for every read: only rows still 'running' are looked at (an index), and a
        process is checked with one signal 0 and one read of /proc. On a read-only database the
        ids are still returned, so readers report the status they could not record.
        """
        running = RunStatus.RUNNING.value
        if run_ids is None:
            rows = self._db.execute("SELECT id, pid, pid_start FROM runs WHERE status = ?", (running,)).fetchall()
        else:
            rows = []
            for chunk in _chunks(run_ids, MAX_SQL_PARAMS - 1):  # and the status
                rows += self._db.execute(
                    f"SELECT id, pid, pid_start FROM runs WHERE status = ? AND id IN ({_marks(chunk)})",
                    [running, *chunk]).fetchall()
        dead = {r["id"] for r in rows if not _process_alive(r["pid"], r["pid_start"])}
        if not dead:
            return dead
        try:
            with self._db:
                self._db.execute("BEGIN")
                for run_id in dead:
                    self._db.execute(
                        "UPDATE runs SET status = ?, error = ? WHERE id = ? AND status = ?",
                        (RunStatus.INTERRUPTED.value, INTERRUPTED_ERROR, run_id, running),
                    )
                    self._db.execute(
                        "UPDATE sessions SET stop_reason = ?, stop_detail = ?, finished_at = ? "
                        "WHERE run_id = ? AND stop_reason IS NULL",
                        (StopReason.CANCELLED.value, "run interrupted", time.time(), run_id),
                    )
        except sqlite3.Error as e:  # read-only or locked: report it, record it next time
            log.warning("could not record %d interrupted run(s): %s", len(dead), e)
        return dead

    # --- sessions and messages ------------------------------------------------------------------

    async def create_session(self, session: Session) -> None:
        await self._run(
            lambda: self._db.execute(
                "INSERT INTO sessions (id, run_id, case_index, repeat, started_at, metadata) VALUES (?, ?, ?, ?, ?, ?)",
                (session.id, session.run_id, session.case_index, session.repeat, session.started_at,
                 _clean(json.dumps(session.metadata))),
            )
        )

    async def create_sessions(self, run_id: str, planned: Sequence[tuple[str, int | None, int]]) -> None:
        """Rows for a run's planned sessions, (id, case index, repeat) each, in one transaction.

        A run of 10,000 sessions is one executemany, not 10,000 writes (see `create_session` for one).
        """

        def write() -> None:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO sessions (id, run_id, case_index, repeat) VALUES (?, ?, ?, ?)",
                                     ((sid, run_id, i, r) for sid, i, r in planned))

        if planned:
            await self._run(write)

    async def end_open_sessions(self, run_id: str, reason: StopReason, detail: str | None) -> int:
        """Give every session of the run still without a stop reason this one (sessions never started, when a
        run is cancelled or stopped), in one statement; their turns and usage stay as stored. Returns how many."""
        return await self._run(lambda: self._db.execute(
            "UPDATE sessions SET stop_reason = ?, stop_detail = ?, finished_at = ? WHERE run_id = ? "
            "AND stop_reason IS NULL", (reason.value, _clean(detail) if detail else None, time.time(), run_id)).rowcount)

    async def add_message(self, session_id: str, seq: int, message: Message, turns: int) -> None:
        """Append one message and update the session's turn count, atomically; returns once committed."""
        await self._write(self._insert_message, session_id, seq, message, turns)

    def _insert_message(self, session_id: str, seq: int, message: Message, turns: int) -> None:
        self._db.execute(
            "INSERT INTO messages (session_id, seq, data, created_at) VALUES (?, ?, ?, ?)",
            (session_id, seq, _clean(message.model_dump_json(exclude_defaults=True)), time.time()),
        )
        self._db.execute("UPDATE sessions SET turns = ? WHERE id = ?", (turns, session_id))

    async def finish_session(self, session: Session, *, trial_mark: str | None = None) -> None:
        """Record how a session ended (and, for a repeated run, its transcript's `trial_mark`, so that polling its
        trials reads no transcript; None: not known, read it when needed); returns once committed."""
        await self._write(self._update_finished, session, trial_mark)

    def _update_finished(self, session: Session, trial_mark: str | None = None) -> None:
        self._db.execute(
            "UPDATE sessions SET stop_reason = ?, stop_detail = ?, turns = ?, finished_at = ?, usage = ?,"
            " replayed_turns = ?, trial_mark = ?, started_at = COALESCE(started_at, ?) WHERE id = ?",
            (session.stop_reason.value if session.stop_reason else None,  # started_at: set once it played
             _clean(session.stop_detail) if session.stop_detail else None, session.turns,
             session.finished_at, json.dumps({k: u.model_dump() for k, u in session.usage.items()}),
             json.dumps(session.replayed_turns), trial_mark, session.started_at, session.id),
        )

    async def trial_marks(self, session_ids: Sequence[str]) -> dict[str, str | None]:
        """The stored `trial_mark` of each of these sessions (None where none was stored)."""

        def read() -> dict[str, str | None]:
            return {r[0]: r[1] for chunk in _chunks(session_ids) for r in self._db.execute(
                f"SELECT id, trial_mark FROM sessions WHERE id IN ({_marks(chunk)})", chunk)}

        return await self._run(read)

    async def session_ids(self, run_id: str) -> list[str]:
        """A run's session ids in run order (case, repeat, start): small enough to hold for any run."""
        rows = await self._run(lambda: self._db.execute(
            "SELECT id FROM sessions WHERE run_id = ? ORDER BY case_index, repeat, started_at", (run_id,)).fetchall())
        return [r[0] for r in rows]

    async def session_runs(self, session_ids: Sequence[str]) -> dict[str, str]:
        """Which run each of these sessions belongs to (unknown ids are left out)."""

        def read() -> dict[str, str]:
            found: dict[str, str] = {}
            for chunk in _chunks(session_ids):
                found.update((r[0], r[1]) for r in self._db.execute(
                    f"SELECT id, run_id FROM sessions WHERE id IN ({_marks(chunk)})", chunk))
            return found

        return await self._run(read)

    async def get_sessions(self, run_id: str, *, with_messages: bool = True) -> list[Session]:
        """Every session of a run, in memory: read a big run with `iter_sessions` instead."""
        return await self.get_sessions_by_ids(await self.session_ids(run_id), with_messages=with_messages)

    async def get_sessions_by_ids(self, session_ids: Sequence[str], *, with_messages: bool = True) -> list[Session]:
        """These sessions in the order given; unknown ids are skipped."""
        out: list[Session] = []
        for chunk in _chunks(session_ids):
            out += await self._run(self._load_sessions, chunk, "all" if with_messages else "none")
        return out

    async def iter_sessions(self, run_id: str | None = None, *, session_ids: Sequence[str] | None = None,
                            page: int = PAGE_SESSIONS, with_messages: bool = True) -> AsyncIterator[list[Session]]:
        """The sessions of a run (or these ids) with their messages, a page at a time: at most `page`
        sessions, and fewer once their messages pass PAGE_BYTES (at least one). Memory stays flat."""
        ids = session_ids if session_ids is not None else await self.session_ids(run_id or "")
        i = 0
        while i < len(ids):
            if with_messages:
                sessions, used = await self._run(self._load_page, ids[i:i + page], PAGE_BYTES)
            else:
                sessions, used = await self._run(self._load_sessions, ids[i:i + page], "none"), page
            i += used
            yield sessions

    async def stopped_sessions(self, reason: StopReason, *, session_ids: Sequence[str]) -> list[tuple[str, str | None]]:
        """(id, stop detail) of those of these sessions that ended with `reason`."""

        def read() -> list[tuple[str, str | None]]:
            return [(r[0], r[1]) for chunk in _chunks(session_ids, MAX_SQL_PARAMS - 1) for r in self._db.execute(
                f"SELECT id, stop_detail FROM sessions WHERE stop_reason = ? AND id IN ({_marks(chunk)})",
                (reason.value, *chunk))]

        return await self._run(read)

    async def get_session_previews(self, run_id: str, limit: int) -> list[Session]:
        """The first `limit` sessions of a run, each with only its last user and last assistant message.

        Enough to summarise a session (`summarize_session`) without reading its transcript.
        """
        ids = await self._run(lambda: [r[0] for r in self._db.execute(
            "SELECT id FROM sessions WHERE run_id = ? ORDER BY case_index, repeat, started_at LIMIT ?",
            (run_id, limit))])
        return await self._run(self._load_sessions, ids, "last") if ids else []

    async def session_rows(self, run_id: str, *, offset: int = 0, limit: int = 50,
                           attention_first: bool = False) -> tuple[list[SessionRow], int]:
        """A page of a run's sessions as summary rows, and how many sessions the run has.

        Each row is the session without its transcript (only its last user and last assistant message,
        enough for `summarize_session`) plus the tally of its stored verdicts, counted in SQL: no
        transcript and no verdict is parsed beyond the page. In run order (case, repeat), or with
        `attention_first` the sessions that failed (the agent crashed or went silent, or a verdict
        failed) first, then those that could not test the agent (the simulated user failed, the
        session was cancelled, or a verdict could not be given), then the rest, each group in run order.
        """

        def read() -> tuple[list[SessionRow], int]:
            total = self._db.execute("SELECT COUNT(*) FROM sessions WHERE run_id = ?", (run_id,)).fetchone()[0]
            run_order = "s.case_index, s.repeat, s.started_at"
            if attention_first:  # the order needs every session's tally
                rows = self._db.execute(
                    "SELECT s.id, COALESCE(v.passed, 0), COALESCE(v.failed, 0), COALESCE(v.unscored, 0), "
                    f"COALESCE(v.untested, 0) FROM sessions s LEFT JOIN ({_VERDICT_TALLY}) v ON v.session_id = s.id "
                    f"WHERE s.run_id = ? ORDER BY CASE WHEN s.stop_reason IN ({_FAILED_STOPS}) OR "
                    f"COALESCE(v.failed, 0) > 0 THEN 0 WHEN s.stop_reason IN ({_UNTESTED_STOPS}) OR "
                    f"COALESCE(v.untested, 0) > 0 THEN 1 ELSE 2 END, {run_order} LIMIT ? OFFSET ?",
                    (run_id, run_id, max(limit, 0), max(offset, 0))).fetchall()
            else:  # only the page's
                ids = [r[0] for r in self._db.execute(
                    f"SELECT s.id FROM sessions s WHERE s.run_id = ? ORDER BY {run_order} LIMIT ? OFFSET ?",
                    (run_id, max(limit, 0), max(offset, 0)))]
                tallies: dict[str, tuple[int, ...]] = {}
                for chunk in _chunks(ids):
                    tallies.update((r[0], tuple(r[1:])) for r in self._db.execute(
                        f"{_VERDICT_COUNTS} WHERE a.session_id IN ({_marks(chunk)}) GROUP BY a.session_id", chunk))
                rows = [(sid, *tallies.get(sid, (0, 0, 0, 0))) for sid in ids]
            heads = {s.id: s for s in self._load_sessions([r[0] for r in rows], "last")}
            return [SessionRow(heads[r[0]], passed=r[1], failed=r[2], unscored=r[3], untested=r[4])
                    for r in rows if r[0] in heads], total

        return await self._run(read)

    async def session_totals(self, run_id: str, max_turns: int) -> SessionTotals:
        """Counts, turns, progress steps, stop reasons and usage of a run's sessions, without transcripts."""

        def read() -> SessionTotals:
            t = SessionTotals()
            for reason, n, turns, capped in self._db.execute(
                    "SELECT stop_reason, COUNT(*), SUM(turns), SUM(MIN(turns, ?)) FROM sessions WHERE run_id = ? "
                    "GROUP BY stop_reason ORDER BY stop_reason", (max_turns, run_id)):
                t.sessions += n
                t.turns += turns or 0
                if reason:
                    t.done += n
                    t.steps += n * max_turns
                    t.stop_reasons[reason] = n
                else:
                    t.steps += capped or 0
            for (usage,) in self._db.execute("SELECT usage FROM sessions WHERE run_id = ? AND usage != '{}'",
                                             (run_id,)):
                for role, u in json.loads(usage).items():
                    t.usage = add_usage(t.usage, role, Usage.model_validate(u))
            return t

        return await self._run(read)

    async def get_session(self, session_id: str, run_id: str | None = None) -> Session:
        found = await self._run(self._load_sessions, [session_id], "all")
        if not found or (run_id and found[0].run_id != run_id):
            where = f" in run '{run_id}'" if run_id else ""
            raise NotFound(f"no session with id '{session_id}'{where}; call get_run to list a run's sessions")
        return found[0]

    def _load_sessions(self, ids: Sequence[str], messages: str) -> list[Session]:
        """Sessions by id, in the order given; `messages`: 'all', 'last' or 'none'."""
        if len(ids) > MAX_SQL_PARAMS:
            return [s for chunk in _chunks(ids) for s in self._load_sessions(chunk, messages)]
        if not ids:
            return []
        marks = _marks(ids)
        rows = {r["id"]: r for r in self._db.execute(
            "SELECT s.*, t.data AS case_data FROM sessions s LEFT JOIN test_cases t "
            f"ON t.run_id = s.run_id AND t.idx = s.case_index WHERE s.id IN ({marks})", list(ids))}
        transcripts: dict[str, list[Message]] = {}
        if messages == "all":
            for r in self._db.execute(f"SELECT session_id, data FROM messages WHERE session_id IN ({marks}) "
                                      "ORDER BY session_id, seq", list(ids)):
                transcripts.setdefault(r[0], []).append(Message.model_validate_json(r[1]))
        elif messages == "last":
            transcripts = {sid: self._last_messages(sid) for sid in rows}
        cases: dict[tuple[str, int], TestCase] = {}  # repeats of a case share one parsed TestCase
        out = []
        for sid in ids:
            row = rows.get(sid)
            if row is None:
                continue
            case = None
            if row["case_data"] is not None:
                key = (row["run_id"], row["case_index"])
                case = cases.get(key) or cases.setdefault(key, TestCase.model_validate_json(row["case_data"]))
            out.append(_session(row, case, transcripts.get(sid, [])))
        return out

    def _load_page(self, ids: Sequence[str], max_bytes: int) -> tuple[list[Session], int]:
        """The first of `ids` whose messages fit in `max_bytes` of JSON (at least one), with their messages;
        returns them and how many ids were used."""
        heads = {s.id: s for s in self._load_sessions(ids, "none")}
        out: list[Session] = []
        size = 0
        for used, sid in enumerate(ids, 1):
            head = heads.get(sid)
            if head is None:
                continue
            messages = []
            for (data,) in self._db.execute("SELECT data FROM messages WHERE session_id = ? ORDER BY seq", (sid,)):
                size += len(data)
                messages.append(Message.model_validate_json(data))
            out.append(head.model_copy(update={"messages": messages}))
            if size >= max_bytes:
                return out, used
        return out, len(ids)

    def _last_messages(self, session_id: str) -> list[Message]:
        """The last user message and the last assistant message of a session, in transcript order."""
        found: dict[str, tuple[int, Message]] = {}
        cursor = self._db.execute("SELECT seq, data FROM messages WHERE session_id = ? ORDER BY seq DESC",
                                  (session_id,))
        try:
            for seq, data in cursor:
                m = Message.model_validate_json(data)
                if m.role in ("user", "assistant"):
                    found.setdefault(m.role, (seq, m))
                    if len(found) == 2:
                        break
        finally:
            cursor.close()
        return [m for _, m in sorted(found.values(), key=lambda x: x[0])]

    # --- assessments ----------------------------------------------------------------------------

    async def save_assessments(self, assessments: list[Assessment]) -> None:
        """Store verdicts; scoring a session again with the same scorer replaces the earlier verdict."""

        def write() -> None:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO assessments (session_id, scorer, turn, data, created_at) VALUES (?, ?, ?, ?, ?)",
                    [(a.session_id, a.scorer, -1 if a.turn is None else a.turn,
                      _clean(a.model_dump_json(exclude_defaults=True)), a.created_at or time.time())
                     for a in assessments],
                )

        if assessments:
            await self._run(write)

    async def get_assessments(self, session_ids: Sequence[str]) -> list[Assessment]:
        """Verdicts on these sessions, grouped by session (in memory: page with `iter_assessments`)."""
        out: list[Assessment] = []
        async with aclosing(self.iter_assessments(session_ids)) as pages:
            async for page in pages:
                out += page
        return out

    async def iter_assessments(self, session_ids: Sequence[str]) -> AsyncIterator[list[Assessment]]:
        """Verdicts on these sessions, MAX_SQL_PARAMS sessions at a time; each page grouped by session."""

        def read(chunk: Sequence[str]) -> list[Assessment]:
            return [Assessment.model_validate_json(r["data"]) for r in self._db.execute(
                f"SELECT data FROM assessments WHERE session_id IN ({_marks(chunk)}) "
                "ORDER BY session_id, scorer, turn", list(chunk))]

        for chunk in _chunks(session_ids):
            yield await self._run(read, chunk)

    # --- test sets and reports ------------------------------------------------------------------

    async def save_test_set(self, test_set: TestSet) -> None:
        await self._run(lambda: self._db.execute(
            "INSERT OR REPLACE INTO test_sets (id, name, created_at, data) VALUES (?, ?, ?, ?)",
            (test_set.id, _clean(test_set.name), test_set.created_at, _clean(test_set.model_dump_json())),
        ))

    async def get_test_set(self, set_id: str) -> TestSet:
        row = await self._run(lambda: self._db.execute("SELECT data FROM test_sets WHERE id = ?", (set_id,)).fetchone())
        if row is None:
            raise NotFound(f"no test set with id '{set_id}'; generate_test_cases returns test set ids")
        return TestSet.model_validate_json(row["data"])

    async def save_report(self, report: Report, markdown: str) -> None:
        await self._run(lambda: self._db.execute(
            "INSERT OR REPLACE INTO reports (run_id, data, markdown, created_at) VALUES (?, ?, ?, ?)",
            (report.run_id, _clean(report.model_dump_json()), _clean(markdown), time.time()),
        ))

    async def get_report(self, run_id: str) -> tuple[Report, str]:
        row = await self._run(
            lambda: self._db.execute("SELECT data, markdown FROM reports WHERE run_id = ?", (run_id,)).fetchone()
        )
        if row is None:
            await self.get_run(run_id)  # NotFound for an unknown run
            raise NotFound(f"run '{run_id}' has no report yet: reports come from test_agent runs once they finish")
        return Report.model_validate_json(row["data"]), row["markdown"]

    # --- response cache (engine.llm.ResponseCache) ----------------------------------------------

    async def cache_get(self, key: str) -> str | None:
        """The cached reply for a request key, counting the hit; None when there is none."""

        def read() -> str | None:
            row = self._db.execute("SELECT output FROM llm_cache WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            try:
                self._db.execute("UPDATE llm_cache SET hits = hits + 1, last_hit_at = ? WHERE key = ?",
                                 (time.time(), key))
            except sqlite3.Error as e:  # a read-only database still serves its hits
                log.debug("could not count a cache hit: %s", e)
            return row["output"]

        return await self._run(read)

    async def cache_put(self, key: str, output: str, *, model: str, role: str, schema: str) -> None:
        """Store a validated reply, replacing what the key held (a stale entry that no longer validates)."""
        await self._run(lambda: self._db.execute(
            "INSERT OR REPLACE INTO llm_cache (key, output, model, role, schema, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (key, _clean(output), _clean(model), role, schema, time.time())))

    async def cache_delete(self, key: str) -> None:
        await self._run(lambda: self._db.execute("DELETE FROM llm_cache WHERE key = ?", (key,)))

    async def cache_stats(self) -> dict[str, int]:
        """Entries and hits served, for people deciding whether to clear it."""
        row = await self._run(lambda: self._db.execute(
            "SELECT COUNT(*) AS entries, COALESCE(SUM(hits), 0) AS hits FROM llm_cache").fetchone())
        return {"entries": row["entries"], "hits": row["hits"]}

    async def clear_cache(self) -> int:
        """Delete every cached reply; returns how many there were."""
        return await self._run(lambda: self._db.execute("DELETE FROM llm_cache").rowcount)

    # --- JSONL export / import ------------------------------------------------------------------

    async def iter_export(self, run_id: str) -> AsyncIterator[str]:
        """One JSON line per session (see `export_jsonl`), read a page of sessions at a time."""
        await self.get_run(run_id)
        async with aclosing(self.iter_sessions(run_id)) as pages:
            async for page in pages:
                for s in page:
                    yield json.dumps(session_to_record(s), ensure_ascii=False)

    async def export_jsonl(self, run_id: str) -> list[str]:
        """One JSON line per session: OpenAI-format messages plus test case, stop reason and metadata."""
        async with aclosing(self.iter_export(run_id)) as lines:
            return [line async for line in lines]

    async def import_file(self, path: str | Path, *, source: str | None = None) -> str:
        """Store a JSONL file (our export format, or one message list per line) as a new run; returns its id.

        A first pass counts the transcripts (and checks line lengths) without parsing, so a file
        over MAX_TRANSCRIPTS is refused before anything is stored; the second parses line by line
        and inserts in batches. Memory stays flat whatever the file's size.
        """
        path = Path(path)
        source = source or str(path)
        total = None
        if path.is_file():  # a pipe or device cannot be read twice: its count is checked as it streams
            total = await anyio.to_thread.run_sync(_count_file, path, source)
        return await self._import(_parse_file(path, source), source=source, total=total)

    async def import_jsonl(self, lines: Iterable[str | bytes], *, source: str = "import") -> str:
        """Store sessions from JSONL lines (a list, or any iterable: streamed) as a new run; returns its id."""
        total = None
        if isinstance(lines, (list, tuple)):
            total = sum(1 for line in lines if line.strip())
        return await self._import((_parse_line(line, n) for n, line in _numbered(lines)), source=source, total=total)

    async def import_records(self, records: Sequence[Any], *, source: str = "inline transcripts",
                             what: str = "transcript") -> str:
        """Store decoded records (see `record_to_session`; numbered from 1 in errors) as a new run."""
        return await self._import((record_to_session(r, i, what=what) for i, r in enumerate(records, 1)),
                                  source=source, total=len(records))

    async def import_sessions(self, sessions: Iterable[Session], *, source: str = "import") -> str:
        """Store already-parsed sessions (see `record_to_session`) as a new run; returns its id."""
        total = len(sessions) if isinstance(sessions, (list, tuple)) else None
        return await self._import(iter(sessions), source=source, total=total)

    async def _import(self, sessions: Iterator[Session], *, source: str, total: int | None) -> str:
        """All or nothing: sessions are inserted in batches (a transaction each); on any error the run is
        deleted again. `total`, when known, is checked against MAX_TRANSCRIPTS before anything is stored."""
        try:
            if total is not None:
                _check_count(total, source)
            run_id = new_run_id()
            await self.create_run(run_id=run_id, kind="import", target={"source": source}, options={},
                                  model="n/a", offline=False, test_cases=[], sessions_total=total or 0)
            stored = 0
            try:
                while batch := await anyio.to_thread.run_sync(_take_batch, sessions):
                    if stored + len(batch) > MAX_TRANSCRIPTS:
                        _check_count(stored + len(batch), source, more=True)
                    await self._run(self._insert_batch, run_id, batch, stored)
                    stored += len(batch)
                _check_count(stored, source)
                await self._run(lambda: self._db.execute(
                    "UPDATE runs SET status = ?, finished_at = ?, sessions_total = ? WHERE id = ?",
                    (RunStatus.COMPLETED.value, time.time(), stored, run_id)))
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._run(self._delete_run, run_id)
                raise
            return run_id
        finally:
            close = getattr(sessions, "close", None)
            if close:
                close()

    def _insert_batch(self, run_id: str, batch: list[Session], start: int) -> None:
        """Insert sessions with their cases and messages in one transaction (ids already taken are renamed)."""
        for s in batch:
            s.id = _clean(s.id)  # ids are text from the file too
        ids = [s.id for s in batch]
        taken: set[str] = set()
        for chunk in _chunks(ids):
            taken.update(r[0] for r in self._db.execute(f"SELECT id FROM sessions WHERE id IN ({_marks(chunk)})", chunk))
        seen: set[str] = set()
        for s in batch:
            if s.id in taken or s.id in seen:  # already in this database or earlier in the file: keep both
                s.metadata["original_session_id"] = s.id
                s.id = new_session_id()
            seen.add(s.id)
        now = time.time()
        cases, rows, messages = [], [], []
        for i, s in enumerate(batch, start):
            s.run_id, s.case_index = run_id, i
            case = s.test_case or TestCase(goal="(imported conversation)")
            cases.append((run_id, i, _clean(case.model_dump_json())))
            rows.append((s.id, run_id, i, s.repeat, s.stop_reason.value if s.stop_reason else None,
                         _clean(s.stop_detail) if s.stop_detail else None, s.turns, s.started_at, s.finished_at,
                         _clean(json.dumps({k: u.model_dump() for k, u in s.usage.items()})),
                         _clean(json.dumps(s.metadata)), json.dumps(s.replayed_turns)))
            messages += [(s.id, seq, _clean(m.model_dump_json(exclude_defaults=True)), now)
                         for seq, m in enumerate(s.messages)]
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO test_cases (run_id, idx, data) VALUES (?, ?, ?)", cases)
            self._db.executemany(
                "INSERT INTO sessions (id, run_id, case_index, repeat, stop_reason, stop_detail, turns, started_at,"
                " finished_at, usage, metadata, replayed_turns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._db.executemany("INSERT INTO messages (session_id, seq, data, created_at) VALUES (?, ?, ?, ?)",
                                 messages)

    def _delete_run(self, run_id: str) -> None:
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute("DELETE FROM runs WHERE id = ?", (run_id,))  # cascades to its sessions
        except sqlite3.Error as e:
            log.warning("could not remove the partial import %s: %s", run_id, e)


INTERRUPTED_ERROR = "the process running it exited before it finished"

def _chunks(items: Sequence[T], size: int = MAX_SQL_PARAMS) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _marks(items: Sequence[Any]) -> str:
    return ",".join("?" * len(items))


def _session(row: sqlite3.Row, case: TestCase | None, messages: list[Message]) -> Session:
    return Session(
        id=row["id"],
        run_id=row["run_id"],
        case_index=row["case_index"],
        repeat=row["repeat"],
        test_case=case,
        messages=messages,
        stop_reason=StopReason(row["stop_reason"]) if row["stop_reason"] else None,
        stop_detail=row["stop_detail"],
        turns=row["turns"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        usage={k: Usage.model_validate(v) for k, v in json.loads(row["usage"]).items()},
        metadata=json.loads(row["metadata"]),
        replayed_turns=json.loads(row["replayed_turns"]),
    )


def _run_row(row: sqlite3.Row, dead: Collection[str] = ()) -> dict[str, Any]:
    d = dict(row)
    d.pop("pid_start", None)
    d["target"] = json.loads(d["target"])
    d["options"] = json.loads(d["options"])
    d["offline"] = bool(d["offline"])
    if d["id"] in dead and d["status"] == RunStatus.RUNNING.value:  # seen dead, but not recorded (read-only)
        d["status"], d["error"] = RunStatus.INTERRUPTED.value, INTERRUPTED_ERROR
    return d


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, 'boot id:start time') of a process from Linux /proc; None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip().decode()
        fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime 22
        return fields[0].decode(), f"{boot}:{int(fields[19])}"
    except (OSError, ValueError, IndexError):
        return None


_stamps: dict[int, str | None] = {}


def _own_stamp() -> str | None:
    """This process's start stamp (per pid, so a forked child gets its own)."""
    pid = os.getpid()
    if pid not in _stamps:
        stat = _proc_stat(pid)
        _stamps[pid] = stat[1] if stat else None
    return _stamps[pid]


def _process_alive(pid: int | None, stamp: str | None) -> bool:
    """Is the process that created a run still running? A recycled pid (other start stamp) is not."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # another user's process: it exists; its start time is not ours to read
    except (OSError, OverflowError):
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc (macOS): the signal says it exists
    state, current = stat
    if state in ("Z", "X"):  # exited, not yet reaped by its parent
        return False
    return stamp is None or stamp == current
