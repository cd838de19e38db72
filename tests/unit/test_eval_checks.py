"""The checks of an evaluation task: each kind passing and failing on trajectories, their JSON form, bad forms."""

from __future__ import annotations

import pytest

from services.eval import (
    Contains,
    Exact,
    Numeric,
    ToolCalled,
    ToolCallRecord,
    Trajectory,
    Unanswerable,
    parse_check,
)
from services.eval.checks import is_rejection


def said(answer: str, *calls: ToolCallRecord) -> Trajectory:
    return Trajectory(answer, tuple(calls))


@pytest.mark.parametrize(
    ("answer", "passed"),
    [
        ("The capital of Bhutan is Thimphu.", True),
        ("THIMPHU", True),
        ("The capital of São Tomé and Príncipe is São Tomé.", True),
        ("I could not find the answer.", False),
    ],
)
def test_contains_folds_case_and_accents(answer: str, passed: bool) -> None:
    check = Contains(("Thimphu", "Sao Tome"))
    assert check.evaluate(said(answer)).passed is passed


def test_contains_says_what_it_looked_for() -> None:
    result = Contains(("Euro", "EUR")).evaluate(said("The currency is the dollar."))
    assert (result.kind, result.passed, result.detail) == (
        "contains",
        False,
        "the answer does not contain 'Euro' or 'EUR'",
    )


def test_exact_ignores_case_spacing_and_a_final_full_stop() -> None:
    assert Exact("Paris").evaluate(said("  paris. ")).passed
    assert not Exact("Paris").evaluate(said("It is Paris.")).passed


@pytest.mark.parametrize(
    ("answer", "value", "tolerance", "passed"),
    [
        ("The calling code of Bhutan is +975.", 975, 0, True),
        ("The calling code of Canada is +1.", 1, 0, True),
        ("Founded in 2021.", 1, 0, False),
        ("There are 1,234 of them.", 1234, 0, True),
        ("The area is 24.9 km².", 25, 0.5, True),
        ("The area is 24.4 km².", 25, 0.5, False),
        ("No number here.", 3, 0, False),
    ],
)
def test_numeric_finds_a_number_within_the_tolerance(answer: str, value: float, tolerance: float, passed: bool) -> None:
    assert Numeric(value, tolerance).evaluate(said(answer)).passed is passed


def test_tool_call_matches_the_accepted_values_with_optional_arguments() -> None:
    check = ToolCalled("bfcl.calculate_triangle_area", {"base": (10,), "height": (5,), "unit": ("units", "")})

    assert check.evaluate(said("", ToolCallRecord("bfcl.calculate_triangle_area", {"base": 10, "height": 5}))).passed
    assert check.evaluate(
        said("", ToolCallRecord("bfcl.calculate_triangle_area", {"base": 10.0, "height": 5, "unit": "Units"}))
    ).passed


@pytest.mark.parametrize(
    ("calls", "detail"),
    [
        ((), "bfcl.area was not called (called: none)"),
        ((ToolCallRecord("country_facts", {}),), "bfcl.area was not called (called: country_facts)"),
        ((ToolCallRecord("bfcl.area", {"base": 10}),), "argument 'height' is missing"),
        ((ToolCallRecord("bfcl.area", {"base": 10, "height": 6}),), "argument 'height' is 6, expected one of (5,)"),
        ((ToolCallRecord("bfcl.area", {"base": 10, "height": 5, "color": "red"}),), "unexpected argument 'color'"),
    ],
)
def test_tool_call_says_what_was_wrong(calls: tuple[ToolCallRecord, ...], detail: str) -> None:
    result = ToolCalled("bfcl.area", {"base": (10,), "height": (5,)}).evaluate(said("", *calls))
    assert (result.passed, result.detail) == (False, detail)


def test_tool_call_compares_lists_and_objects_as_json_values() -> None:
    check = ToolCalled("f", {"xs": ([1, 2, 3],), "opts": ({"a": "x"},), "flag": (True,)})
    assert check.evaluate(said("", ToolCallRecord("f", {"xs": [1.0, 2, 3], "opts": {"a": "X"}, "flag": True}))).passed
    assert not check.evaluate(said("", ToolCallRecord("f", {"xs": [1, 2], "opts": {"a": "x"}, "flag": True}))).passed
    assert not check.evaluate(said("", ToolCallRecord("f", {"xs": [1, 2, 3], "opts": {"a": "x"}, "flag": 1}))).passed


def test_a_dict_argument_in_bfcls_form_lists_each_fields_accepted_values() -> None:
    # BFCL simple_python_94: update_info's possible answers are per field; "" lets a field be left out.
    check = ToolCalled("f", {"info": ({"name": ["John Doe"], "email": ["johndoe@email.com", ""]},)})

    def passes(info: dict) -> bool:
        return check.evaluate(said("", ToolCallRecord("f", {"info": info}))).passed

    assert passes({"name": "John Doe", "email": "johndoe@email.com"})
    assert passes({"name": "john doe"})  # the optional field left out, the string normalized
    assert not passes({"email": "johndoe@email.com"})  # the required field missing
    assert not passes({"name": "Jane Doe", "email": "johndoe@email.com"})
    assert not passes({"name": "John Doe", "phone": "1"})  # a field BFCL does not list
    assert passes({"name": ["John Doe"], "email": ["johndoe@email.com", ""]})  # the literal value still matches


@pytest.mark.parametrize(
    ("answer", "passed"),
    [
        ("I could not find the answer.", True),
        ("I couldn't find a country named Zorvania.", True),
        ("There is no such country.", True),
        ("我找不到答案。", True),
        ("The capital of Zorvania is Zorvo.", False),
    ],
)
def test_unanswerable_passes_only_when_the_answer_admits_it(answer: str, passed: bool) -> None:
    assert Unanswerable().evaluate(said(answer)).passed is passed


@pytest.mark.parametrize(
    "check",
    [
        Contains(("Paris", "Paname")),
        Exact("Paris"),
        Numeric(975.0, 0.5),
        ToolCalled("bfcl.f", {"a": (1, "")}),
        Unanswerable(),
    ],
)
def test_every_check_reads_back_its_json_form(check) -> None:
    assert parse_check(check.to_json()) == check


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("contains Paris", "a check is an object such as"),
        ({"type": "contains", "values": []}, 'a contains check needs "values"'),
        ({"type": "contains", "values": ["", "x"]}, 'a contains check needs "values"'),
        ({"type": "exact"}, 'an exact check needs "value"'),
        ({"type": "numeric", "value": "3"}, 'a numeric check needs "value": a number'),
        ({"type": "numeric", "value": 3, "tolerance": -1}, "a number >= 0"),
        ({"type": "numeric", "value": float("nan")}, 'a numeric check needs "value": a number'),
        ({"type": "tool_call"}, 'a tool_call check needs "tool"'),
        ({"type": "tool_call", "tool": "f", "arguments": {"a": 1}}, "maps each argument to a list"),
        ({"type": "regex" + "x" * 10_000}, "is not one of: contains, exact, numeric, tool_call, unanswerable"),
    ],
)
def test_a_bad_check_says_what_to_write(value, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_check(value)
    assert message in str(raised.value)
    assert len(str(raised.value)) < 300


@pytest.mark.parametrize(
    ("error", "rejected"),
    [
        ("unknown tool 'nope'; available tools: calculator", True),
        ("invalid arguments for tool 'country_facts': $: 'name' is a required property", True),
        ("tool 'python' is not one of this agent's tools: country_facts", True),
        ("no country named 'Zorvania'", False),
        ("", False),
    ],
)
def test_a_call_refused_before_it_ran_is_told_from_a_tool_that_failed(error: str, rejected: bool) -> None:
    assert is_rejection(error) is rejected
