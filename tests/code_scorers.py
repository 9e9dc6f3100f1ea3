"""Code scorers for tests: each level, return type and failure."""

from __future__ import annotations


def mentions_order(session):
    text = " ".join(m["content"] or "" for m in session["messages"] if m["role"] == "assistant")
    return {"value": "A1234" in text, "rationale": "looked for A1234"}


async def turns_count(session, expectations):
    n = sum(1 for m in session["messages"] if m["role"] == "user")
    return {"value": n, "passed": n <= expectations.get("max_turns", 99), "rationale": f"{n} turns"}


def short_reply(outputs, turn):
    return len(outputs) < 40


def label_only(inputs):
    return "fine" if inputs["last_user_message"] else "empty"


def explodes(session):
    raise RuntimeError("scorer bug")


def bad_return(session):
    return object()


def mixed(session, outputs):
    return True


def no_known_params(x):
    return True
