"""convsim engine: simulate users against a conversational agent, store and export the conversations.

The supported public API is listed in `__all__`; everything else is an
implementation detail. No MCP imports live in this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:
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

# Each name is imported from its module when first read (engine/_lazy.py).
__getattr__, __dir__ = lazy_exports(__name__, {
    "AgentError": ".errors",
    "ConvsimError": ".errors",
    "CouldNotTest": ".errors",
    "InvalidOption": ".errors",
    "InvalidTarget": ".errors",
    "InvalidTestCase": ".errors",
    "LLMAuthError": ".errors",
    "LLMError": ".errors",
    "LLMOutputError": ".errors",
    "NotFound": ".errors",
    "RunError": ".errors",
    "UserInputError": ".errors",
    "JobRegistry": ".jobs",
    "LLM": ".llm",
    "LiteLLMBackend": ".llm",
    "LLMResult": ".llm",
    "OfflineBackend": ".llm",
    "resolve_llm": ".llm",
    "resolve_model": ".llm",
    "AgentProfile": ".models",
    "Assessment": ".models",
    "Evidence": ".models",
    "Issue": ".models",
    "Message": ".models",
    "Report": ".models",
    "Role": ".models",
    "RunStatus": ".models",
    "RunSummary": ".models",
    "ScorerSummary": ".models",
    "ScoreSummary": ".models",
    "Session": ".models",
    "SessionSummary": ".models",
    "StopReason": ".models",
    "TargetSpec": ".models",
    "TestCase": ".models",
    "TestSet": ".models",
    "ToolCall": ".models",
    "Usage": ".models",
    "Progress": ".pipeline",
    "ScoringJob": ".pipeline",
    "SimulationJob": ".pipeline",
    "prepare_scoring": ".pipeline",
    "prepare_simulation": ".pipeline",
    "run_summary": ".pipeline",
    "score_sessions": ".pipeline",
    "simulate": ".pipeline",
    "prepare_agent_test": ".pipeline.agent_test",
    "test_agent": ".pipeline.agent_test",
    "rerun_issues": ".pipeline.rerun",
    "compare_runs": ".pipeline.compare",
    "Comparison": ".reports",
    "build_test_set": ".pipeline.generation",
    "export_test_set": ".pipeline.generation",
    "BuiltinJudge": ".judging",
    "CodeScorer": ".judging",
    "CustomJudge": ".judging",
    "Scorer": ".judging",
    "parse_scorers": ".judging",
    "LLMSimulatedUser": ".simulation",
    "SimulatedUser": ".simulation",
    "SimulatorContext": ".simulation",
    "UserTurn": ".simulation",
    "Store": ".store",
    "Target": ".simulation",
    "resolve_target": ".simulation",
    "load_test_cases": ".cases",
    "Workspace": ".workspace",
})

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
