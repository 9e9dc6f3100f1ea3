"""The rate limiter: pacing, tokens, 429 pause and recovery, cancellation, FIFO; then end to end against a
fake provider that answers 429 above R requests per second. Limiter units run on a fake clock: no timing
is asserted anywhere, only counts and the fake clock's readings."""

from __future__ import annotations

import email.utils
import gc
import logging
import threading
import time

import anyio
import pytest

from engine import InvalidOption, LLMError, Role, StopReason, UserTurn, resolve_llm, simulate
from engine.llm import ratelimit
from engine.llm.base import LLMSettings
from engine.llm.litellm_backend import LiteLLMBackend
from engine.llm.ratelimit import (
    DECREASE,
    RECOVERY_PER_S,
    WINDOW_MARGIN,
    RateLimiter,
    RateLimitExhausted,
    estimate_tokens,
    limiter_for,
    retry_after_seconds,
)
from tests.conftest import ROOT, agent
from tests.fake_llm import FakeReply

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


class FakeClock:
    """Time stands still until someone sleeps; a sleep moves it forward (only the queue's head sleeps)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += max(0.0, seconds)
        await anyio.lowlevel.checkpoint()


class ManualClock(FakeClock):
    """Sleeps wait until the test advances the clock past their end."""

    def __init__(self) -> None:
        super().__init__()
        self._sleepers: list[tuple[float, anyio.Event]] = []

    async def sleep(self, seconds: float) -> None:
        event = anyio.Event()
        self._sleepers.append((self.now + seconds, event))
        await event.wait()

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its own end time."""
        target = self.now + seconds
        while True:
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            due = sorted((end, i) for i, (end, _) in enumerate(self._sleepers) if end <= target + 1e-9)
            if not due:
                break
            end, i = due[0]
            self.now = max(self.now, end)
            self._sleepers.pop(i)[1].set()
        self.now = target


def limiter(clock: FakeClock, **rates) -> RateLimiter:
    return RateLimiter(name="test/model", clock=clock, sleep=clock.sleep, **rates)


async def departures(lim: RateLimiter, n: int, tokens: int = 0) -> list[tuple[int, float]]:
    """n concurrent acquires started in order; (index, departure time) in the order they left."""
    out: list[tuple[int, float]] = []

    async def one(i: int) -> None:
        ticket = await lim.acquire(tokens)
        out.append((i, ticket.sent_at))

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return out


# --- pacing ---------------------------------------------------------------------------------------

async def test_requests_are_spread_evenly_at_the_configured_rate():
    clock = FakeClock()
    out = await departures(limiter(clock, rpm=600), 40)  # 10 per second
    times = [t for _, t in out]
    assert sum(1 for t in times if t < 0.95) == 10 and sum(1 for t in times if t < 1.95) == 20
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.1 - 1e-9  # no burst: never two requests closer than 60 / rpm


async def test_late_wake_ups_are_made_up_but_no_second_gets_more_than_its_share():
    clock = FakeClock()
    sleep = clock.sleep

    async def oversleep(seconds: float) -> None:  # a busy event loop wakes the head late
        await sleep(seconds + 0.03)

    lim = RateLimiter(rpm=600, name="test/model", clock=clock, sleep=oversleep)
    times = [t for _, t in await departures(lim, 60)]
    assert times[-1] < 60 * 0.13  # faster than a limiter that lost every late wake-up (0.13 s per request)
    assert max(sum(1 for t in times if start <= t < start + 1.0) for start in times) <= 10


async def test_waiters_leave_in_the_order_they_came():
    out = await departures(limiter(FakeClock(), rpm=120), 25)
    assert [i for i, _ in out] == list(range(25))


async def test_tokens_per_minute_pace_by_the_estimate_and_are_corrected_by_usage():
    clock = FakeClock()
    lim = limiter(clock, tpm=6000)  # 100 tokens per second
    out = await departures(lim, 20, tokens=50)  # 2 requests per second
    assert sum(1 for _, t in out if t < 4.9) == 10
    ticket = await lim.acquire(50)
    lim.succeeded(ticket, 250)  # the provider counted 200 more tokens: 2 s more before the next request
    assert (await lim.acquire(50)).sent_at == pytest.approx(ticket.sent_at + 2.5)


async def test_an_unconfigured_limiter_never_waits():
    clock = FakeClock()
    out = await departures(limiter(clock), 100)
    assert clock.sleeps == 0 and {t for _, t in out} == {0.0}


# --- 429s --------------------------------------------------------------------------------------------

async def test_a_429_pauses_everyone_for_retry_after_then_the_rate_is_cut_and_recovers():
    clock = FakeClock()
    lim = limiter(clock, rpm=600)
    first = await lim.acquire()
    lim.rate_limited(first, 5.0)
    after = [t for _, t in await departures(lim, 10)]
    assert after[0] == pytest.approx(5.0)  # nobody left during the pause
    gaps = [b - a for a, b in zip(after, after[1:])]
    assert gaps[0] == pytest.approx(0.1 / DECREASE, rel=0.02)  # slower than configured, then climbing back
    assert all(b <= a for a, b in zip(gaps, gaps[1:]))
    clock.now += (1 - DECREASE) / RECOVERY_PER_S + 1  # long enough to climb back to the configured rate
    lim.succeeded(await lim.acquire())
    later = [t for _, t in await departures(lim, 10)]
    margin = 10 * 0.1 * (WINDOW_MARGIN - 1) + 1e-6  # a second's worth of departures spans that much more
    assert [b - a for a, b in zip(later, later[1:])] == pytest.approx([0.1] * 9, abs=margin)  # the configured rate


async def test_429s_of_requests_sent_before_a_cut_do_not_cut_again():
    clock = FakeClock()
    lim = limiter(clock, rpm=600)
    in_flight = [await lim.acquire() for _ in range(5)]
    for ticket in in_flight:
        lim.rate_limited(ticket, 0.0)
    out = [t for _, t in await departures(lim, 3)]
    assert [b - a for a, b in zip(out, out[1:])] == pytest.approx([0.1 / DECREASE] * 2, rel=0.05)  # one cut, not 5


async def test_an_unconfigured_limiter_learns_a_rate_from_a_429_and_later_stops_pacing():
    clock = FakeClock()
    lim = limiter(clock)
    for _ in range(10):  # 10 requests over one second
        await lim.acquire()
        clock.now += 0.1
    lim.rate_limited(None, None)  # no Retry-After: a short backoff, and pacing at DECREASE x what it measured
    out = [t for _, t in await departures(lim, 5)]
    assert out[0] > clock.now - 5 and all(b - a > 0 for a, b in zip(out, out[1:]))
    clock.now += 60
    lim.succeeded(await lim.acquire())
    sleeps = clock.sleeps
    await departures(lim, 50)
    assert clock.sleeps == sleeps  # recovered: unpaced again


async def test_rate_cuts_are_warned_about_at_most_every_30_seconds(caplog):
    """An adaptive limiter may cut its rate every few seconds: one warning, the rest at debug level."""
    clock = FakeClock()
    lim = limiter(clock, rpm=600)
    caplog.set_level(logging.DEBUG, logger="convsim.llm")
    for later in (0, 2, 2, 40):  # four 429 episodes: each for a request sent after the previous cut
        clock.now += later
        lim.rate_limited(await lim.acquire(), 0.0)
    cuts = [r for r in caplog.records if "429 from the provider" in r.getMessage()]
    assert [r.levelno for r in cuts] == [logging.WARNING, logging.DEBUG, logging.DEBUG, logging.WARNING]


async def test_a_provider_that_only_answers_429_ends_every_waiter_with_a_clear_error():
    clock = FakeClock()
    lim = limiter(clock, rpm=60)
    lim.rate_limited(await lim.acquire(), 30.0)
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await lim.acquire(give_up_after=10.0)
        except RateLimitExhausted as e:
            errors.append(e)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one)
    assert len(errors) == 4 and clock.now == pytest.approx(10.0, abs=0.01)
    assert "429" in str(errors[0]) and "CONVSIM_LLM_RPM" in str(errors[0]) and errors[0].kind == "rate_limit"


# --- cancellation --------------------------------------------------------------------------------

async def test_a_cancelled_waiter_gives_back_its_turn():
    clock = ManualClock()
    lim = limiter(clock, rpm=60)  # one per second
    await lim.acquire()  # leaves at 0; the next may leave at 1
    left: list[tuple[str, float]] = []
    scopes: dict[str, anyio.CancelScope] = {}

    async def one(name: str) -> None:
        with anyio.CancelScope() as scope:
            scopes[name] = scope
            left.append((name, (await lim.acquire()).sent_at))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for name in ("head", "middle", "last"):
                tg.start_soon(one, name)
                await clock.advance(0)
            scopes["head"].cancel()  # sleeping at the head of the queue
            scopes["middle"].cancel()  # waiting behind it
            await clock.advance(0)
            await clock.advance(1.5)
    assert [name for name, _ in left] == ["last"] and left[0][1] < 1.5  # the next slot (~1 s) went to it, not 3 s


async def test_a_cancelled_waiter_leaves_the_queue_usable():
    clock = FakeClock()
    lim = limiter(clock, rpm=600)
    with anyio.move_on_after(0):
        await lim.acquire()
    assert [i for i, _ in await departures(lim, 5)] == [0, 1, 2, 3, 4]


# --- parts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers, expected", [
    pytest.param({"Retry-After": "7"}, 7.0, id="seconds"),
    pytest.param({"retry-after": "0.5"}, 0.5, id="fractional"),
    pytest.param({"retry-after-ms": "250", "Retry-After": "1"}, 0.25, id="milliseconds-first"),
    pytest.param({"Retry-After": "soon"}, None, id="garbage"),
    pytest.param({}, None, id="none"),
])
def test_retry_after_is_read_from_seconds_and_milliseconds(headers, expected):
    assert retry_after_seconds(headers) == expected


def test_retry_after_may_be_an_http_date():
    now = time.time()
    when = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after_seconds({"Retry-After": when}, now=now) == pytest.approx(30, abs=1.01)


def test_tokens_are_estimated_from_the_characters():
    assert estimate_tokens([{"role": "user", "content": "x" * 400}]) == 104


def test_backends_of_one_endpoint_and_model_share_a_limiter():
    a = LiteLLMBackend(LLMSettings(model="openai/m", api_base="http://127.0.0.1:1/v1", api_key="k", rpm=100))
    b = LiteLLMBackend(LLMSettings(model="openai/m", api_base="http://127.0.0.1:1/v1", api_key="k", rpm=100))
    c = LiteLLMBackend(LLMSettings(model="openai/other", api_base="http://127.0.0.1:1/v1", api_key="k"))
    assert a._rate is b._rate is limiter_for("http://127.0.0.1:1/v1", "openai/m", owner=b, rpm=100)
    assert c._rate is not a._rate


async def test_a_shared_limiter_paces_at_the_strictest_rates_of_the_backends_that_hold_it(fake_llm):
    """A second run configured without rpm (or with a higher one) does not lift the first run's limit; a backend's
    rates go when its job closes it (or, failing that, when it is collected), and come back if it is used again."""
    def backend(**rates):
        return LiteLLMBackend(LLMSettings(model="openai/strict", api_base=fake_llm.url, api_key="k", **rates))
    first = backend(rpm=60, tpm=9000)
    limiter = first._rate
    unlimited = backend()
    higher = backend(rpm=600, tpm=5000)
    assert (limiter.rpm, limiter.tpm) == (60, 5000)
    await first.aclose()
    assert (limiter.rpm, limiter.tpm) == (600, 5000)  # its rates went with its job
    fake_llm.set_handler(lambda req: turn("again"))
    await first.complete(MESSAGES, UserTurn, role=Role.USER)
    assert (limiter.rpm, limiter.tpm) == (60, 5000)  # used again: held again
    await first.aclose()
    del higher
    gc.collect()
    assert (limiter.rpm, limiter.tpm) == (None, None) and unlimited._rate is limiter  # collected: gone too


def test_rpm_and_tpm_come_from_the_arguments_or_the_environment(monkeypatch):
    monkeypatch.setenv("CONVSIM_LLM_RPM", "120")
    monkeypatch.setenv("CONVSIM_LLM_TPM", "40000")
    llm = resolve_llm("openai/x", api_base="http://127.0.0.1:1/v1", api_key="k")
    assert (llm.settings.rpm, llm.settings.tpm) == (120.0, 40000.0)
    llm = resolve_llm("openai/x", api_base="http://127.0.0.1:1/v1", api_key="k", rpm=30)
    assert llm.settings.rpm == 30.0


@pytest.mark.parametrize("given, env, named", [
    pytest.param({"rpm": 0}, {}, "rpm", id="zero"),
    pytest.param({"tpm": -5}, {}, "tpm", id="negative"),
    pytest.param({"rpm": True}, {}, "rpm", id="bool"),
    pytest.param({}, {"CONVSIM_LLM_RPM": "fast"}, "CONVSIM_LLM_RPM", id="env-text"),
    pytest.param({}, {"CONVSIM_LLM_TPM": "inf"}, "CONVSIM_LLM_TPM", id="env-inf"),
])
def test_bad_rates_are_refused_naming_the_field(monkeypatch, given, env, named):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(InvalidOption, match=named):
        resolve_llm("openai/x", api_base="http://127.0.0.1:1/v1", api_key="k", **given)


# --- through the backend and a real fake provider ------------------------------------------------

def turn(message: str = "next", done: bool = False) -> dict:
    return {"message": message, "goal_achieved": done, "end_conversation": False, "reason": "r"}


def backend(fake, **settings) -> LiteLLMBackend:
    settings = {"max_retries": 1, "backoff_s": 0.01, "timeout_s": 5, **settings}
    return LiteLLMBackend(LLMSettings(model="openai/fake-user", api_base=fake.url, api_key="k", **settings))


async def test_429s_do_not_spend_the_retry_budget(fake_llm):
    fake_llm.queue(*[FakeReply(status=429, headers={"retry-after-ms": "1"}) for _ in range(4)], turn("hi"))
    result = await backend(fake_llm, max_retries=1).complete(MESSAGES, UserTurn, role=Role.USER)
    assert result.output.message == "hi" and fake_llm.calls == 5
    assert result.usage.failures == {"rate_limit": 4}


async def test_only_429s_end_with_a_clear_error_not_a_hang(fake_llm):
    fake_llm.set_handler(lambda req: FakeReply(status=429, headers={"Retry-After": "0"}))
    with pytest.raises(LLMError) as info:
        await backend(fake_llm, rate_limit_wait_s=0.5).complete(MESSAGES, UserTurn, role=Role.USER)
    assert info.value.kind == "rate_limit" and "only 429" in str(info.value)
    assert info.value.usage.failures["rate_limit"] == fake_llm.calls >= 2


class PerSecondLimit:
    """A provider allowing `rate` requests in any one-second window; above it, 429 with the wait in ms."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.accepted: list[float] = []
        self.refused = 0
        self._lock = threading.Lock()

    def __call__(self, request: dict) -> FakeReply:
        with self._lock:
            now = time.monotonic()
            window = [t for t in self.accepted if t > now - 1.0]
            if len(window) >= self.rate:
                self.refused += 1
                wait = window[0] + 1.0 - now
                return FakeReply(status=429, headers={"retry-after-ms": f"{wait * 1000:.0f}", "Retry-After": "1"})
            self.accepted.append(now)
        n = sum(1 for m in request.get("messages") or [] if m.get("role") == "assistant")
        return FakeReply(content=turn(f"question {n}"))


async def test_a_run_configured_for_the_providers_rate_loses_no_session(store, fake_llm):
    provider = PerSecondLimit(rate=20)
    fake_llm.set_handler(provider)
    cases = [{"goal": "Ask about item 1. Ask about item 2. Ask about item 3.", "id": f"c{i}"} for i in range(12)]
    summary = await simulate(store, agent("echo"), cases, model="openai/fake-user", api_base=fake_llm.url,
                             api_key="k", rpm=20 * 60, max_turns=3, concurrency=12, workspace=ROOT)
    sessions = await store.get_sessions(summary.run_id)
    assert len(sessions) == 12 and all(s.stop_reason == StopReason.MAX_TURNS for s in sessions)
    assert len(provider.accepted) == 36 and fake_llm.calls == 36 + provider.refused


# --- the options, through the MCP tools and the command line -------------------------------------

async def test_the_mcp_tools_take_rpm_and_tpm_and_a_run_records_them(store, fake_llm, monkeypatch):
    from mcp import Client

    from convsim_mcp.server import build_server

    paced_at = []  # the rates of the backend's limiter as each request arrives (they go with the backend)

    def handler(req):
        limiter = ratelimit._limiters[(fake_llm.url, "openai/fake-rpm")]
        paced_at.append((limiter.rpm, limiter.tpm))
        return turn("more")
    fake_llm.set_handler(handler)
    monkeypatch.setenv("CONVSIM_API_BASE", fake_llm.url)
    monkeypatch.setenv("CONVSIM_API_KEY", "k")
    args = {"target": agent("echo"), "test_cases": [{"goal": "g"}], "max_turns": 2, "model": "openai/fake-rpm",
            "rpm": 6000, "tpm": 1_000_000}
    async with Client(build_server(store)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        for name in ("simulate_conversations", "test_agent", "score_sessions", "generate_test_cases", "rerun_issue"):
            assert {"rpm", "tpm"} <= set(tools[name].input_schema["properties"]), name
        done = await client.call_tool("simulate_conversations", args)
        bad = await client.call_tool("simulate_conversations", {**args, "rpm": 0})
    assert not done.is_error, done.content
    options = (await store.get_run(done.structured_content["run_id"]))["options"]
    assert (options["rpm"], options["tpm"]) == (6000.0, 1_000_000.0)
    assert paced_at and set(paced_at) == {(6000.0, 1_000_000.0)}
    assert bad.is_error and "rpm must be a positive number" in bad.content[0].text


@pytest.mark.slow
def test_the_command_line_takes_rpm_and_refuses_a_bad_one(tmp_path):
    import json
    import os
    import subprocess
    import sys

    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"goal": "track my order"}]), encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    env.update(CONVSIM_HOME=str(tmp_path), PYTHONPATH=str(ROOT), CONVSIM_ROOTS=str(tmp_path))

    def convsim(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "convsim_mcp", "simulate", "tests.agents:echo", str(cases),
                               "--max-turns", "2", "--db", str(tmp_path / "db.sqlite"), *args], cwd=ROOT,
                              env={**env, **extra}, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)

    ok, bad, bad_env = convsim("--rpm", "600", "--tpm", "90000"), convsim("--rpm", "0"), convsim(CONVSIM_LLM_TPM="x")
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode == 2 and "rpm must be a positive number" in bad.stderr and "Traceback" not in bad.stderr
    assert bad_env.returncode == 2 and "CONVSIM_LLM_TPM" in bad_env.stderr
