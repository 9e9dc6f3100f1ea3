"""Bounds on everything a caller controls, in one place (the README's "Limits" table lists them).

Every input that could make a run slow, huge or unreadable is bounded where it
enters, and the error names the bound: the JSON nesting depth of tool
arguments, test cases and transcript records; the size of a text field; how
many cases, transcripts and messages. A value within these bounds can always
be stored, read back, exported and reported.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import InvalidOption

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

MAX_JSON_DEPTH = 32  # nesting of any JSON value a caller passes (arguments, context, files, records)
MAX_TEXT_CHARS = 50_000  # one text field of a test case: goal, persona, a guideline, a scripted turn
MAX_LIST_ITEMS = 200  # simulation_guidelines, scripted_turns
MAX_DATA_CHARS = 100_000  # a test case's context or expectations, as JSON
MAX_TEST_CASES = 1000  # per run: inline, in a JSON or YAML file, or a stored test set
MAX_FILE_CASES = 100_000  # per run from a JSONL test-case file (read line by line, never whole)
MAX_RUN_SESSIONS = 100_000  # sessions in one run: test cases x repeats
MAX_TRANSCRIPTS = 20_000  # per import (file or inline); files beyond are refused before anything is stored
MAX_MESSAGES = 2_000  # per transcript
MAX_MESSAGE_CHARS = 200_000  # one message's content (transcripts, agent replies)
MAX_LINE_BYTES = 8_000_000  # one line of a JSONL file
MAX_FILE_BYTES = 50_000_000  # a JSON or YAML test-case file (read whole; JSONL files are streamed)
MAX_ARGUMENT_BYTES = 20_000_000  # all arguments of one tool call, as JSON
MAX_REPLY_BYTES = 10_000_000  # one HTTP agent reply body, read until this many bytes and no further
MAX_REPLY_MESSAGES = 100  # messages in one agent reply ({"messages": [...]}: tool calls and results)
MAX_TOOL_CALLS = 100  # tool calls in one agent message
MAX_COUNT = 1_000_000  # any count a record carries (turns, repeat): stored as a SQLite INTEGER


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a JSON-like value (a scalar is 0, `[1]` is 1); stops counting past `limit`.

    Iterative, so a value nested thousands deep is measured without recursion.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth) for child in children)
    return deepest


def check_depth(value: Any, what: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise InvalidOption when `value` is nested deeper than `limit`."""
    if json_depth(value, limit) > limit:
        raise InvalidOption(f"{what} is nested more than {limit} levels deep (limit MAX_JSON_DEPTH={limit})")


def has_lone_surrogate(value: Any) -> bool:
    """True if a string in `value` (a key or a value, at any depth) holds a lone UTF-16 surrogate.

    Such a string is not text: it cannot be encoded as UTF-8, so SQLite, JSON output and every
    transport refuse it. No JSON parser delivers one, but an in-process caller can. Iterative.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False
