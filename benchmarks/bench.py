"""Benchmarks for convsim-mcp: engine overhead against an ideal, LLM calls per turn, startup time.

    .venv/bin/python benchmarks/bench.py            # full run, ~2-3 minutes
    .venv/bin/python benchmarks/bench.py --quick    # smaller, under a minute
    .venv/bin/python benchmarks/bench.py --json out.json

Everything runs locally: the simulated user's model is the test suite's fake
OpenAI-compatible server (tests/fake_llm.py), started in a child process on
127.0.0.1 so its request handling does not share this process's GIL; the
agent under test is `agent` below, loaded by file path like any user agent.
No API key, no network beyond 127.0.0.1, and every database lives in a
temporary CONVSIM_HOME (never ~/.convsim).

This file is also imported by the engine as the target ("benchmarks/bench.py:agent"),
so module level stays light: heavy imports happen inside `main`.
"""

from __future__ import annotations

import os

import anyio

AGENT_DELAY_ENV = "CONVSIM_BENCH_AGENT_DELAY_S"
AGENT_REPLY = "Noted. Anything else I should know?"  # no "sorry"/"can't": the offline user keeps going


async def agent(messages):
    """The agent under test: waits A seconds without holding a thread, then replies."""
    await anyio.sleep(float(os.environ.get(AGENT_DELAY_ENV, "0.1")))
    return AGENT_REPLY


async def instant_agent(messages):
    """An agent that costs nothing, to measure the engine alone."""
    return AGENT_REPLY


# --------------------------------------------------------------------------------------------------
# Everything below runs only when the file is executed.

GOAL = ("Ask about opening hours. Ask about prices. Ask about parking. Ask about refunds. "
        "Ask about delivery. Ask about gift cards.")
# The offline user reveals one goal sentence per turn and judges the goal only after the last one,
# so a goal of more sentences than turns keeps it going to max_turns.
LONG_GOAL = " ".join(f"Ask about item {i}." for i in range(1, 31))
RUN_TIMEOUT_S = 180.0  # bound for any single simulation
STARTUP_TIMEOUT_S = 60.0


def _fake_server_main(root: str) -> int:
    """Child-process mode: serve the fake LLM; answer line commands on stdin with one JSON line.

    Commands: `delay SECONDS`, `ratelimit R` (answer 429 above R requests in any one second; 0: off; resets
    the counts), `limits` (requests accepted and refused since), `stats` (then reset), `quit`.
    """
    import json
    import sys
    import threading
    import time

    sys.path.insert(0, root)
    from tests.fake_llm import AsyncFakeLLMServer, FakeReply

    state = {"delay": 0.0, "rate": 0}
    limited = {"accepted": [], "refused": 0}
    lock = threading.Lock()

    def over_rate() -> FakeReply | None:
        """A provider allowing R requests in any one-second window: above it, 429 with the wait in ms."""
        with lock:
            now = time.monotonic()
            accepted = limited["accepted"]
            recent = [t for t in accepted[-state["rate"]:] if t > now - 1.0]
            if len(recent) >= state["rate"]:
                limited["refused"] += 1
                wait_ms = max(1, int((recent[0] + 1.0 - now) * 1000) + 1)
                return FakeReply(status=429, content="Rate limit reached for requests",
                                 headers={"retry-after-ms": str(wait_ms), "Retry-After": "1"})
            accepted.append(now)
        return None

    def handler(request: dict) -> FakeReply:
        if state["rate"] and (refusal := over_rate()) is not None:
            return refusal
        n = sum(1 for m in request.get("messages") or [] if m.get("role") == "assistant") + 1
        return FakeReply(
            content={"message": f"Thanks. Next question, number {n}: what about the next item on my list?",
                     "goal_achieved": False, "end_conversation": False, "reason": "still pursuing the goal"},
            delay_s=state["delay"],
        )

    with AsyncFakeLLMServer(handler) as fake:  # lean: its CPU would otherwise be counted against the engine
        print(json.dumps({"url": fake.url}), flush=True)
        seen = 0
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "delay":
                state["delay"] = float(arg)
                print(json.dumps({"ok": True}), flush=True)
            elif cmd == "stats":
                batch = list(fake.requests[seen:])
                seen += len(batch)
                rows = []
                for r in batch:
                    msgs = r.get("messages") or []
                    turn = sum(1 for m in msgs if m.get("role") == "assistant") + 1
                    chars = sum(len(m.get("content") or "") for m in msgs if isinstance(m.get("content"), str))
                    schema_chars = len(json.dumps(r.get("response_format") or {}))
                    rows.append([turn, chars, schema_chars])
                print(json.dumps({"requests": rows, "errors": [repr(e) for e in fake.errors]}), flush=True)
            elif cmd == "ratelimit":
                with lock:
                    state["rate"] = int(arg)
                    limited.update(accepted=[], refused=0)
                print(json.dumps({"ok": True}), flush=True)
            elif cmd == "limits":
                with lock:
                    acc = limited["accepted"]
                    print(json.dumps({"accepted": len(acc), "refused": limited["refused"],
                                      "span_s": acc[-1] - acc[0] if len(acc) > 1 else 0.0}), flush=True)
            elif cmd == "quit":
                break
    return 0


class FakeLLMProcess:
    """The fake LLM server in a child process, driven through its stdin/stdout."""

    def __init__(self, root: str):
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--fake-server", root],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        self.url = self._read()["url"]

    def _read(self, timeout: float = 30.0) -> dict:
        import json
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError("the fake LLM process did not answer within %.0fs" % timeout)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fake LLM process exited (code {self.proc.poll()})")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def cpu_s(self) -> float | None:
        """CPU seconds the fake has used so far (Linux /proc), or None."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        import subprocess

        try:
            if self.proc.poll() is None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=5)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


async def _simulate_once(store, root, *, n: int, t: int, target: str, llm, goal: str = GOAL,
                         fake: FakeLLMProcess | None = None) -> dict:
    """One simulation of n concurrent conversations x t turns; wall time, CPU time, what the store holds."""
    import time

    from engine import StopReason, simulate

    cases = [{"goal": goal, "id": f"case-{i}"} for i in range(n)]
    fake_cpu = fake.cpu_s() if fake else None
    cpu = time.process_time()
    started = time.perf_counter()
    with anyio.fail_after(RUN_TIMEOUT_S):
        summary = await simulate(store, target, cases, max_turns=t, concurrency=n, llm=llm, workspace=root)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    if fake_cpu is not None:
        now = fake.cpu_s()
        fake_cpu = now - fake_cpu if now is not None else None
    sessions = await store.get_sessions(summary.run_id)  # every session, with messages, from SQLite
    reasons = [s.stop_reason for s in sessions]
    stored = sum(len(s.messages) for s in sessions)
    usage = summary.usage.get("simulated_user")
    return {
        "wall_s": wall,
        "cpu_s": cpu,  # this process, all threads (engine, litellm, SQLite worker)
        "fake_cpu_s": fake_cpu,
        "sessions": len(sessions),
        "all_max_turns": len(sessions) == n and all(r == StopReason.MAX_TURNS for r in reasons),
        "stop_reasons": summary.stop_reasons,
        "turns": summary.turns_done,
        "messages_stored": stored,
        "messages_expected": 2 * n * t,
        "engine_calls": usage.calls if usage else 0,
        "engine_prompt_tokens": usage.prompt_tokens if usage else 0,
    }


def _litellm_backend(url: str, concurrency: int):
    """The backend exactly as `prepare_simulation` builds it for a run of this concurrency."""
    from engine import resolve_llm

    return resolve_llm("openai/fake-user", api_base=url, api_key="x", timeout_s=30, max_retries=0,
                       max_concurrency=concurrency)


async def bench_simulations(store, root: str, fake: FakeLLMProcess, *, quick: bool, repeats: int,
                            latency: float, agent_delay: float) -> dict:
    import time

    os.environ[AGENT_DELAY_ENV] = str(agent_delay)
    target = "benchmarks/bench.py:agent"

    # Warm-up, untimed in the table: the first LLM call imports litellm (seconds).
    fake.ask("delay 0")
    t0 = time.perf_counter()
    await _simulate_once(store, root, n=1, t=1, target=target, llm=_litellm_backend(fake.url, 1))
    first_call_s = time.perf_counter() - t0
    fake.ask("stats")
    fake.ask(f"delay {latency}")

    t = 3 if quick else 5
    configs = [1, 10] if quick else [1, 10, 50]
    configs.append(100)

    rows = []
    growth: dict[int, list[int]] = {}
    schema_chars: list[int] = []
    for n in configs:
        runs = [await _simulate_once(store, root, n=n, t=t, target=target, llm=_litellm_backend(fake.url, n),
                                     fake=fake)
                for _ in range(repeats)]
        stats = fake.ask("stats")
        reqs = stats["requests"]
        if n == 10:
            for turn, chars, sc in reqs:
                growth.setdefault(turn, []).append(chars)
                schema_chars.append(sc)
        ideal = t * (latency + agent_delay)
        wall = _median([r["wall_s"] for r in runs])
        turns = sum(r["turns"] for r in runs)
        rows.append({
            "n": n, "concurrency": n, "t": t, "repeats": len(runs),
            "ideal_s": ideal, "wall_s_median": wall, "wall_s_min": min(r["wall_s"] for r in runs),
            "wall_s_all": [r["wall_s"] for r in runs],
            "ratio": wall / ideal, "overhead_ms_per_turn": (wall - ideal) / t * 1000,
            "cpu_ms_per_llm_turn": _median([r["cpu_s"] / r["turns"] * 1000 for r in runs]),
            "fake_cpu_ms_per_call": (_median([r["fake_cpu_s"] / r["turns"] * 1000 for r in runs])
                                     if all(r["fake_cpu_s"] is not None for r in runs) else None),
            "fake_calls": len(reqs), "turns": turns, "calls_per_turn": len(reqs) / turns if turns else None,
            "est_prompt_tokens_per_call": sum(c for _, c, _ in reqs) / 4 / len(reqs) if reqs else None,
            "engine_calls": sum(r["engine_calls"] for r in runs),
            "engine_prompt_tokens_per_call": (sum(r["engine_prompt_tokens"] for r in runs)
                                              / max(1, sum(r["engine_calls"] for r in runs))),
            "all_max_turns": all(r["all_max_turns"] for r in runs),
            "messages_stored": sum(r["messages_stored"] for r in runs),
            "messages_expected": sum(r["messages_expected"] for r in runs),
            "stop_reasons": runs[-1]["stop_reasons"], "fake_errors": stats["errors"],
        })
    prompt_growth = {str(k): {"calls": len(v), "est_tokens_per_call": sum(v) / 4 / len(v)}
                     for k, v in sorted(growth.items())}
    return {
        "llm_latency_s": latency, "agent_delay_s": agent_delay, "turns": t,
        "first_call_incl_litellm_import_s": first_call_s,
        "rows": rows, "prompt_growth_n10": prompt_growth,
        "response_format_tokens_per_call": (sum(schema_chars) / 4 / len(schema_chars)) if schema_chars else None,
    }


async def bench_zero_delay(store, root: str, fake: FakeLLMProcess, *, quick: bool, repeats: int) -> list[dict]:
    """Pure engine cost: no model latency, an instant agent."""
    from engine import OfflineBackend

    fake.ask("delay 0")
    target = "benchmarks/bench.py:instant_agent"
    cases = [("offline", 50, 5), ("litellm + fake", 50, 5), ("offline", 1, 20), ("litellm + fake", 1, 20)]
    if quick:
        cases = [("offline", 20, 3), ("litellm + fake", 20, 3), ("offline", 1, 10), ("litellm + fake", 1, 10)]
    rows = []
    for backend, n, t in cases:
        runs = []
        for _ in range(repeats):
            llm = OfflineBackend() if backend == "offline" else _litellm_backend(fake.url, n)
            runs.append(await _simulate_once(store, root, n=n, t=t, target=target, llm=llm, goal=LONG_GOAL,
                                             fake=fake))
        fake.ask("stats")
        wall = _median([r["wall_s"] for r in runs])
        turns = n * t
        rows.append({
            "backend": backend, "n": n, "concurrency": n, "t": t, "turns": turns, "repeats": repeats,
            "wall_s_median": wall, "wall_s_all": [r["wall_s"] for r in runs],
            "turns_per_s": turns / wall, "ms_per_turn_throughput": wall / turns * 1000,
            "ms_per_turn_latency": wall / t * 1000,
            "cpu_ms_per_turn": _median([r["cpu_s"] / turns * 1000 for r in runs]),
            "all_max_turns": all(r["all_max_turns"] for r in runs),
            "messages_ok": all(r["messages_stored"] == r["messages_expected"] for r in runs),
        })
    return rows


# --- prompt caching: prompt tokens per T=10 conversation, growth per turn, the cacheable prefix ------------------

PROMPT_CACHE_CASES = [
    {"goal": GOAL, "persona": "A busy parent who writes short messages.",
     "simulation_guidelines": ["Ask one question per message."]},
    {"goal": LONG_GOAL, "persona": "A retired teacher, polite and precise."},
]


def _wire(messages: list[dict]) -> str:
    """A request's messages as one string, roles included: what a provider's prompt cache compares, byte for byte."""
    return "".join(f"<{m.get('role')}>{m.get('content') or ''}</>" for m in messages)


async def bench_prompt_cache(store, root: str, *, t: int = 10, repeats: int = 5) -> dict:
    """N = len(cases) x repeats conversations of T turns against an in-process fake (no latency: only sizes count).

    Per simulated-user call: the prompt tokens the fake reported (message characters / 4, its usage field), the
    tokens added since the previous turn, and the share of the prompt that is a byte-identical prefix of an earlier
    request: the system message alone (the fixed rules + the case, the same from turn 1 for every session of the
    case), and the longest prefix any earlier request of the run shares (the conversation so far, too).
    """
    import os.path

    from engine import simulate
    from engine.simulation.user import SIMULATED_USER_RULES
    from tests.fake_llm import AsyncFakeLLMServer, FakeReply

    def handler(request: dict) -> FakeReply:
        n = sum(1 for m in request.get("messages") or [] if m.get("role") == "assistant") + 1
        return FakeReply(content={"message": f"Thanks. Next question, number {n}: what about the next item on my list?",
                                  "goal_achieved": False, "end_conversation": False, "reason": "still pursuing"})

    with AsyncFakeLLMServer(handler) as fake:  # lean: its CPU would otherwise be counted against the engine
        llm = _litellm_backend(fake.url, len(PROMPT_CACHE_CASES) * repeats)
        with anyio.fail_after(RUN_TIMEOUT_S):
            summary = await simulate(store, "benchmarks/bench.py:instant_agent", PROMPT_CACHE_CASES, max_turns=t,
                                     repeats=repeats, concurrency=len(PROMPT_CACHE_CASES) * repeats, llm=llm,
                                     workspace=root, cache=False)
        requests = list(fake.requests)
    conversations = len(PROMPT_CACHE_CASES) * repeats
    seen: list[str] = []
    per_turn: dict[int, dict[str, list[float]]] = {}
    for r in requests:
        msgs = r.get("messages") or []
        turn = sum(1 for m in msgs if m.get("role") == "assistant") + 1
        wire = _wire(msgs)
        prefix = max((len(os.path.commonprefix([wire, w])) for w in seen), default=0)
        seen.append(wire)
        row = per_turn.setdefault(turn, {"tokens": [], "system": [], "cached": []})
        row["tokens"].append(max(1, len("".join(m.get("content") or "" for m in msgs)) // 4))  # as the fake counts
        row["system"].append(len(_wire(msgs[:1])) / len(wire))
        row["cached"].append(prefix / len(wire))
    turns = []
    previous = None
    for turn, row in sorted(per_turn.items()):
        tokens = sum(row["tokens"]) / len(row["tokens"])
        turns.append({"turn": turn, "calls": len(row["tokens"]), "prompt_tokens": tokens,
                      "added_tokens": tokens - previous if previous is not None else None,
                      "system_share": sum(row["system"]) / len(row["system"]),
                      "cacheable_share": sum(row["cached"]) / len(row["cached"])})
        previous = tokens
    usage = summary.usage.get("simulated_user")
    fake_tokens = sum(x for row in per_turn.values() for x in row["tokens"])
    all_system = [x for row in per_turn.values() for x in row["system"]]
    all_cached = [x for row in per_turn.values() for x in row["cached"]]
    added = [x["added_tokens"] for x in turns if x["added_tokens"] is not None]
    weights = [x for row in per_turn.values() for x in row["tokens"]]
    return {
        "t": t, "cases": len(PROMPT_CACHE_CASES), "repeats": repeats, "conversations": conversations,
        "turns_done": summary.turns_done, "calls": len(requests),
        "prompt_tokens_per_conversation_fake": fake_tokens / conversations,
        "prompt_tokens_per_conversation_engine": (usage.prompt_tokens if usage else 0) / conversations,
        "added_tokens_per_turn_mean": sum(added) / len(added) if added else None,
        "system_share_mean": sum(all_system) / len(all_system),
        "cacheable_share_mean": sum(all_cached) / len(all_cached),
        "cacheable_share_token_weighted": sum(c * w for c, w in zip(all_cached, weights)) / sum(weights),
        "fixed_rules_tokens": len(SIMULATED_USER_RULES) // 4,
        "per_turn": turns,
    }


def _render_prompt_cache(pc: dict) -> list[str]:
    out = [
        "",
        f"## 5. Prompt caching: the simulated user's prompt over T={pc['t']} turns "
        f"({pc['conversations']} conversations: {pc['cases']} cases x {pc['repeats']} sessions; "
        "tokens = message characters / 4, as the fake's usage reports them)",
        "",
        f"Prompt tokens per conversation (sum over its {pc['t']} calls): "
        f"{pc['prompt_tokens_per_conversation_fake']:.0f} at the fake, "
        f"{pc['prompt_tokens_per_conversation_engine']:.0f} recorded by the engine "
        "(RunSummary.usage['simulated_user']). Growth: "
        + (f"{pc['added_tokens_per_turn_mean']:.0f} tokens added per turn (mean)." if pc["added_tokens_per_turn_mean"]
           is not None else "one turn only."),
        f"Byte-identical prefix of an earlier request: {pc['cacheable_share_mean']:.0%} of each prompt (mean), "
        f"{pc['cacheable_share_token_weighted']:.0%} of all prompt tokens; the system message alone (fixed rules, "
        f"then the case) is {pc['system_share_mean']:.0%} of each prompt. The fixed rules alone, "
        f"{pc['fixed_rules_tokens']} tokens, open every case's prompt: a new case's first call finds them cached.",
        "",
        "| turn | calls | prompt tokens/call | added since the previous turn | system message share "
        "| cacheable prefix share |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for x in pc["per_turn"]:
        added = f"{x['added_tokens']:.0f}" if x["added_tokens"] is not None else "-"
        out.append(f"| {x['turn']} | {x['calls']} | {x['prompt_tokens']:.0f} | {added} | {x['system_share']:.0%} | "
                   f"{x['cacheable_share']:.0%} |")
    return out


# --- Provider rate limit ------------------------------------------------------------------------

RATE_R = 20  # requests/s the fake provider allows before it answers 429


async def bench_rate_limit(store, root: str, fake: FakeLLMProcess, *, quick: bool) -> dict:
    """A fake provider answering 429 above R requests/s; runs configured for R (rpm = 60 R) and unconfigured.

    Demand is far above R (N conversations, L=0.2 s model, A=0.1 s agent: about 3 requests/s each), so the
    achieved rate is the limiter's. Achieved = requests the provider accepted / the span from its first to
    its last acceptance. Lost = sessions that did not reach their normal stop reason (max_turns here).
    """
    import time

    from engine import resolve_llm
    from engine.llm.ratelimit import RateLimiter

    n, t = (40, 6) if quick else (40, 8)  # long enough that the first and last second do not dominate
    fake.ask("delay 0.2")
    os.environ[AGENT_DELAY_ENV] = "0.1"
    warm = resolve_llm("openai/fake-ratelimit-warmup", api_base=fake.url, api_key="x", timeout_s=30, max_concurrency=n)
    await _simulate_once(store, root, n=n, t=1, target="benchmarks/bench.py:agent", llm=warm)  # litellm warmed up
    rows = []
    for label, rpm in (("rpm = 60 R", RATE_R * 60), ("no rpm (adaptive)", None)):
        fake.ask(f"ratelimit {RATE_R}")
        llm = resolve_llm(f"openai/fake-ratelimit-{rpm or 0}", api_base=fake.url, api_key="x", timeout_s=30,
                          max_concurrency=n, rpm=rpm)
        run = await _simulate_once(store, root, n=n, t=t, target="benchmarks/bench.py:agent", llm=llm,
                                   goal=LONG_GOAL)
        limits = fake.ask("limits")
        fake.ask("stats")
        lost = n - int(run["stop_reasons"].get("max_turns", 0))  # every session should reach max_turns
        rows.append({
            "config": label, "r": RATE_R, "n": n, "t": t, "wall_s": run["wall_s"],
            "accepted": limits["accepted"], "refused_429": limits["refused"],
            "achieved_rps": (limits["accepted"] - 1) / limits["span_s"] if limits["span_s"] else None,
            "achieved_rps_wall": limits["accepted"] / run["wall_s"],
            "sessions": run["sessions"], "sessions_lost": lost,
            "stop_reasons": run["stop_reasons"], "all_max_turns": run["all_max_turns"],
        })
    fake.ask("ratelimit 0")
    fake.ask("delay 0")

    async def per_acquire_us(lim: RateLimiter, count: int) -> float:
        started = time.process_time()
        for _ in range(count):
            lim.succeeded(await lim.acquire(0))
        return (time.process_time() - started) / count * 1e6

    overhead = {"unpaced_us": await per_acquire_us(RateLimiter(), 20000),
                "paced_uncontended_us": await per_acquire_us(RateLimiter(rpm=1e9), 20000)}
    return {"rows": rows, "limiter_cpu": overhead}


def render_rate_limit(rl: dict) -> list[str]:
    out = [
        "",
        f"## 6. Provider rate limit (fake answers 429 above R={RATE_R} requests/s; L=0.2 s, A=0.1 s)",
        "",
        "| run | N | T | wall s | accepted | 429s | achieved req/s (span) | achieved/R | sessions lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rl["rows"]:
        rate = r["achieved_rps"]
        out.append(f"| {r['config']} | {r['n']} | {r['t']} | {r['wall_s']:.1f} | {r['accepted']} | {r['refused_429']} "
                   f"| {rate:.1f} | {rate / r['r']:.0%} | {r['sessions_lost']} |" if rate else
                   f"| {r['config']} | {r['n']} | {r['t']} | {r['wall_s']:.1f} | {r['accepted']} | {r['refused_429']} "
                   f"| - | - | {r['sessions_lost']} |")
    c = rl["limiter_cpu"]
    out += ["", "Targets: achieved/R >= 90% and 0 sessions lost for the run configured for R. Limiter CPU per "
                f"request: {c['unpaced_us']:.1f} us unpaced, {c['paced_uncontended_us']:.1f} us paced (uncontended)."]
    return out


def bench_startup(root: str, home: str, tries: int) -> dict:
    import json
    import subprocess
    import sys
    import time

    env = _child_env(root, home)

    def timed(args: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, *args], env=env, cwd=root, check=True, timeout=STARTUP_TIMEOUT_S,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - started

    bare = [timed(["-c", "pass"]) for _ in range(tries)]
    imports = [timed(["-c", "import convsim_mcp.server"]) for _ in range(tries)]
    # The same import timed inside the child: the difference is interpreter start and shutdown.
    inside = []
    for _ in range(tries):
        out = subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); import convsim_mcp.server; "
                              "print(time.perf_counter() - t)"], env=env, cwd=root, check=True,
                             timeout=STARTUP_TIMEOUT_S, capture_output=True, text=True)
        inside.append(float(out.stdout.strip().splitlines()[-1]))

    async def spawn_and_list() -> tuple[float, int]:
        from mcp import Client
        from mcp.client.stdio import StdioServerParameters

        params = StdioServerParameters(
            command=sys.executable, args=["-m", "convsim_mcp", "serve", "--db", os.path.join(home, "stdio.sqlite")],
            env=env, cwd=root,
        )
        with anyio.fail_after(STARTUP_TIMEOUT_S):
            started = time.perf_counter()
            async with Client(params) as client:
                tools = await client.list_tools()
                elapsed = time.perf_counter() - started
        return elapsed, len(tools.tools)

    listed = [anyio.run(spawn_and_list) for _ in range(tries)]

    probe = (
        "import json, sys, anyio\n"
        "from mcp import Client\n"
        "from convsim_mcp.server import build_server\n"
        "from engine import Store\n"
        "server = build_server(Store(sys.argv[1]))\n"
        "async def main():\n"
        "    async with Client(server) as c:\n"
        "        return len((await c.list_tools()).tools)\n"
        "n = anyio.run(main)\n"
        "print(json.dumps({'tools': n, 'litellm': 'litellm' in sys.modules, 'openai': 'openai' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, os.path.join(home, "probe.sqlite")], env=env, cwd=root,
                         check=True, timeout=STARTUP_TIMEOUT_S, capture_output=True, text=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "python_bare_s": bare, "import_server_s": imports, "import_server_in_process_s": inside,
        "stdio_spawn_to_list_tools_s": [s for s, _ in listed], "tools_listed": listed[-1][1],
        "after_build_server_and_list_tools": loaded,
    }


# --- the assistant's context: bytes of tools/list and of run results, through the MCP client ------

CONTEXT_RUNS = (100, 1000)  # sessions per run, offline user, instant agent, 3 turns


async def bench_context(root: str, home: str) -> dict:
    """What an assistant reads, in bytes (UTF-8, compact JSON): tools/list (all of it, and input schemas plus
    descriptions), and the results of simulate_conversations and get_run for 100- and 1,000-session runs
    (structured content plus its text, as the client receives them)."""
    import json
    from pathlib import Path

    from mcp import Client

    from convsim_mcp.server import build_server
    from engine import Store, Workspace

    def size(data) -> int:
        return len(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode())

    def received(result) -> int:
        return size(result.structured_content) + sum(len(c.text.encode()) for c in result.content if c.type == "text")

    store = Store(Path(home) / "context.sqlite")
    try:
        async with Client(build_server(store, workspace=Workspace.default(base=root))) as client:
            listed = await client.list_tools()
            tools = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in listed.tools]
            out: dict = {"tools_list_bytes": size(listed.model_dump(mode="json", by_alias=True, exclude_none=True)),
                         "input_schemas_and_descriptions_bytes": sum(size(t["inputSchema"]) + len(
                             t.get("description", "").encode()) for t in tools),
                         "output_schemas_bytes": sum(size(t.get("outputSchema", {})) for t in tools),
                         "tools": len(tools), "runs": []}
            for n in CONTEXT_RUNS:
                cases = [{"goal": GOAL, "id": f"case-{i}"} for i in range(n)]
                with anyio.fail_after(RUN_TIMEOUT_S):
                    sim = await client.call_tool("simulate_conversations", {
                        "target": "benchmarks/bench.py:instant_agent", "test_cases": cases, "max_turns": 3,
                        "model": "offline", "concurrency": min(n, 256)})
                if sim.is_error:
                    raise RuntimeError(f"simulate_conversations failed: {sim.content}")
                got = await client.call_tool("get_run", {"run_id": sim.structured_content["run_id"]})
                listed = len(got.structured_content["sessions"])
                out["runs"].append({"sessions": n, "simulate_bytes": received(sim), "get_run_bytes": received(got),
                                    "sessions_listed": listed, "left_out": n - listed})
    finally:
        store.close()
    return out


def render_context(ctx: dict) -> list[str]:
    out = [
        "",
        "## 7. The assistant's context (bytes of compact JSON, through the in-process MCP client)",
        "",
        f"`tools/list` ({ctx['tools']} tools): {ctx['tools_list_bytes']:,} bytes in all; input schemas + "
        f"descriptions {ctx['input_schemas_and_descriptions_bytes']:,}, output schemas "
        f"{ctx['output_schemas_bytes']:,}.",
        "",
        "| sessions in the run | simulate_conversations result | get_run result | sessions listed | left out |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in ctx["runs"]:
        out.append(f"| {r['sessions']:,} | {r['simulate_bytes']:,} | {r['get_run_bytes']:,} | "
                   f"{r['sessions_listed']} | {r['left_out']:,} |")
    out += ["", "A result is its structured content plus the same JSON as text; the rest of a run is paged "
                "(get_run offset/limit) or read from its resources."]
    return out


def _child_env(root: str, home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
    env.update({"HOME": home, "CONVSIM_HOME": home, "PYTHONPATH": root})
    return env


def render(result: dict) -> str:
    meta, sim, zero, start = result["meta"], result["simulation"], result["zero_delay"], result["startup"]
    out = [
        f"# convsim-mcp benchmark, {meta['date']}",
        "",
        f"{meta['cores']} cores, load average {meta['loadavg']}, Python {meta['python']}, "
        f"mode {'quick' if meta['quick'] else 'default'}. Figures are ratios from one run on a shared, "
        "noisy machine: compare them with each other, not with other machines.",
        "",
        f"## 1. Wall time against the ideal (fake LLM answers after L={sim['llm_latency_s']:g} s, "
        f"agent sleeps A={sim['agent_delay_s']:g} s, all N conversations concurrent, T={sim['turns']} turns)",
        "",
        "Ideal = T x (L + A). Overhead = (wall - ideal) / T. The backend is built as a run builds it "
        "(model calls in flight capped at the run's concurrency).",
        "",
        "| N = concurrency | runs | ideal s | wall s (median) | wall/ideal | overhead ms/turn "
        "| LLM calls/turn (at fake) | engine CPU ms/turn | all max_turns, all messages stored |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in sim["rows"]:
        ok = "yes" if r["all_max_turns"] and r["messages_stored"] == r["messages_expected"] else (
            f"NO: {r['stop_reasons']}, {r['messages_stored']}/{r['messages_expected']} msgs")
        out.append(f"| {r['n']} | {r['repeats']} | {r['ideal_s']:.2f} | {r['wall_s_median']:.2f} | "
                   f"{r['ratio']:.2f} | {r['overhead_ms_per_turn']:.0f} | {r['calls_per_turn']:.2f} | "
                   f"{r['cpu_ms_per_llm_turn']:.1f} | {ok} |")
    fake_cpu = [r["fake_cpu_ms_per_call"] for r in sim["rows"] if r["fake_cpu_ms_per_call"] is not None]
    out += [
        "",
        "Engine CPU = CPU time of the benchmark process (event loop, litellm, SQLite worker thread) per turn. "
        + (f"The fake LLM runs in its own process and used at most {max(fake_cpu):.1f} ms CPU per call."
           if fake_cpu else ""),

        "",
        f"First LLM call of the process (imports litellm): {sim['first_call_incl_litellm_import_s']:.2f} s, "
        "excluded above (a warm-up run).",
        "",
        "## 2. Prompt size per simulated-user call (N=10 run; tokens estimated as message characters / 4)",
        "",
        "| turn | calls | est. prompt tokens/call |",
        "|---:|---:|---:|",
    ]
    for turn, g in sim["prompt_growth_n10"].items():
        out.append(f"| {turn} | {g['calls']} | {g['est_tokens_per_call']:.0f} |")
    n10 = next((r for r in sim["rows"] if r["n"] == 10), None)
    if n10:
        out += ["", f"Mean over all turns: {n10['est_prompt_tokens_per_call']:.0f} est. tokens/call at the fake; "
                    f"the engine recorded {n10['engine_prompt_tokens_per_call']:.0f} prompt tokens/call "
                    f"(RunSummary.usage['simulated_user'], as reported by the fake's usage field). "
                    f"The response_format JSON schema adds ~{sim['response_format_tokens_per_call']:.0f} tokens "
                    "per call on top (not counted above)."]
    out += [
        "",
        "## 3. Engine alone: zero model latency, instant agent",
        "",
        "| user backend | N = concurrency | T | turns | wall s (median) | turns/s | ms/turn (wall/turns) "
        "| ms per conversation turn (wall/T) | engine CPU ms/turn | all max_turns, stored |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in zero:
        ok = "yes" if r["all_max_turns"] and r["messages_ok"] else "NO"
        out.append(f"| {r['backend']} | {r['n']} | {r['t']} | {r['turns']} | {r['wall_s_median']:.2f} | "
                   f"{r['turns_per_s']:.0f} | {r['ms_per_turn_throughput']:.1f} | {r['ms_per_turn_latency']:.0f} | "
                   f"{r['cpu_ms_per_turn']:.1f} | {ok} |")
    la = start["after_build_server_and_list_tools"]
    out += [
        "",
        f"## 4. Startup (best of {len(start['import_server_s'])}; subprocesses)",
        "",
        "| measure | best s | all runs s |",
        "|---|---:|---|",
        _srow("`python -c pass` (interpreter alone)", start["python_bare_s"]),
        _srow("`python -c 'import convsim_mcp.server'` (process wall)", start["import_server_s"]),
        _srow("the same import, timed inside the child", start["import_server_in_process_s"]),
        _srow(f"spawn `python -m convsim_mcp serve` (stdio) -> `list_tools()` done ({start['tools_listed']} tools)",
              start["stdio_spawn_to_list_tools_s"]),
        "",
        f"After `build_server()` + in-process `list_tools()`: litellm imported = {la['litellm']}, "
        f"openai imported = {la['openai']}.",
    ]
    if "prompt_cache" in result:
        out += _render_prompt_cache(result["prompt_cache"])
    if "rate_limit" in result:
        out += render_rate_limit(result["rate_limit"])
    if "context" in result:
        out += render_context(result["context"])
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Scale (issue 10): the headline N=100 x T=5, N=1000 x T=3 at concurrency 1000, and 10,000 test cases
# from a JSONL file in a child process whose peak RSS is read from the kernel (wait4).

HEADLINE_RATIO_TARGET = 1.3
SCALE_RATIO_TARGET = 2.0
FILE_CASES_RSS_TARGET_MB = 400
FILE_CASES_TIMEOUT_S = 900.0


async def bench_scale(store, root: str, fake: FakeLLMProcess, *, latency: float, agent_delay: float,
                      sim: dict | None = None) -> list[dict]:
    """N=100 x T=5 at concurrency 100 (taken from `sim` when it already ran it) and N=1000 x T=3 at
    concurrency 1000, through the fake LLM process and the sleeping agent: wall against the ideal."""
    os.environ[AGENT_DELAY_ENV] = str(agent_delay)
    fake.ask(f"delay {latency}")
    fake.ask("stats")
    rows = []
    for n, t, target_ratio in ((100, 5, HEADLINE_RATIO_TARGET), (1000, 3, SCALE_RATIO_TARGET)):
        ideal = t * (latency + agent_delay)
        done = next((r for r in (sim or {}).get("rows", []) if r["n"] == n and r["t"] == t), None)
        if done is not None:
            rows.append({"n": n, "concurrency": n, "t": t, "ideal_s": ideal, "wall_s": done["wall_s_median"],
                         "ratio": done["ratio"], "target": target_ratio, "cpu_ms_per_turn": done["cpu_ms_per_llm_turn"],
                         "calls_per_turn": done["calls_per_turn"], "from": "section 1",
                         "ok": done["all_max_turns"] and done["messages_stored"] == done["messages_expected"]})
            continue
        run = await _simulate_once(store, root, n=n, t=t, target="benchmarks/bench.py:agent",
                                   llm=_litellm_backend(fake.url, n), fake=fake)
        stats = fake.ask("stats")
        rows.append({"n": n, "concurrency": n, "t": t, "ideal_s": ideal, "wall_s": run["wall_s"],
                     "ratio": run["wall_s"] / ideal, "target": target_ratio,
                     "cpu_ms_per_turn": run["cpu_s"] / max(run["turns"], 1) * 1000,
                     "calls_per_turn": len(stats["requests"]) / max(run["turns"], 1), "from": "this section",
                     "ok": run["all_max_turns"] and run["messages_stored"] == run["messages_expected"],
                     "fake_errors": stats["errors"][:5]})
    return rows


# Runs `argv[3:]` and writes its exit code and peak RSS to `argv[1]`. A small process of its own: a child's
# ru_maxrss counts the image it was forked from, so forking the CLI from this (big) process would count it too.
_MEASURE_CHILD = """
import json, os, subprocess, sys, time
out, timeout, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
proc, deadline = subprocess.Popen(cmd), time.monotonic() + timeout
while True:
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
        break
    if time.monotonic() > deadline:
        proc.kill()
    time.sleep(0.05)
proc.returncode = os.waitstatus_to_exitcode(status)
json.dump({"exit": proc.returncode, "maxrss_kb": usage.ru_maxrss}, open(out, "w"))
"""


def bench_file_cases(root: str, home: str, *, cases: int = 10_000, turns: int = 3, concurrency: int = 1000) -> dict:
    """`convsim-mcp simulate` of `cases` test cases from a JSONL file (offline user, instant agent) in a
    child process: wall time, and its peak RSS as the kernel counted it (ru_maxrss from os.wait4, in a small
    launcher process: see _MEASURE_CHILD)."""
    import json
    import sys
    import time
    from pathlib import Path

    work = Path(home) / "file-cases"
    work.mkdir(exist_ok=True)
    path = work / "cases.jsonl"
    with path.open("w") as f:
        for i in range(cases):
            f.write(json.dumps({"id": f"case-{i}", "goal": LONG_GOAL}) + "\n")
    out = work / "summary.json"
    cmd = [sys.executable, "-m", "convsim_mcp", "simulate", "benchmarks/bench.py:instant_agent", str(path),
           "--model", "offline", "--max-turns", str(turns), "--concurrency", str(concurrency), "--json",
           "--root", str(work), "--db", str(work / "cases.sqlite")]
    import subprocess

    started = time.perf_counter()
    with out.open("w") as stdout:
        subprocess.run([sys.executable, "-c", _MEASURE_CHILD, str(work / "rusage.json"), str(FILE_CASES_TIMEOUT_S),
                        *cmd], env=_child_env(root, home), cwd=root, stdout=stdout, stderr=subprocess.DEVNULL,
                       timeout=FILE_CASES_TIMEOUT_S + 60)
    wall = time.perf_counter() - started
    measured = json.loads((work / "rusage.json").read_text())
    proc_exit, rss_mb = measured["exit"], measured["maxrss_kb"] / 1024
    try:
        summary = json.loads(out.read_text())
    except ValueError:
        summary = {}
    return {
        "cases": cases, "turns": turns, "concurrency": concurrency, "file_bytes": path.stat().st_size,
        "exit": proc_exit, "wall_s": wall, "peak_rss_mb": rss_mb, "target_mb": FILE_CASES_RSS_TARGET_MB,
        "sessions_done": summary.get("sessions_done"), "turns_done": summary.get("turns_done"),
        "stop_reasons": summary.get("stop_reasons"),
        "ok": proc_exit == 0 and summary.get("sessions_done") == cases
        and summary.get("stop_reasons") == {"max_turns": cases},
    }


def render_scale(scale: list[dict], file_cases: dict) -> str:
    out = [
        "",
        "## 8. Scale: many conversations at once, and 10,000 test cases from one file",
        "",
        "Through the fake LLM process and the sleeping agent, as in section 1 (ideal = T x (L + A)).",
        "",
        "| N = concurrency | T | ideal s | wall s | wall/ideal | target | engine CPU ms/turn | LLM calls/turn "
        "| all max_turns, all messages stored | measured in |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in scale:
        out.append(f"| {r['n']} | {r['t']} | {r['ideal_s']:.2f} | {r['wall_s']:.2f} | {r['ratio']:.2f} | "
                   f"<= {r['target']:g} | {r['cpu_ms_per_turn']:.1f} | {r['calls_per_turn']:.2f} | "
                   f"{'yes' if r['ok'] else 'NO'} | {r['from']} |")
    f = file_cases
    out += [
        "",
        f"`convsim-mcp simulate` of {f['cases']:,} test cases from a JSONL file ({f['file_bytes'] / 1e6:.1f} MB; "
        f"offline user, instant agent, T={f['turns']}, concurrency {f['concurrency']}) in a child process; "
        "peak RSS is the child's ru_maxrss from wait4:",
        "",
        "| cases | T | concurrency | wall s | sessions done | turns done | peak RSS MB | target | ok |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {f['cases']:,} | {f['turns']} | {f['concurrency']} | {f['wall_s']:.1f} | {f['sessions_done']} | "
        f"{f['turns_done']} | {f['peak_rss_mb']:.0f} | <= {f['target_mb']} | "
        f"{'yes' if f['ok'] else 'NO (exit %s, %s)' % (f['exit'], f['stop_reasons'])} |",
    ]
    return "\n".join(out)


def _srow(label: str, xs: list[float]) -> str:
    return f"| {label} | {min(xs):.2f} | {', '.join(f'{x:.2f}' for x in xs)} |"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import datetime
    import json
    import platform
    import sys
    import tempfile
    import time
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller configurations, under a minute")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--repeats", type=int, help="runs per configuration (default 3, quick 1)")
    parser.add_argument("--fake-server", metavar="ROOT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fake_server:
        return _fake_server_main(args.fake_server)

    # No real provider may be reached, and litellm must not fetch its cost map or read a .env.
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "MISTRAL_API_KEY", "GROQ_API_KEY",
                "CONVSIM_MODEL", "CONVSIM_API_BASE", "CONVSIM_API_KEY"):
        os.environ.pop(var, None)
    os.environ.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MODE": "PRODUCTION",
                       "LITELLM_LOG": "WARNING", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    sys.path.insert(0, root)
    repeats = args.repeats or (1 if args.quick else 3)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="convsim-bench-") as home:
        os.environ["CONVSIM_HOME"] = home
        from engine import Store

        result: dict = {"meta": {
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "cores": os.cpu_count(), "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "python": platform.python_version(), "quick": args.quick, "repeats": repeats,
        }}
        print(f"running ({'quick' if args.quick else 'default'}, {repeats} run(s) per configuration)...",
              file=sys.stderr)
        fake = FakeLLMProcess(root)
        store = Store(Path(home) / "bench.sqlite")
        try:
            async def engine_benches() -> None:
                result["simulation"] = await bench_simulations(
                    store, root, fake, quick=args.quick, repeats=repeats, latency=0.2, agent_delay=0.1)
                print("  simulations done", file=sys.stderr)
                result["zero_delay"] = await bench_zero_delay(store, root, fake, quick=args.quick, repeats=repeats)
                print("  zero-delay runs done", file=sys.stderr)
                result["scale"] = await bench_scale(store, root, fake, latency=0.2, agent_delay=0.1,
                                                    sim=result["simulation"])
                print("  scale runs done", file=sys.stderr)
                result["prompt_cache"] = await bench_prompt_cache(store, root)
                print("  prompt-cache run done", file=sys.stderr)
                result["rate_limit"] = await bench_rate_limit(store, root, fake, quick=args.quick)
                print("  rate-limit runs done", file=sys.stderr)

            anyio.run(engine_benches)
        finally:
            store.close()
            fake.close()
        result["startup"] = bench_startup(root, home, tries=3)
        print("  startup done", file=sys.stderr)
        result["file_cases"] = bench_file_cases(root, home, turns=2 if args.quick else 3)
        print("  file cases done", file=sys.stderr)
        result["context"] = anyio.run(bench_context, root, home)
        print("  context sizes done", file=sys.stderr)
    result["meta"]["total_s"] = time.perf_counter() - started

    print(render(result))
    print(render_scale(result["scale"], result["file_cases"]))
    print(f"\n(benchmark took {result['meta']['total_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    failed = [r for r in result["simulation"]["rows"]
              if not (r["all_max_turns"] and r["messages_stored"] == r["messages_expected"])]
    failed += [r for r in result["zero_delay"] if not (r["all_max_turns"] and r["messages_ok"])]
    failed += [r for r in [*result["scale"], result["file_cases"]] if not r["ok"]]
    failed += [r for r in result["rate_limit"]["rows"] if r["sessions_lost"]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
