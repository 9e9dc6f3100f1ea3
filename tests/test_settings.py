"""Operator settings: a bad environment variable names itself, its value and what is expected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import InvalidOption, resolve_llm

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name, value, expected", [
    pytest.param("CONVSIM_LLM_CONCURRENCY", "abc", "CONVSIM_LLM_CONCURRENCY='abc': expected an integer from 1 to 100000",
                 id="concurrency-not-a-number"),
    pytest.param("CONVSIM_LLM_CONCURRENCY", "0", "expected an integer from 1", id="concurrency-zero"),
    pytest.param("CONVSIM_LLM_RETRIES", "-1", "CONVSIM_LLM_RETRIES='-1': expected an integer from 0 to 20", id="retries"),
    pytest.param("CONVSIM_LLM_TIMEOUT", "soon", "CONVSIM_LLM_TIMEOUT='soon': expected a number of seconds", id="timeout"),
    pytest.param("CONVSIM_LLM_TIMEOUT", "inf", "expected a number of seconds", id="timeout-infinite"),
    pytest.param("CONVSIM_API_BASE", "localhost:11434", "CONVSIM_API_BASE='localhost:11434': expected an http:// or "
                 "https:// URL", id="api-base"),
    pytest.param("CONVSIM_MODEL", "gpt-4o", "CONVSIM_MODEL='gpt-4o': expected 'provider/model'", id="model"),
])
def test_bad_environment_values_are_named_with_what_is_expected(monkeypatch, name, value, expected):
    monkeypatch.setenv("CONVSIM_PROVIDERS", "openai")
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidOption) as info:
        resolve_llm("openai/x" if name != "CONVSIM_MODEL" else None)
    assert expected in str(info.value)


@pytest.mark.slow
def test_the_cli_reports_a_bad_environment_variable_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(ROOT), CONVSIM_HOME=str(tmp_path), CONVSIM_LLM_CONCURRENCY="abc",
               CONVSIM_PROVIDERS="openai")
    proc = subprocess.run([sys.executable, "-m", "convsim_mcp", "simulate", "tests.agents:echo",
                           "examples/support_cases.yaml", "--model", "openai/x", "--db", str(tmp_path / "db.sqlite")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("InvalidOption: environment variable CONVSIM_LLM_CONCURRENCY='abc': expected an "
                                   "integer from 1 to 100000")


def test_a_missing_root_directory_is_named(monkeypatch):
    from engine import Workspace

    monkeypatch.setenv("CONVSIM_ROOTS", "/no/such/dir")
    with pytest.raises(InvalidOption, match="workspace root '/no/such/dir' .from CONVSIM_ROOTS. is not a directory"):
        Workspace.default()
