"""The one interface of every scorer: `Scorer.score(session, llm) -> [Assessment]`."""

from __future__ import annotations

from typing import Any

from ..llm import LLM
from ..models import Assessment, Evidence, Session

QUOTE_LIMIT = 200


class Scorer:
    """Scores one session. Implementations return assessments; they raise only for bugs."""

    name: str
    kind: str

    async def score(self, session: Session, llm: LLM) -> list[Assessment]:
        raise NotImplementedError(f"{type(self).__name__} does not implement score")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind}


def clean_evidence(evidence: list[Evidence], turns: int) -> list[Evidence]:
    """Keep evidence whose turn exists; clip quotes."""
    return [e.model_copy(update={"quote": e.quote[:QUOTE_LIMIT]}) for e in evidence if 1 <= e.turn <= max(turns, 1)]
