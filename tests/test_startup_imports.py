"""Startup stays light: the MCP server answers `tools/list` without importing the stacks behind its tools."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# Loaded at a tool's first call (or a command's run), never by `import convsim_mcp.server` / the CLI.
DEFERRED = ("engine.pipeline.simulation", "engine.pipeline.scoring", "engine.pipeline.agent_test",
            "engine.pipeline.generation", "engine.simulation", "engine.judging", "engine.cases", "engine.issues",
            "engine.llm", "yaml", "litellm", "openai")

PROBE = """
import json, sys
import convsim_mcp.cli, convsim_mcp.server
from convsim_mcp.server import build_server
from engine import Store
build_server(Store(sys.argv[1]))
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("engine", "yaml", "litellm", "openai")))))
"""


def test_importing_the_server_and_building_it_defers_the_engine_stacks(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "db.sqlite")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "CONVSIM_HOME": str(tmp_path),
                                                      "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "engine.models" in loaded and "engine.store" in loaded
    assert not {m for m in loaded if m.startswith(DEFERRED)}, sorted(loaded)


@pytest.mark.parametrize("package", ["engine", "engine.pipeline", "engine.reports"])
def test_lazy_packages_export_every_name_they_list(package):
    module = __import__(package, fromlist=["__all__"])
    assert all(getattr(module, name) is not None for name in module.__all__)
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match="no_such_name"):
        getattr(module, "no_such_name")


def test_the_deferred_entry_points_are_the_engine_functions_once_called():
    from convsim_mcp import server
    from engine.pipeline.simulation import describe_target

    spec = {"path": "tests.agents:echo"}
    assert server.describe_target(spec) == describe_target(spec) == "tests.agents:echo"
    assert server.describe_target.__name__ == "describe_target"
