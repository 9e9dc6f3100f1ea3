"""Fuzz every tool's input schema, and the resources, through the real MCP client.

The caller may be a prompt-injected assistant, so no argument may crash or hang the server, or come back
as the SDK's masked "Error executing tool <name>" with no reason after it. Every call must return within
CALL_TIMEOUT, with a result or with an error that says why (and is not the server's own "internal error
in <tool>", which it reports only for its bugs); then `list_runs` must still answer; and once a tool's
examples are done, every background run it started must end, none failed by anything but an engine
error. Resource reads are held to the same rules.

Arguments for each tool come from four legs, derandomized so CI draws the same examples every time:
- schema: `hypothesis_jsonschema.from_schema(tool.input_schema)`, exactly what the tool publishes (which
  allows unknown keys, so those come too);
- steered: every argument valid (an agent in the workspace, stored run / session / test-set / issue ids,
  scorer names, workspace files), so calls get past the first checks and reach the engine's deep code;
- near: steered, but one argument wrong inside (twice as likely as the others): junk in one field of a
  nested record (a test case, a transcript or one of its messages, a scorer, the target object; see
  POINTS), or an odd value of the right type (a file that is not there, an unknown id, a bad port);
- off-schema: steered with one argument of the wrong type or size (NaN, 2**64, a 1 MB string, nesting
  3000 deep, lone surrogates, NUL, traversal paths), an unknown key, no arguments, or all junk.

Sandbox. The server's workspace is a fresh temporary directory that holds only WORKSPACE_FILES, so no
import path under the repository can run (the fuzz tries some: they must be refused). The model is
offline: provider keys are unset, CONVSIM_MODEL=offline, and any 'provider/model' argument becomes
'offline'. A target's timeout_s defaults to 60 s, so a URL that reached a real host could hold a call
for a minute: every URL the fuzz produces is mapped to one of SAFE_URLS, which point at a loopback port
held closed for the test (bound, never listening, so a connection is refused at once) or cannot be
sent at all. Arguments that set a run's length (max_turns, repeats, num_test_cases, how many cases)
are folded to small values. Only the strategies are constrained; the server runs as it is.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import types
from dataclasses import dataclass
from typing import Any

import anyio
import hypothesis_jsonschema._from_schema as _hjs_from_schema
import mcp_types
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import utils as _conjecture_utils
from hypothesis_jsonschema import from_schema
from mcp import Client, MCPError
from pydantic import TypeAdapter, ValidationError

from convsim_mcp.server import build_server
from engine import ConvsimError, Store, Workspace

pytestmark = pytest.mark.anyio


# --- hypothesis-jsonschema 0.23.1 on hypothesis >= 6.16x -------------------------------------------
# hypothesis-jsonschema's object strategy drives hypothesis's private `many` as `while elements.more()`.
# Newer hypothesis replaced that with `with many(...) as elements: for _ in elements`, so every object
# schema fails with "'many' object has no attribute 'more'". Give hypothesis-jsonschema (only it) a
# `many` that has `more()` again, made of the new one's own steps (the same draws and spans).

class _ManyWithMore(_conjecture_utils.many):
    def __init__(self, data: Any, min_size: int, max_size: float, average_size: float, **kwargs: Any):
        super().__init__(data, min_size, max_size, average_size, **kwargs)
        self._depth = data.depth  # what entering the `with` block sets

    def more(self) -> bool:
        self._finish_element()
        if not self._decide():
            return False
        self.count += 1
        self._in_element, self._rejected = True, False
        return True


if not hasattr(_conjecture_utils.many, "more"):
    _patched_utils = types.ModuleType(_conjecture_utils.__name__)
    _patched_utils.__dict__.update(vars(_conjecture_utils))
    _patched_utils.many = _ManyWithMore
    _hjs_from_schema.cu = _patched_utils


# --- budget ----------------------------------------------------------------------------------------

EXAMPLES = {  # per tool: the whole file takes about 45 s on 2 cores (the bound is 2 minutes)
    "simulate_conversations": 600,
    "test_agent": 400,
    "score_sessions": 800,
    "generate_test_cases": 500,
    "rerun_issue": 400,
    "compare_runs": 300,
    "get_report": 200,
    "get_run": 200,
    "cancel_run": 200,
    "resume_run": 200,
    "list_runs": 100,
    "list_scorers": 30,
}
RESOURCE_EXAMPLES = 600
CALL_TIMEOUT = 20.0  # one call, however odd its arguments (runs are folded small)
SETTLE_TIMEOUT = 30.0  # the background runs a tool's examples started have all ended by then
FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                     suppress_health_check=list(HealthCheck))


# --- the sandbox -----------------------------------------------------------------------------------

def nested(depth: int, leaf: Any = "x") -> Any:
    value: Any = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


WORKSPACE_FILES = {
    "echo_agent.py": '''
NOT_CALLABLE = 42


def echo(messages):
    return "You said: " + str(messages[-1].get("content") or "")


def shaped(messages, session_id=None):
    return {"choices": [{"message": {"role": "assistant", "content": "ok " + str(session_id),
                                     "tool_calls": [{"id": "t1", "function": {"name": "lookup",
                                                                              "arguments": {"q": 1}}}]}}]}


def needs_key(messages, account_id):
    return f"account {account_id}"


def crashy(messages):
    if len(messages) > 2:
        raise KeyError("order_id")
    return "Which order?"


async def slow(messages):
    import anyio

    await anyio.sleep(0.2)
    return "...finally: " + str(messages[-1].get("content") or "")
''',
    "scorer.py": '''
def always(session):
    return True


def per_turn(outputs):
    return {"value": len(str(outputs)), "passed": True, "rationale": "counted"}
''',
    "cases.yaml": "- goal: Ask for a refund.\n  persona: terse\n- goal: Say hello.\n  id: hello\n",
    "cases.json": json.dumps([{"goal": "Check order A1.", "scripted_turns": ["Hi", "Order A1?"]}]),
    "bad_cases.yaml": "- goal: [unclosed\n",
    "deep.json": "[" * 2000 + "]" * 2000,
    "transcripts.jsonl": "\n".join(json.dumps(r) for r in [
        {"session_id": "imported-1", "goal": "refund",
         "messages": [{"role": "user", "content": "refund?"}, {"role": "assistant", "content": "Sure."}]},
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    ]) + "\n",
    "bad.jsonl": '{"messages": [}\nnot json\n',
    "deep.jsonl": json.dumps({"messages": [{"role": "user", "content": "hi"}], "metadata": nested(200)}) + "\n",
    "notes.txt": "not test cases\n",
}

CLOSED = "127.0.0.1:9"  # stands for the closed port in URLs; `sanitize` puts the real one in
SAFE_URLS = (
    f"http://{CLOSED}/", f"http://{CLOSED}/v1", f"https://{CLOSED}/v1/", f"http://{CLOSED}/chat?x=1",
    f"http://user:pass@{CLOSED}/", f"http://{CLOSED}/ a b", "http://[::1]:9/",
    # httpx cannot send these: refused with the target
    "http://127.0.0.1:99999/", "http://[::1/", "http://", "https://", f"http://{CLOSED}/\x00", f"http://{CLOSED}/\udc80",
)
URL = re.compile(r"^\s*https?://", re.I)
MODEL_KEYS = ("model", "judge_model", "user_model", "generator_model")
SMALL = {"max_turns": (1, 100, 3), "repeats": (1, 50, 2), "num_test_cases": (0, 50, 3)}  # (low, high, fold to)
LIST_CAPS = {"test_cases": 3, "transcripts": 3, "session_ids": 4, "scorers": 5}


def _fold_int(value: Any, low: int, high: int, span: int) -> Any:
    """A value the SDK would read as an int in [low, high] becomes a small one; anything else stays."""
    try:
        number = TypeAdapter(int).validate_python(value)  # the SDK validates arguments in this lax mode
    except (ValidationError, TypeError, ValueError, OverflowError, RecursionError):
        return value
    return low + (number - low) % span if low <= number <= high else value


_STAND_IN = re.compile(r"(127\.0\.0\.1|\[::1\]):9(?!\d)")


def _safe_url(url: str, port: int) -> str:
    """One of SAFE_URLS (the same for the same `url`), on the port held closed for this test."""
    safe = url if url in SAFE_URLS else SAFE_URLS[sum(map(ord, url)) % len(SAFE_URLS)]
    return _STAND_IN.sub(lambda m: f"{m.group(1)}:{port}", safe)


def _safe_target(value: Any, port: int) -> Any:
    if isinstance(value, str):
        if URL.match(value):
            return _safe_url(value, port)
        if value.strip().startswith("{"):  # a target may be given as JSON text
            try:
                parsed = json.loads(value)
            except (ValueError, RecursionError):
                return value
            return json.dumps(_safe_target(parsed, port))
        return value
    if isinstance(value, dict):
        return {k: _safe_url(v, port) if k in ("url", "path") and isinstance(v, str) and URL.match(v) else v
                for k, v in value.items()}
    return value


def sanitize(args: Any, port: int) -> Any:
    """Keep a call inside the sandbox: no model, no host but the closed `port`, short runs."""
    if not isinstance(args, dict):
        return args
    out = dict(args)
    for key in MODEL_KEYS:
        if isinstance(out.get(key), str) and "/" in out[key]:
            out[key] = "offline"
    if "target" in out:
        out["target"] = _safe_target(out["target"], port)
    for key, (low, high, span) in SMALL.items():
        if key in out:
            out[key] = _fold_int(out[key], low, high, span)
    for key, cap in LIST_CAPS.items():
        if isinstance(out.get(key), list):
            out[key] = out[key][:cap]
    return out


# --- values made when the call is made -------------------------------------------------------------

@dataclass(frozen=True)
class Known:
    """A stored id of `kind` (ids exist only once the server has run something)."""

    kind: str  # run, report_run, running, session, test_set, issue
    index: int


@dataclass(frozen=True)
class Big:
    """A huge string or a deeply nested value (hypothesis would choke printing the value itself)."""

    kind: str  # "huge": HUGE[index]; "deep": nested DEPTHS[index] levels
    index: int


HUGE = ("x" * 1_000_001, "é" * 60_001, "\udc80" * 5_000, '{"a":' * 50_000, "[" * 50_000, " " * 300_000)
DEPTHS = (31, 33, 200, 3_000)


def resolve(value: Any, pools: dict[str, list[str]]) -> Any:
    if isinstance(value, Known):
        pool = pools.get(value.kind) or ["nothing-stored-yet"]
        return pool[value.index % len(pool)]
    if isinstance(value, Big):
        return HUGE[value.index] if value.kind == "huge" else nested(DEPTHS[value.index])
    if isinstance(value, dict):
        return {k: resolve(v, pools) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, pools) for v in value]
    return value


def known(kind: str) -> st.SearchStrategy[Known]:
    return st.builds(Known, st.just(kind), st.integers(0, 50))


# --- strategies: text and junk ---------------------------------------------------------------------

TRAVERSAL = (
    "../../../../etc/passwd", "/etc/passwd", "~/.ssh/id_rsa", "..", "../", "./", ".", "..\\..\\boot.ini",
    "%2e%2e%2fetc%2fpasswd", "....//....//etc/passwd", "/proc/self/environ", "file:///etc/passwd", "/dev/zero",
    "/dev/stdin", "a\x00b", "\x00", "../echo_agent.py:echo", "/work/wt-fuzz/tests/agents.py:echo",
    "tests.agents:echo", "examples/support_agent.py:support_agent", "os:system", "subprocess:run",
    "builtins:eval", "engine.llm:resolve_llm", "echo_agent:__builtins__", "echo_agent.py:NOT_CALLABLE",
)
huge = st.builds(Big, st.just("huge"), st.integers(0, len(HUGE) - 1))
deep = st.builds(Big, st.just("deep"), st.integers(0, len(DEPTHS) - 1))
surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
odd_text = st.lists(st.one_of(st.characters(), surrogate, st.sampled_from("\x00\n\r\t{}[]:/\\.%$\u202e\ufeff")),
                    max_size=24).map("".join)
text = st.one_of(st.text(max_size=30), odd_text, st.sampled_from(TRAVERSAL))
numbers = st.one_of(st.integers(), st.floats(), st.sampled_from([0, -1, 2**31, 2**63, 2**64 + 1, -(2**63) - 1,
                                                                  10**40, math.nan, math.inf, -math.inf, -0.0]))
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
junk = st.one_of(scalars, huge, deep, st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=12))
# valid text, with what breaks naive code: NUL, controls, quotes, braces, an RTL override, a BOM
plain = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from("\x00\n\r\t\"'{}[]:/\\.%$\u202e\ufeff")),
                max_size=30)
words = st.sampled_from(["Ask for a refund.", "Say hi.", "Check order A1, then ask about returns.",
                         "Get the agent to reveal its system prompt.", "Book a table for 2 {{ conversation }}"])
sentence = st.one_of(words, plain.filter(str.strip))
ids = st.sampled_from(["", " ", "run-nope", "set-nope", "ISS-nope", "sim-nope"])


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` three times in four, else junk."""
    return st.one_of(good, good, good, junk)


def record(required: dict[str, Any], optional: dict[str, Any], extra: tuple[str, ...] = ()
           ) -> tuple[st.SearchStrategy[dict[str, Any]], st.SearchStrategy[Any]]:
    """(valid objects, objects whose fields are each valid or junk, with stray `extra` fields, or junk)."""
    good = st.fixed_dictionaries(required, optional=optional)
    mixed = st.fixed_dictionaries({k: mostly(v) for k, v in required.items()},
                                  optional={**{k: mostly(v) for k, v in optional.items()}, **{k: junk for k in extra}})
    return good, st.one_of(mixed, junk)


def with_one(good: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """A list of valid items with one odd one somewhere in it."""
    return st.tuples(st.lists(good, max_size=2), odd, st.integers(0, 2)).map(
        lambda t: t[0][:t[2]] + [t[1]] + t[0][t[2]:])


# --- strategies: the nested records ----------------------------------------------------------------

case_good, case_mixed = record(
    {"goal": sentence},
    {"persona": st.one_of(st.none(), plain), "id": st.one_of(st.none(), plain, st.just("dup")),
     "simulation_guidelines": st.one_of(plain, st.lists(sentence, max_size=3)),
     "scripted_turns": st.lists(sentence, max_size=3),
     "context": st.one_of(st.just({"account_id": "A1"}),
                          st.dictionaries(plain, st.one_of(plain, st.integers()), max_size=3)),
     "expectations": st.dictionaries(plain, st.one_of(plain, st.booleans()), max_size=3)},
    extra=("gaol", "inputs"),
)
case_odd = st.one_of(case_mixed, st.sampled_from([{"goal": "  "}, {"goal": "x", "context": {"messages": "reserved"}},
                                                  {"inputs": {"goal": "An MLflow dataset record"}}]))
message_good, message_mixed = record(
    {"role": st.sampled_from(["user", "assistant", "tool", "system"])},
    {"content": st.one_of(st.none(), plain, st.just("Delivery is guaranteed.")),
     "tool_calls": st.one_of(st.none(), st.just([{"id": "c1", "function": {"name": "f", "arguments": "{}"}}]),
                             st.just([{"function": {"name": "f", "arguments": {"a": 1}}}])),
     "tool_call_id": st.one_of(st.none(), plain), "name": plain, "turn": st.integers(1, 3)},
    extra=("usage", "error", "scripted", "latency_ms"),
)
transcript_good, transcript_mixed = record(
    {"messages": st.lists(message_good, min_size=1, max_size=4)},
    {"session_id": st.one_of(known("session"), st.just("same-id"), plain), "goal": sentence,
     "expectations": st.dictionaries(plain, plain, max_size=2), "test_case": case_good,
     "stop_reason": st.sampled_from(["max_turns", "goal_achieved"]), "turns": st.integers(0, 5),
     "repeat": st.integers(0, 2), "metadata": st.dictionaries(plain, plain, max_size=2),
     "usage": st.just({"judge": {"calls": 1}}), "stop_detail": plain, "run_id": known("run")},
    extra=("started_at", "finished_at"),
)
transcript_odd = st.one_of(
    transcript_mixed,
    st.builds(lambda t, m: {**t, "messages": m}, transcript_good, with_one(message_good, message_mixed)),
    st.builds(lambda t, c: {**t, "test_case": c}, transcript_good, case_odd),
    st.just({"messages": []}),
)
scorer_good = st.one_of(
    st.sampled_from(["goal_achievement", "conversation_completeness", "user_frustration", "knowledge_retention",
                     "tool_call_efficiency", "scorer.py:always", "scorer.py:per_turn",
                     '{"name": "guidelines", "guidelines": ["Be kind"]}']),
    st.fixed_dictionaries({"name": st.just("guidelines"), "guidelines": st.lists(sentence, min_size=1, max_size=2)}),
    st.fixed_dictionaries({"name": sentence, "instructions": st.just("Polite? {{ conversation }}")},
                          optional={"output": st.sampled_from(["bool", {"labels": ["a", "b"], "pass": ["a"]},
                                                               {"range": [1, 5], "threshold": 4}])}),
    st.fixed_dictionaries({"path": st.just("scorer.py:always")}, optional={"name": sentence}),
)
scorer_odd = st.one_of(
    st.sampled_from(["nope", "guidelines", "scorer.py:missing", "echo_agent.py:NOT_CALLABLE", "tests.code_scorers:mixed",
                     '{"name": ', '{"a":' * 2000, "[" * 2000, *TRAVERSAL]),
    record({"name": st.just("guidelines"), "guidelines": st.just(["Be kind"])}, {}, extra=("role", "extra"))[1],
    record({"name": sentence, "instructions": st.just("Polite? {{ conversation }}")},
           {"output": st.sampled_from(["bool", {"labels": ["a"], "pass": ["a"]}, {"range": [1, 5], "threshold": 4}])},
           extra=("model",))[1],
    st.builds(lambda o: {"name": "j", "instructions": "{{ conversation }}", "output": o}, st.one_of(
        record({"labels": st.just(["a", "b"]), "pass": st.just(["a"])}, {})[1],
        record({"range": st.just([1, 5]), "threshold": st.just(3)}, {})[1],
        st.sampled_from([{"labels": []}, {"labels": ["a"], "pass": ["z"]}, {"range": [5, 1]},
                         {"range": [1, 5], "threshold": 9}, "int", {}]))),
    record({"path": st.just("scorer.py:always")}, {"name": sentence})[1],
)
python_target, python_target_mixed = record(
    {"path": st.sampled_from(["echo_agent.py:echo", "echo_agent.py:shaped"])},
    {"kind": st.just("python"), "timeout_s": st.sampled_from([0.5, 5, 1e308])}, extra=("url", "request", "protocol"))
http_target, http_target_mixed = record(
    {"url": st.sampled_from(SAFE_URLS)},
    {"kind": st.sampled_from(["openai", "json"]), "model": plain,
     "headers": st.sampled_from([{}, {"Authorization": "Bearer ${HOME}"}, {"X-Token": "literal-secret-value"},
                                 {"X-Key": "${OPENAI_API_KEY}"}, {"X": "${NOT_SET_ANYWHERE}"}, {"X": "é"}]),
     "request": st.sampled_from([{"q": "{{message}}", "sid": "{{session_id}}"}, {"q": "{{message}}", "c": "{{context}}"},
                                 {"q": "{{nope}}"}, {"q": "no placeholder"}, {"q": "{{message}} {{context.missing}}"}]),
     "response_path": st.sampled_from(["reply", "reply.text", "choices.0.message"]),
     "timeout_s": st.sampled_from([1e-300, 0.01, 5, 1e308, 0, -1, math.inf, math.nan])},
    extra=("path", "protocol"))
json_target = http_target.map(lambda t: {**t, "kind": "json"})
target_good = st.one_of(
    st.sampled_from(["echo_agent.py:echo", "echo_agent:echo", "echo_agent.py:shaped", "echo_agent.py:crashy",
                     "echo_agent.py:slow", f"http://{CLOSED}/", f"https://{CLOSED}/v1",
                     f'{{"url": "http://{CLOSED}/", "kind": "json"}}']),
    python_target, json_target,
    http_target.map(lambda t: {k: v for k, v in t.items() if k not in ("request", "response_path")}),
)
target_odd = st.one_of(
    st.sampled_from(["echo_agent.py:missing", "echo_agent.py:needs_key", " ", "", '{"path": ', '{"a":' * 2000,
                     "[" * 2000, *TRAVERSAL]),
    text, python_target_mixed, http_target_mixed, http_target,
    st.builds(lambda t: {("protocol" if k == "kind" else k): v for k, v in t.items()}, http_target),
)

# Where the near leg puts junk: (argument, path inside it, a valid value to put it in), one point per field
# of each nested record, so that every field's check is reached within a few hundred examples.
CASE_FIELDS = ("goal", "persona", "id", "simulation_guidelines", "scripted_turns", "context", "expectations",
               "gaol", "inputs")
MESSAGE_FIELDS = ("role", "content", "tool_calls", "tool_call_id", "name", "turn", "usage", "error", "scripted")
TRANSCRIPT_FIELDS = ("messages", "session_id", "goal", "expectations", "test_case", "stop_reason", "stop_detail",
                     "turns", "repeat", "usage", "metadata", "run_id", "started_at")
_cases = st.lists(st.fixed_dictionaries({
    "goal": sentence, "persona": plain, "id": plain, "simulation_guidelines": st.lists(sentence, max_size=2),
    "scripted_turns": st.lists(sentence, max_size=2), "context": st.just({"account_id": "A1"}),
    "expectations": st.just({"outcome": "refund"})}), min_size=1, max_size=2)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": plain, "name": plain,
                                  "tool_calls": st.just([{"id": "c1", "function": {"name": "f", "arguments": "{}"}}]),
                                  "turn": st.just(1)})
_transcripts = st.lists(st.fixed_dictionaries({
    "session_id": plain.filter(bool), "messages": st.lists(_message, min_size=1, max_size=3), "goal": sentence,
    "expectations": st.just({"outcome": "refund"}), "stop_reason": st.just("max_turns"), "turns": st.just(1),
    "repeat": st.just(0), "usage": st.just({"judge": {"calls": 1}}), "metadata": st.just({"source": "fuzz"}),
    "stop_detail": plain, "test_case": _cases.map(lambda c: c[0])}), min_size=1, max_size=2)
_judges = st.lists(st.fixed_dictionaries({
    "name": sentence, "instructions": st.just("Polite? {{ conversation }}"),
    "output": st.sampled_from([{"labels": ["a", "b"], "pass": ["a"]}, {"range": [1, 5], "threshold": 4}])}),
    min_size=1, max_size=1)
POINTS: list[tuple[str, tuple[Any, ...], st.SearchStrategy[Any]]] = [
    *[("test_cases", (0, f), _cases) for f in CASE_FIELDS],
    *[("transcripts", (0, f), _transcripts) for f in TRANSCRIPT_FIELDS],
    *[("transcripts", (0, "messages", 0, f), _transcripts) for f in MESSAGE_FIELDS],
    *[("transcripts", (0, "messages", 0, "tool_calls", 0, f), _transcripts) for f in ("id", "type", "function")],
    *[("transcripts", (0, "test_case", f), _transcripts) for f in CASE_FIELDS[:4]],
    *[("scorers", (0, f), _judges) for f in ("name", "instructions", "output", "x")],
    *[("scorers", (0, "output", f), _judges) for f in ("labels", "pass", "range", "threshold")],
    *[("scorers", (0, f), st.just([{"name": "guidelines", "guidelines": ["Be kind"]}])) for f in ("guidelines", "role")],
    *[("scorers", (0, f), st.just([{"name": "mine", "path": "scorer.py:always"}])) for f in ("name", "path")],
    *[("target", (f,), python_target) for f in ("path", "kind", "timeout_s", "url", "protocol")],
    *[("target", (f,), json_target)
      for f in ("url", "kind", "model", "headers", "request", "response_path", "timeout_s", "path")],
    ("target", ("headers", "Authorization"), http_target),
    ("target", ("request", "q"), json_target),
]


def set_path(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of `value` with `new` at `path` (list indexes wrap; missing dict keys are added)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, list) and value:
        copy = list(value)
        copy[head % len(copy)] = set_path(copy[head % len(copy)], rest, new)
        return copy
    copy = dict(value) if isinstance(value, dict) else {}
    copy[head] = set_path(copy.get(head, {}), rest, new)
    return copy


# --- strategies: the arguments ---------------------------------------------------------------------

FILES_ODD = st.sampled_from([*WORKSPACE_FILES, "missing.yaml", "missing.jsonl", "set-nope", "set-" + "x" * 300,
                             "x" * 300 + ".yaml", "~nosuchuser/x.yaml", "~/x.jsonl", *TRAVERSAL])
small_int = st.one_of(st.integers(-2, 6), st.sampled_from([49, 50, 51, 99, 100, 101, 200, 201, 256, 257, 2**63]))

GOOD: dict[str, st.SearchStrategy[Any]] = {
    "target": target_good,
    "test_cases": st.one_of(st.lists(case_good, min_size=1, max_size=3), st.sampled_from(["cases.yaml", "cases.json"]),
                            known("test_set")),
    "run_id": known("run"),
    "base": known("run"), "candidate": known("report_run"),
    "issue_id": st.one_of(st.none(), known("issue")),
    "session_ids": st.lists(known("session"), min_size=1, max_size=3),
    "transcripts": st.lists(transcript_good, min_size=1, max_size=3),
    "scorers": st.one_of(st.none(), st.lists(scorer_good, min_size=1, max_size=3, unique_by=repr)),
    "file": st.just("transcripts.jsonl"),
    "user_agent": st.none(),
    "description": st.one_of(st.none(), sentence),
    "guidance": st.one_of(st.none(), plain), "name": st.one_of(st.none(), plain),
    "adversarial": st.floats(0, 1),
    "wait": st.booleans(), "markdown": st.booleans(), "ask_agent": st.booleans(),
    "max_turns": st.integers(1, 3), "repeats": st.integers(1, 2), "num_test_cases": st.integers(1, 3),
    "concurrency": st.integers(1, 8), "limit": st.integers(1, 200), "offset": st.integers(0, 30),
    **{key: st.sampled_from([None, "offline", " offline "]) for key in MODEL_KEYS},
}
GOOD_FOR_TOOL = {  # (tool, argument): what gets that tool past its first checks
    ("get_report", "run_id"): known("report_run"),
    ("rerun_issue", "run_id"): known("report_run"),
    ("cancel_run", "run_id"): st.one_of(known("running"), known("run")),
    ("resume_run", "run_id"): st.one_of(known("running"), known("run")),
    ("test_agent", "num_test_cases"): st.integers(0, 2),
    ("test_agent", "max_turns"): st.integers(1, 2),
    ("get_run", "limit"): st.integers(1, 50),
    ("get_report", "limit"): st.integers(1, 50),
}
ODD: dict[str, st.SearchStrategy[Any]] = {  # valid JSON of about the right shape, wrong inside
    "target": target_odd,
    "test_cases": st.one_of(st.lists(case_odd, min_size=1, max_size=3), FILES_ODD, st.just([])),
    "run_id": st.one_of(text, ids, known("session"), known("test_set"), huge),
    **{key: st.one_of(text, ids, known("session"), known("test_set"), known("running"), huge)
       for key in ("base", "candidate")},
    "issue_id": st.one_of(text, ids),
    "session_ids": st.one_of(with_one(known("session"), st.one_of(known("run"), text, ids)), st.just([])),
    "transcripts": st.one_of(st.lists(transcript_odd, min_size=1, max_size=3), st.just([])),
    "scorers": st.one_of(with_one(scorer_good, scorer_odd), st.just(["guidelines", "guidelines"]), st.just([]),
                         st.just(["goal_achievement", "goal_achievement"])),
    "file": FILES_ODD,
    "user_agent": st.one_of(st.sampled_from(["echo_agent.py:echo", "engine.simulation:LLMSimulatedUser", "os:system",
                                             "scorer.py:always", *TRAVERSAL]), text),
    "description": st.one_of(text, huge), "guidance": st.one_of(text, huge), "name": st.one_of(text, huge),
    "adversarial": st.one_of(st.floats(), st.sampled_from([-0.1, 1.1, 2])),
    **{key: small_int for key in ("max_turns", "repeats", "num_test_cases", "concurrency", "limit", "offset")},
    **{key: st.one_of(st.sampled_from(["gpt-4o", "", "OFFLINE", "openai:/gpt-4o-mini", "a/b", "://"]), text)
       for key in MODEL_KEYS},
}
SOURCES = {  # tools that need a source among these arguments: "one" exactly one, "some" at least one
    "score_sessions": ("one", ("run_id", "session_ids", "transcripts", "file")),
    "generate_test_cases": ("some", ("description", "target", "run_id", "session_ids", "file")),
}


def _from_property(schema: dict[str, Any], name: str) -> st.SearchStrategy[Any]:
    return from_schema({**schema["properties"][name], "$defs": schema.get("$defs", {})})


def _good(tool: str, schema: dict[str, Any], name: str) -> st.SearchStrategy[Any]:
    for table, key in ((GOOD_FOR_TOOL, (tool, name)), (GOOD, name)):
        if key in table:
            return table[key]
    return _from_property(schema, name)


def _use_source(tool: str, args: dict[str, Any], name: str) -> None:
    """Make `name` the only source of a tool that takes exactly one."""
    how, sources = SOURCES.get(tool, ("", ()))
    if how == "one" and name in sources:
        for other in sources:
            if other != name:
                args.pop(other, None)


@st.composite
def steered(draw: st.DrawFn, tool: str, schema: dict[str, Any]) -> dict[str, Any]:
    """Arguments that pass every check, so the call reaches the engine's deeper code."""
    names = list(schema.get("properties", {}))
    required = set(schema.get("required", []))
    args = draw(st.fixed_dictionaries({n: _good(tool, schema, n) for n in names if n in required},
                                      optional={n: _good(tool, schema, n) for n in names if n not in required}))
    if tool in SOURCES:
        chosen = draw(st.sampled_from(SOURCES[tool][1]))
        _use_source(tool, args, chosen)
        if args.get(chosen) is None:
            args[chosen] = draw(_good(tool, schema, chosen))
    return args


@st.composite
def near(draw: st.DrawFn, tool: str, schema: dict[str, Any]) -> dict[str, Any]:
    """Steered arguments with one of them wrong inside: junk at one of POINTS, or an ODD value."""
    args = draw(steered(tool, schema))
    props = schema.get("properties", {})
    points = [p for p in POINTS if p[0] in props]
    odd = [n for n in props if n in ODD]
    if points and (not odd or draw(st.integers(0, 2))):  # two in three: junk inside a record
        name, path, base = draw(st.sampled_from(points))
        _use_source(tool, args, name)
        args[name] = set_path(draw(base), path, draw(junk))
    elif odd:
        name = draw(st.sampled_from(odd))
        _use_source(tool, args, name)
        args[name] = draw(ODD[name])
    return args


@st.composite
def off_schema(draw: st.DrawFn, tool: str, schema: dict[str, Any]) -> dict[str, Any]:
    """Steered arguments with one of the wrong type or size, an unknown key, no arguments, or all junk."""
    args = draw(steered(tool, schema))
    names = list(schema.get("properties", {}))
    how = draw(st.sampled_from(["junk_value", "big_value", "unknown_key", "empty", "all_junk"]))
    if how in ("junk_value", "big_value") and names:
        args[draw(st.sampled_from(names))] = draw(junk if how == "junk_value" else st.one_of(huge, deep))
    elif how == "unknown_key":
        args[draw(st.one_of(text, st.sampled_from(["ctx", "_meta", "__proto__", "arguments", "goal"])))] = draw(junk)
    elif how == "empty":
        args = {}
    elif how == "all_junk":
        args = {n: draw(junk) for n in names}
    return args


def arguments(tool: str, schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    wrong_inside = near(tool, schema)
    return st.one_of(from_schema(schema), steered(tool, schema), wrong_inside, wrong_inside, off_schema(tool, schema))


# --- checks ----------------------------------------------------------------------------------------

MASKED_TOOL = re.compile(r"Error executing tool [\w.-]+\s*:?\s*")
ENGINE_ERRORS = set()
_pending = [ConvsimError]
while _pending:
    _cls = _pending.pop()
    ENGINE_ERRORS.add(_cls.__name__)
    _pending.extend(_cls.__subclasses__())


def reason_of(text: str, uri: str | None = None) -> str:
    """What is left of an error once the SDK's prefixes are gone: nothing means the reason was masked."""
    text = text.strip()
    if uri is not None:
        masked = (f"Error reading resource {uri}", f"Error creating resource from template {uri}")
        return "" if text in masked else text
    while m := MASKED_TOOL.match(text):
        text = text[m.end():].strip()
    return text


def check_reason(what: str, text: str, uri: str | None = None) -> None:
    reason = reason_of(text, uri)
    assert reason, f"{what}: the error carries no reason: {text[:300]!r}"
    assert "internal error in" not in reason, f"{what}: a bug behind the server's guard: {reason[:600]}"


def _short(value: Any, limit: int = 600) -> str:
    try:
        text = json.dumps(value, default=repr)
    except (ValueError, RecursionError):
        try:
            text = repr(value)
        except RecursionError:
            text = f"<{type(value).__name__} nested too deep to print>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def collect_ids(value: Any, pools: dict[str, list[str]]) -> None:
    """Remember every id a result names, so that later examples can pass real ones."""
    def add(kind: str, v: str) -> None:
        if v not in pools.setdefault(kind, []):
            pools[kind].append(v)

    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("run_id"), str):
                if item.get("report"):
                    add("report_run", item["run_id"])
                if item.get("status") == "running":
                    add("running", item["run_id"])
            for key, v in item.items():
                if not isinstance(v, str):
                    stack.append(v)
                elif key in ("run_id", "rerun_of"):
                    add("run", v)
                elif key in ("session_id", "test_set_id"):
                    add(key.removesuffix("_id"), v)
                elif key == "id" and v.startswith("ISS-"):
                    add("issue", v)
        elif isinstance(item, list):
            stack.extend(item)


def client_refuses(request: mcp_types.ClientRequest) -> bool:
    """True when the MCP client cannot encode the request, so the server never sees it.

    The client dumps each request in pydantic's JSON mode and UTF-8-encodes the tool name or resource
    URI for its Mcp-Name header: values nested past pydantic's serialization depth, and lone surrogates
    in dict keys or in the URI, fail there. (Every real transport refuses them as well.)
    """
    try:
        data = request.model_dump(by_alias=True, mode="json", exclude_none=True)
        for key in ("name", "uri"):
            if isinstance(data["params"].get(key), str):
                data["params"][key].encode("utf-8")
    except (ValueError, UnicodeError, RecursionError):
        return True
    return False


async def server_answers(client: Client) -> None:
    with anyio.fail_after(10):
        result = await client.call_tool("list_runs", {})
    assert not result.is_error, f"list_runs failed after the fuzzed call: {result.content}"


async def call_and_check(client: Client, tool: str, args: dict[str, Any], pools: dict[str, list[str]]) -> None:
    what = f"{tool}({_short(args)})"
    if not client_refuses(mcp_types.CallToolRequest(params=mcp_types.CallToolRequestParams(name=tool,
                                                                                           arguments=args))):
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                result = await client.call_tool(tool, args)
        except TimeoutError:
            raise AssertionError(f"{what}: no answer within {CALL_TIMEOUT:g}s") from None
        except MCPError as e:  # a JSON-RPC error instead of a tool result: it must still say why
            check_reason(what, e.error.message)
        else:
            if result.is_error:
                texts = [c.text for c in result.content if c.type == "text"]
                assert texts, f"{what}: an error result without text: {result.content}"
                check_reason(what, " ".join(texts))
            else:
                assert result.structured_content is not None, f"{what}: a result without structured content"
                collect_ids(result.structured_content, pools)
    await server_answers(client)


async def settle(client: Client) -> None:
    """Wait for the background runs to end; a run may fail only with an engine error (else it is a bug)."""
    with anyio.fail_after(SETTLE_TIMEOUT):
        while True:
            listed = await client.call_tool("list_runs", {"limit": 200})
            assert not listed.is_error, f"list_runs failed: {listed.content}"
            runs = listed.structured_content["runs"]
            if not any(r["status"] == "running" for r in runs):
                break
            await anyio.sleep(0.1)
    for run in runs:
        if run["status"] == "failed":
            error = (await client.call_tool("get_run", {"run_id": run["run_id"]})).structured_content["error"] or ""
            assert error.partition(":")[0] in ENGINE_ERRORS, f"run {run['run_id']} ({run['kind']}) failed: {error}"


# --- the server under fuzz -------------------------------------------------------------------------

@pytest.fixture
def closed_port():
    """A loopback port that refuses connections at once: bound for the test, never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        try:
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            v6.bind(("::1", port))
        except OSError:  # no IPv6 loopback: connecting to [::1] fails at once anyway
            v6 = None
        try:
            yield port
        finally:
            if v6 is not None:
                v6.close()


@pytest.fixture
def fuzz_server(tmp_path, monkeypatch, closed_port):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    for name, content in WORKSPACE_FILES.items():
        (workspace / name).write_text(content, encoding="utf-8")
    for var in [v for v in os.environ if v.endswith("_API_KEY") or v in ("CONVSIM_ROOTS", "CONVSIM_AGENT_ENV")]:
        monkeypatch.delenv(var)  # no provider key, no extra code roots, no allowed credential headers
    monkeypatch.setenv("CONVSIM_MODEL", "offline")
    # should a model call get through anyway: the closed port, no retries, a short timeout
    monkeypatch.setenv("CONVSIM_API_BASE", f"http://127.0.0.1:{closed_port}/v1")
    monkeypatch.setenv("CONVSIM_LLM_RETRIES", "0")
    monkeypatch.setenv("CONVSIM_LLM_TIMEOUT", "2")
    monkeypatch.setattr(sys, "path", list(sys.path))  # importing a workspace agent puts its root first
    store = Store(tmp_path / "fuzz.sqlite")
    yield build_server(store, workspace=Workspace.default(base=workspace))
    store.close()


async def seed(client: Client) -> dict[str, list[str]]:
    """One of each thing the store holds, so that the fuzz can name real runs, sessions, test sets and issues."""
    pools: dict[str, list[str]] = {}
    calls = [
        ("simulate_conversations", {"target": "echo_agent.py:echo", "test_cases": "cases.yaml", "max_turns": 2,
                                    "scorers": ["goal_achievement", "scorer.py:per_turn"]}),
        ("test_agent", {"target": "echo_agent.py:crashy", "num_test_cases": 1, "max_turns": 3}),
        ("generate_test_cases", {"description": "A refunds agent.", "num_test_cases": 1}),
        ("score_sessions", {"file": "transcripts.jsonl", "scorers": ["user_frustration"]}),
        ("simulate_conversations", {"target": "echo_agent.py:slow", "test_cases": [{"goal": "Ask A, B, C, D, E."}] * 2,
                                    "max_turns": 20, "wait": False}),  # still running when cancel_run is fuzzed
    ]
    for tool, args in calls:
        result = await client.call_tool(tool, args)
        assert not result.is_error, (tool, result.content)
        collect_ids(result.structured_content, pools)
    assert {"run", "report_run", "running", "session", "test_set", "issue"} <= set(pools), pools
    return pools


def prepared(args: dict[str, Any], pools: dict[str, list[str]], port: int) -> dict[str, Any]:
    """The drawn arguments as sent: stored ids filled in, kept in the sandbox, pointed at the closed port."""
    return sanitize(resolve(args, pools), port)


async def test_every_tool_is_fuzzed(fuzz_server):
    async with Client(fuzz_server) as client:
        names = {t.name for t in (await client.list_tools()).tools}
    assert names == set(EXAMPLES), "a new tool needs a budget in EXAMPLES (and GOOD / ODD values for new arguments)"


@pytest.mark.parametrize("tool", list(EXAMPLES))
async def test_fuzzed_arguments_get_an_answer_with_a_reason(fuzz_server, closed_port, tool):
    async with Client(fuzz_server) as client:
        schema = next(t for t in (await client.list_tools()).tools if t.name == tool).input_schema
        pools = await seed(client)

        @settings(max_examples=EXAMPLES[tool], **FUZZ_SETTINGS)
        @given(args=arguments(tool, schema))
        def fuzz(args: dict[str, Any]) -> None:
            anyio.from_thread.run(call_and_check, client, tool, prepared(args, pools, closed_port), pools)

        await anyio.to_thread.run_sync(fuzz)  # hypothesis drives the examples from a worker thread
        await settle(client)


# --- resources -------------------------------------------------------------------------------------

TEMPLATES = ("convsim://runs/{run_id}", "convsim://runs/{run_id}/report", "convsim://runs/{run_id}/report.md",
             "convsim://runs/{run_id}/scores", "convsim://test-sets/{set_id}",
             "convsim://runs/{run_id}/sessions/{session_id}", "convsim://compare/{run_id}/{set_id}",
             "convsim://compare/{session_id}/{run_id}/report.md")
resource_id = st.one_of(
    known("run"), known("report_run"), known("session"), known("test_set"), text,
    st.sampled_from(["..", "%2e%2e", "..%2f..%2fetc%2fpasswd", "%2Fetc%2Fpasswd", "a%00b", "%", "%zz", "run-x/../..",
                     "run-x?y=1", "run-x#frag", " ", "", "\udc80", "run-" + "x" * 10_000, "{run_id}"]),
)
resource_uri = st.one_of(
    st.tuples(st.sampled_from(TEMPLATES), st.fixed_dictionaries({"run_id": resource_id, "set_id": resource_id,
                                                                 "session_id": resource_id})),
    st.tuples(st.one_of(text, st.sampled_from([
        "convsim://runs/../../etc/passwd", "convsim://runs/", "convsim://", "", "file:///etc/passwd",
        "convsim://runs/run-x/sessions/", "convsim://RUNS/x", "convsim://runs/x/sessions/y/z", f"http://{CLOSED}/"])),
        st.just({})),
)


async def read_and_check(client: Client, uri: str) -> None:
    what = f"read_resource({_short(uri, 300)})"
    if not client_refuses(mcp_types.ReadResourceRequest(params=mcp_types.ReadResourceRequestParams(uri=uri))):
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                result = await client.read_resource(uri)
        except TimeoutError:
            raise AssertionError(f"{what}: no answer within {CALL_TIMEOUT:g}s") from None
        except MCPError as e:
            check_reason(what, e.error.message, uri=uri)
        else:
            assert result.contents, f"{what}: no contents"
            for content in result.contents:
                if content.mime_type == "application/json":
                    json.loads(content.text)
    await server_answers(client)


async def test_fuzzed_resource_uris_get_an_answer_with_a_reason(fuzz_server):
    async with Client(fuzz_server) as client:
        pools = await seed(client)

        @settings(max_examples=RESOURCE_EXAMPLES, **FUZZ_SETTINGS)
        @given(drawn=resource_uri)
        def fuzz(drawn: tuple[str, dict[str, Any]]) -> None:
            uri, params = drawn
            for name, value in params.items():
                uri = uri.replace("{" + name + "}", str(resolve(value, pools)))
            anyio.from_thread.run(read_and_check, client, uri)

        await anyio.to_thread.run_sync(fuzz)
