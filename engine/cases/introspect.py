"""What an agent's Python source says about it: system prompts, tool definitions, docstrings.

Read with `ast`, never executed: a module whose import has side effects (or
fails) can still be inspected. Used by `cases.generation.describe_agent` so that test
cases target what the agent is really built to do.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
import tokenize
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidTarget
from ..text import clip, one_line, unique
from ..workspace import WorkspaceArg, as_workspace

DOCSTRING_LIMIT = 600


@dataclass
class SourceFacts:
    """What an agent's Python source says about it, read with `ast` (the file is never executed)."""

    path: str
    system_prompts: list[str] = field(default_factory=list)
    tools: list[str] = field(default_factory=list)
    docstrings: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.system_prompts or self.tools or self.docstrings)


_PROMPT_NAME = re.compile(r"PROMPT|INSTRUCTION|SYSTEM", re.IGNORECASE)
_PROMPT_KEYWORDS = {"instructions", "system_prompt", "system", "system_message", "prompt"}
_TOOL_DECORATORS = {"tool", "function_tool", "tool_plain"}
_TOOL_SCHEMA_KEYS = {"parameters", "input_schema", "inputSchema", "args_schema"}
_MIN_PROMPT_CHARS = 20
_ROLE_CONTENT_MIN = 200
_UNKNOWN = object()  # a value ast cannot know without running the code


def introspect_source(path: str, *, workspace: WorkspaceArg = None) -> SourceFacts:
    """Read system prompts, tool definitions and docstrings from a Python target's source file.

    `path` is a target spec, 'pkg.module:func' or 'path/to/file.py:func', located under the
    workspace roots exactly as the target itself is (`Workspace.code_file`, which imports nothing).
    Raises InvalidTarget when the spec is malformed or refused, or the file cannot be read or parsed.
    """
    file, _, attr = as_workspace(workspace).code_file(path, what="agent")
    try:
        with tokenize.open(file) as f:  # honours a coding declaration
            text = f.read()
    except (OSError, SyntaxError, UnicodeDecodeError) as e:
        raise InvalidTarget(f"cannot read the agent's source {file}: {e}") from e
    try:
        tree = ast.parse(text, filename=str(file))
    except SyntaxError as e:
        raise InvalidTarget(f"cannot parse the agent's source {file}: {e.msg} (line {e.lineno})") from e
    except ValueError as e:  # null bytes
        raise InvalidTarget(f"cannot parse the agent's source {file}: {e}") from e
    return _facts(tree, attr, str(file))


def _facts(tree: ast.Module, attr: str, path: str) -> SourceFacts:
    consts: dict[str, Any] = {}  # module-level names with statically known values, in order
    prompts: list[str] = []
    tools: list[str] = []
    for stmt in tree.body:
        for name, value in _assignments(stmt):
            known = _static(value, consts)
            if known is not _UNKNOWN:
                consts[name] = known
            if _PROMPT_NAME.search(name) and isinstance(known, str):
                prompts.append(known)
            if isinstance(value, (ast.List, ast.Tuple, ast.Dict)) and known is not _UNKNOWN:
                tools += _tool_lines(known, trusted=bool(re.search(r"TOOL|FUNCTION", name, re.IGNORECASE)))
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    target = defs.get(attr)
    if target is not None:
        for node in ast.walk(target):
            for name, value in _assignments(node):
                known = _static(value, consts)
                if _PROMPT_NAME.search(name) and isinstance(known, str):
                    prompts.append(known)
                elif isinstance(value, (ast.List, ast.Tuple, ast.Dict)) and known is not _UNKNOWN:
                    tools += _tool_lines(known, trusted=bool(re.search(r"TOOL|FUNCTION", name, re.IGNORECASE)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                known = _static(kw.value, consts) if kw.arg in _PROMPT_KEYWORDS else None
                if isinstance(known, str):
                    prompts.append(known)
        elif isinstance(node, ast.Dict):
            entries = {k.value: v for k, v in zip(node.keys, node.values)
                       if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            role = entries.get("role")
            if role is not None and _static(role, consts) == "system" and "content" in entries:
                content = _static(entries["content"], consts)
                if isinstance(content, str) and len(content) > _ROLE_CONTENT_MIN:
                    prompts.append(content)
    for fn in defs.values():
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
            _decorator_name(d) in _TOOL_DECORATORS for d in fn.decorator_list
        ):
            tools.append(_tool_line(_decorated_tool_name(fn, consts), _first_paragraph(ast.get_docstring(fn))))
    return SourceFacts(
        path=path,
        system_prompts=unique(p for p in prompts if len(p.strip()) >= _MIN_PROMPT_CHARS),
        tools=_unique_tools(tools),
        docstrings=_docstrings(tree, target, defs),
    )


def _assignments(node: ast.AST) -> list[tuple[str, ast.expr]]:
    """(name, value) for `NAME = value` and `NAME: T = value`; other targets are skipped."""
    if isinstance(node, ast.Assign):
        return [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
        return [(node.target.id, node.value)]
    return []


def _static(node: ast.AST | None, consts: dict[str, Any]) -> Any:
    """The value of a literal expression (strings, containers, concatenation, dedent, names of constants)."""
    if node is None:
        return _UNKNOWN
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return consts.get(node.id, _UNKNOWN)
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(str(v.value))
            elif isinstance(v, ast.FormattedValue):
                known = _static(v.value, consts)
                parts.append(known if isinstance(known, str) else "{" + ast.unparse(v.value) + "}")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _static(node.left, consts), _static(node.right, consts)
        return left + right if isinstance(left, str) and isinstance(right, str) else _UNKNOWN
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        left, right = _static(node.left, consts), _static(node.right, consts)
        if isinstance(left, str) and isinstance(right, int) and not isinstance(right, bool) and 0 <= right <= 100:
            return left * right
        return _UNKNOWN
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_static(e, consts) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            key = _static(k, consts)
            if isinstance(key, (str, int)):
                out[key] = _static(v, consts)
        return out
    if isinstance(node, ast.Call) and not node.keywords:
        func = node.func
        fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        args = [_static(a, consts) for a in node.args]
        if fname in ("dedent", "cleandoc") and len(args) == 1 and isinstance(args[0], str):
            return textwrap.dedent(args[0]) if fname == "dedent" else inspect.cleandoc(args[0])
        if isinstance(func, ast.Attribute):
            owner = _static(func.value, consts)
            if fname in ("strip", "lstrip", "rstrip") and not args and isinstance(owner, str):
                return getattr(owner, fname)()
            if fname == "join" and isinstance(owner, str) and len(args) == 1 and isinstance(args[0], list) \
                    and all(isinstance(a, str) for a in args[0]):
                return owner.join(args[0])
    return _UNKNOWN


def _tool_lines(value: Any, *, trusted: bool) -> list[str]:
    """Tool dicts anywhere inside a literal: OpenAI chat/responses style, or {name, description} with a schema.

    A bare {name, description} counts only beside a parameter schema, or inside a constant whose name says
    it holds tools, so that ordinary records with a name are not mistaken for tools.
    """
    if isinstance(value, dict):
        fn = value.get("function")
        if value.get("type") == "function" and isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return [_tool_line(fn["name"], fn.get("description"))]
        if isinstance(value.get("name"), str) and isinstance(value.get("description"), str) and (
            trusted or _TOOL_SCHEMA_KEYS & set(value)
        ):
            return [_tool_line(value["name"], value["description"])]
        return [line for v in value.values() for line in _tool_lines(v, trusted=trusted)]
    if isinstance(value, list):
        return [line for v in value for line in _tool_lines(v, trusted=trusted)]
    return []


def _tool_line(name: str, description: Any) -> str:
    text = one_line(description, 200) if isinstance(description, str) else ""
    return f"{name}: {text}" if text else name


def _decorator_name(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""


def _decorated_tool_name(fn: ast.FunctionDef | ast.AsyncFunctionDef, consts: dict[str, Any]) -> str:
    for d in fn.decorator_list:
        if isinstance(d, ast.Call) and _decorator_name(d) in _TOOL_DECORATORS:
            for kw in d.keywords:
                named = _static(kw.value, consts) if kw.arg in ("name", "name_override") else None
                if isinstance(named, str) and named.strip():
                    return named.strip()
    return fn.name


def _docstrings(tree: ast.Module, target: ast.AST | None, defs: dict[str, ast.AST]) -> list[str]:
    """The module's docstring, the target's, and those of public module functions the target names."""
    out = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        out.append(clip(module_doc, DOCSTRING_LIMIT))
    if target is None:
        return out
    doc = ast.get_docstring(target)  # type: ignore[arg-type]
    if doc:
        out.append(clip(f"{target.name}: {doc}", DOCSTRING_LIMIT))  # type: ignore[attr-defined]
    names = sorted((n for n in ast.walk(target) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)),
                   key=lambda n: (n.lineno, n.col_offset))
    seen = {target.name}  # type: ignore[attr-defined]
    for n in names:
        ref = defs.get(n.id)
        if n.id in seen or n.id.startswith("_") or not isinstance(ref, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        seen.add(n.id)
        doc = ast.get_docstring(ref)
        if doc:
            out.append(clip(f"{n.id}: {doc}", DOCSTRING_LIMIT))
    return out


def _first_paragraph(doc: str | None) -> str:
    return one_line((doc or "").split("\n\n")[0], 200)


def _unique_tools(lines: list[str]) -> list[str]:
    """One line per tool name; the first definition wins."""
    out: list[str] = []
    names: set[str] = set()
    for line in lines:
        name = line.split(":", 1)[0].strip()
        if name not in names:
            names.add(name)
            out.append(line)
    return out
