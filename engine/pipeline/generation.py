"""The generation job: test cases from a description, the agent itself, its source, or transcripts.

Generated cases are stored as a named test set whose id `simulate_conversations`
accepts in place of a list of cases.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import InvalidOption, LLMError
from ..cases import dedupe_cases, describe_agent, distill_cases, generate_cases
from ..llm import LLM, resolve_llm
from ..models import AgentProfile, Role, TargetSpec, TestCase, TestSet, Usage, add_usage
from ..secrets import redact
from ..store import Store, new_test_set_id
from ..simulation import Target, resolve_target
from ..workspace import WorkspaceArg, as_workspace
from ._shared import cache_enabled, check_range, with_cache
from .scoring import collect_sessions

MAX_TEST_CASES = 50


async def build_test_set(
    store: Store,
    *,
    description: str | None = None,
    target: str | dict[str, Any] | TargetSpec | Target | None = None,
    run_id: str | None = None,
    session_ids: list[str] | None = None,
    file: str | Path | None = None,
    num_test_cases: int = 7,
    guidance: str | None = None,
    adversarial: float = 0.0,
    ask_agent: bool = True,
    introspect: bool = True,
    model: str | None = None,
    name: str | None = None,
    workspace: WorkspaceArg = None,
    llm: LLM | None = None,
    cache: bool | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
) -> TestSet:
    """Generate (from a description and/or the target) and distill (from transcripts), then store.

    `num_test_cases` bounds the generated cases; each distinct transcript adds one distilled case
    (a transcript whose case nearly repeats an earlier one is dropped). `cache`, `temperature`, `seed`,
    `rpm` and `tpm`: as for `prepare_simulation`, for the generator's model calls.
    """
    check_range("num_test_cases", num_test_cases, 1, MAX_TEST_CASES)
    if not 0.0 <= adversarial <= 1.0:
        raise InvalidOption(f"adversarial must be a share from 0 to 1, got {adversarial!r}")
    if not (description or target or run_id or session_ids or file):
        raise InvalidOption("give at least one source: description, target, run_id, session_ids or file")
    llm = with_cache(llm or resolve_llm(model, temperature=temperature, seed=seed, rpm=rpm, tpm=tpm), store,
                     cache_enabled(cache))
    workspace = as_workspace(workspace)
    resolved = target if isinstance(target, Target) or target is None else resolve_target(target, workspace=workspace)
    usage: dict[str, Usage] = {}
    cases: list[TestCase] = []
    profile: AgentProfile | None = None
    sources: list[str] = []
    try:
        if description or resolved:
            profile, spent = await describe_agent(llm, description=description, target=resolved,
                                                  ask_agent=ask_agent, introspect=introspect, workspace=workspace)
            usage = add_usage(usage, Role.GENERATOR.value, spent)
            generated, spent = await generate_cases(profile, llm, num_test_cases=num_test_cases, guidance=guidance,
                                                    adversarial=adversarial)
            usage = add_usage(usage, Role.GENERATOR.value, spent)
            cases += generated
            sources += profile.sources
        sessions = await collect_sessions(store, run_id=run_id, session_ids=session_ids, file=file, workspace=workspace)
        if sessions:
            distilled, spent = await distill_cases(sessions, llm)  # deduped among themselves
            usage = add_usage(usage, Role.GENERATOR.value, spent)
            cases += dedupe_cases(distilled, against=cases)
            sources.append(f"transcripts:{len(sessions)} sessions")
    except LLMError as e:  # the error carries everything generation spent, the failed call included
        e.usage = usage.get(Role.GENERATOR.value, Usage()).add(e.usage)
        raise
    finally:
        if resolved is not None and not isinstance(target, Target):
            await resolved.aclose()
    cases = _unique_ids(cases)
    test_set = TestSet(id=new_test_set_id(), name=name or _default_name(profile, sources), created_at=time.time(),
                       cases=cases, profile=profile, sources=sources, offline=llm.offline, usage=usage)
    await store.save_test_set(test_set)
    return test_set


def export_test_set(test_set: TestSet, path: str | Path) -> Path:
    """Write the cases as .json, .jsonl or .yaml/.yml (by suffix), loadable by `load_test_cases`."""
    path = Path(path)
    cases = [c.model_dump(exclude_defaults=True) for c in test_set.cases]
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        text = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cases)
    elif suffix == ".json":
        text = json.dumps(cases, indent=2, ensure_ascii=False) + "\n"
    elif suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(cases, sort_keys=False, allow_unicode=True)
    else:
        raise InvalidOption(f"cannot export to '{suffix}': use .json, .jsonl, .yaml or .yml")
    path.write_text(redact(text), encoding="utf-8")
    return path


def _unique_ids(cases: list[TestCase]) -> list[TestCase]:
    seen: set[str] = set()
    out = []
    for i, c in enumerate(cases):
        base = c.id or f"case-{i + 1}"
        cid, n = base, 2
        while cid in seen:
            cid, n = f"{base}-{n}", n + 1
        seen.add(cid)
        out.append(c if c.id == cid else c.model_copy(update={"id": cid}))
    return out


def _default_name(profile: AgentProfile | None, sources: list[str]) -> str:
    who = (profile.name if profile and profile.name else None) or "agent"
    return f"{who} test set ({time.strftime('%Y-%m-%d %H:%M')})"
