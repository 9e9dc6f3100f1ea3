"""examples/github-actions.yml: a workflow whose convsim command the real CLI parser accepts, gating on
high issues, writing JUnit, taking the key from the repository's secrets and uploading the results."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from convsim_mcp.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "examples" / "github-actions.yml"


def steps() -> list[dict]:
    workflow = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    [job] = workflow["jobs"].values()
    return job["steps"]


def test_the_workflow_runs_test_agent_with_the_fail_on_gate_and_junit():
    [step] = [s for s in steps() if "convsim-mcp test-agent" in s.get("run", "")]
    argv = shlex.split(step["run"])
    assert argv[0] == "convsim-mcp"
    args = _parser().parse_args(argv[1:])  # every flag is one the CLI takes
    assert args.fail_on == "high" and args.junit == "results.xml" and args.model
    assert step["env"]["OPENAI_API_KEY"] == "${{ secrets.OPENAI_API_KEY }}"  # from the repository's secrets
    assert not any("KEY" in a.upper() for a in argv[1:])  # never on the command line


def test_the_junit_file_is_uploaded_and_published_whatever_the_outcome():
    later = steps()[[i for i, s in enumerate(steps()) if "test-agent" in s.get("run", "")][0] + 1:]
    uploads = [s for s in later if s.get("uses", "").startswith("actions/upload-artifact")]
    published = [s for s in later if s.get("with", {}).get("reporter") == "java-junit"]
    assert uploads and published
    for s in uploads + published:
        assert s.get("if") == "always()"
    assert "results.xml" in uploads[0]["with"]["path"] and published[0]["with"]["path"] == "results.xml"
