"""A slow agent whose reply says how much history it was sent: a resumed session must send it all."""

from __future__ import annotations

import os
import time


def counting(messages):
    """Replies 'reply N' where N counts the user messages it received, after RESUME_AGENT_DELAY_S seconds."""
    time.sleep(float(os.environ.get("RESUME_AGENT_DELAY_S", "0.3")))
    users = [m for m in messages if m.get("role") == "user"]
    return f"reply {len(users)}: noted '{users[-1]['content'][:40]}'"
