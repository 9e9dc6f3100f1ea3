"""Lumen Mobile support: a flawed example agent that is slow and crashes on a turn count.

What it is
    A rule-based, deterministic mobile-phone support assistant (standard library only):

        examples/telecom_agent.py:telecom_agent

Scope (what SYSTEM_PROMPT promises)
    plans, data usage, bills, roaming.

PLANTED FLAWS (what the tool should discover)
    a. SLOW ON BILLS. A question about a bill takes BILL_DELAY_S seconds (12 by default; the
       environment variable LUMEN_BILL_DELAY_S overrides it, so tests can use a small delay
       with a small latency threshold).
    b. CRASHES ON THE 3RD USER MESSAGE. Its conversation buffer holds two user messages; the
       third, whatever it says, raises IndexError.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

SYSTEM_PROMPT = """\
You are the support assistant of Lumen Mobile. You help customers with:
- plans: compare plans and their prices;
- data usage: how much data is left this month;
- bills: explain the latest bill;
- roaming: how roaming works abroad and what it costs.
"""

BILL_DELAY_S = 12.0
BUFFER_SIZE = 2


def _reply(text: str) -> str:
    if re.search(r"\b(bill|invoice|charge)", text):
        time.sleep(float(os.environ.get("LUMEN_BILL_DELAY_S", BILL_DELAY_S)))  # flaw (a)
        return "Your latest bill is $38.00: your $35 plan plus $3.00 for an international call."
    if re.search(r"\b(data|usage|gigabytes?|gb)\b", text):
        return "You have 6.2 GB of data left this month; it renews on the 1st."
    if re.search(r"\b(roam|abroad|travel|overseas)", text):
        return "Roaming is included in 40 countries; elsewhere it's $5 a day for 1 GB."
    if re.search(r"\b(plans?|upgrade|cheaper|price)\b", text):
        return "We have three plans: Lite at $20 (5 GB), Plus at $35 (20 GB) and Max at $50 (unlimited)."
    if re.search(r"\b(poem|essay|joke|story|weather|recipe|homework)\b", text):
        return "Sorry, I can only help with plans, data usage, bills and roaming. Is there anything about those?"
    if re.search(r"\b(what happens next|next step|how long|when will)", text):
        return "Changes to your plan start on your next billing day; nothing else is needed from you."
    if re.search(r"\b(my name is|i'm|i am)\b", text):
        return "Nice to meet you! I can help with plans, data usage, bills and roaming. What do you need?"
    return "I can help with plans, data usage, bills and roaming. What do you need?"


def telecom_agent(messages: list[dict], session_id: str | None = None, **context: Any) -> str:
    """Reply to the last user message of `messages` (OpenAI chat format)."""
    users = [str(m.get("content") or "").lower() for m in messages if m.get("role") == "user"]
    buffer = [None] * BUFFER_SIZE
    for i, text in enumerate(users):
        buffer[i] = text  # flaw (b): IndexError at the third user message
    return _reply(users[-1])
