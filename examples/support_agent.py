"""Acme Outfitters support assistant: a deliberately flawed example agent.

What it is
    A customer-support chat agent for "Acme Outfitters", a fictional outdoor
    clothing shop. It is rule-based (keyword matching on the last user
    message, plus a look at the history), deterministic, and uses only the
    standard library: no LLM, no network. It exists so that the convsim-mcp
    README demo and test-suite have an agent with known bugs to find.

    Use it as a Python target, either way:

        examples.support_agent:support_agent         (module path, repo root on sys.path)
        examples/support_agent.py:support_agent      (file path)

    or `support_agent_async` for an async target. `examples/http_agent.py`
    serves the same agent over HTTP (OpenAI-compatible and plain JSON).

Scope (what SYSTEM_PROMPT promises)
    order status, returns and refunds, shipping times, order cancellation,
    account / password help. Anything else is politely declined.

Calling convention
    support_agent(messages, session_id=None, **context) -> str
    `messages` is the whole conversation in OpenAI chat format; the agent
    replies to the last user message. It keeps no state between calls:
    everything (the user's name, order ids mentioned earlier) is derived from
    `messages`. `context["customer_tier"] == "gold"` turns on free express
    shipping in the replies.

PLANTED FLAWS (what the tool should discover)
    a. FORGETS THE USER'S NAME. The agent picks the name up from "my name is
       Dana" / "I'm Dana" / "I am Dana" and uses it, but only while the
       conversation has fewer than 3 user messages. From the user's 3rd
       message on it stops addressing them by name, and a memory question
       ("what's my name?", "do you remember my name?") is answered with
       "I'm sorry, I don't know your name ..." even though the user gave it.
    b. CRASHES ON GIFT-CARD REFUNDS. Any message asking for a refund to a
       gift card ("refund order A1234 to a gift card") raises
       KeyError('gift_card'): the refund-method parser knows "gift_card" but
       REFUND_METHODS was never given an entry for it.
    c. REFUSES CANCELLATIONS. Every cancellation request ("cancel my order",
       "cancel order B5678", "I'd like a cancellation") gets "I'm sorry, I
       can't help with cancelling orders." although cancellation is in scope.

Everything else (greetings, order lookups, unknown order ids, returns policy,
shipping times, password resets, declining off-topic requests) works as a
reasonable support bot would.
"""

from __future__ import annotations

import re
from typing import Any

SYSTEM_PROMPT = """\
You are the customer-support assistant of Acme Outfitters, an online shop for \
outdoor clothing and gear.

You help customers with:
- order status: look orders up with the lookup_order tool and report status, items and delivery estimate;
- returns and refunds: items can be returned within 30 days of delivery if unworn and with tags; \
start returns with the start_return tool; refunds go to the original payment method;
- shipping times: standard shipping takes 3-5 business days, express 1-2 business days \
(free for Gold members, otherwise $12);
- order cancellation: orders that have not shipped yet can be cancelled;
- account and password help: explain how to reset a password or unlock an account.

Always be polite and concise, and address the customer by name once they have told you their name. \
Ask for the order number (format: one letter and four digits, e.g. A1234) when you need it. \
Never invent order details. Politely decline requests outside customer support for Acme Outfitters \
(weather, poems, code, general knowledge) and steer the conversation back to how you can help.
"""

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Look up an Acme Outfitters order: status, items and estimated delivery.",
            "parameters": {
                "type": "object",
                "properties": {
                    "order_id": {
                        "type": "string",
                        "description": "Order number: one letter followed by four digits, e.g. A1234.",
                    }
                },
                "required": ["order_id"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "start_return",
            "description": "Start a return for a delivered order; the refund goes to the original payment method.",
            "parameters": {
                "type": "object",
                "properties": {
                    "order_id": {"type": "string", "description": "Order number, e.g. A1234."},
                    "reason": {"type": "string", "description": "Why the customer is returning the items."},
                },
                "required": ["order_id", "reason"],
            },
        },
    },
]

# The shop's (tiny) order database.
ORDERS: dict[str, dict[str, str]] = {
    "A1234": {
        "status": "delivered",
        "items": "Trailblazer rain jacket (size M)",
        "eta": "delivered last Tuesday",
    },
    "B5678": {
        "status": "processing",
        "items": "Summit hiking boots (size 9)",
        "eta": "expected to ship tomorrow and arrive in 3-5 business days",
    },
    "C9012": {
        "status": "shipped",
        "items": "Basecamp 2-person tent",
        "eta": "arriving Thursday",
    },
    "D3456": {
        "status": "out for delivery",
        "items": "Merino wool socks (3-pack)",
        "eta": "arriving today",
    },
}

# How refunds are paid out. (Planted flaw b: the parser below also recognises
# "gift_card", which has no entry here.)
REFUND_METHODS: dict[str, dict[str, str]] = {
    "original_payment": {"label": "your original payment method", "days": "5-7 business days"},
    "store_credit": {"label": "Acme store credit", "days": "1 business day"},
}

RETURN_WINDOW_DAYS = 30
FORGET_FROM_USER_TURN = 3  # planted flaw a: the name is "forgotten" from this user message on
DEFAULT_GOLD_TIERS = {"gold"}

ORDER_ID_RE = re.compile(r"\b[A-Z]\d{4}\b", re.IGNORECASE)
NAME_RE = re.compile(
    r"(?i:\bmy name is|\bmy name's|\bi'm|\bi’m|\bi am|\bcall me)\s+([A-Z][a-zA-Z'’-]*[a-z])\b"
)
NOT_NAMES = {
    "Not", "Sorry", "Looking", "Trying", "Just", "Still", "Here", "Fine", "Good", "Great", "Happy",
    "Interested", "Wondering", "Calling", "Writing", "Having", "Asking", "Also", "Very", "So", "Really",
}

_MEMORY_QUESTION_RES = [
    re.compile(r"\bwhat(?:'s|’s| is| was)\s+my\s+name\b"),
    re.compile(r"\bremember(?:s|ed|ing)?\b.*\bname\b"),
    re.compile(r"\b(?:know|recall)s?\s+(?:my|your)\s+name\b"),
    re.compile(r"\b(?:remember|recall)s?\s+(?:me|who i am)\b"),
    re.compile(r"\bwho am i\b"),
]
_GIFT_CARD_RE = re.compile(r"\bgift[\s-]?cards?\b")
_REFUND_RE = re.compile(r"\brefund|\bmoney back\b|\breimburse|\bpay (?:me|it) back\b")
_RETURN_RE = re.compile(r"\breturn|\brefund|\bsend (?:it|them|this|these)? ?back\b|\bmoney back\b|\bexchange\b")
_CANCEL_RE = re.compile(r"\bcancel")
_SHIPPING_RE = re.compile(
    r"\bship(?:ping)?\b|\bexpress\b|\bdelivery (?:time|times|options?|speed)\b|\bfaster\b"
    r"|\bhow long\b.*\b(?:deliver|delivery|take|arrive|ship)"
)
_ORDER_RE = re.compile(
    r"\border\b|\borders\b|\bpackage\b|\bparcel\b|\btrack(?:ing)?\b|\bwhere(?:'s|’s| is)\b.*\b(?:it|stuff)\b"
    r"|\barriv|\bdelivered\b|\bstatus\b"
)
_PASSWORD_RE = re.compile(
    r"\bpassword\b|\blog ?in\b|\bsign ?in\b|\blocked out\b|\baccount\b|\breset\b|\bcan't log\b|\bcannot log\b"
)
_GREETING_RE = re.compile(r"^\W*(?:hi|hello|hey|hiya|good (?:morning|afternoon|evening)|greetings)\b")
_THANKS_RE = re.compile(r"\bthanks?\b|\bthank you\b|\bbye\b|\bgoodbye\b|\bthat'?s all\b|\bthat is all\b")
_OFF_TOPIC_RE = re.compile(
    r"\bweather\b|\bforecast\b|\bpoem|\bpoetry\b|\bjoke\b|\bsong\b|\blyrics\b|\bstory\b|\bessay\b|\brecipe\b"
    r"|\bpython\b|\bjavascript\b|\bsql\b|\bhomework\b|\bstock market\b|\bbitcoin\b|\bfootball\b|\bmovie\b"
    r"|\bwrite (?:me )?(?:a |some )?(?:code|program|script|function)\b|\bcapital of\b"
)


# --------------------------------------------------------------------------- tools


def lookup_order(order_id: str) -> dict[str, str] | None:
    """The `lookup_order` tool: the order's record, or None when it does not exist."""
    record = ORDERS.get(order_id.strip().upper())
    return dict(record, order_id=order_id.strip().upper()) if record else None


def start_return(order_id: str, reason: str) -> dict[str, str]:
    """The `start_return` tool: open a return for a delivered order."""
    order = lookup_order(order_id)
    if order is None:
        return {"ok": "false", "error": f"Order {order_id} not found."}
    if order["status"] != "delivered":
        return {"ok": "false", "error": f"Order {order['order_id']} has not been delivered yet."}
    return {"ok": "true", "rma": f"RMA-{order['order_id']}", "reason": reason}


# --------------------------------------------------------------------------- helpers


def _text(message: dict[str, Any]) -> str:
    """A message's content as plain text (string content or OpenAI content parts)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return str(content)


def _user_texts(messages: list[dict[str, Any]]) -> list[str]:
    return [_text(m) for m in messages if isinstance(m, dict) and m.get("role") == "user"]


def _find_name(user_texts: list[str]) -> str | None:
    """The most recent name the user introduced themselves with, if any."""
    name = None
    for text in user_texts:
        for match in NAME_RE.finditer(text):
            candidate = match.group(1).replace("’", "'")
            if candidate not in NOT_NAMES:
                name = candidate
    return name


def _order_ids(text: str) -> list[str]:
    seen: list[str] = []
    for match in ORDER_ID_RE.findall(text):
        oid = match.upper()
        if oid not in seen:
            seen.append(oid)
    return seen


def _is_gold(context: dict[str, Any]) -> bool:
    tier = context.get("customer_tier")
    return isinstance(tier, str) and tier.strip().lower() in DEFAULT_GOLD_TIERS


def _express_phrase(context: dict[str, Any]) -> str:
    if _is_gold(context):
        return "As a Gold member you get free express shipping (1-2 business days) on every order."
    return "Express shipping takes 1-2 business days and costs $12."


def _requested_refund_method(text: str) -> str:
    """Which payout the customer asked for, as a REFUND_METHODS key."""
    if _GIFT_CARD_RE.search(text):
        return "gift_card"
    if "store credit" in text:
        return "store_credit"
    return "original_payment"


def _refund_terms(method: str) -> str:
    details = REFUND_METHODS[method]  # planted flaw b: KeyError('gift_card')
    return f"The refund will go to {details['label']} within {details['days']} of us receiving the items."


def _order_status_reply(order_id: str, context: dict[str, Any]) -> str:
    order = lookup_order(order_id)
    if order is None:
        return (
            f"I'm sorry, I can't find an order with the number {order_id}. Could you double-check it? "
            "Order numbers are one letter followed by four digits, like A1234."
        )
    status = order["status"]
    if status == "delivered":
        reply = f"Order {order_id} ({order['items']}) was {order['eta']}."
    elif status == "processing":
        reply = f"Order {order_id} ({order['items']}) is still being processed: it is {order['eta']}."
    elif status == "shipped":
        reply = f"Order {order_id} ({order['items']}) has shipped and is {order['eta']}."
    else:
        reply = f"Order {order_id} ({order['items']}) is {status} and {order['eta']}."
    if status in {"processing", "shipped"} and _is_gold(context):
        reply += " " + _express_phrase(context)
    return reply


def _return_reply(order_id: str, text: str) -> str:
    method = _requested_refund_method(text)
    terms = _refund_terms(method)
    reason_match = re.search(r"\b(?:because|since|as) (.+?)(?:[.!?]|$)", text)
    reason = reason_match.group(1).strip() if reason_match else "customer request"
    result = start_return(order_id, reason)
    if result["ok"] != "true":
        if "not found" in result["error"]:
            return (
                f"I'm sorry, I can't find an order with the number {order_id}. Could you double-check it? "
                "Order numbers are one letter followed by four digits, like A1234."
            )
        return (
            f"Order {order_id} hasn't been delivered yet, so it can't be returned. Once it arrives you'll have "
            f"{RETURN_WINDOW_DAYS} days to send back any unworn items."
        )
    return (
        f"I've started a return for order {order_id} (return number {result['rma']}). "
        "Please send the unworn items back with their tags within "
        f"{RETURN_WINDOW_DAYS} days using the prepaid label we'll email you. {terms}"
    )


def _returns_policy() -> str:
    return (
        f"You can return unworn items with their tags within {RETURN_WINDOW_DAYS} days of delivery. "
        "Refunds go to your original payment method within 5-7 business days of us receiving the items. "
        "If you'd like to start a return, just tell me your order number (for example A1234)."
    )


def _shipping_reply(context: dict[str, Any]) -> str:
    return (
        "Standard shipping takes 3-5 business days and is free on orders over $50. "
        + _express_phrase(context)
        + " Orders placed before 2 pm ship the same business day."
    )


def _password_reply() -> str:
    return (
        "To reset your password, go to acme-outfitters.example/login, click \"Forgot password?\" and enter the "
        "email address on your account. We'll email you a reset link that is valid for 1 hour. "
        "If you don't see it, check your spam folder; after 5 failed sign-in attempts your account is locked "
        "for 15 minutes."
    )


HELP_MENU = (
    "I can help with order status, returns and refunds, shipping times, order cancellations, "
    "and account or password questions."
)


# --------------------------------------------------------------------------- the agent


def _reply(messages: list[dict[str, Any]], context: dict[str, Any]) -> str:
    users = _user_texts(messages)
    if not users:
        return "Hello! Welcome to Acme Outfitters support. " + HELP_MENU + " How can I help you today?"
    raw = users[-1].strip()
    text = raw.lower()
    turn = len(users)

    # Planted flaw a: from the 3rd user message on the name is "forgotten".
    name = _find_name(users) if turn < FORGET_FROM_USER_TURN else None
    introduced_now = _find_name([raw]) is not None
    thanks_name = f"Thanks, {name}. " if name else ""

    if not text:
        return "It looks like your message was empty. " + HELP_MENU + " What can I do for you?"

    # "Do you remember my name?"
    if any(r.search(text) for r in _MEMORY_QUESTION_RES) and not introduced_now:
        if name:
            return f"Of course! Your name is {name}. How else can I help you today?"
        return (
            "I'm sorry, I don't know your name. I don't think you've told me yet. "
            "What should I call you?"
        )

    # Refunds to a gift card (planted flaw b: crashes in _refund_terms).
    earlier = " ".join(users[:-1]).lower()
    if _GIFT_CARD_RE.search(text) and (_REFUND_RE.search(text) or _REFUND_RE.search(earlier)):
        method = _requested_refund_method(text)
        terms = _refund_terms(method)
        ids = _order_ids(raw) or _order_ids(earlier)
        target = f"order {ids[0]}" if ids else "your order"
        return f"{thanks_name}I can arrange the refund for {target}. {terms}"

    # Planted flaw c: cancellations are refused although they are in scope.
    if _CANCEL_RE.search(text):
        return (
            f"{thanks_name}I'm sorry, I can't help with cancelling orders. "
            "Is there anything else I can do for you, such as checking an order's status?"
        )

    ids = _order_ids(raw)
    wants_return = bool(_RETURN_RE.search(text))
    if ids:
        if wants_return:
            body = " ".join(_return_reply(oid, text) for oid in ids)
        else:
            body = " ".join(_order_status_reply(oid, context) for oid in ids)
        return thanks_name + body

    earlier_ids = _order_ids(" ".join(users[:-1]))
    if wants_return:
        if earlier_ids and re.search(r"\b(?:it|this|that|them|the order|my order)\b", text) and "policy" not in text:
            return thanks_name + _return_reply(earlier_ids[-1], text)
        return thanks_name + _returns_policy()

    if _SHIPPING_RE.search(text):
        return thanks_name + _shipping_reply(context)

    if _ORDER_RE.search(text):
        if earlier_ids:
            return thanks_name + _order_status_reply(earlier_ids[-1], context)
        return (
            f"{thanks_name}I'd be happy to check on your order. Could you tell me your order number? "
            "It's one letter followed by four digits, like A1234, and it's in your confirmation email."
        )

    if _PASSWORD_RE.search(text):
        return thanks_name + _password_reply()

    if _OFF_TOPIC_RE.search(text):
        sorry = f"I'm sorry, {name}, but" if name else "I'm sorry, but"
        return (
            f"{sorry} I can only help with questions about Acme Outfitters orders and your account. "
            + HELP_MENU
            + " Is there something I can help you with there?"
        )

    if introduced_now:
        intro_name = _find_name([raw])
        if turn < FORGET_FROM_USER_TURN:
            return f"Nice to meet you, {intro_name}! I'm the Acme Outfitters assistant. {HELP_MENU} How can I help?"
        return f"Nice to meet you! I'm the Acme Outfitters assistant. {HELP_MENU} How can I help?"

    if _GREETING_RE.search(text):
        hello = f"Hi {name}!" if name else "Hello!"
        return f"{hello} Welcome to Acme Outfitters support. {HELP_MENU} How can I help you today?"

    if _THANKS_RE.search(text):
        bye = f", {name}" if name else ""
        return f"You're welcome{bye}! Is there anything else I can help you with?"

    return (
        f"{thanks_name}I'm not sure I understood. " + HELP_MENU + " Could you tell me a bit more about what you need?"
    )


def support_agent(messages: list[dict], session_id: str | None = None, **context: Any) -> str:
    """Reply to the last user message of `messages` (OpenAI chat format).

    Stateless: everything is derived from `messages`. `session_id` is accepted
    and ignored. `context` may carry `customer_tier` (e.g. "gold").
    """
    if not isinstance(messages, list):
        raise TypeError(f"messages must be a list of {{role, content}} dicts, got {type(messages).__name__}")
    return _reply(messages, context)


async def support_agent_async(messages: list[dict], session_id: str | None = None, **context: Any) -> str:
    """Async twin of `support_agent`: same reply, for testing async targets."""
    return support_agent(messages, session_id=session_id, **context)


_RESERVED_CONTEXT_KEYS = {"messages", "session_id"}


def stateful_reply(session_state: dict[str, Any], message: str, **context: Any) -> str:
    """Stateful wrapper: keep the history in `session_state["messages"]` and reply to `message`.

    The user message and the reply are appended only when the agent succeeds;
    when it raises, the history is left as it was and the exception propagates.
    Context keys that would clash with `support_agent`'s own parameters are dropped.
    """
    history: list[dict[str, Any]] = session_state.setdefault("messages", [])
    clean_context = {k: v for k, v in context.items() if k not in _RESERVED_CONTEXT_KEYS}
    attempt = [*history, {"role": "user", "content": message}]
    reply = support_agent(attempt, session_id=session_state.get("session_id"), **clean_context)
    history.append({"role": "user", "content": message})
    history.append({"role": "assistant", "content": reply})
    return reply
