"""The engine's layout rule (DESIGN.md, "The engine, by stage"): data and imports flow one way.

A stage imports the ground and earlier stages only; nothing imports `pipeline` but the MCP layer,
the CLI, the public `engine/__init__.py` and the background-job runner beside it.
"""

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parent.parent / "engine"
ORDER = ["llm", "store", "cases", "simulation", "judging", "issues", "reports", "pipeline"]
COMPOSERS = {"__init__", "jobs"}  # engine-level modules that may import pipeline


def _engine_imports(path: Path) -> set[str]:
    """The first-level engine packages or modules `path` imports (relative imports resolved)."""
    rel = path.relative_to(ENGINE).with_suffix("").parts
    package = list(rel[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            parts = base + (node.module.split(".") if node.module else [])
            if parts:
                found.add(parts[0])
            else:  # `from . import x` at the engine's top level
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("engine."):
            found.add(node.module.split(".")[1])
    return found


def _modules():
    return sorted(p for p in ENGINE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_stage_package_exists():
    for stage in ORDER:
        assert (ENGINE / stage / "__init__.py").is_file(), stage


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ENGINE)))
def test_imports_flow_one_way(path):
    rel = path.relative_to(ENGINE).parts
    own = rel[0] if len(rel) > 1 else None
    imported = _engine_imports(path) - {own}
    stages = imported & set(ORDER)
    if own is None:  # the ground, or a composer
        allowed = set(ORDER) if path.stem in COMPOSERS else set()
    else:
        allowed = set(ORDER[: ORDER.index(own)])
    assert stages <= allowed, f"{path.relative_to(ENGINE)} imports {sorted(stages - allowed)}, a later stage"
