"""The two chat transports, for tests that run the shared model path through each (test_llm, test_llm_fallback)."""

from __future__ import annotations

from engine.llm.base import LLMSettings
from engine.llm.litellm_backend import LiteLLMBackend
from engine.llm.openai_http import OpenAIHTTPBackend

TRANSPORTS = {"direct": OpenAIHTTPBackend, "litellm": LiteLLMBackend}
_transport = ["direct"]  # set per test by the `transport` fixture (tests/conftest.py)


def make(settings: LLMSettings):
    return TRANSPORTS[_transport[0]](settings)


def backend(fake, model="openai/fake-user", **settings):
    settings = {"max_retries": 2, "backoff_s": 0.01, "timeout_s": 5, **settings}
    return make(LLMSettings(model=model, api_base=fake.url, api_key="k", **settings))
