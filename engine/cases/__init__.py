"""Test cases: loading and validating them; generating them (describe, generate, distill, introspect)."""

from __future__ import annotations

from .generation import dedupe_cases, describe_agent, distill_cases, generate_cases
from .loading import load_test_cases

__all__ = [
    "dedupe_cases",
    "describe_agent",
    "distill_cases",
    "generate_cases",
    "load_test_cases",
]
