"""The one exception family of the engine.

Two branches, so that callers can tell "you asked for something wrong" from
"something failed while running":

    ConvsimError
    ├── UserInputError            the caller must change the request
    │   ├── InvalidTestCase       a test case (by index and field)
    │   ├── InvalidTarget         the agent spec, import path or signature
    │   ├── InvalidOption         any other argument (max_turns, model, ...)
    │   └── NotFound              an unknown run or session id
    └── RunError                  something failed during a run
        ├── AgentError            the agent under test raised, timed out or replied badly
        └── LLMError              the simulator's (or judge's) model call failed
            └── LLMOutputError    the model replied, but not with the schema asked for

Messages say what to do next. They never contain secrets: every message is
passed through `secrets.redact` when the error is made, so a key echoed in an
agent's or a provider's error body is masked before anything can store it.
"""

from __future__ import annotations

from . import secrets


class ConvsimError(Exception):
    """Root of every error the engine raises on purpose."""

    def __init__(self, message: str = "", *args: object):
        super().__init__(secrets.redact(str(message)), *args)


class UserInputError(ConvsimError):
    """Raised when a request is invalid; nothing has run yet."""


class InvalidTestCase(UserInputError):
    """Raised when a test case is missing a field or has a wrong value."""

    def __init__(self, message: str, *, index: int | None = None, field: str | None = None):
        """`index` is 0-based, as in the list; messages count from 1, as people do."""
        where = []
        if index is not None:
            where.append(f"test case {index + 1}")
        if field:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.index = index
        self.field = field


class InvalidTarget(UserInputError):
    """Raised when the agent under test cannot be reached as specified."""


class InvalidOption(UserInputError):
    """Raised when a job option is out of range or malformed."""


class NotFound(UserInputError):
    """Raised when a run or session id is unknown to the store."""


class RunError(ConvsimError):
    """Raised when something fails while a job runs."""


class AgentError(RunError):
    """Raised when the agent under test raises, times out, or returns an unusable reply."""

    def __init__(self, message: str, *, kind: str = "exception"):
        super().__init__(message)
        self.kind = kind  # exception | timeout | http | unparseable


class LLMError(RunError):
    """Raised when a model call fails after its retries.

    `retryable` says whether the last failure was transient (rate limit,
    server error, timeout), as opposed to fatal (bad key, unknown model).
    """

    def __init__(self, message: str, *, retryable: bool = False, status_code: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status_code = status_code


class LLMOutputError(LLMError):
    """Raised when the model's reply does not parse into the requested schema, even after a repair attempt."""
