"""The README's table of exit codes is the CLI's: every row names a constant of convsim_mcp/cli.py with
that value, every EXIT_* constant has a row, and the CLI returns no other literal code."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from convsim_mcp import cli

ROOT = Path(__file__).resolve().parent.parent


def readme_exit_codes() -> dict[str, int]:
    """{constant: code} from the table under '### Exit codes' in README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Exit codes\n", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `(EXIT_[A-Z_]+)` \|", section, flags=re.M)
    assert rows, "no table rows under '### Exit codes'"
    return {name: int(code) for code, name in rows}


def test_every_row_of_the_readme_table_is_a_cli_constant_with_that_code():
    table = readme_exit_codes()
    constants = {name: value for name, value in vars(cli).items() if name.startswith("EXIT_") and isinstance(value, int)}
    assert table == constants


def test_the_cli_returns_no_code_the_table_does_not_list():
    codes = set(readme_exit_codes().values())
    tree = ast.parse((ROOT / "convsim_mcp" / "cli.py").read_text(encoding="utf-8"))
    literals = {node.value.value for node in ast.walk(tree)
                if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, int) and not isinstance(node.value.value, bool)}
    assert literals <= codes, literals - codes


def test_bad_input_and_no_command_exit_with_the_documented_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CONVSIM_HOME": str(tmp_path)}
    for args, error in (([], "usage:"), (["runs", "show", "run-0123456789ab"], "NotFound:")):
        proc = subprocess.run([sys.executable, "-m", "convsim_mcp", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == cli.EXIT_BAD_INPUT == 2, proc.stderr
        assert error in proc.stderr
