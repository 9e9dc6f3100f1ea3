"""Targets: each kind, each reply shape, signature checks, and what reaches the agent."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from engine import AgentError, InvalidTarget, Message, TestCase
from engine.simulation.targets import normalise_reply, parse_target_spec, redacted_spec, resolve_target
from tests.conftest import ROOT, agent

pytestmark = pytest.mark.anyio

HISTORY = [Message(role="user", content="hi there")]


async def reply_of(target_spec, history=HISTORY, **context):
    target = resolve_target(target_spec, workspace=ROOT)
    try:
        return await target.respond(history, session_id="sim-test", context=context)
    finally:
        await target.aclose()


@pytest.mark.parametrize(
    "name, text",
    [
        pytest.param("echo", "You said: hi there", id="str"),
        pytest.param("async_echo", "async:sim-test:hi there", id="async-input-param-message-dict"),
        pytest.param("content_dict", "from a dict", id="content-dict"),
        pytest.param("chat_completion_dict", "from a completion", id="chat-completion-dict"),
        pytest.param("chat_completion_object", "from an object", id="chat-completion-object"),
        pytest.param("messages_list", "Your order shipped.", id="messages-list"),
    ],
)
async def test_python_reply_shapes_normalise_to_text(name, text):
    reply = await reply_of(agent(name))
    assert reply.text == text
    assert not any((m.content or "").startswith("{") for m in reply.messages if m.role == "assistant"), "JSON-dumped"


async def test_tool_calls_stay_structured_in_the_transcript():
    reply = await reply_of(agent("messages_list"))
    roles = [m.role for m in reply.messages]
    assert roles == ["assistant", "tool", "assistant"]
    call = reply.messages[0].tool_calls[0]
    assert call.function["name"] == "lookup_order"
    assert json.loads(call.function["arguments"]) == {"order_id": "A1"}


async def test_file_path_target_loads():
    reply = await reply_of("tests/agents.py:echo")
    assert reply.text == "You said: hi there"


async def test_context_and_session_id_reach_the_agent():
    from tests import agents

    agents.SEEN.clear()
    await reply_of(agent("echo"), user_id="u-42", tier="gold")
    assert agents.SEEN["sim-test"] == [{"session_id": "sim-test", "mlflow_session_id": "sim-test",
                                        "user_id": "u-42", "tier": "gold"}]


async def test_only_accepted_keywords_are_passed():
    reply = await reply_of(agent("async_echo"), unrelated="x")  # takes input + mlflow_session_id only
    assert reply.text.startswith("async:sim-test")


def test_missing_history_parameter_is_rejected_before_the_run():
    with pytest.raises(InvalidTarget, match="'messages' or 'input'"):
        resolve_target(agent("no_history_param"), workspace=ROOT)


def test_required_parameter_missing_from_a_case_names_the_case():
    target = resolve_target(agent("needs_user_id"), workspace=ROOT)
    target.check_cases([TestCase(goal="a", context={"user_id": "u"})])
    with pytest.raises(InvalidTarget, match="'user_id'.*test case 2"):
        target.check_cases([TestCase(goal="a", context={"user_id": "u"}), TestCase(goal="b")])


@pytest.mark.parametrize(
    "spec, message",
    [
        pytest.param("", "target is empty", id="empty"),
        pytest.param("no_colon", "must look like", id="no-colon"),
        pytest.param("no_such_module_xyz:fn", "no_such_module_xyz", id="unknown-module"),
        pytest.param("tests.agents:nope", "has no attribute 'nope'", id="unknown-attr"),
        pytest.param("missing/file.py:fn", "file not found", id="missing-file"),
        pytest.param({"kind": "json"}, "needs 'url'", id="json-without-url"),
        pytest.param({"url": "ftp://x"}, "http", id="bad-scheme"),
        pytest.param({"url": "http://x", "bogus": 1}, "bogus", id="unknown-field"),
    ],
)
def test_bad_target_specs_say_what_to_fix(spec, message):
    with pytest.raises(InvalidTarget, match=message):
        resolve_target(spec, workspace=ROOT)


@pytest.mark.parametrize(
    "name, kind",
    [("crashes_on_turn_2", "exception"), ("unparseable", "unparseable")],
)
async def test_agent_failures_raise_agent_error(name, kind):
    history = [Message(role="user", content="a"), Message(role="assistant", content="b"),
               Message(role="user", content="c")]
    with pytest.raises(AgentError) as info:
        await reply_of(agent(name), history=history)
    assert info.value.kind == kind


async def test_slow_agent_times_out():
    with pytest.raises(AgentError, match="within 0.2s") as info:
        await reply_of({"path": agent("slow"), "timeout_s": 0.2})
    assert info.value.kind == "timeout"


def test_empty_reply_is_detected():
    assert normalise_reply("   ", HISTORY)[0].content == "   "
    from engine.simulation.targets import AgentReply

    assert AgentReply(normalise_reply("   ", HISTORY), 1.0).empty


# --- HTTP targets against a real local server ---------------------------------------------------


class _AgentServer:
    """A tiny HTTP agent recording requests; replies come from `respond(path, body, headers)`."""

    def __init__(self, respond):
        self.requests: list[tuple[str, dict, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body, dict(self.headers)))
                status, payload, *ctype = respond(self.path, body, dict(self.headers))
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype[0] if ctype else
                                 "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_agent():
    servers = []

    def make(respond):
        servers.append(_AgentServer(respond))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


async def test_openai_target_sends_full_history_model_and_expanded_headers(http_agent, monkeypatch):
    monkeypatch.setenv("AGENT_TOKEN", "s3cret")
    monkeypatch.setenv("CONVSIM_AGENT_ENV", "AGENT_TOKEN")
    srv = http_agent(lambda path, body, headers: (200, {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}))
    history = [Message(role="user", content="a"), Message(role="assistant", content="b"), Message(role="user", content="c")]
    spec = {"url": srv.url + "/v1", "model": "my-agent", "headers": {"Authorization": "Bearer ${AGENT_TOKEN}"}}
    reply = await reply_of(spec, history=history)
    path, body, headers = srv.requests[0]
    assert reply.text == "ok"
    assert path == "/v1/chat/completions"
    assert body["model"] == "my-agent"
    assert [m["content"] for m in body["messages"]] == ["a", "b", "c"]
    assert headers["Authorization"] == "Bearer s3cret"


def test_secrets_are_redacted_from_the_stored_spec():
    headers = {"Authorization": "Bearer literal", "X-Key": "${AGENT_TOKEN}", "X-Auth": "Bearer ${AGENT_TOKEN}",
               "X-Mixed": "abc${AGENT_TOKEN}"}
    spec = parse_target_spec({"url": "http://x", "headers": headers})
    assert redacted_spec(spec)["headers"] == {"Authorization": "***", "X-Key": "${AGENT_TOKEN}",
                                              "X-Auth": "Bearer ${AGENT_TOKEN}", "X-Mixed": "***"}


def test_unset_header_variable_is_reported_before_the_run(monkeypatch):
    monkeypatch.delenv("AGENT_TOKEN", raising=False)
    monkeypatch.setenv("CONVSIM_AGENT_ENV", "AGENT_TOKEN")
    with pytest.raises(InvalidTarget, match="AGENT_TOKEN, which are not set"):
        resolve_target({"url": "http://127.0.0.1:1/v1", "headers": {"Authorization": "Bearer ${AGENT_TOKEN}"}})


async def test_json_target_fills_the_template_and_follows_response_path(http_agent):
    srv = http_agent(lambda path, body, headers: (200, {"data": {"reply": {"text": f"got {body['q']}"}}}))
    spec = {"kind": "json", "url": srv.url + "/chat", "response_path": "data.reply.text",
            "request": {"q": "{{message}}", "sid": "{{session_id}}", "ctx": "{{context}}", "tier": "t={{context.tier}}"}}
    history = [Message(role="user", content="a"), Message(role="assistant", content="b"), Message(role="user", content="c")]
    reply = await reply_of(spec, history=history, tier="gold")
    assert reply.text == "got c"
    assert srv.requests[0][1] == {"q": "c", "sid": "sim-test", "ctx": {"tier": "gold"}, "tier": "t=gold"}


def test_protocol_is_accepted_as_another_name_for_kind():
    assert parse_target_spec({"url": "http://x", "protocol": "json"}).kind == "json"


async def test_json_target_with_a_wrong_response_path_is_an_agent_error(http_agent):
    srv = http_agent(lambda path, body, headers: (200, {"answer": "x"}))
    with pytest.raises(AgentError, match="response_path 'reply.text'.*answer"):
        await reply_of({"kind": "json", "url": srv.url, "response_path": "reply.text"})


def test_json_template_placeholders_are_checked():
    with pytest.raises(InvalidTarget, match="unknown placeholder"):
        resolve_target({"kind": "json", "url": "http://x", "request": {"m": "{{message}}", "x": "{{nope}}"}})
    with pytest.raises(InvalidTarget, match="must contain"):
        resolve_target({"kind": "json", "url": "http://x", "request": {"m": "hello"}})


async def test_http_error_is_an_agent_error_with_status(http_agent):
    srv = http_agent(lambda path, body, headers: (500, {"error": {"message": "boom"}}))
    with pytest.raises(AgentError, match="HTTP 500.*boom") as info:
        await reply_of(srv.url + "/v1/chat/completions")
    assert info.value.kind == "http"


@pytest.mark.parametrize("kind", ["json", "openai"])
@pytest.mark.parametrize("content_type, body", [
    pytest.param("text/html; charset=utf-8", "<html><body><h1>Welcome to nginx!</h1></body></html>", id="html"),
    pytest.param("text/plain", "just text", id="plain-text"),
])
async def test_a_non_json_http_reply_is_an_agent_error_naming_the_content_type(http_agent, kind, content_type, body):
    srv = http_agent(lambda path, req, headers: (200, body, content_type))
    with pytest.raises(AgentError, match=f"agent replied {content_type.split(';')[0]}, expected JSON") as info:
        await reply_of({"kind": kind, "url": srv.url})
    assert info.value.kind == "unparseable"


async def test_an_html_page_labelled_json_is_an_agent_error(http_agent):
    srv = http_agent(lambda path, req, headers: (200, "<!doctype html><p>login</p>", "application/json"))
    with pytest.raises(AgentError, match="agent reply is not JSON"):
        await reply_of({"kind": "openai", "url": srv.url})


async def test_unreachable_agent_is_an_agent_error():
    with pytest.raises(AgentError, match="could not reach"):
        await reply_of("http://127.0.0.1:1/v1/chat/completions")


@pytest.mark.parametrize("reply, limit", [
    pytest.param({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "x" * 200_001}}]},
        "MAX_MESSAGE_CHARS", id="huge-tool-arguments"),
    pytest.param({"role": "assistant", "content": None, "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in range(101)]},
        "MAX_TOOL_CALLS", id="many-tool-calls"),
    pytest.param({"messages": [{"role": "assistant", "content": "hi"}] * 101}, "MAX_REPLY_MESSAGES",
                 id="many-messages"),
])
async def test_agent_replies_beyond_the_bounds_are_agent_errors(http_agent, reply, limit):
    srv = http_agent(lambda path, body, headers: (200, reply))
    with pytest.raises(AgentError, match=limit):
        await reply_of({"kind": "json", "url": srv.url})


async def test_an_agent_reply_body_is_read_only_up_to_max_reply_bytes(http_agent):
    srv = http_agent(lambda path, body, headers: (200, {"content": "x" * 10_000_001}))
    with pytest.raises(AgentError, match="larger than 10000000 bytes"):
        await reply_of({"kind": "json", "url": srv.url})


def test_a_url_password_and_query_values_are_masked_when_stored_and_echoed():
    from engine import secrets

    spec = parse_target_spec("http://alice:Sup3rSecretPassw0rd@127.0.0.1:1/v1?api_key=QUERYSECRET12345&v=2")
    assert redacted_spec(spec)["url"] == "http://alice:***@127.0.0.1:1/v1?api_key=***&v=***"
    assert secrets.redact(f"could not reach {spec.url}") == "could not reach http://alice:***@127.0.0.1:1/v1?api_key=***&v=2"
