"""Shared fixtures: a temporary store, the fake OpenAI-compatible server, anyio on asyncio."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import Store
from tests.fake_llm import FakeLLMServer

ROOT = Path(__file__).resolve().parent.parent

# No test may reach a real provider: drop keys and model settings inherited from the developer's shell.
for _var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "MISTRAL_API_KEY", "GROQ_API_KEY",
             "CONVSIM_MODEL", "CONVSIM_API_BASE", "CONVSIM_API_KEY"):
    os.environ.pop(_var, None)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def convsim_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "convsim-home"
    monkeypatch.setenv("CONVSIM_HOME", str(home))
    return home


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "test.sqlite")
    yield s
    s.close()


@pytest.fixture
def fake_llm():
    with FakeLLMServer() as server:
        yield server


def agent(name: str) -> str:
    """Import path of a test agent in tests/agents.py."""
    return f"tests.agents:{name}"


@pytest.fixture(params=["direct", "litellm"])
def transport(request) -> Iterator[str]:
    """Runs a test through each chat transport (tests/transports.py): the shared model path must behave the same."""
    from tests import transports

    transports._transport[0] = request.param
    yield request.param
    transports._transport[0] = "direct"  # a test without the fixture gets the default, whatever ran before it
