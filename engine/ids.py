"""Ids of runs, sessions and test sets: short, random, with a prefix that says what they name."""

from __future__ import annotations

import re
import uuid
from typing import Any

from .errors import InvalidOption
from .text import clip


def new_run_id() -> str:
    return "run-" + uuid.uuid4().hex[:12]


def new_session_id() -> str:
    return "sim-" + uuid.uuid4().hex[:16]


def new_test_set_id() -> str:
    return "set-" + uuid.uuid4().hex[:12]


# Any id a store could hold (imports and older runs included), and nothing that could escape a query or a URI.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_run_id(value: Any, field: str = "run_id") -> str:
    """The run id as given, if it has the shape of one; InvalidOption naming the field otherwise."""
    if not isinstance(value, str) or not RUN_ID.fullmatch(value):
        raise InvalidOption(f"{field} must be a run id such as 'run-0123456789ab' (letters, digits, '-', '_' or '.', "
                            f"at most 64 characters; list_runs shows them), got {clip(repr(value), 80)}")
    return value
