"""convsim engine: simulate users against a conversational agent, store and export the conversations.

The supported public API is listed in `__all__`; everything else is an
implementation detail. No MCP imports live in this package.
"""

from .errors import AgentError, ConvsimError, CouldNotTest, InvalidOption, InvalidTarget, InvalidTestCase, LLMAuthError, LLMError, LLMOutputError, NotFound, RunError, UserInputError
from .jobs import JobRegistry
from .llm import LLM, LiteLLMBackend, LLMResult, OfflineBackend, resolve_llm, resolve_model
from .models import AgentProfile, Assessment, Evidence, Issue, Message, Report, Role, RunStatus, RunSummary, ScorerSummary, ScoreSummary, Session, SessionSummary, StopReason, TargetSpec, TestCase, TestSet, ToolCall, Usage
from .pipeline import Progress, ScoringJob, SimulationJob, prepare_scoring, prepare_simulation, run_summary, score_sessions, simulate
from .pipeline.agent_test import prepare_agent_test, test_agent
from .pipeline.rerun import rerun_issues
from .pipeline.compare import compare_runs
from .reports import Comparison
from .pipeline.generation import build_test_set, export_test_set
from .judging import BuiltinJudge, CodeScorer, CustomJudge, Scorer, parse_scorers
from .simulation import LLMSimulatedUser, SimulatedUser, SimulatorContext, UserTurn
from .store import Store
from .simulation import Target, resolve_target
from .cases import load_test_cases
from .workspace import Workspace

__all__ = [
    "AgentError",
    "AgentProfile",
    "Assessment",
    "BuiltinJudge",
    "CodeScorer",
    "Comparison",
    "ConvsimError",
    "CouldNotTest",
    "CustomJudge",
    "Evidence",
    "InvalidOption",
    "InvalidTarget",
    "InvalidTestCase",
    "Issue",
    "JobRegistry",
    "LLM",
    "LLMAuthError",
    "LLMError",
    "LLMOutputError",
    "LLMResult",
    "LLMSimulatedUser",
    "LiteLLMBackend",
    "Message",
    "NotFound",
    "OfflineBackend",
    "Progress",
    "Report",
    "Role",
    "RunError",
    "RunStatus",
    "RunSummary",
    "ScoreSummary",
    "Scorer",
    "ScorerSummary",
    "ScoringJob",
    "Session",
    "SessionSummary",
    "SimulatedUser",
    "SimulationJob",
    "SimulatorContext",
    "StopReason",
    "Store",
    "Target",
    "TargetSpec",
    "TestCase",
    "TestSet",
    "ToolCall",
    "Usage",
    "UserInputError",
    "UserTurn",
    "Workspace",
    "build_test_set",
    "compare_runs",
    "export_test_set",
    "load_test_cases",
    "parse_scorers",
    "prepare_agent_test",
    "prepare_scoring",
    "prepare_simulation",
    "resolve_llm",
    "resolve_model",
    "resolve_target",
    "rerun_issues",
    "run_summary",
    "score_sessions",
    "simulate",
    "test_agent",
]
