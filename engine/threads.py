"""Sync user code (agents, code scorers) in threads that a blocked call cannot pin.

A sync agent that never returns (`time.sleep(600)` past its `timeout_s`)
cannot be interrupted: Python threads cannot be killed. anyio's worker
threads are joined at interpreter exit, so one blocked call kept the CLI
alive long after its run had finished. Here each call gets a daemon thread:
when the caller gives up (a timeout or a cancelled run) the thread is
abandoned, the process can still exit, and the count of abandoned threads
that are still blocked is capped, so a long-lived server refuses new sync
calls (saying why) rather than piling up stuck threads.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

from .errors import AgentError

log = logging.getLogger("convsim.threads")

T = TypeVar("T")

MAX_BLOCKED_THREADS = 32

_lock = threading.Lock()
_blocked = 0  # abandoned calls whose thread has not returned yet


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
    token = anyio.lowlevel.current_token()
    done = anyio.Event()
    outcome: dict[str, Any] = {}
    state = {"abandoned": False, "finished": False}

    def work() -> None:
        global _blocked
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the waiting task, which re-raises it
            outcome["error"] = e
        with _lock:
            state["finished"] = True
            if state["abandoned"]:
                _blocked -= 1
                return
        try:
            anyio.from_thread.run_sync(done.set, token=token)
        except Exception:  # the event loop has gone: nobody is waiting
            pass

    threading.Thread(target=work, name=f"convsim-sync-{what}", daemon=True).start()
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
