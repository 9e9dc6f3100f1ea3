"""The example support agent after a developer fixed its gift-card crash (and nothing else)."""

from __future__ import annotations

import copy

from examples import support_agent as _original

REFUND_METHODS = copy.deepcopy(_original.REFUND_METHODS)
REFUND_METHODS["gift_card"] = {"label": "an Acme gift card", "days": "1 business day"}


def support_agent(messages, session_id=None, **context):
    saved = _original.REFUND_METHODS
    _original.REFUND_METHODS = REFUND_METHODS
    try:
        return _original.support_agent(messages, session_id=session_id, **context)
    finally:
        _original.REFUND_METHODS = saved
