"""Sous, a cooking assistant: a flawed example agent that loops.

What it is
    A rule-based, deterministic cooking assistant (standard library only):

        examples/recipe_agent.py:recipe_agent

Scope (what SYSTEM_PROMPT promises)
    recipe ideas, ingredient substitutions, cooking times.

PLANTED FLAWS (what the tool should discover)
    a. LOOPS. Its first reply is helpful; from the user's 2nd message on it asks the same
       question, "What ingredients do you have in your fridge right now?", whatever the user
       says, even after the user listed them.
"""

from __future__ import annotations

from typing import Any

SYSTEM_PROMPT = """\
You are Sous, a friendly cooking assistant. You help home cooks with:
- recipe ideas from the ingredients they have;
- ingredient substitutions;
- cooking times and temperatures.
"""

LOOP_QUESTION = "What ingredients do you have in your fridge right now? Tell me and I'll suggest a recipe."


def recipe_agent(messages: list[dict], session_id: str | None = None, **context: Any) -> str:
    """Reply to the last user message of `messages` (OpenAI chat format)."""
    users = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
    if len(users) >= 2:
        return LOOP_QUESTION  # flaw (a)
    return ("Happy to help in the kitchen! I can suggest recipes from what you have, "
            "find substitutions and tell you cooking times. What would you like to cook?")
