"""A per-endpoint request and token rate limiter that queues, paces evenly and learns from 429s.

One `RateLimiter` per (api_base, model) in the process (`limiter_for`), so two backends that call the same
model at the same endpoint (a run's simulated user and its judges, two runs of a server) share one budget.
While several backends hold it, the strictest rates any of them was configured with apply: a second run
configured without rpm does not lift the first one's limit, and a backend's rates go when its job ends.

    ticket = await limiter.acquire(tokens=estimate_tokens(messages), give_up_after=300)
    ...send the request...
    limiter.succeeded(ticket, actual_tokens)      # or
    limiter.rate_limited(ticket, retry_after_s)   # on a 429

How it paces. Requests leave one at a time from a FIFO queue. With `rpm`, they leave 60/rpm seconds apart
on a grid (a head the busy event loop woke late, by up to CATCH_UP_S, is made up), and the last second's
worth of departures always spans a second (x WINDOW_MARGIN): evenly spread, never a burst that trips a
provider's per-second window. With `tpm`,
a request of `e` estimated tokens pushes the next departure back by e x 60/tpm seconds; the estimate
(characters / 4) is corrected by the usage the provider reports. Waiting costs a slot only once a request
leaves: a waiter cancelled in the queue takes nothing and the next one moves up.

How it learns. A 429 pauses every caller for its Retry-After (seconds, an HTTP date or OpenAI's
`retry-after-ms`; capped at MAX_PAUSE_S), or, without one, for a backoff that doubles while nothing
succeeds. It also cuts the rate by DECREASE, once per episode (a 429 for a request sent before the last
cut is the same episode), and the rate then climbs back by RECOVERY_PER_S of the configured rate per
second. Without rpm/tpm the limiter costs a clock read per request until a 429; then it paces at
DECREASE x the rate it measured, recovers the same way, and returns to unpaced once it reaches
ADAPTIVE_CEILING x that rate.

It never hangs on a provider that only answers 429: once the endpoint has been refused for
`give_up_after` seconds without a single success, every waiter raises `RateLimitExhausted`.
"""

from __future__ import annotations

import collections
import email.utils
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import anyio

from ..errors import LLMError

log = logging.getLogger("convsim.llm")

DECREASE = 0.8  # rate multiplier on each new 429 episode
RECOVERY_PER_S = 0.1  # of the base rate, regained per second without a new episode
MIN_FACTOR = 0.05  # the rate never falls below this share of its base
ADAPTIVE_CEILING = 2.0  # unconfigured: back to unpaced at this multiple of the rate measured at the 429
ADAPTIVE_FALLBACK_RPM = 60.0  # unconfigured, a 429 reported before any request left
MAX_PAUSE_S = 60.0
LOG_EVERY_S = 30.0  # rate cuts logged as warnings at most this often (the rest at debug level)
BACKOFF_S = 1.0  # pause after a 429 without Retry-After, doubled per episode until a success
HISTORY = 256  # departures remembered: the window below, and the rate measured at a 429 (unconfigured)
MEASURED = 64  # departures the measured rate is taken over
CATCH_UP_S = 0.1  # a late wake-up (a busy event loop) up to this long is made up, within the window below
WINDOW_MARGIN = 1.04  # any B consecutive departures span at least B intervals x this (B: about a second's worth)

EXHAUSTED = ("model {model}: the provider has answered only 429 (rate limited) for {waited:.0f}s; lower the request "
             "rate (rpm / CONVSIM_LLM_RPM, tpm / CONVSIM_LLM_TPM) or the concurrency, or try again later")


class RateLimitExhausted(LLMError):
    """Raised when an endpoint has refused every request with 429 for longer than the caller waits."""

    def __init__(self, message: str):
        super().__init__(message, retryable=False, status_code=429, kind="rate_limit")


@dataclass(slots=True)
class Ticket:
    """One request that left the queue: when, and the tokens it was charged."""

    sent_at: float
    tokens: int


class _Waiter:
    __slots__ = ("tokens", "event")

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.event: anyio.Event | None = None


class RateLimiter:
    """Requests and tokens per minute for one endpoint; see the module docstring.

    `clock` and `sleep` are injectable so tests can run on a fake clock.
    """

    def __init__(self, rpm: float | None = None, tpm: float | None = None, *, name: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = anyio.sleep):
        self.name = name
        self._clock, self._sleep = clock, sleep
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._next_request = 0.0  # earliest departure allowed by the request rate
        self._next_token = 0.0  # earliest departure allowed by the token rate
        self._paused_until = 0.0
        self._history: collections.deque[float] = collections.deque(maxlen=HISTORY)
        self._limited_since: float | None = None  # first 429 since the last success
        self._streak = 0  # 429 episodes since the last success
        self._cut_at = -math.inf  # when the rate was last cut
        self._cut_factor = 1.0
        self._recover_from = -math.inf  # the end of the pause that came with the last cut
        self._adaptive_rpm: float | None = None  # unconfigured: the learnt base rate
        self.rate_limited_count = 0
        self._logged_at = -math.inf  # when a rate cut was last logged as a warning
        self._owners: dict[int, tuple[float | None, float | None]] = {}  # id(backend) -> its rates (see hold)
        self._finalizers: dict[int, weakref.finalize] = {}
        self._owners_lock = threading.Lock()
        self.configure(rpm, tpm)

    def configure(self, rpm: float | None, tpm: float | None) -> None:
        """Set the configured rates (None: unlimited, adaptive on 429)."""
        self.rpm, self.tpm = rpm, tpm

    def hold(self, owner: object, rpm: float | None, tpm: float | None) -> None:
        """`owner` (a backend) uses this limiter with these rates until it `release`s it (a job's end) or is
        collected: the limiter paces at the lowest rpm and the lowest tpm its owners name (None where none does)."""
        key = id(owner)
        with self._owners_lock:  # a collected owner is released from whichever thread the collector runs in
            self._owners[key] = (rpm, tpm)
            if key not in self._finalizers:
                self._finalizers[key] = weakref.finalize(owner, self._release, key)
            self._apply_owners()

    def release(self, owner: object) -> None:
        """`owner`'s rates no longer apply (it may `hold` again)."""
        self._release(id(owner))

    def _release(self, key: int) -> None:
        with self._owners_lock:
            finalizer = self._finalizers.pop(key, None)
            if finalizer is not None:
                finalizer.detach()
            if self._owners.pop(key, None) is not None:
                self._apply_owners()

    def _apply_owners(self) -> None:
        rates = tuple(self._owners.values())
        rpms = [r for r, _ in rates if r is not None]
        tpms = [t for _, t in rates if t is not None]
        self.configure(min(rpms) if rpms else None, min(tpms) if tpms else None)

    # --- the hot path ---------------------------------------------------------------------------

    @property
    def counts_tokens(self) -> bool:
        return self.tpm is not None

    def _paced(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self._adaptive_rpm is not None

    async def acquire(self, tokens: int = 0, *, give_up_after: float = math.inf) -> Ticket:
        """Wait for this request's turn and return its ticket. Raises RateLimitExhausted (see module doc)."""
        now = self._clock()
        if (not self._queue and self._limited_since is None and now >= self._paused_until
                and (not self._paced() or self._ready_in(now) <= 0)):
            return self._depart(now, tokens)
        waiter = _Waiter(tokens)
        self._queue.append(waiter)
        departed = False
        try:
            while True:
                if self._queue[0] is not waiter:
                    waiter.event = anyio.Event()
                    await waiter.event.wait()
                    continue
                now = self._clock()
                self._check_exhausted(now, give_up_after)
                delay = max(self._paused_until - now, self._ready_in(now))
                if delay <= 0:
                    self._queue.popleft()
                    departed = True
                    return self._depart(now, tokens)
                if self._limited_since is not None:  # wake up in time to give up
                    delay = min(delay, max(0.0, self._limited_since + give_up_after - now) + 1e-3)
                await self._sleep(delay)
        finally:
            if not departed:
                if self._queue and self._queue[0] is waiter:
                    self._queue.popleft()
                else:
                    try:
                        self._queue.remove(waiter)
                    except ValueError:
                        pass
            if self._queue and self._queue[0].event is not None:
                self._queue[0].event.set()

    def _depart(self, now: float, tokens: int) -> Ticket:
        self._history.append(now)
        if self._paced():
            factor = self._factor(now)
            rpm = self.rpm if self.rpm is not None else self._adaptive_rpm
            if rpm is not None:  # on a grid, so a late wake-up (a busy event loop) does not lower the rate
                interval = 60.0 / (rpm * factor)
                on_grid = now - self._next_request <= max(CATCH_UP_S, interval / 2)  # else idle: a new grid
                self._next_request = (self._next_request if on_grid else now) + interval
            if self.tpm is not None and tokens:
                self._next_token = max(now, self._next_token) + tokens * 60.0 / (self.tpm * factor)
        return Ticket(now, tokens)

    def _ready_in(self, now: float) -> float:
        """Seconds until the rates let the next request leave.

        Besides the grid, a window: the last B departures (about one second's worth) must span B intervals
        (x WINDOW_MARGIN), so catching up never puts more than a second's worth into any second. Departures
        before the last cut are left out: the cut slows the grid, not retroactively the second before it.
        """
        ready = max(self._next_request, self._next_token if self.tpm is not None else 0.0)
        rpm = self.rpm if self.rpm is not None else self._adaptive_rpm
        if rpm is not None:
            count = min(HISTORY, max(1, round(rpm / 60.0)))
            if len(self._history) >= count and self._history[-count] > self._cut_at:  # those since the last cut
                interval = 60.0 / (rpm * self._factor(now))
                ready = max(ready, self._history[-count] + count * interval * WINDOW_MARGIN)
        return ready - now

    def _factor(self, now: float) -> float:
        """The share of the base rate allowed now: cut on 429 episodes, climbing back linearly."""
        if self._cut_factor >= 1.0 and self._adaptive_rpm is None:
            return 1.0
        ceiling = ADAPTIVE_CEILING if (self._adaptive_rpm is not None and self.rpm is None) else 1.0
        factor = min(ceiling, self._cut_factor + RECOVERY_PER_S * max(0.0, now - self._recover_from))
        if factor >= ceiling:
            self._cut_factor = ceiling
            if ceiling > 1.0 and self.tpm is None:  # recovered well past the rate that was refused: unpaced again
                self._adaptive_rpm = None
                self._cut_factor = 1.0
                log.info("rate limiter %s: no 429 for a while; no longer paced", self.name)
        return factor

    def _check_exhausted(self, now: float, give_up_after: float) -> None:
        if self._limited_since is not None and now - self._limited_since >= give_up_after:
            raise RateLimitExhausted(EXHAUSTED.format(model=self.name or "?", waited=now - self._limited_since))

    # --- feedback -------------------------------------------------------------------------------

    def succeeded(self, ticket: Ticket, tokens: int | None = None) -> None:
        """The request got an answer: the endpoint is not refusing us; correct its token charge."""
        self._limited_since = None
        self._streak = 0
        if tokens is not None and self.tpm is not None and tokens != ticket.tokens:
            self._next_token += (tokens - ticket.tokens) * 60.0 / (self.tpm * self._factor(self._clock()))

    def rate_limited(self, ticket: Ticket | None, retry_after: float | None) -> None:
        """The request got a 429: pause everyone for Retry-After and, once per episode, cut the rate."""
        now = self._clock()
        self.rate_limited_count += 1
        if self._limited_since is None:
            self._limited_since = now
        new_episode = ticket is None or ticket.sent_at > self._cut_at
        if new_episode:
            self._streak += 1
            if self.rpm is None and self.tpm is None and self._adaptive_rpm is None:
                self._adaptive_rpm = self._measured_rpm(now)
                self._cut_factor = DECREASE
            else:
                self._cut_factor = max(MIN_FACTOR, self._factor(now) * DECREASE)
            self._cut_at = now
            # a warning at most every LOG_EVERY_S: an adaptive limiter may cut its rate every few seconds
            level = logging.DEBUG
            if now - self._logged_at >= LOG_EVERY_S:
                level, self._logged_at = logging.WARNING, now
            log.log(level, "rate limiter %s: 429 from the provider; pacing at %.0f%% of %s", self.name,
                    self._cut_factor * 100, self._base_description())
        if retry_after is not None:
            pause = min(max(0.0, retry_after), MAX_PAUSE_S)
        elif new_episode:
            pause = min(BACKOFF_S * 2 ** (self._streak - 1), MAX_PAUSE_S)
        else:
            pause = 0.0
        self._paused_until = max(self._paused_until, now + pause)
        self._next_request = max(self._next_request, self._paused_until)  # no catching up after a 429
        if new_episode:
            self._recover_from = self._paused_until

    def _measured_rpm(self, now: float) -> float:
        if not self._history:
            return ADAPTIVE_FALLBACK_RPM
        count = min(len(self._history), MEASURED)
        span = max(now - self._history[-count], 1e-3)  # up to the 429: its latency counts, so one request is a rate
        return count / span * 60.0

    def _base_description(self) -> str:
        parts = [f"{self.rpm:g} rpm" if self.rpm is not None else "",
                 f"{self.tpm:g} tpm" if self.tpm is not None else ""]
        if self._adaptive_rpm is not None and self.rpm is None:
            parts.append(f"{self._adaptive_rpm:.0f} rpm (measured)")
        return ", ".join(p for p in parts if p)


_limiters: dict[tuple[str | None, str], RateLimiter] = {}


def limiter_for(api_base: str | None, model: str, *, owner: object, rpm: float | None = None,
                tpm: float | None = None) -> RateLimiter:
    """The process's limiter for this endpoint and model, held by `owner` with these rates (see `hold`)."""
    key = (api_base, model)
    limiter = _limiters.get(key)
    if limiter is None:
        limiter = _limiters[key] = RateLimiter(name=model)
    limiter.hold(owner, rpm, tpm)
    return limiter


def estimate_tokens(messages: list[dict[str, Any]]) -> int:
    """A request's prompt tokens, roughly: characters / 4 (the provider's usage corrects it afterwards)."""
    chars = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return chars // 4 + 4 * len(messages)


def retry_after_seconds(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from response headers: `retry-after-ms`, else `Retry-After` as seconds or an HTTP date."""
    if not headers:
        return None
    get = headers.get
    ms = get("retry-after-ms") or get("Retry-After-Ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = get("retry-after") or get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
