"""The drafts generation parses model output into (and the offline path writes): profile, cases, distilled cases.

Shared by `cases.generation` (model path) and `cases.offline` (offline path), so neither imports the other's internals.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

# --- structured outputs (strict json_schema: the model must give every field, see llm.strict_schema) --


class ProfileDraft(BaseModel):
    """The model's half of an `AgentProfile`; system prompt and sources are filled in by us."""

    name: str = Field("", description="The agent's or product's name, or empty.")
    description: str = Field("", description="Whom the agent serves and what it does, in two or three sentences.")
    capabilities: list[str] = Field(default_factory=list, description="Things users can get help with.")
    tools: list[str] = Field(default_factory=list, description="Tools as 'name: what it does'.")
    limits: list[str] = Field(default_factory=list, description="Out of scope, forbidden or conditional.")


class CaseDraft(BaseModel):
    """One generated scenario, before it becomes a `TestCase` (an empty goal drops it)."""

    id: str = Field("", description="Short kebab-case slug.")
    kind: str = Field("normal", description="normal, edge or adversarial.")
    goal: str = ""
    persona: str = ""
    simulation_guidelines: list[str] = Field(default_factory=list)
    expected_outcome: str = ""


class CaseDrafts(BaseModel):
    cases: list[CaseDraft] = Field(default_factory=list)


class DistilledCase(BaseModel):
    """A test case that replays one transcript."""

    goal: str = ""
    persona: str = ""
    simulation_guidelines: list[str] = Field(default_factory=list)
    expected_outcome: str = ""


class OfflineCaseDraft(CaseDraft):
    """A case the offline path writes: also the details the simulated user can give, and labels judges never see.

    Not part of the model's schema (the model path writes `CaseDraft`); an instance passes through
    `CaseDrafts` validation unchanged, as a subclass instance.
    """

    context: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)


def goal_words(goal: str) -> set[str]:
    """A goal as a set of lowercased words, a plural "s" dropped (how `dedupe_cases` compares goals)."""
    return {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
            for w in re.findall(r"[a-z0-9]+", goal.lower())}
