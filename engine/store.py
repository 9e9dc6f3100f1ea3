"""SQLite storage for runs, test cases, sessions and messages.

Every message is written as its turn completes, so a crashed agent, a failed
model call or a cancelled job keeps every completed turn. One connection, in
WAL mode, used from one worker thread at a time (a CapacityLimiter of 1), so
the event loop never blocks on disk and writes never contend.

Nothing secret is stored: target specs arrive already redacted
(`targets.redacted_spec`), model API keys never reach this module, and every
text written passes through `secrets.redact` (`_clean`) on its way in, so a
key that an agent or a provider echoed is masked in the tables and the WAL.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import anyio

from .errors import InvalidOption, NotFound
from .secrets import redact as _clean
from .models import (
    Assessment,
    Message,
    Report,
    RunStatus,
    Session,
    StopReason,
    TestCase,
    TestSet,
    Usage,
)

R = TypeVar("R")

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
    pid INTEGER
);
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
    metadata TEXT NOT NULL DEFAULT '{}'
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
"""


def default_db_path() -> Path:
    home = os.environ.get("CONVSIM_HOME") or str(Path.home() / ".convsim")
    return Path(home).expanduser() / "convsim.sqlite"


def new_run_id() -> str:
    return "run-" + uuid.uuid4().hex[:12]


def new_session_id() -> str:
    return "sim-" + uuid.uuid4().hex[:16]


def new_test_set_id() -> str:
    return "set-" + uuid.uuid4().hex[:12]


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
        self._limiter = anyio.CapacityLimiter(1)

    async def _run(self, fn: Callable[..., R], *args: Any) -> R:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def close(self) -> None:
        self._db.close()

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
                    "INSERT INTO runs (id, kind, status, created_at, target, options, model, offline, sessions_total, pid)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, kind, RunStatus.RUNNING.value, time.time(), _clean(json.dumps(target)),
                     _clean(json.dumps(options)), model, int(offline), sessions_total, os.getpid()),
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

    async def get_run(self, run_id: str) -> dict[str, Any]:
        row = await self._run(lambda: self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())
        if row is None:
            raise NotFound(f"no run with id '{run_id}'; call list_runs to see the runs there are")
        return _run_row(row)

    async def list_runs(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = await self._run(
            lambda: self._db.execute("SELECT * FROM runs ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
        )
        return [_run_row(r) for r in rows]

    async def get_test_cases(self, run_id: str) -> list[TestCase]:
        rows = await self._run(
            lambda: self._db.execute("SELECT data FROM test_cases WHERE run_id = ? ORDER BY idx", (run_id,)).fetchall()
        )
        return [TestCase.model_validate_json(r["data"]) for r in rows]

    async def mark_interrupted(self) -> int:
        """Runs left 'running' by a process that no longer exists become 'interrupted'. Returns how many."""

        def sweep() -> int:
            rows = self._db.execute("SELECT id, pid FROM runs WHERE status = ?", (RunStatus.RUNNING.value,)).fetchall()
            dead = [r["id"] for r in rows if r["pid"] != os.getpid() and not _pid_alive(r["pid"])]
            for run_id in dead:
                self._db.execute(
                    "UPDATE runs SET status = ?, error = ? WHERE id = ?",
                    (RunStatus.INTERRUPTED.value, "the process running it exited before it finished", run_id),
                )
                self._db.execute(
                    "UPDATE sessions SET stop_reason = ?, stop_detail = ?, finished_at = ? "
                    "WHERE run_id = ? AND stop_reason IS NULL",
                    (StopReason.CANCELLED.value, "run interrupted", time.time(), run_id),
                )
            return len(dead)

        return await self._run(sweep)

    # --- sessions and messages ------------------------------------------------------------------

    async def create_session(self, session: Session) -> None:
        await self._run(
            lambda: self._db.execute(
                "INSERT INTO sessions (id, run_id, case_index, repeat, started_at, metadata) VALUES (?, ?, ?, ?, ?, ?)",
                (session.id, session.run_id, session.case_index, session.repeat, session.started_at,
                 _clean(json.dumps(session.metadata))),
            )
        )

    async def add_message(self, session_id: str, seq: int, message: Message, turns: int) -> None:
        """Append one message and update the session's turn count, atomically."""

        def write() -> None:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute(
                    "INSERT INTO messages (session_id, seq, data, created_at) VALUES (?, ?, ?, ?)",
                    (session_id, seq, _clean(message.model_dump_json(exclude_defaults=True)), time.time()),
                )
                self._db.execute("UPDATE sessions SET turns = ? WHERE id = ?", (turns, session_id))

        await self._run(write)

    async def finish_session(self, session: Session) -> None:
        await self._run(
            lambda: self._db.execute(
                "UPDATE sessions SET stop_reason = ?, stop_detail = ?, turns = ?, finished_at = ?, usage = ? WHERE id = ?",
                (session.stop_reason.value if session.stop_reason else None,
                 _clean(session.stop_detail) if session.stop_detail else None, session.turns,
                 session.finished_at, json.dumps({k: u.model_dump() for k, u in session.usage.items()}), session.id),
            )
        )

    async def get_sessions(self, run_id: str, *, with_messages: bool = True) -> list[Session]:
        def read() -> list[Session]:
            cases = {
                r["idx"]: TestCase.model_validate_json(r["data"])
                for r in self._db.execute("SELECT idx, data FROM test_cases WHERE run_id = ?", (run_id,))
            }
            rows = self._db.execute(
                "SELECT * FROM sessions WHERE run_id = ? ORDER BY case_index, repeat, started_at", (run_id,)
            ).fetchall()
            return [self._session(r, cases.get(r["case_index"]), with_messages) for r in rows]

        return await self._run(read)

    async def get_session(self, session_id: str, run_id: str | None = None) -> Session:
        def read() -> Session | None:
            row = self._db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None or (run_id and row["run_id"] != run_id):
                return None
            case = self._db.execute(
                "SELECT data FROM test_cases WHERE run_id = ? AND idx = ?", (row["run_id"], row["case_index"])
            ).fetchone()
            return self._session(row, TestCase.model_validate_json(case["data"]) if case else None, True)

        session = await self._run(read)
        if session is None:
            where = f" in run '{run_id}'" if run_id else ""
            raise NotFound(f"no session with id '{session_id}'{where}; call get_run to list a run's sessions")
        return session

    def _session(self, row: sqlite3.Row, case: TestCase | None, with_messages: bool) -> Session:
        messages: list[Message] = []
        if with_messages:
            messages = [
                Message.model_validate_json(m["data"])
                for m in self._db.execute("SELECT data FROM messages WHERE session_id = ? ORDER BY seq", (row["id"],))
            ]
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
        )

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

    async def get_assessments(self, session_ids: list[str]) -> list[Assessment]:
        def read() -> list[Assessment]:
            out = []
            for i in range(0, len(session_ids), 500):
                chunk = session_ids[i:i + 500]
                out += [Assessment.model_validate_json(r["data"]) for r in self._db.execute(
                    f"SELECT data FROM assessments WHERE session_id IN ({','.join('?' * len(chunk))}) "
                    "ORDER BY session_id, scorer, turn", chunk)]
            return out

        return await self._run(read) if session_ids else []

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

    # --- JSONL export / import ------------------------------------------------------------------

    async def export_jsonl(self, run_id: str) -> list[str]:
        """One JSON line per session: OpenAI-format messages plus test case, stop reason and metadata."""
        await self.get_run(run_id)
        return [json.dumps(session_to_record(s), ensure_ascii=False) for s in await self.get_sessions(run_id)]

    async def import_jsonl(self, lines: Iterable[str], *, source: str = "import") -> str:
        """Store sessions from JSONL (our export format, or one bare list of messages per line) as a new run."""
        return await self.import_sessions([record_to_session(_json_line(line, n), n) for n, line in _numbered(lines)],
                                          source=source)

    async def import_sessions(self, sessions: list[Session], *, source: str = "import") -> str:
        """Store already-parsed sessions (see `record_to_session`) as a new run; returns its id."""
        if not sessions:
            raise InvalidOption(f"{source}: no sessions found (expected one JSON object or message list per line)")
        taken = await self._run(lambda: {
            r[0] for r in self._db.execute(
                f"SELECT id FROM sessions WHERE id IN ({','.join('?' * len(sessions))})", [s.id for s in sessions])
        })
        for s in sessions:
            if s.id in taken:  # already in this database or earlier in the file: keep both, note the original
                s.metadata["original_session_id"] = s.id
                s.id = new_session_id()
            taken.add(s.id)
        run_id = new_run_id()
        cases = [s.test_case or TestCase(goal="(imported conversation)") for s in sessions]
        await self.create_run(
            run_id=run_id, kind="import", target={"source": source}, options={}, model="n/a", offline=False,
            test_cases=cases, sessions_total=len(sessions),
        )
        try:
            for i, s in enumerate(sessions):
                s.run_id, s.case_index = run_id, i
                await self.create_session(s)
                for seq, m in enumerate(s.messages):
                    await self.add_message(s.id, seq, m, s.turns)
                await self.finish_session(s)
        except BaseException as e:
            with anyio.CancelScope(shield=True):
                await self.finish_run(run_id, RunStatus.FAILED, f"import stopped: {type(e).__name__}: {e}")
            raise
        await self.finish_run(run_id, RunStatus.COMPLETED)
        return run_id


def session_to_record(s: Session) -> dict[str, Any]:
    messages = []
    for m in s.messages:
        d = {**m.to_openai(), "content": m.content}  # null stays null (tool-call and failed turns)
        for key in ("turn", "latency_ms", "error"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        if m.scripted:
            d["scripted"] = True
        if m.usage:
            d["usage"] = m.usage.model_dump()
        messages.append(d)
    return {
        "session_id": s.id,
        "run_id": s.run_id,
        "test_case": s.test_case.model_dump(exclude_defaults=True) if s.test_case else None,
        "stop_reason": s.stop_reason.value if s.stop_reason else None,
        "stop_detail": s.stop_detail,
        "turns": s.turns,
        "repeat": s.repeat,
        "usage": {k: u.model_dump() for k, u in s.usage.items()},
        "metadata": s.metadata,
        "messages": messages,
    }


def record_to_session(record: Any, line_no: int, *, what: str = "line") -> Session:
    """Parse one record: our export object, {session_id?, messages, goal?, expectations?}, or a bare message list."""
    if isinstance(record, list):
        record = {"messages": record}
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise InvalidOption(f"{what} {line_no}: expected an object with 'messages' (a list) or a list of messages")
    if not record["messages"]:
        raise InvalidOption(f"{what} {line_no}: 'messages' is empty")
    try:
        messages = [Message.model_validate(m) for m in record["messages"]]
        if record.get("test_case"):
            case = TestCase.model_validate(record["test_case"])
        elif record.get("goal"):
            case = TestCase(goal=record["goal"], expectations=record.get("expectations") or {})
        else:
            case = None
        stop = StopReason(record["stop_reason"]) if record.get("stop_reason") else None
        turns = record.get("turns") or sum(1 for m in messages if m.role == "user")
        return Session(  # inside the try: session_id, turns, usage, metadata... are the caller's too
            id=record.get("session_id") or new_session_id(),
            test_case=case,
            messages=messages,
            stop_reason=stop,
            stop_detail=record.get("stop_detail"),
            turns=turns,
            repeat=record.get("repeat") or 0,
            usage={k: Usage.model_validate(v) for k, v in (record.get("usage") or {}).items()},
            metadata={**(record.get("metadata") or {}), "imported_from_run": record.get("run_id")},
            started_at=time.time(),
            finished_at=time.time(),
        )
    except Exception as e:
        detail = str(e).splitlines()
        raise InvalidOption(f"{what} {line_no}: {' '.join(detail[:3])}") from None


def _json_line(line: str, line_no: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidOption(f"line {line_no} is not valid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise InvalidOption(f"line {line_no} is nested too deeply to read") from None


def _numbered(lines: Iterable[str]) -> Iterable[tuple[int, str]]:
    for n, line in enumerate(lines, 1):
        if line.strip():
            yield n, line


def _run_row(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["target"] = json.loads(d["target"])
    d["options"] = json.loads(d["options"])
    d["offline"] = bool(d["offline"])
    return d


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
