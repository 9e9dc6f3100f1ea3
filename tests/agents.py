"""Small agents for tests, one per reply shape or failure mode."""

from __future__ import annotations

import time

import anyio

SEEN: dict[str, list[dict]] = {}  # session_id -> kwargs received, for assertions


def echo(messages, session_id=None, **context):
    SEEN.setdefault(session_id or "?", []).append({"session_id": session_id, **context})
    return "You said: " + messages[-1]["content"]


async def async_echo(input, mlflow_session_id=None):
    await anyio.sleep(0)
    return {"role": "assistant", "content": f"async:{mlflow_session_id}:{input[-1]['content']}"}


def content_dict(messages):
    return {"content": "from a dict"}


def chat_completion_dict(messages):
    return {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "from a completion"}}]}


class _Msg:
    def __init__(self):
        self.role, self.content, self.tool_calls = "assistant", "from an object", None


class _Choice:
    def __init__(self):
        self.message = _Msg()


class _Completion:
    """Shaped like openai's ChatCompletion object (attributes, no model_dump)."""

    def __init__(self):
        self.choices = [_Choice()]


def chat_completion_object(messages):
    return _Completion()


def messages_list(messages):
    return {"messages": [*messages,
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c1", "type": "function",
                              "function": {"name": "lookup_order", "arguments": {"order_id": "A1"}}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "{\"status\": \"shipped\"}"},
                         {"role": "assistant", "content": "Your order shipped."}]}


def crashes_on_turn_2(messages):
    if sum(1 for m in messages if m["role"] == "user") >= 2:
        raise KeyError("gift_card")
    return "first reply is fine"


def empty_reply(messages):
    return "   "


def slow(messages):
    time.sleep(2)
    return "too late"


def unparseable(messages):
    return {"weird": 1}


def needs_user_id(messages, user_id):
    return f"hello {user_id}"


def no_history_param(prompt):
    return prompt


def blocks(messages):
    """A sync agent that never answers in time: run it with a short `timeout_s`."""
    time.sleep(600)
    return "never"


_CALLS: dict[str, list[str]] = {}


def every_other_session_crashes(messages, session_id=None, flaky_key=None):
    """Crashes in every other session it sees per `flaky_key` (context), whatever the order they run in:
    a test case that fails in half its trials. Without a key it always answers (a deterministic agent)."""
    if flaky_key is not None:
        seen = _CALLS.setdefault(flaky_key, [])
        if session_id not in seen:
            seen.append(session_id)
        if seen.index(session_id) % 2 == 1:
            raise KeyError("gift_card")
    last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return f"Happy to help with that: {last[:80]}"
