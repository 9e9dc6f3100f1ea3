"""Background jobs: start a prepared job, watch its progress, cancel it.

The MCP protocol version we serve has no long-running tasks, so the server
keeps its own registry. Job state (status, turns, stop reasons, progress)
lives in the store; this registry holds only what is live: the cancel scope
and completion event of each job running in this process.

The registry owns one task group, opened by `running()`. It is re-entrant:
the outermost `running()` (the server's lifetime) owns the group; nested
ones (an MCP session's lifespan) reuse it. When the owner exits, running
jobs are cancelled and record their completed turns.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol

import anyio
from anyio.abc import TaskGroup

if TYPE_CHECKING:  # a type only: the registry must not load the pipelines (the server imports it at start)
    from .pipeline import ProgressFn

log = logging.getLogger("convsim.jobs")


class Job(Protocol):
    run_id: str

    async def run(self, progress: ProgressFn | None = None) -> Any: ...


@dataclass
class _Live:
    scope: anyio.CancelScope
    done: anyio.Event


class JobRegistry:
    def __init__(self) -> None:
        self._tg: TaskGroup | None = None
        self._live: dict[str, _Live] = {}

    @asynccontextmanager
    async def running(self) -> AsyncIterator[JobRegistry]:
        if self._tg is not None:
            yield self
            return
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                yield self
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    def start(self, job: Job, on_progress: ProgressFn | None = None) -> None:
        """Run `job` in the background; `on_progress` also receives its progress. Requires `running()`."""
        if self._tg is None:
            raise RuntimeError("JobRegistry.start() called outside `async with registry.running()`")
        live = _Live(scope=anyio.CancelScope(), done=anyio.Event())
        self._live[job.run_id] = live
        self._tg.start_soon(self._run, job, live, on_progress)

    async def _run(self, job: Job, live: _Live, on_progress: ProgressFn | None) -> None:
        try:
            with live.scope:
                await job.run(on_progress)
        except Exception:
            log.exception("background job %s failed", job.run_id)
        finally:
            live.done.set()
            self._live.pop(job.run_id, None)

    def is_live(self, run_id: str) -> bool:
        return run_id in self._live

    def cancel(self, run_id: str) -> bool:
        """Cancel a live job; False if it is not running in this process."""
        live = self._live.get(run_id)
        if live is None:
            return False
        live.scope.cancel()
        return True

    async def wait(self, run_id: str) -> None:
        live = self._live.get(run_id)
        if live is not None:
            await live.done.wait()
