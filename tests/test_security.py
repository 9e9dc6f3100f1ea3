"""A hostile caller (a prompt-injected assistant) against the workspace rules.

Every refusal is driven through the real MCP client or the engine's public functions, with
real files, real local HTTP servers and the real fake model server; nothing of ours is mocked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mcp import Client

from convsim_mcp.server import build_server
from engine import InvalidOption, InvalidTarget, InvalidTestCase, Workspace, load_test_cases, resolve_target
from engine.judging.code import CodeScorer
from engine.simulation.user import load_user_class
from tests.test_targets import _AgentServer

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
CASE = {"goal": "Ask about refunds."}


async def call(server, tool: str, arguments: dict) -> tuple[bool, str]:
    async with Client(server) as client:
        result = await client.call_tool(tool, arguments)
    return result.is_error, result.content[0].text if result.content else ""


# --- code runs only from files under the workspace roots -----------------------------------------


@pytest.mark.parametrize("target, rule", [
    pytest.param("litellm:completion", "cannot find module 'litellm' under the workspace roots", id="installed-library"),
    pytest.param("subprocess:run", "cannot find module 'subprocess' under the workspace roots", id="stdlib-module"),
    pytest.param("os:system", "cannot find module 'os' under the workspace roots", id="stdlib-function"),
    pytest.param("engine.llm:resolve_llm", "convsim's own packages", id="convsim-itself"),
    pytest.param("convsim_mcp.cli:main", "convsim's own packages", id="convsim-cli"),
])
async def test_import_paths_outside_the_project_are_refused_before_anything_runs(store, fake_llm, monkeypatch,
                                                                                  target, rule):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-servers-own-key-0123456789")
    case = {"goal": "hi", "context": {"model": "openai/gpt-4o-mini", "api_base": fake_llm.url, "args": ["touch", "x"]}}
    failed, text = await call(build_server(store), "simulate_conversations",
                              {"target": target, "test_cases": [case], "model": "offline"})
    assert failed and rule in text, text
    assert fake_llm.calls == 0  # the server's key went nowhere
    assert await store.list_runs() == []


def test_a_stdlib_module_under_a_root_is_still_refused():
    import subprocess

    stdlib = Path(subprocess.__file__).parent
    ws = Workspace.default([stdlib])
    with pytest.raises(InvalidTarget, match="the Python standard library, which is never a code target"):
        resolve_target("subprocess:run", workspace=ws)


def test_a_function_a_project_module_imported_from_elsewhere_is_refused(tmp_path):
    (tmp_path / "shim.py").write_text("from subprocess import run\n\ndef agent(messages):\n    return 'ok'\n")
    ws = Workspace.default(base=tmp_path)
    assert resolve_target("shim.py:agent", workspace=ws)  # its own function is fine
    with pytest.raises(InvalidTarget, match=r"'run' is defined in .*subprocess\.py, not in a file under the workspace"):
        resolve_target("shim.py:run", workspace=ws)
    with pytest.raises(InvalidTarget, match="not in a file under the workspace"):
        resolve_target("shim:run", workspace=ws)


def test_files_outside_the_roots_and_symlinks_out_of_them_are_refused(tmp_path):
    outside = tmp_path / "outside"
    project = tmp_path / "project"
    outside.mkdir()
    project.mkdir()
    (outside / "agent.py").write_text("def agent(messages):\n    return 'hi'\n")
    (project / "link.py").symlink_to(outside / "agent.py")
    ws = Workspace.default(base=project)
    for spec in (f"{outside / 'agent.py'}:agent", "link.py:agent", "../outside/agent.py:agent"):
        with pytest.raises(InvalidTarget, match="outside the workspace roots"):
            resolve_target(spec, workspace=ws)
    assert resolve_target(f"{outside / 'agent.py'}:agent", workspace=Workspace.default([outside], base=project))


def test_convsim_roots_adds_directories(tmp_path, monkeypatch):
    (tmp_path / "agent.py").write_text("def agent(messages):\n    return 'hi'\n")
    with pytest.raises(InvalidTarget, match="outside the workspace roots"):
        resolve_target(f"{tmp_path / 'agent.py'}:agent")
    monkeypatch.setenv("CONVSIM_ROOTS", f"/nonexistent-root{os.pathsep}{tmp_path}")
    with pytest.raises(InvalidOption, match="workspace root '/nonexistent-root' .from CONVSIM_ROOTS. is not a directory"):
        Workspace.default()
    monkeypatch.setenv("CONVSIM_ROOTS", str(tmp_path))
    assert resolve_target(f"{tmp_path / 'agent.py'}:agent")


def test_user_agents_and_code_scorers_follow_the_same_rule():
    with pytest.raises(InvalidTarget, match="cannot find module 'subprocess' under the workspace roots"):
        load_user_class("subprocess:Popen")
    with pytest.raises(InvalidTarget, match="cannot find module 'os' under the workspace roots"):
        CodeScorer("os:system")
    import pydantic

    site_packages = Path(pydantic.__file__).parent.parent
    with pytest.raises(InvalidTarget, match=r"site-packages \(installed libraries\), which is never a code target"):
        CodeScorer("pydantic.main:BaseModel", workspace=Workspace.default([site_packages]))


USER_CLASS = ("from engine import LLMSimulatedUser\n\n\nclass Evil(LLMSimulatedUser):\n"
              "    extra_guidelines = ['injected']\n")


@pytest.fixture
def outside_user(tmp_path) -> tuple[Path, Path]:
    """A project directory (the only root) and, beside it, a user-agent file outside it."""
    outside, project = tmp_path / "outside", tmp_path / "project"
    outside.mkdir()
    project.mkdir()
    (outside / "evil_users.py").write_text(USER_CLASS)
    (project / "link_users.py").symlink_to(outside / "evil_users.py")
    (project / "agent.py").write_text("def respond(messages):\n    return 'hello'\n")
    return project, outside


@pytest.mark.parametrize("tool", ["simulate_conversations", "test_agent"])
@pytest.mark.parametrize("spec, rule", [
    pytest.param("{outside}/evil_users.py:Evil", "outside the workspace roots", id="file-outside-the-roots"),
    pytest.param("../outside/evil_users.py:Evil", "outside the workspace roots", id="relative-escape"),
    pytest.param("link_users.py:Evil", "outside the workspace roots", id="symlink-escape"),
    pytest.param("evil_users:Evil", "cannot find module 'evil_users' under the workspace roots",
                 id="module-on-sys-path-not-under-the-roots"),
])
async def test_user_agents_outside_the_roots_are_refused_by_every_tool(store, outside_user, monkeypatch, tool, spec,
                                                                       rule):
    project, outside = outside_user
    monkeypatch.syspath_prepend(str(outside))  # importable from sys.path: still not project code
    server = build_server(store, workspace=Workspace.default(base=project))
    arguments = {"target": f"{project / 'agent.py'}:respond", "test_cases": [CASE], "model": "offline",
                 "user_agent": spec.format(outside=outside)}
    if tool == "test_agent":
        arguments["num_test_cases"] = 0
    failed, text = await call(server, tool, arguments)
    assert failed and rule in text and "user_agent" in text, text
    assert "evil_users" not in __import__("sys").modules  # refused before its code ran
    assert await store.list_runs() == []


async def test_test_agent_plays_a_user_agent_from_under_the_roots(store):
    failed, text = await call(build_server(store), "test_agent", {
        "target": "tests.agents:echo", "test_cases": [{"goal": "reset my password"}], "num_test_cases": 0,
        "max_turns": 2, "model": "offline", "user_agent": "tests.test_simulator:ImpatientUser"})
    assert not failed, text
    [run] = await store.list_runs()
    [session] = await store.get_sessions(run["id"])
    assert session.messages[0].content == "I need help RIGHT NOW: reset my password"


@pytest.mark.parametrize("key", ["messages", "input", "session_id", "mlflow_session_id"])
async def test_context_never_supplies_reserved_parameters(store, key):
    case = {"goal": "hi", "context": {key: "injected"}}
    failed, text = await call(build_server(store), "simulate_conversations",
                              {"target": "tests.agents:echo", "test_cases": [case], "model": "offline"})
    assert failed and f"test case 1, field 'context': key '{key}' is reserved" in text, text


# --- network transports: the operator decides -----------------------------------------------------


def network(store, **policy):
    ws = Workspace.default().restricted("http", allow_code=policy.get("allow_code", False),
                                        agent_hosts=policy.get("agent_hosts", []))
    return build_server(store, workspace=ws)


@pytest.mark.parametrize("tool, arguments", [
    pytest.param("simulate_conversations", {"target": "tests.agents:echo", "test_cases": [CASE]}, id="code-target"),
    pytest.param("simulate_conversations", {"target": "http://127.0.0.1:9/v1", "test_cases": [CASE],
                                            "user_agent": "tests.agents:echo"}, id="user-agent"),
    pytest.param("test_agent", {"target": "http://127.0.0.1:9/v1", "test_cases": [CASE], "num_test_cases": 0,
                                "user_agent": "tests.test_simulator:ImpatientUser"}, id="test-agent-user-agent"),
    pytest.param("score_sessions", {"transcripts": [{"messages": [{"role": "user", "content": "hi"}]}],
                                    "scorers": ["tests.code_scorers:short_reply"]}, id="code-scorer"),
    pytest.param("simulate_conversations", {"target": "http://127.0.0.1:9/v1", "test_cases": "examples/support_cases.yaml"},
                 id="test-case-file"),
    pytest.param("score_sessions", {"file": "examples/support_cases.json"}, id="transcript-file"),
    pytest.param("generate_test_cases", {"file": "examples/support_cases.json"}, id="generation-file"),
])
async def test_code_and_files_are_refused_over_network_transports_without_allow_code(store, tool, arguments):
    failed, text = await call(network(store), tool, {"model": "offline", **arguments})
    assert failed and "over the http transport unless the server is started with --allow-code" in text, text


async def test_allow_code_lets_the_operator_accept_code_over_network_transports(store):
    failed, text = await call(network(store, allow_code=True), "simulate_conversations",
                              {"target": "tests.agents:echo", "test_cases": [CASE], "model": "offline"})
    assert not failed, text


async def test_http_agents_over_network_transports_are_loopback_only_unless_allowed(store):
    agent = _AgentServer(lambda path, body, headers: (200, {"content": "hello"}))
    try:
        url = agent.url.replace("127.0.0.1", "localhost")
        failed, text = await call(network(store), "simulate_conversations",
                                  {"target": "http://agents.internal:8080/v1", "test_cases": [CASE], "model": "offline"})
        assert failed and "host 'agents.internal' is refused" in text and "--allow-agent-host agents.internal" in text
        for ok_url in (agent.url, url):
            failed, text = await call(network(store), "simulate_conversations",
                                      {"target": {"kind": "json", "url": ok_url}, "test_cases": [CASE],
                                       "model": "offline", "max_turns": 1})
            assert not failed, text
        assert resolve_target("http://agents.internal:8080/v1",
                              workspace=Workspace.default().restricted("http", allow_code=False,
                                                                       agent_hosts=["agents.internal"]))
    finally:
        agent.close()


@pytest.mark.parametrize("variable", ["OPENAI_API_KEY", "REPLICATE_API_TOKEN", "DATABASE_PASSWORD", "MY_COPY_OF_KEY"])
async def test_agent_headers_expand_only_variables_the_operator_listed(store, monkeypatch, variable):
    monkeypatch.setenv(variable, "sk-the-servers-own-key-0123456789")
    agent = _AgentServer(lambda path, body, headers: (200, {"content": headers.get("Authorization", "")}))
    try:
        target = {"kind": "json", "url": agent.url, "headers": {"Authorization": f"Bearer ${{{variable}}}"}}
        failed, text = await call(build_server(store), "simulate_conversations",
                                  {"target": target, "test_cases": [CASE], "model": "offline"})
        assert failed and f"CONVSIM_AGENT_ENV={variable}" in text and agent.requests == []
        monkeypatch.setenv("CONVSIM_AGENT_ENV", variable)  # the operator's explicit choice
        failed, text = await call(build_server(store), "simulate_conversations",
                                  {"target": target, "test_cases": [CASE], "model": "offline", "max_turns": 1})
        assert not failed and agent.requests, text
        assert "sk-the-servers-own-key" not in text  # echoed back, and still masked
    finally:
        agent.close()


# --- files -----------------------------------------------------------------------------------------

SECRET_YAML = """\
# not a test-case file at all
aws_access_key_id: AKIAEXAMPLEEXAMPLE
aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY
password: hunter2-but-longer
"""


@pytest.mark.parametrize("name, text", [
    pytest.param("creds.yaml", SECRET_YAML, id="yaml-mapping"),
    pytest.param("creds.json", json.dumps([{"goal": "x", "password": "hunter2-but-longer"}]), id="json-list"),
    pytest.param("creds.jsonl", json.dumps({"aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG"}) + "\n", id="jsonl"),
])
def test_file_errors_name_path_and_line_never_keys_or_content(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InvalidTestCase) as info:
        load_test_cases(str(path), workspace=tmp_path)
    message = str(info.value)
    assert str(path) in message and "line" in message and "unknown field" in message
    for leaked in ("aws", "password", "hunter2", "AKIA", "wJalr", "secret"):
        assert leaked not in message.replace(str(path), ""), message


def test_file_errors_give_the_line_of_the_bad_case(tmp_path):
    path = tmp_path / "cases.yaml"
    path.write_text("- goal: one\n- goal: two\n  persona: p\n- persona: no goal here\n")
    with pytest.raises(InvalidTestCase, match=r"cases.yaml line 4, test case 3, field 'goal': is required"):
        load_test_cases(str(path), workspace=tmp_path)
    path = tmp_path / "cases.json"
    path.write_text('[\n  {"goal": "one"},\n\n  {"goal": ""}\n]')
    with pytest.raises(InvalidTestCase, match=r"cases.json line 4, test case 2, field 'goal'"):
        load_test_cases(str(path), workspace=tmp_path)


@pytest.mark.parametrize("tool, arguments", [
    pytest.param("simulate_conversations", {"target": "tests.agents:echo", "test_cases": "/etc/passwd"}, id="cases"),
    pytest.param("score_sessions", {"file": "/etc/hostname"}, id="score-file"),
    pytest.param("generate_test_cases", {"file": "/etc/hostname"}, id="generate-file"),
    pytest.param("simulate_conversations", {"target": "tests.agents:echo", "test_cases": "../../etc/passwd"},
                 id="relative-escape"),
])
async def test_file_arguments_outside_the_roots_are_refused(store, tool, arguments):
    failed, text = await call(build_server(store), tool, {"model": "offline", **arguments})
    assert failed and "is outside the workspace roots" in text and "--root DIR or CONVSIM_ROOTS" in text, text
    assert "root:" not in text  # nothing of the file's content


# --- bounds ------------------------------------------------------------------------------------------


def nested(depth: int):
    value: object = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize("tool, arguments, where", [
    pytest.param("simulate_conversations", {"target": "tests.agents:echo",
                                            "test_cases": [{"goal": "g", "context": nested(200)}]},
                 "test_cases", id="context"),
    pytest.param("simulate_conversations", {"target": {"kind": "json", "url": "http://127.0.0.1:9",
                                                       "request": nested(200)}, "test_cases": [CASE]},
                 "target", id="target-template"),
    pytest.param("score_sessions", {"transcripts": [{"messages": [{"role": "user", "content": "hi"}],
                                                     "metadata": nested(200)}]}, "transcripts", id="transcript"),
])
async def test_deeply_nested_arguments_are_refused_and_the_server_answers_the_next_call(store, tool, arguments, where):
    server = build_server(store)
    async with Client(server) as client:
        result = await client.call_tool(tool, {"model": "offline", **arguments})
        assert result.is_error and f"argument '{where}' is nested more than 32 levels deep" in result.content[0].text
        runs = await client.call_tool("list_runs", {})
    assert not runs.is_error and runs.structured_content["runs"] == []


def test_test_cases_bound_text_sizes_and_depth():
    with pytest.raises(InvalidTestCase, match="test case 1, field 'goal': .*at most 50000"):
        load_test_cases([{"goal": "x" * 50_001}])
    with pytest.raises(InvalidTestCase, match="test case 1: is nested more than 32 levels deep"):
        load_test_cases([{"goal": "g", "context": nested(40)}])
    with pytest.raises(InvalidTestCase, match="field 'simulation_guidelines': has 201 entries"):
        load_test_cases([{"goal": "g", "simulation_guidelines": ["be brief"] * 201}])
    assert load_test_cases([{"goal": "g", "context": nested(31)}])  # within the bound: accepted


async def test_a_run_at_the_bounds_stays_readable_everywhere(store):
    case = {"goal": "Ask about refunds.", "context": nested(30), "expectations": {"k": "v" * 90_000}}
    server = build_server(store)
    async with Client(server) as client:
        run = (await client.call_tool("simulate_conversations", {"target": "tests.agents:echo", "test_cases": [case],
                                                                 "model": "offline", "max_turns": 2})).structured_content
        got = await client.call_tool("get_run", {"run_id": run["run_id"]})
        assert not got.is_error, got.content
        whole = await client.read_resource(run["resource"])
        assert json.loads(whole.contents[0].text)["sessions"][0]["test_case"]["context"]
    assert (await store.export_jsonl(run["run_id"]))


@pytest.mark.parametrize("model", ["openai/http://evil.example/v1", "openai://evil.example/v1",
                                   "openai/gpt 4o", "hosted_vllm/https://attacker.example"])
async def test_a_model_argument_cannot_choose_an_endpoint(store, fake_llm, model):
    failed, text = await call(build_server(store), "simulate_conversations",
                              {"target": "tests.agents:echo", "test_cases": [CASE], "model": model})
    assert failed and "is not a 'provider/model' name" in text and "CONVSIM_API_BASE" in text, text


@pytest.mark.parametrize("layout, file, why", [
    pytest.param({"vendor/lib-1.0.dist-info/METADATA": "", "vendor/lib/__init__.py": "",
                  "vendor/lib/main.py": "def run(messages):\n    return 'x'\n"},
                 "vendor/lib/main.py", "a directory packages were installed into", id="pip-install-target"),
    pytest.param({"env2/pyvenv.cfg": "home = /usr/bin\n", "env2/lib/tool.py": "def run(messages):\n    return 'x'\n"},
                 "env2/lib/tool.py", "a Python environment", id="second-virtualenv"),
    pytest.param({"conda/conda-meta/history": "", "conda/bin/tool.py": "def run(messages):\n    return 'x'\n"},
                 "conda/bin/tool.py", "a Python environment", id="conda-env"),
    pytest.param({"py/lib/python3.12/os.py": "", "py/lib/python3.12/runpy.py": "def run(messages):\n    return 1\n"},
                 "py/lib/python3.12/runpy.py", "a Python standard library", id="other-stdlib"),
])
def test_python_installations_under_a_root_are_never_code_targets(tmp_path, layout, file, why):
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(InvalidTarget, match=why):
        resolve_target(f"{file}:run", workspace=Workspace.default(base=tmp_path))


def test_functions_of_frozen_stdlib_modules_are_not_taken_for_project_code(tmp_path):
    (tmp_path / "frozen_mod.py").write_text("from os import makedirs\nfrom runpy import run_path\n")
    ws = Workspace.default(base=tmp_path)
    for name in ("makedirs", "run_path"):
        with pytest.raises(InvalidTarget, match="defined in no Python source file|not in a file under the workspace"):
            ws.load_callable(f"frozen_mod:{name}")


def test_a_module_path_never_imports_a_same_named_module_from_elsewhere(tmp_path, capsys):
    (tmp_path / "this").mkdir()  # a namespace package named like the stdlib's `this`
    (tmp_path / "this" / "agent.py").write_text("def respond(messages):\n    return 'ok'\n")
    import sys

    sys.modules.pop("this", None)
    try:
        fn = Workspace.default(base=tmp_path).load_callable("this.agent:respond")
        assert fn([]) == "ok"
        assert "Zen of Python" not in capsys.readouterr().out  # the stdlib module never ran
    finally:
        sys.modules.pop("this.agent", None)
        sys.modules.pop("this", None)


def test_a_refused_path_does_not_say_whether_a_file_exists_outside_the_roots(tmp_path):
    ws = Workspace.default(base=tmp_path)
    messages = []
    for spec in ("/etc/hostname:x", "/etc/no-such-file-here:x"):
        with pytest.raises(InvalidTarget) as info:
            ws.load_callable(spec)
        messages.append(str(info.value).replace(spec.split(":")[0], "PATH"))
    assert messages[0] == messages[1] and "outside the workspace roots" in messages[0]


@pytest.mark.parametrize("model", ["deepinfra/meta-llama/Llama-3.3-70B-Instruct", "replicate/meta/llama", "nvidia_nim/x"])
async def test_a_model_argument_names_only_providers_the_operator_configured(store, fake_llm, monkeypatch, model):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-servers-own-key-0123456789")  # litellm would fall back to it
    failed, text = await call(build_server(store), "score_sessions",
                              {"transcripts": [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "hello"}]}],
                               "model": model})
    provider = model.partition("/")[0]
    assert failed and f"provider '{provider}' is not one the operator configured" in text, text
    assert f"CONVSIM_PROVIDERS={provider}" in text
    assert await store.list_runs() == []


def test_configured_providers_follow_the_operators_environment(monkeypatch):
    from engine.llm.providers import configured_providers

    for var in ("OPENAI_API_KEY", "CONVSIM_MODEL", "CONVSIM_API_BASE", "CONVSIM_PROVIDERS"):
        monkeypatch.delenv(var, raising=False)
    assert configured_providers() == set()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x-0123456789")
    monkeypatch.setenv("CONVSIM_PROVIDERS", "groq")
    assert configured_providers() >= {"openai", "groq"} and "deepinfra" not in configured_providers()
    monkeypatch.setenv("CONVSIM_API_BASE", "http://127.0.0.1:11434/v1")  # a local server: the OpenAI route to it
    monkeypatch.setenv("CONVSIM_MODEL", "hosted_vllm/llama")
    assert configured_providers() == {"openai", "groq", "hosted_vllm"}


async def test_errors_are_bounded_whatever_the_argument_size(store):
    failed, text = await call(build_server(store), "get_run", {"run_id": "run-" + "x" * 1_000_000})
    assert failed and "no run with id" in text and len(text) < 2200
