"""Sync user code (agents, code scorers) in threads that a blocked call cannot pin.

A sync agent that never returns (`time.sleep(600)` past its `timeout_s`)
cannot be interrupted: Python threads cannot be killed. anyio's worker
threads are joined at interpreter exit, so one blocked call kept the CLI
alive long after its run had finished. Here each call gets a daemon thread:
when the caller gives up (a timeout or a cancelled run) the thread is
abandoned, the process can still exit, and the count of abandoned threads
that are still blocked is capped, so a long-lived server refuses new sync
calls (saying why) rather than piling up stuck threads.

A thread whose call has returned waits (IDLE_S) for the next one, so a sync agent's turns do not each pay
for starting a thread; a call only ever gets an idle thread, never one still running (or blocked in)
another call, and it runs in a fresh contextvars context, as in a new thread. On asyncio the waiting task
is woken with `call_soon_threadsafe` (anyio's `from_thread.run_sync` otherwise).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import queue
import threading
from typing import Any, Callable, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

from .errors import AgentError

log = logging.getLogger("convsim.threads")

T = TypeVar("T")

MAX_BLOCKED_THREADS = 32
IDLE_S = 10.0  # a thread with no call to run for this long exits

_lock = threading.Lock()
_blocked = 0  # abandoned calls whose thread has not returned yet
_idle = 0  # threads waiting on _work for a call; each call put there is taken by one of them
_work: queue.SimpleQueue[tuple[Callable[[], Callable[[], None] | None], str]] = queue.SimpleQueue()


def _forget_threads() -> None:
    """In a forked child, whose only thread is the one that forked: no thread is idle there."""
    global _lock, _idle, _work
    _lock, _idle, _work = threading.Lock(), 0, queue.SimpleQueue()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads)


def blocked_threads() -> int:
    """How many abandoned sync calls are still running in this process."""
    return _blocked


async def run_sync(fn: Callable[[], T], *, what: str = "agent") -> T:
    """Run `fn()` in a daemon thread and wait for it; on cancellation the thread is abandoned.

    Raises AgentError (before starting) when MAX_BLOCKED_THREADS abandoned calls are still blocked.
    Exceptions raised by `fn` propagate unchanged.
    """
    global _blocked
    if _blocked >= MAX_BLOCKED_THREADS:
        raise AgentError(f"{_blocked} earlier sync {what} calls are still blocked after their timeout; this process "
                         f"runs at most {MAX_BLOCKED_THREADS} such threads. Fix the blocking code (or make it async) "
                         "and restart the server", kind="timeout")
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        token = None
    except RuntimeError:  # not asyncio
        loop, token = None, anyio.lowlevel.current_token()
    done = anyio.Event()
    outcome: dict[str, Any] = {}
    state = {"abandoned": False, "finished": False}

    def work() -> Callable[[], None] | None:
        """Runs the call; returns how to wake its caller (None when it gave up on it)."""
        global _blocked
        try:
            outcome["value"] = contextvars.Context().run(fn)
        except BaseException as e:  # handed to the waiting task, which re-raises it
            outcome["error"] = e
        with _lock:
            state["finished"] = True
            if state["abandoned"]:
                _blocked -= 1
                return None
        return wake

    def wake() -> None:
        try:
            if loop is not None:
                loop.call_soon_threadsafe(done.set)
            else:
                anyio.from_thread.run_sync(done.set, token=token)
        except Exception:  # the event loop has gone: nobody is waiting
            pass

    _start(work, f"convsim-sync-{what}")
    try:
        await done.wait()
    except anyio.get_cancelled_exc_class():
        with _lock:
            if not state["finished"]:
                state["abandoned"] = True
                _blocked += 1
                log.warning("abandoned a blocked sync %s call (%d still blocked)", what, _blocked)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _start(work: Callable[[], Callable[[], None] | None], name: str) -> None:
    """Run `work` in an idle thread, or in a new one when none is idle."""
    global _idle
    with _lock:
        if _idle:
            _idle -= 1  # that thread is now this call's
            _work.put((work, name))
            return
    threading.Thread(target=_serve, args=(work, name), name=name, daemon=True).start()


def _serve(work: Callable[[], Callable[[], None] | None], name: str) -> None:
    global _idle
    me = threading.current_thread()
    while True:
        me.name = name
        wake = work()
        del work
        with _lock:
            _idle += 1  # idle before the caller wakes, so its next call finds this thread
        if wake is not None:
            wake()
        del wake
        while True:
            try:
                work, name = _work.get(timeout=IDLE_S)
                break
            except queue.Empty:
                with _lock:
                    if _idle and _work.empty():  # nobody gave this thread a call meanwhile: exit
                        _idle -= 1
                        return
