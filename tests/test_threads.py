"""Sync user code runs in daemon threads: a blocked call is abandoned, counted and capped."""

from __future__ import annotations

import contextvars
import threading

import anyio
import pytest

from engine import AgentError, threads

pytestmark = pytest.mark.anyio


async def test_a_call_that_blocks_past_its_deadline_is_abandoned_and_counted():
    release = threading.Event()
    before = threads.blocked_threads()
    with anyio.move_on_after(0.2):
        await threads.run_sync(lambda: release.wait(10))
    assert threads.blocked_threads() == before + 1
    release.set()
    with anyio.fail_after(5):
        while threads.blocked_threads() != before:  # the thread returned: no longer counted
            await anyio.sleep(0.01)


async def test_abandoned_threads_are_capped_and_the_refusal_says_why(monkeypatch):
    monkeypatch.setattr(threads, "MAX_BLOCKED_THREADS", threads.blocked_threads() + 2)
    release = threading.Event()
    try:
        for _ in range(2):
            with anyio.move_on_after(0.05):
                await threads.run_sync(lambda: release.wait(10))
        with pytest.raises(AgentError, match="still blocked after their timeout"):
            await threads.run_sync(lambda: "never runs")
    finally:
        release.set()


async def test_results_and_exceptions_come_back_from_the_thread():
    assert await threads.run_sync(lambda: 41 + 1) == 42
    with pytest.raises(ZeroDivisionError):
        await threads.run_sync(lambda: 1 / 0)


async def test_a_returned_thread_runs_the_next_call_and_a_busy_one_is_never_shared(monkeypatch):
    started: list[threading.Thread] = []

    class Counted(threading.Thread):
        def start(self) -> None:
            started.append(self)
            super().start()

    monkeypatch.setattr(threads.threading, "Thread", Counted)
    await threads.run_sync(threading.get_ident)
    started.clear()
    for _ in range(10):  # each call's thread is idle again before its caller goes on: no new thread per call
        await threads.run_sync(threading.get_ident)
    assert started == []
    release, started = threading.Event(), threading.Event()

    def blocks() -> int:
        started.set()
        release.wait(10)
        return threading.get_ident()

    async with anyio.create_task_group() as tg:
        busy: list[int] = []

        async def run_blocking() -> None:
            busy.append(await threads.run_sync(blocks))

        tg.start_soon(run_blocking)
        with anyio.fail_after(5):
            while not started.is_set():
                await anyio.sleep(0.01)
        other = await threads.run_sync(threading.get_ident)  # while the first is busy: another thread
        release.set()
    assert other != busy[0]


async def test_each_call_starts_from_a_fresh_context():
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    assert await threads.run_sync(lambda: var.set("set by an earlier call") and var.get()) == "set by an earlier call"
    assert await threads.run_sync(var.get) == "unset"
