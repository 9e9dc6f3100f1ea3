"""What a simulated user sees (`SimulatorContext`) and what it returns (`UserTurn`)."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, Field

from ..models import Message, TestCase

DEFAULT_PERSONA = (
    "An ordinary, polite user of this service. Writes short, natural messages, answers the assistant's "
    "questions when asked, and stops once they have what they came for."
)


class UserTurn(BaseModel):
    """The simulated user's move: its next message, or the decision to stop."""

    message: str = Field("", description="The next message to the assistant; may be empty when stopping.")
    goal_achieved: bool = Field(False, description="The assistant has fully accomplished the goal.")
    end_conversation: bool = Field(False, description="The user gives up without the goal achieved.")
    reason: str = Field("", description="One short sentence explaining the decision.")


@dataclass
class SimulatorContext:
    """What a simulated user knows when choosing its next move."""

    test_case: TestCase
    session_id: str
    messages: list[Message]  # the transcript so far, agent replies included
    turn: int  # 1-based number of the user message being written
    max_turns: int

    @property
    def goal(self) -> str:
        return self.test_case.goal

    @property
    def persona(self) -> str:
        return self.test_case.persona or DEFAULT_PERSONA

    @property
    def guidelines(self) -> list[str]:
        return self.test_case.simulation_guidelines

    @property
    def is_first_turn(self) -> bool:
        return self.turn == 1

    @property
    def last_assistant_response(self) -> str | None:
        for m in reversed(self.messages):
            if m.role == "assistant" and m.content:
                return m.content
        return None
