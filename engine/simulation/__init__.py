"""Simulation: the agent under test (targets), the simulated user (model and offline), the conversation loop."""

from __future__ import annotations

from .conversation import ConversationRunner, SessionRecorder, TurnEvent
from .targets import Target, redacted_spec, resolve_target
from .turns import SimulatorContext, UserTurn
from .user import LLMSimulatedUser, SimulatedUser, load_user_class

__all__ = [
    "ConversationRunner",
    "LLMSimulatedUser",
    "SessionRecorder",
    "SimulatedUser",
    "SimulatorContext",
    "Target",
    "TurnEvent",
    "UserTurn",
    "load_user_class",
    "redacted_spec",
    "resolve_target",
]
