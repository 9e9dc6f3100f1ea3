"""Group commit of a running conversation's writes (`Store._write`): shared transactions, each caller's own outcome."""

from __future__ import annotations

import sqlite3
import threading

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from engine import Message, Session, StopReason, Store
from engine.store import new_run_id, new_session_id
from engine.store.worker import DbWorker

pytestmark = pytest.mark.anyio


async def _sessions(store: Store, n: int) -> list[Session]:
    run_id = new_run_id()
    await store.create_run(run_id=run_id, kind="simulate", target={"path": "x"}, options={}, model="offline",
                           offline=True, test_cases=[], sessions_total=n)
    sessions = [Session(id=new_session_id(), run_id=run_id, case_index=0, repeat=i) for i in range(n)]
    for s in sessions:
        await store.create_session(s)
    return sessions


def _stored(path, session_id: str) -> list[str]:
    """The messages of a session as another connection reads them: only what is committed."""
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute("SELECT data FROM messages WHERE session_id = ? ORDER BY seq", (session_id,))]
    finally:
        db.close()


async def _until(flag: threading.Event) -> None:
    with anyio.fail_after(10):
        while not flag.is_set():
            await anyio.sleep(0.005)


async def test_concurrent_writes_share_transactions_and_each_is_committed_when_its_await_returns(store):
    sessions = await _sessions(store, 50)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    seen_after_await: dict[str, int] = {}

    async def converse(s: Session) -> None:
        for seq in range(3):
            await store.add_message(s.id, seq, Message(role="user", content=f"{s.id} says {seq}", turn=seq + 1),
                                    seq + 1)
            seen_after_await[s.id] = len(_stored(store.path, s.id))
            assert seen_after_await[s.id] == seq + 1  # durable for any other reader the moment the await returns
        s.stop_reason, s.stop_detail, s.turns = StopReason.MAX_TURNS, "stopped after 3 turns", 3
        await store.finish_session(s)

    async with anyio.create_task_group() as tg:
        for s in sessions:
            tg.start_soon(converse, s)
    store._db.set_trace_callback(None)

    begins = sum(st.strip().upper().startswith("BEGIN") for st in statements)
    assert begins < 4 * len(sessions) // 5  # 200 writes: far fewer transactions than one each
    for got in await store.get_sessions(sessions[0].run_id):
        assert [m.content for m in got.messages] == [f"{got.id} says {i}" for i in range(3)]
        assert (got.stop_reason, got.turns) == (StopReason.MAX_TURNS, 3)


async def test_a_failing_write_fails_alone_and_the_others_of_its_transaction_are_kept(store):
    sessions = await _sessions(store, 20)
    await store.add_message(sessions[7].id, 0, Message(role="user", content="first", turn=1), 1)
    outcomes: dict[int, BaseException | None] = {}

    async def write(i: int) -> None:
        try:  # session 7's seq 0 is taken: its write breaks the primary key
            await store.add_message(sessions[i].id, 0, Message(role="user", content=f"hello {i}", turn=1), 1)
            outcomes[i] = None
        except sqlite3.Error as e:
            outcomes[i] = e

    async with anyio.create_task_group() as tg:
        for i in range(len(sessions)):
            tg.start_soon(write, i)

    assert isinstance(outcomes.pop(7), sqlite3.IntegrityError)
    assert all(e is None for e in outcomes.values())
    for i, s in enumerate(sessions):
        texts = [m.content for m in (await store.get_session(s.id)).messages]
        assert texts == (["first"] if i == 7 else [f"hello {i}"])


async def test_a_closed_store_refuses_every_waiting_write(tmp_path):
    store = Store(tmp_path / "closed.sqlite")
    sessions = await _sessions(store, 5)
    store.close()
    errors: list[BaseException] = []

    async def write(s: Session) -> None:
        try:
            await store.add_message(s.id, 0, Message(role="user", content="hi", turn=1), 1)
        except sqlite3.ProgrammingError as e:
            errors.append(e)

    async with anyio.create_task_group() as tg:
        for s in sessions:
            tg.start_soon(write, s)
    assert len(errors) == len(sessions)
    assert not store._pending and store._committing is None  # nothing left waiting for a commit


async def test_a_write_cancelled_before_its_commit_is_not_made_and_does_not_hold_up_the_others(store):
    a, b = await _sessions(store, 2)
    scope_a = anyio.CancelScope()

    async def write_a() -> None:
        with scope_a:
            await store.add_message(a.id, 0, Message(role="user", content="never", turn=1), 1)

    async def write_b() -> None:
        await store.add_message(b.id, 0, Message(role="user", content="kept", turn=1), 1)

    held, free = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        free.wait(10)

    async with anyio.create_task_group() as tg:
        tg.start_soon(store._run, hold)  # a reader holds the connection: no commit can start yet
        await _until(held)
        tg.start_soon(write_a)  # a's commit waits for the connection
        await wait_all_tasks_blocked()
        tg.start_soon(write_b)  # b waits for a's commit to end
        await wait_all_tasks_blocked()
        scope_a.cancel()
        await wait_all_tasks_blocked()
        free.set()
    assert scope_a.cancel_called
    assert _stored(store.path, a.id) == []
    assert len(_stored(store.path, b.id)) == 1
    assert not store._pending and store._committing is None


async def test_a_write_cancelled_during_its_commit_returns_only_once_it_is_committed(store):
    c, b, a = await _sessions(store, 3)
    first_started, first_go = threading.Event(), threading.Event()
    second_started, second_go = threading.Event(), threading.Event()

    def insert(session_id: str, started: threading.Event | None = None, go: threading.Event | None = None) -> None:
        store._db.execute("INSERT INTO messages (session_id, seq, data, created_at) VALUES (?, 0, '{}', 0)",
                          (session_id,))
        if started and go:
            started.set()
            go.wait(10)

    seen_by_a: list[list[str]] = []
    scope_a = anyio.CancelScope()

    async def write_a() -> None:
        with scope_a:
            try:
                await store._write(insert, a.id)
            finally:  # returned or cancelled: either way only once the write is committed
                seen_by_a.append(_stored(store.path, a.id))

    async with anyio.create_task_group() as tg:
        tg.start_soon(store._write, insert, c.id, first_started, first_go)  # c's commit is under way ...
        await _until(first_started)
        tg.start_soon(store._write, insert, b.id, second_started, second_go)  # ... b and a wait for the next
        await wait_all_tasks_blocked()
        tg.start_soon(write_a)
        await wait_all_tasks_blocked()
        first_go.set()
        await _until(second_started)  # b commits b and a together; a's part of it has not run yet
        assert store._pending == []
        scope_a.cancel()
        await wait_all_tasks_blocked()
        assert seen_by_a == []  # still waiting for the commit
        second_go.set()
    assert scope_a.cancel_called
    assert seen_by_a == [["{}"]]
    assert len(_stored(store.path, b.id)) == len(_stored(store.path, c.id)) == 1


async def test_the_store_thread_runs_calls_one_at_a_time_in_order_and_starts_again_after_a_stop():
    worker = DbWorker()
    running, ran, overlaps = [0], [], []

    def call(i: int) -> int:
        running[0] += 1
        overlaps.append(running[0])
        ran.append(i)
        running[0] -= 1
        return i * i

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(worker.run, call, i)
    assert ran == list(range(30)) and set(overlaps) == {1}
    worker.stop()
    assert await worker.run(call, 7) == 49  # a call after a stop gets a thread again
    with pytest.raises(ZeroDivisionError):
        await worker.run(lambda: 1 / 0)
    worker.stop()
