"""Which providers and models the operator configured; model-name checks; where each provider's key lives."""

from __future__ import annotations

import os
import re

from ..errors import InvalidOption
from ..settings import env_list, env_str
from .base import OFFLINE, LLMSettings

# Sensible defaults when a provider key is present and no model was named.
DEFAULT_MODELS_BY_KEY = (
    ("OPENAI_API_KEY", "openai/gpt-4o-mini"),
    ("ANTHROPIC_API_KEY", "anthropic/claude-3-5-haiku-latest"),
    ("GEMINI_API_KEY", "gemini/gemini-2.0-flash"),
    ("MISTRAL_API_KEY", "mistral/mistral-small-latest"),
    ("GROQ_API_KEY", "groq/llama-3.1-8b-instant"),
)


# provider/model as litellm spells it; no URL, no whitespace (a tool argument must not choose an endpoint)
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.:@/+-]{1,200}")


NOT_A_MODEL_NAME = ("model {model!r} is not a 'provider/model' name: a model argument names a model only. Where "
                    "calls go and with which key is operator configuration (CONVSIM_API_BASE, CONVSIM_API_KEY, "
                    "provider keys)")


UNCONFIGURED_PROVIDER = (
    "model '{model}': provider '{provider}' is not one the operator configured, and model calls go only to "
    "those (a model argument cannot choose where the server's keys are sent). Configure it with {variable}, "
    "CONVSIM_MODEL, or CONVSIM_PROVIDERS={provider}")


# The environment variable litellm reads each provider's key from (others: PROVIDER_API_KEY).
PROVIDER_KEY_VARIABLES = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "groq": "GROQ_API_KEY",
    "cohere": "COHERE_API_KEY",
    "cohere_chat": "COHERE_API_KEY",
    "together_ai": "TOGETHERAI_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "xai": "XAI_API_KEY",
    "fireworks_ai": "FIREWORKS_AI_API_KEY",
    "perplexity": "PERPLEXITYAI_API_KEY",
    "azure": "AZURE_API_KEY",
    "huggingface": "HUGGINGFACE_API_KEY",
    "cerebras": "CEREBRAS_API_KEY",
    "deepinfra": "DEEPINFRA_API_KEY",
    "nvidia_nim": "NVIDIA_NIM_API_KEY",
    "codestral": "CODESTRAL_API_KEY",
    "vertex_ai": "GOOGLE_APPLICATION_CREDENTIALS",
    "bedrock": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
}


def configured_providers() -> set[str]:
    """The providers the operator set up, which are the only ones a model argument may name.

    litellm finds a key for nearly every provider, falling back to OPENAI_API_KEY for dozens of
    OpenAI-compatible hosts, so a caller naming `deepinfra/...` would otherwise send the operator's
    OpenAI key there. Configured: CONVSIM_MODEL's provider and CONVSIM_PROVIDERS; with
    CONVSIM_API_BASE, 'openai' (the OpenAI-compatible route to it); without it, each provider whose
    own key variable is set.
    """
    providers = {p.lower() for p in env_list("CONVSIM_PROVIDERS")}
    default = env_str("CONVSIM_MODEL")
    if default and default != OFFLINE:
        providers.add(normalise_model(default).partition("/")[0].lower())
    if env_str("CONVSIM_API_BASE"):
        providers.add("openai")
        return providers
    for provider, variable in PROVIDER_KEY_VARIABLES.items():
        if all(os.environ.get(v.strip()) for v in variable.split("/")):
            providers.add(provider)
    providers.update(name[: -len("_API_KEY")].lower() for name in os.environ
                     if name.endswith("_API_KEY") and os.environ[name].strip() and name != "CONVSIM_API_KEY")
    return providers


def key_variable(settings: LLMSettings) -> str:
    """The environment variable that holds the key `settings` sends: CONVSIM_API_KEY with an api_base or an
    explicit key, else the provider's own (OPENAI_API_KEY for openai/*, ...)."""
    if settings.api_base or settings.api_key:
        return "CONVSIM_API_KEY"
    provider = settings.model.partition("/")[0].strip().lower()
    return PROVIDER_KEY_VARIABLES.get(provider) or f"{re.sub(r'[^A-Z0-9]+', '_', provider.upper())}_API_KEY"


def normalise_model(model: str) -> str:
    """Accept MLflow's `provider:/model` as well as litellm's `provider/model`."""
    model = model.strip()
    if "://" in model or any(c.isspace() for c in model):
        raise InvalidOption(NOT_A_MODEL_NAME.format(model=model[:80]))
    if ":/" in model:
        provider, _, name = model.partition(":/")
        return f"{provider}/{name}"
    return model


def resolve_model(model: str | None = None) -> str:
    """Explicit argument, then CONVSIM_MODEL, then a default for a present provider key, then offline."""
    if model and model.strip():
        return normalise_model(model)
    env_model = env_str("CONVSIM_MODEL")
    if env_model:
        name = normalise_model(env_model)
        if name != OFFLINE and "/" not in name:
            raise InvalidOption(f"environment variable CONVSIM_MODEL={env_model!r}: expected 'provider/model' "
                                f"(e.g. 'openai/{name}') or 'offline'")
        return name
    for key, default in DEFAULT_MODELS_BY_KEY:
        if os.environ.get(key):
            return default
    return OFFLINE
