"""SQLite storage for runs, test cases, sessions and messages.

Every message is written as its turn completes, so a crashed agent, a failed
model call or a cancelled job keeps every completed turn. One connection, in
WAL mode, used from one worker thread at a time (a CapacityLimiter of 1), so
the event loop never blocks on disk and writes never contend.

Nothing secret is stored: target specs arrive already redacted
(`targets.redacted_spec`), model API keys never reach this module, and every
text written passes through `secrets.redact` (`_clean`) on its way in, so a
key that an agent or a provider echoed is masked in the tables and the WAL.

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

from ..ids import new_run_id, new_session_id, new_test_set_id
from .sqlite import PAGE_SESSIONS, Store

__all__ = [
    "PAGE_SESSIONS",
    "Store",
    "new_run_id",
    "new_session_id",
    "new_test_set_id",
]
