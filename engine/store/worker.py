"""The thread a Store's SQLite calls run in: one at a time, in the order they come, off the event loop.

anyio's `to_thread.run_sync` (with a CapacityLimiter of 1) did the same at about three times the CPU per
call (a checkpoint, the limiter, a cancel scope, a condition variable to wake a pooled thread); a store
makes a few calls per simulated turn, so on asyncio its calls go through this leaner hop instead: a
`queue.SimpleQueue` to one thread of its own, and `call_soon_threadsafe` back. The semantics are
anyio's: a call cancelled while it waits for its turn is never made; one cancelled while it runs is
waited for, then the cancel goes on. Under another async library, calls go through anyio.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

R = TypeVar("R")

IDLE_S = 10.0  # an idle thread exits after this long; the next call starts another


class _Call:
    __slots__ = ("fn", "args", "future", "loop", "state")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], future: asyncio.Future, loop: Any):
        self.fn, self.args, self.future, self.loop = fn, args, future, loop
        self.state = "waiting"  # -> "running" (the thread took it) or "cancelled" (its caller gave up first)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # nobody waits for it any more
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DbWorker:
    """Runs calls in one thread, one at a time; `await worker.run(fn, *args)`."""

    def __init__(self, name: str = "convsim-store"):
        self.name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._limiter = anyio.CapacityLimiter(1)  # for async libraries other than asyncio

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        # As a thread call does: a caller already cancelled never queues its call (else the thread may start it
        # before the cancellation is seen, and a write the caller gave up would still be made).
        await anyio.lowlevel.checkpoint_if_cancelled()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        call = _Call(fn, args, loop.create_future(), loop)
        with self._lock:
            self._calls.put(call)
            if self._thread is None or not self._thread.is_alive():  # (not alive: in a forked child)
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()
        try:
            return await asyncio.shield(call.future)
        except asyncio.CancelledError:
            with self._lock:
                started = call.state == "running"
                if not started:
                    call.state = "cancelled"
            if started:  # it runs: wait for it to end, as a thread call does, then go on cancelled
                with anyio.CancelScope(shield=True):
                    try:
                        await asyncio.shield(call.future)
                    except BaseException:  # its outcome is not this cancelled caller's to raise
                        pass
            raise

    def stop(self) -> None:
        """Let the thread exit once the calls queued are done (a later call starts another)."""
        with self._lock:
            if self._thread is not None:
                self._calls.put(None)

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                call = self._calls.get(timeout=IDLE_S)
            except queue.Empty:
                call = None
            if call is None:  # idle, or told to stop: exit unless a call came in meanwhile
                with self._lock:
                    if self._calls.empty():
                        if self._thread is me:
                            self._thread = None
                        return
                continue
            with self._lock:
                if call.state == "cancelled":
                    continue
                call.state = "running"
            result, error = None, None
            try:
                result = call.fn(*call.args)
            except BaseException as e:  # handed to the caller, which re-raises it
                error = e
            try:
                call.loop.call_soon_threadsafe(_resolve, call.future, result, error)
            except RuntimeError:  # its event loop has closed: nobody is waiting
                pass
            del call, result, error
