"""Suites: reading JSONL (bad lines named), the shipped suites, the knowledge-graph generator's fixed split, and the
BFCL conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.eval import Contains, Numeric, SuiteError, ToolCalled, Unanswerable, load_suite, parse_suite
from services.eval.bfcl import agent_name, convert_bfcl, json_schema, tool_name
from services.eval.generate import CATEGORIES, generate_kg_tasks, split_of
from services.knowledge.dataset import default_data_dir, read_countries

GOOD = '{"id": "capital-FR", "category": "one_hop", "task": "What is the capital of France?", "checks": [{"type": "contains", "values": ["Paris"]}]}'


def test_a_suite_line_becomes_a_task_and_comments_and_blank_lines_are_skipped() -> None:
    suite = parse_suite("mine", ["# made by hand", "", GOOD])
    (task,) = suite.tasks
    assert (task.id, task.category, task.split, task.task, task.checks) == (
        "capital-FR", "one_hop", "test", "What is the capital of France?", (Contains(("Paris",)),)
    )  # fmt: skip
    assert parse_suite("again", [json.dumps(task.to_json())]).tasks == (task,)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not valid JSON (Expecting property name enclosed in double quotes at character 1)"),
        ("[1, 2]", 'line 2: a line is a JSON object: {"id": ..., "task": ..., "checks": [...]}'),
        ('{"task": "q", "checks": [{"type": "unanswerable"}]}', 'line 2: "id" must be 1-200 characters'),
        ('{"id": "a b", "task": "q", "checks": [{"type": "unanswerable"}]}', 'line 2: "id" must be 1-200 characters'),
        (
            '{"id": "a", "task": "  ", "checks": [{"type": "unanswerable"}]}',
            'line 2: "task" must be a non-empty string',
        ),
        ('{"id": "a", "task": "q", "checks": []}', 'line 2: "checks" must be a non-empty list'),
        (
            '{"id": "a", "task": "q", "checks": [{"type": "unanswerable"}, {"type": "exact"}]}',
            "line 2: check 2: an exact check",
        ),
        (
            '{"id": "a", "task": "q", "split": "dev", "checks": [{"type": "unanswerable"}]}',
            'line 2: "split" must be one of train, test',
        ),
        (
            '{"id": "a", "task": "q", "category": 3, "checks": [{"type": "unanswerable"}]}',
            'line 2: "category" and "agent"',
        ),
        (
            '{"id": "capital-FR", "task": "q", "checks": [{"type": "unanswerable"}]}',
            "line 2: id 'capital-FR' is already used on line 1",
        ),
    ],
)
def test_a_bad_line_is_named_with_what_to_change(line: str, message: str) -> None:
    with pytest.raises(SuiteError) as raised:
        parse_suite("mine", [GOOD, line], source="mine.jsonl")
    assert str(raised.value).startswith("mine.jsonl, ") and message in str(raised.value)


def test_a_huge_line_is_refused_without_being_echoed() -> None:
    line = json.dumps({"id": "a", "task": "q" * 200_000, "checks": [{"type": "unanswerable"}]})
    with pytest.raises(SuiteError) as raised:
        parse_suite("mine", [line])
    assert str(raised.value) == f"mine, line 1: the line has {len(line)} characters; a task line has at most 100000"


def test_an_empty_suite_a_missing_file_and_a_binary_file_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match="has no tasks; write one JSON object per line"):
        parse_suite("empty", ["# nothing", ""])
    with pytest.raises(SuiteError, match=r"no suite '.*nope\.jsonl': give a JSONL file or one of the shipped suites"):
        load_suite(tmp_path / "nope.jsonl")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SuiteError, match=r"is not UTF-8 text .*save the suite as UTF-8"):
        load_suite(binary)


def test_select_takes_a_fixed_sample_per_category(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": f"{c}-{i}", "category": c, "task": "q", "checks": [{"type": "unanswerable"}]})
        for c in ("a", "b") for i in range(5)
    ]  # fmt: skip
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines))
    suite = load_suite(path)
    assert [t.id for t in suite.select(limit=2).tasks] == ["a-0", "a-1", "b-0", "b-1"]
    assert [t.id for t in suite.select(categories=["b"], limit=1).tasks] == ["b-0"]
    assert suite.select(limit=2).path == path
    assert [t.id for t in suite.select(limit=1, limits={"b": 3}).tasks] == ["a-0", "b-0", "b-1", "b-2"]
    assert len(suite.select(limit=1, limits={"a": 0}).tasks) == 6  # 0: all of that category


def test_the_shipped_suites_load_and_keep_their_splits_apart() -> None:
    train, test = load_suite("kg-train"), load_suite("kg-test")
    assert {t.split for t in train.tasks} == {"train"} and {t.split for t in test.tasks} == {"test"}
    assert {t.category for t in test.tasks} == set(CATEGORIES)
    subjects = lambda suite: {t.meta["subject"] for t in suite.tasks}  # noqa: E731
    assert not subjects(train) & subjects(test)


def test_generation_is_the_same_for_the_same_seed_and_the_split_does_not_depend_on_it() -> None:
    records = read_countries(default_data_dir())
    first = generate_kg_tasks(records, seed=14, per_category={"train": 5, "test": 5})
    again = generate_kg_tasks(records, seed=14, per_category={"train": 5, "test": 5})
    other = generate_kg_tasks(records, seed=15, per_category={"train": 5, "test": 5})
    assert first == again
    assert [t.id for t in first] != [t.id for t in other]
    assert all(t.split == split_of(t.meta["subject"]) for t in first + other)


def test_generated_questions_check_what_the_graph_says() -> None:
    bhutan = [r for r in read_countries(default_data_dir()) if r["iso2"] in ("BT", "FR")]
    tasks = {t.id: t for t in generate_kg_tasks(bhutan, per_category={"train": 100, "test": 100})}
    assert tasks["reverse-capital-BT"].task == "Which country has Thimphu as its capital?"
    assert tasks["reverse-capital-BT"].checks == (Contains(("Bhutan",)),)
    assert tasks["two_hop-currency-BT"].checks == (Contains(("Bhutanese ngultrum", "BTN")),)
    assert tasks["calling_code-phone-BT"].checks == (Numeric(975.0),)
    assert tasks["chinese-capital-BT"].task == "不丹的首都是哪里？"
    assert tasks["unanswerable-leader-BT"].checks == (Unanswerable(),)


QUESTIONS = json.dumps(
    {
        "id": "simple_python_0",
        "question": [[{"role": "user", "content": "Find the area of a triangle with a base of 10 units and height of 5 units."}]],
        "function": [{"name": "calc.triangle_area", "description": "Area of a triangle.", "parameters": {
            "type": "dict", "required": ["base", "height"], "properties": {
                "base": {"type": "integer"}, "height": {"type": "float"}, "dims": {"type": "tuple", "items": {"type": "float"}},
                "extra": {"type": "any"}}}}],
    }
)  # fmt: skip
ANSWERS = json.dumps(
    {"id": "simple_python_0", "ground_truth": [{"calc.triangle_area": {"base": [10], "height": [5.0], "dims": [""]}}]}
)


def test_bfcl_simple_becomes_a_task_with_its_function_as_a_tool_and_a_tool_call_check() -> None:
    (task,) = convert_bfcl(QUESTIONS, ANSWERS)
    assert (task.id, task.category, task.agent) == ("simple_python_0", "bfcl_simple", "bfcl-simple-python-0")
    assert task.task.startswith("Find the area of a triangle")
    assert task.checks == (ToolCalled("bfcl.calc_triangle_area", {"base": (10,), "height": (5.0,), "dims": ("",)}),)
    assert task.meta["tool"]["name"] == "calc_triangle_area"
    assert task.meta["tool"]["input_schema"] == {
        "type": "object",
        "required": ["base", "height"],
        "properties": {
            "base": {"type": "integer"}, "height": {"type": "number"},
            "dims": {"type": "array", "items": {"type": "number"}}, "extra": {},
        },
    }  # fmt: skip
    assert parse_suite("bfcl", [json.dumps(task.to_json())]).tasks == (task,)


def test_bfcl_names_become_names_the_registry_and_the_planner_accept() -> None:
    assert tool_name("math.factorial") == "math_factorial"
    assert tool_name("3D.plot") == "f_3d_plot"
    assert agent_name("simple_python_12") == "bfcl-simple-python-12"
    assert json_schema({"type": "dict", "properties": {}}) == {"type": "object", "properties": {}}


def test_the_generator_refuses_a_folder_without_bfcl_data_and_writes_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    before = {p.name: p.stat().st_mtime_ns for p in (root / "services" / "eval" / "suites").iterdir()}
    done = subprocess.run(
        [sys.executable, "scripts/gen_eval_suites.py", "--bfcl-data", str(tmp_path)],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {tmp_path} has no BFCL_v4_simple_python.json with its possible_answer"
    assert {p.name: p.stat().st_mtime_ns for p in (root / "services" / "eval" / "suites").iterdir()} == before


def test_services_eval_exports_what_its_modules_define() -> None:
    import services.eval

    modules = {"bfcl", "checks", "generate", "report", "runner", "suite", "variants"}
    public = {name for name in dir(services.eval) if not name.startswith("_")} - modules
    assert set(services.eval.__all__) == public
    assert all(getattr(services.eval, name) is not None for name in services.eval.__all__)
