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
        ├── CouldNotTest          a model failure (a refused key, ...) stopped the job: nothing was tested
        ├── AgentError            the agent under test raised, timed out or replied badly
        └── LLMError              a model call failed (simulated user, judge, generator, analyst)
            ├── LLMOutputError    the model replied, but not with the schema asked for
            └── LLMAuthError      the provider refused the credentials; the backend makes no more calls

Messages say what to do next. They never contain secrets: every message is
passed through `secrets.redact` when the error is made, so a key echoed in an
agent's or a provider's error body is masked before anything can store it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import secrets

if TYPE_CHECKING:
    from .models import Usage


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


class CouldNotTest(RunError):
    """Raised when a model failure (the simulated user's, a judge's or the generator's) stopped a job.

    Not a verdict on the agent: the CLI exits 3 ("could not test"), never 0 and never 1.
    """


class AgentError(RunError):
    """Raised when the agent under test raises, times out, or returns an unusable reply."""

    def __init__(self, message: str, *, kind: str = "exception", frames: list[str] | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.kind = kind  # exception | timeout | http | unparseable
        self.frames = list(frames or [])  # the agent's own traceback frames, "file.py:42 in fn" (Python targets)
        self.status = status  # the HTTP status of an HTTP target's error reply


class LLMError(RunError):
    """Raised when a model call fails after its retries.

    `retryable` says whether the last failure was transient (rate limit,
    server error, timeout), as opposed to fatal (bad key, unknown model).
    `kind` is one of `models.FAILURE_KINDS` (rate_limit, server_error, timeout,
    connection, auth, invalid_output, context_length, other). `usage` is what
    the call spent before it failed, every failed attempt included: callers add
    it to their role's usage even though the call failed.
    """

    kind_default = "other"

    def __init__(self, message: str, *, retryable: bool = False, status_code: int | None = None,
                 kind: str | None = None, usage: Usage | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status_code = status_code
        self.kind = kind or self.kind_default
        if usage is None:
            from .models import Usage  # models imports limits, which imports this module

            usage = Usage()
        self.usage = usage


class LLMOutputError(LLMError):
    """Raised when the model's reply does not parse into the requested schema, even after a repair attempt."""

    kind_default = "invalid_output"


class LLMAuthError(LLMError):
    """Raised when the provider refuses the credentials (HTTP 401/403, an invalid or missing key).

    The backend latches the first one: every later call on it raises this at once, without a
    request. The message names the model and the environment variable to fix.
    """

    kind_default = "auth"
