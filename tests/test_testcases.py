"""Loading test cases: every file format, and errors that name the case index and field."""

from __future__ import annotations

import json

import pytest

from engine import InvalidTestCase, load_test_cases

CASES = [{"goal": "Check order A1", "persona": "terse", "simulation_guidelines": "one rule", "id": "a"},
         {"goal": "Ask about returns", "context": {"tier": "gold"}, "scripted_turns": ["hi"]}]


@pytest.mark.parametrize("suffix", ["json", "jsonl", "yaml", "yml"])
def test_cases_load_from_each_file_format(tmp_path, suffix):
    path = tmp_path / f"cases.{suffix}"
    if suffix == "jsonl":
        path.write_text("\n".join(json.dumps(c) for c in CASES) + "\n\n")
    else:
        path.write_text(json.dumps(CASES))  # JSON is valid YAML
    cases = load_test_cases(str(path), workspace=tmp_path)
    assert [c.goal for c in cases] == ["Check order A1", "Ask about returns"]
    assert cases[0].simulation_guidelines == ["one rule"]
    assert cases[1].context == {"tier": "gold"} and cases[1].scripted_turns == ["hi"]


def test_mlflow_dataset_records_and_wrapped_lists_are_accepted(tmp_path):
    assert load_test_cases([{"inputs": {"goal": "g"}}])[0].goal == "g"
    path = tmp_path / "cases.yaml"
    path.write_text("test_cases:\n  - goal: from a wrapped list\n")
    assert load_test_cases(str(path), workspace=tmp_path)[0].goal == "from a wrapped list"


@pytest.mark.parametrize(
    "cases, message",
    [
        pytest.param([], "no test cases", id="empty"),
        pytest.param([{"goal": "ok"}, {}], "test case 2, field 'goal': is required", id="missing-goal"),
        pytest.param([{"goal": "   "}], "test case 1, field 'goal': must be a non-empty", id="blank-goal"),
        pytest.param([{"goal": "ok", "persna": "x"}], "field 'persna': unknown field 'persna' (did you mean 'persona'?)",
                     id="typo"),
        pytest.param([{"goal": "ok", "context": "x"}], "field 'context'", id="context-not-object"),
        pytest.param([{"goal": "ok", "scripted_turns": ["hi", ""]}], "field 'scripted_turns': entry 2 is empty",
                     id="blank-scripted-turn"),
        pytest.param(["just a string"], "test case 1: must be an object", id="not-an-object"),
    ],
)
def test_invalid_cases_name_the_index_and_field(cases, message):
    with pytest.raises(InvalidTestCase) as info:
        load_test_cases(cases)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "name, text, message",
    [
        pytest.param("bad.json", "[{", "is not valid JSON", id="json"),
        pytest.param("bad.jsonl", '{"goal": "a"}\n{oops\n', "line 2 is not valid JSON", id="jsonl"),
        pytest.param("bad.yaml", "goal: [unclosed\n", "is not valid YAML", id="yaml"),
        pytest.param("cases.txt", "goal: x", "unsupported file type", id="suffix"),
        pytest.param("scalar.yaml", "42\n", "must hold a list", id="scalar"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InvalidTestCase) as info:
        load_test_cases(str(path), workspace=tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_file_is_reported():
    with pytest.raises(InvalidTestCase, match="not found"):
        load_test_cases("no/such/cases.yaml")
