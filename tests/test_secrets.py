"""Secrets planted on every path never reach the database, exports, reports, stdout, stderr or logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import secrets
from tests.fake_llm import FakeReply
from tests.test_targets import _AgentServer

ROOT = Path(__file__).resolve().parent.parent

PROVIDER_KEY = "sk-planted-provider-key-4f1c9a"
AGENT_TOKEN = "agt-planted-agent-token-77e2b0"
AUTH_TOKEN = "planted-auth-token-0d5e8c31aa"
SECRETS = (PROVIDER_KEY, AGENT_TOKEN, AUTH_TOKEN)


def test_redact_masks_registered_and_environment_secrets(monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_API_KEY", "env-secret-value-123")
    monkeypatch.setenv("PLAIN_SETTING", "plain-value-123456")
    secrets.refresh_from_env()
    secrets.register("registered-secret-xyz")
    secrets.register("short")  # under MIN_SECRET_CHARS: words like 'none' are never masked
    text = "a env-secret-value-123 b registered-secret-xyz c plain-value-123456 d short"
    assert secrets.redact(text) == "a *** b *** c plain-value-123456 d short"
    assert secrets.redact(json.dumps({"k": 'quote"inside-secret'})) == json.dumps({"k": 'quote"inside-secret'})
    secrets.register('quote"inside-secret')
    assert 'inside-secret' not in secrets.redact(json.dumps({"k": 'quote"inside-secret'}))  # JSON-escaped form too


def test_a_secret_registered_after_texts_were_redacted_with_none_known_is_masked():
    """The pattern is built once per change, also when there was nothing to mask (fresh process: no secrets)."""
    code = ("from engine import secrets; assert secrets.redact('a late-secret-0042 b') == 'a late-secret-0042 b'; "
            "secrets.register('late-secret-0042'); print(secrets.redact('a late-secret-0042 b'))")
    env = {k: v for k, v in os.environ.items() if not secrets.SECRET_ENV_NAME.search(k)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "a *** b", out.stderr


@pytest.mark.slow
def test_no_planted_secret_survives_a_test_agent_run(tmp_path, fake_llm):
    # A provider error body that echoes the key (the first call fails, then the model answers).
    fake_llm.queue(FakeReply(status=500, content=f"upstream rejected key {PROVIDER_KEY} for this project"))

    def agent_reply(path, body, headers):
        if body.get("message", "").count("?") > 1 or len(agent.requests) > 2:
            return 401, f"unauthorized: you sent {headers.get('Authorization')}", "text/plain"
        return 200, {"content": f"Sure. (debug: you sent {headers.get('Authorization')}; cfg {AUTH_TOKEN})"}

    agent = _AgentServer(agent_reply)
    try:
        cases = tmp_path / "cases.json"
        cases.write_text(json.dumps([{"goal": "Ask about refunds. Then ask about shipping. Then ask about returns."},
                                     {"goal": "Ask where order A1 is."}]))
        target = json.dumps({"kind": "json", "url": agent.url, "headers": {"Authorization": "Bearer ${AGENT_TOKEN}"}})
        env = {k: v for k, v in os.environ.items()
               if not k.endswith("_API_KEY") and not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
        env.update(PYTHONPATH=str(ROOT), CONVSIM_HOME=str(tmp_path / "home"), CONVSIM_ROOTS=str(tmp_path),
                   CONVSIM_API_BASE=fake_llm.url, CONVSIM_API_KEY=PROVIDER_KEY, CONVSIM_LLM_RETRIES="1",
                   AGENT_TOKEN=AGENT_TOKEN, CONVSIM_AGENT_ENV="AGENT_TOKEN", CONVSIM_AUTH_TOKEN=AUTH_TOKEN)
        db = tmp_path / "run.sqlite"
        outputs: list[str] = []

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            proc = subprocess.run([sys.executable, "-m", "convsim_mcp", "-v", *args, "--db", str(db)], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
            outputs.extend([proc.stdout, proc.stderr])
            return proc

        run = cli("test-agent", target, "--cases", str(cases), "--num-test-cases", "0", "--model", "openai/fake-model",
                  "--max-turns", "3", "--report", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json"))
        assert run.returncode in (0, 1, 3), run.stderr
        run_id = json.loads((tmp_path / "r.json").read_text())["run_id"]
        assert cli("runs", "export", run_id, "-o", str(tmp_path / "export.jsonl")).returncode == 0
        assert cli("runs", "show", run_id, "--json").returncode == 0
        assert cli("runs", "list").returncode == 0
    finally:
        agent.close()

    # The secrets really were in play: the agent got its token, and the provider echoed the key.
    assert any(h.get("Authorization") == f"Bearer {AGENT_TOKEN}" for _, _, h in agent.requests)
    assert fake_llm.calls >= 2
    stored = [p.read_bytes() for p in tmp_path.glob("run.sqlite*")]  # the database, its WAL and shm if present
    files = [(tmp_path / n).read_bytes() for n in ("r.md", "r.json", "export.jsonl")]
    everything = b"".join(stored + files) + "".join(outputs).encode()
    assert b"***" in everything  # masked, not dropped
    for secret in SECRETS:
        assert secret.encode() not in everything, f"{secret} leaked"
