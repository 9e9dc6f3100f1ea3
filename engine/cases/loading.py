"""Test cases: loading and validating them (inline, as JSON text, or from JSON / JSONL / YAML files).

Every rejection names the case index and the field, so a user (or an
assistant) can fix the exact entry. A JSON or YAML file is read whole, so it is
bounded in bytes (MAX_FILE_BYTES) and cases (MAX_TEST_CASES, as inline cases);
a JSONL file is read and validated a line at a time, so only its validated
cases are ever held, and it may hold up to MAX_FILE_CASES.
"""

from __future__ import annotations

import codecs
import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import InvalidOption, InvalidTestCase
from ..limits import MAX_FILE_BYTES, MAX_FILE_CASES, MAX_JSON_DEPTH, MAX_LINE_BYTES, MAX_TEST_CASES, has_lone_surrogate, json_depth
from ..models import TestCase
from ..workspace import WorkspaceArg, as_workspace


def load_test_cases(source: str | Path | list[Any] | dict[str, Any], *,
                    workspace: WorkspaceArg = None) -> list[TestCase]:
    """Cases from a list (of dicts or TestCase), a single dict, JSON text of either (a string starting with
    '[' or '{', as the CLI passes inline cases), or a .json/.jsonl/.yaml/.yml file under the roots.

    At most MAX_TEST_CASES, or MAX_FILE_CASES from a .jsonl file (streamed: see `_load_jsonl`).
    """
    lines: list[int | None] = []
    if isinstance(source, str) and source.lstrip()[:1] in ("[", "{"):
        source = parse_inline_cases(source)
    if isinstance(source, (str, Path)):
        try:
            path = as_workspace(workspace).resolve_file(source, what="test case file")
        except InvalidOption as e:
            raise InvalidTestCase(str(e)) from None
        if path.suffix.lower() == ".jsonl":
            return _load_jsonl(path)
        items, lines = _read_file(path)
    elif isinstance(source, dict):
        items = [source]
    elif isinstance(source, list):
        items = source
    else:
        raise InvalidTestCase(f"test cases must be a list of objects or a file path, got {type(source).__name__}")
    if not items:
        raise InvalidTestCase("no test cases given: provide at least one object with a 'goal'")
    if len(items) > MAX_TEST_CASES:
        raise InvalidTestCase(f"{len(items)} test cases given; at most {MAX_TEST_CASES} per run (MAX_TEST_CASES)")
    in_file = isinstance(source, (str, Path))
    out = []
    for i, item in enumerate(items):
        try:
            out.append(validate_case(item, i, from_file=in_file))
        except InvalidTestCase as e:
            if not in_file:
                raise
            line = lines[i] if i < len(lines) else None
            raise InvalidTestCase(f"{path}{f' line {line}' if line else ''}, {e}") from None
    return out


def parse_inline_cases(text: str) -> list[Any] | dict[str, Any]:
    """Test cases written inline as JSON text: a list of case objects, or one object.

    Raises InvalidTestCase for text that is not JSON, too large, or nested too deeply (never echoing it).
    """
    if len(text) > MAX_FILE_BYTES:
        raise InvalidTestCase(f"inline test cases are {len(text)} characters; at most {MAX_FILE_BYTES} "
                              "(MAX_FILE_BYTES): put them in a file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidTestCase(f"inline test cases are not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
                              ) from None
    except RecursionError:
        raise InvalidTestCase(f"inline test cases are nested too deeply (limit MAX_JSON_DEPTH={MAX_JSON_DEPTH})"
                              ) from None
    if has_lone_surrogate(data):  # json.loads delivers "\ud800" escapes as is: not text, SQLite refuses it
        raise InvalidTestCase("inline test cases hold a lone UTF-16 surrogate escape (\\ud800-\\udfff): not text")
    if isinstance(data, dict) and isinstance(data.get("test_cases"), list):
        data = data["test_cases"]
    if not isinstance(data, (list, dict)):
        raise InvalidTestCase(f"inline test cases must be a JSON list of objects (or one object), "
                              f"got {type(data).__name__}")
    return data


def validate_case(item: Any, index: int, *, from_file: bool = False) -> TestCase:
    """One case, or InvalidTestCase naming its index (1-based in the message) and field.

    For a case read from a file, the message names fields of ours only: an unknown key is not
    repeated back, since the file may be something else entirely (a credentials file).
    """
    if isinstance(item, TestCase):
        return item
    if isinstance(item, dict) and isinstance(item.get("inputs"), dict) and "goal" not in item:
        item = item["inputs"]  # MLflow dataset records: {"inputs": {...}}
    if not isinstance(item, dict):
        raise InvalidTestCase(f"must be an object with a 'goal', got {type(item).__name__}", index=index)
    if json_depth(item) > MAX_JSON_DEPTH:
        raise InvalidTestCase(f"is nested more than {MAX_JSON_DEPTH} levels deep (MAX_JSON_DEPTH)", index=index)
    unknown = [k for k in item if k not in TestCase.model_fields]
    if unknown:
        key = str(unknown[0])
        match = difflib.get_close_matches(key, TestCase.model_fields, 1)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        allowed = ", ".join(TestCase.model_fields)
        if from_file:
            raise InvalidTestCase(f"{len(unknown)} unknown field(s){hint}; allowed: {allowed}", index=index)
        raise InvalidTestCase(f"unknown field '{key}'{hint}; allowed: {allowed}", index=index, field=key)
    try:
        return TestCase.model_validate(item)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "missing":
            raise InvalidTestCase("is required", index=index, field=field) from None
        msg = err["msg"].removeprefix("Value error, ")
        raise InvalidTestCase(msg, index=index, field=field) from None


def _load_jsonl(path: Path) -> list[TestCase]:
    """The cases of a JSONL file (one object per line; blank lines skipped), each line read, parsed and
    validated in turn: the file is never held whole, a line is read at most MAX_LINE_BYTES into, and
    at most MAX_FILE_CASES cases are kept. Errors name the path and the line, never the content."""
    out: list[TestCase] = []
    try:
        with path.open("rb") as f:
            n = offset = 0
            while raw := f.readline(MAX_LINE_BYTES + 2):
                n += 1
                start, offset = offset, offset + len(raw)
                line = raw.rstrip(b"\r\n")
                if len(line) > MAX_LINE_BYTES:
                    raise InvalidTestCase(f"{path} line {n} is longer than {MAX_LINE_BYTES} bytes (MAX_LINE_BYTES)")
                if n == 1 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8):]
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InvalidTestCase(f"{path} is not UTF-8 text (byte {start + e.start})") from None
                if not text.strip():
                    continue
                if len(out) >= MAX_FILE_CASES:
                    raise InvalidTestCase(f"{path} holds more than {MAX_FILE_CASES} test cases; at most "
                                          f"{MAX_FILE_CASES} per run from a JSONL file (MAX_FILE_CASES)")
                try:
                    item = json.loads(text)
                except json.JSONDecodeError as e:
                    raise InvalidTestCase(f"{path} line {n} is not valid JSON: {e.msg} (column {e.colno})") from None
                except RecursionError:
                    raise InvalidTestCase(f"{path} line {n} is nested too deeply to read "
                                          f"(limit MAX_JSON_DEPTH={MAX_JSON_DEPTH})") from None
                try:
                    out.append(validate_case(item, len(out), from_file=True))
                except InvalidTestCase as e:
                    raise InvalidTestCase(f"{path} line {n}, {e}") from None
    except OSError as e:
        raise InvalidTestCase(f"cannot read {path}: {e.strerror or e}") from None
    if not out:
        raise InvalidTestCase("no test cases given: provide at least one object with a 'goal'")
    return out


def _read_file(path: Path) -> tuple[list[Any], list[int | None]]:
    """The items of a JSON or YAML test-case file and the line each starts on (when known).

    Errors name the path, the line and what is wrong, never the file's content.
    """
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise InvalidTestCase(f"{path} is {size} bytes; test case files are at most {MAX_FILE_BYTES} (MAX_FILE_BYTES)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidTestCase(f"{path} is not UTF-8 text (byte {e.start})") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data, lines = _json_items(text)
        elif suffix in (".yaml", ".yml"):
            data, lines = _yaml_items(text)
        else:
            raise InvalidTestCase(f"{path}: unsupported file type '{suffix}'; use .json, .jsonl, .yaml or .yml")
    except json.JSONDecodeError as e:
        raise InvalidTestCase(f"{path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or "cannot be parsed"
        raise InvalidTestCase(f"{path} is not valid YAML: {problem}{where}") from None
    except RecursionError:
        raise InvalidTestCase(f"{path} is nested too deeply to read (limit MAX_JSON_DEPTH={MAX_JSON_DEPTH})") from None
    if isinstance(data, dict) and isinstance(data.get("test_cases"), list):
        data = data["test_cases"]
    if isinstance(data, dict):
        data, lines = [data], lines[:1]
    if not isinstance(data, list):
        raise InvalidTestCase(f"{path} must hold a list of test cases (or {{'test_cases': [...]}})")
    return data, lines


def _json_items(text: str) -> tuple[Any, list[int | None]]:
    """The parsed document, and for a top-level list the line each item starts on."""
    data = json.loads(text)
    if not isinstance(data, list):
        return data, [1]
    decoder, lines, pos = json.JSONDecoder(), [], text.index("[") + 1
    for _ in data:
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)
    return data, lines


def _yaml_items(text: str) -> tuple[Any, list[int | None]]:
    """The parsed document, and the line each item of its case list starts on."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    data = yaml.safe_load(text)
    if isinstance(node, yaml.MappingNode):
        node = next((v for k, v in node.value if getattr(k, "value", None) == "test_cases"), node)
    if isinstance(node, yaml.SequenceNode):
        return data, [item.start_mark.line + 1 for item in node.value]
    return data, [node.start_mark.line + 1] if node is not None else []
