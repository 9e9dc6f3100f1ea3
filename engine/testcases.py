"""Test cases: loading and validating them (inline, or from JSON / JSONL / YAML files).

Every rejection names the case index and the field, so a user (or an
assistant) can fix the exact entry.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import InvalidTestCase
from .models import TestCase

MAX_TEST_CASES = 1000


def load_test_cases(source: str | Path | list[Any] | dict[str, Any], *, base_dir: str | Path | None = None) -> list[TestCase]:
    """Cases from a list (of dicts or TestCase), a single dict, or a .json/.jsonl/.yaml/.yml file path."""
    if isinstance(source, (str, Path)):
        items = _read_file(Path(source) if Path(source).is_absolute() or base_dir is None else Path(base_dir) / source)
    elif isinstance(source, dict):
        items = [source]
    elif isinstance(source, list):
        items = source
    else:
        raise InvalidTestCase(f"test cases must be a list of objects or a file path, got {type(source).__name__}")
    if not items:
        raise InvalidTestCase("no test cases given: provide at least one object with a 'goal'")
    if len(items) > MAX_TEST_CASES:
        raise InvalidTestCase(f"{len(items)} test cases given; at most {MAX_TEST_CASES} per run")
    return [validate_case(item, i) for i, item in enumerate(items)]


def validate_case(item: Any, index: int) -> TestCase:
    if isinstance(item, TestCase):
        return item
    if isinstance(item, dict) and isinstance(item.get("inputs"), dict) and "goal" not in item:
        item = item["inputs"]  # MLflow dataset records: {"inputs": {...}}
    if not isinstance(item, dict):
        raise InvalidTestCase(f"must be an object with a 'goal', got {type(item).__name__}", index=index)
    unknown = [k for k in item if k not in TestCase.model_fields]
    if unknown:
        hints = [f"'{k}'" + (f" (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, TestCase.model_fields, 1)) else "")
                 for k in unknown]
        raise InvalidTestCase(
            f"unknown field {', '.join(hints)}; allowed: {', '.join(TestCase.model_fields)}", index=index, field=unknown[0]
        )
    try:
        return TestCase.model_validate(item)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "missing":
            raise InvalidTestCase("is required", index=index, field=field) from None
        msg = err["msg"].removeprefix("Value error, ")
        raise InvalidTestCase(msg, index=index, field=field) from None


def _read_file(path: Path) -> list[Any]:
    if not path.is_file():
        raise InvalidTestCase(f"test case file not found: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            items = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InvalidTestCase(f"{path}: line {n} is not valid JSON: {e.msg}") from None
            return items
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise InvalidTestCase(f"{path}: unsupported file type '{suffix}'; use .json, .jsonl, .yaml or .yml")
    except json.JSONDecodeError as e:
        raise InvalidTestCase(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InvalidTestCase(f"{path} is not valid YAML: {problem}{where}") from None
    if isinstance(data, dict) and isinstance(data.get("test_cases"), list):
        data = data["test_cases"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise InvalidTestCase(f"{path} must hold a list of test cases (or {{'test_cases': [...]}})")
    return data

