"""Ids of runs, sessions and test sets: short, random, with a prefix that says what they name."""

from __future__ import annotations

import uuid


def new_run_id() -> str:
    return "run-" + uuid.uuid4().hex[:12]


def new_session_id() -> str:
    return "sim-" + uuid.uuid4().hex[:16]


def new_test_set_id() -> str:
    return "set-" + uuid.uuid4().hex[:12]
