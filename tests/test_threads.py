"""Sync user code runs in daemon threads: a blocked call is abandoned, counted and capped."""

from __future__ import annotations

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
