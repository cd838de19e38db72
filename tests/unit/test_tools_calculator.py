"""The calculator: correct arithmetic, and refusal of everything that is not arithmetic or would exhaust the machine."""

from __future__ import annotations

import math
from typing import Any

import pytest

from services.common import InvalidArgumentError
from services.tools import ToolErrorKind, ToolFailure, ToolRegistry
from services.tools.builtin.calculator import MAX_EXPRESSION_CHARS, calculator_tool, evaluate


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2 + 3 * 4", 14),
        ("(2 + 3) * 4", 20),
        ("2 ** 3 ** 2", 512),
        ("-2 ** 2", -4),
        ("(-2) ** 2", 4),
        ("7 / 2", 3.5),
        ("6 / 3", 2.0),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("-7 % 3", 2),
        ("2 ** -1", 0.5),
        ("+5 - -3", 8),
        ("1e3 + 1", 1001.0),
        ("sqrt(16)", 4.0),
        ("log(8, 2)", 3.0),
        ("log(e)", 1.0),
        ("exp(0)", 1.0),
        ("abs(-3)", 3),
        ("round(3.14159, 2)", 3.14),
        ("round(2.5)", 2),
        ("min(3, 1, 2)", 1),
        ("max(3, 1, 2.5)", 3),
        ("floor(2.7) + ceil(2.1)", 5),
        ("sin(0) + cos(0)", 1.0),
        ("2 × 3 ÷ 4", 1.5),
        ("12 * 12 =", 144),
    ],
)
def test_evaluates_arithmetic(expression: str, expected: float) -> None:
    value = evaluate(expression)
    assert value == expected
    assert type(value) is type(expected)


def test_constants() -> None:
    assert evaluate("pi") == math.pi
    assert evaluate("2 * pi") == math.tau
    assert evaluate("e") == math.e


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "unknown function '__import__'; the functions are sqrt, log"),
        ("__import__('os').system('ls')", "unknown function \"__import__('os').system\""),
        ("os.system('ls')", "unknown function 'os.system'"),
        ("(1).real", "attribute access (a.b) is not allowed"),
        ("().__class__.__bases__[0]", "Subscript is not allowed"),
        ("().__class__", "attribute access"),
        ("lambda: 1", "Lambda is not allowed"),
        ("[x for x in (1, 2)]", "ListComp is not allowed"),
        ("(x for x in (1,))", "GeneratorExp is not allowed"),
        ("{1: 2}", "Dict is not allowed"),
        ("[1, 2][0]", "Subscript is not allowed"),
        ("'a' * 10", "'a' is not a number"),
        ("True + 1", "True is not a number"),
        ("1j * 1j", "1j is not a number"),
        ("x + 1", "unknown name 'x'; the constants are pi, e, tau"),
        ("sqrt", "sqrt is a function; call it with parentheses"),
        ("1 < 2", "Compare is not allowed"),
        ("1 if 1 else 2", "IfExp is not allowed"),
        ("2 ^ 3", "the operator '^' is not supported; use ** for powers"),
        ("1 << 100000", "the operator '<<' is not supported"),
        ("~1", "the operator '~' is not supported"),
        ("(y := 3)", "NamedExpr is not allowed"),
        ("f'{1}'", "JoinedStr is not allowed"),
        ("round(1.5, ndigits=1)", "round: pass plain positional arguments"),
        ("max(*[1, 2])", "max: pass plain positional arguments"),
        ("max(1)", "max takes 2 to 64 argument(s), got 1"),
        ("sqrt(1, 2)", "sqrt takes 1 argument(s), got 2"),
        ("round(1.5, 1000)", "round: digits must be an integer between -100 and 100"),
    ],
)
def test_refuses_what_is_not_arithmetic(expression: str, message: str) -> None:
    with pytest.raises(ToolFailure) as caught:
        evaluate(expression)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("9**9**9", "the result is too large (more than 10000 bits)"),
        ("10**4000", "the result is too large"),
        ("(-3)**100000", "the result is too large"),
        ("2**9999 * 2**9999", "the result is too large"),
        ("1e308 * 10", "not a finite number"),
        ("1e999", "not a finite number"),
        ("10.0 ** 400", "the result is too large"),
        ("exp(1000)", "exp: the result is too large"),
        ("2**5000 / 3", "the result is too large"),
    ],
)
def test_refuses_huge_numbers_before_computing_them(expression: str, message: str) -> None:
    with pytest.raises(ToolFailure) as caught:
        evaluate(expression)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("1 / 0", "division by zero in '1 / 0'"),
        ("5 // 0", "division by zero"),
        ("5 % 0.0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("2 +", "cannot parse '2 +': invalid syntax; write an arithmetic expression such as"),
        ("(1 + 2", "cannot parse"),
        ("", "the expression is empty"),
        ("sqrt(-1)", "sqrt(-1): math domain error"),
        ("log(0)", "log(0): math domain error"),
        ("(-8) ** (1/3)", "the result is a complex number"),
        ("1" + "+1" * MAX_EXPRESSION_CHARS, f"the limit is {MAX_EXPRESSION_CHARS}"),
    ],
)
def test_errors_say_what_is_wrong(expression: str, message: str) -> None:
    with pytest.raises(ToolFailure) as caught:
        evaluate(expression)
    assert message in str(caught.value)


def test_deep_but_short_nesting_is_evaluated() -> None:
    assert evaluate("-" * 300 + "1") == 1
    assert evaluate("(" * 50 + "1" + ")" * 50) == 1


@pytest.fixture
def registry() -> ToolRegistry:
    registry = ToolRegistry()
    registry.register(calculator_tool())
    return registry


@pytest.mark.parametrize(
    ("expression", "result"),
    [
        ("2 * (3 + 4)", 14),
        ("0.1 + 0.2", 0.3),
        ("2 ** 53", 2**53),
        ("2 ** 100", "1267650600228229401496703205376"),
        ("-(2 ** 60)", str(-(2**60))),
    ],
)
async def test_tool_result_is_compact_and_exact(registry: ToolRegistry, expression: str, result: Any) -> None:
    outcome = await registry.execute("calculator", {"expression": expression})
    assert outcome.error is None
    assert outcome.result == {"result": result}


async def test_tool_errors_are_observations(registry: ToolRegistry) -> None:
    outcome = await registry.execute("calculator", {"expression": "__import__('os')"})
    assert outcome.error is not None
    assert outcome.error.kind is ToolErrorKind.FAILED
    assert "unknown function '__import__'" in outcome.error.message
    outcome = await registry.execute("calculator", {"expression": "9**9**9"})
    assert outcome.error is not None
    assert "too large" in outcome.error.message


async def test_tool_schema_refuses_non_strings_and_long_input(registry: ToolRegistry) -> None:
    with pytest.raises(InvalidArgumentError, match=r"arguments\.expression: 3 is not of type 'string'"):
        await registry.execute("calculator", {"expression": 3})
    with pytest.raises(InvalidArgumentError, match=r"arguments\.expression: .* is too long"):
        await registry.execute("calculator", {"expression": "1" * (MAX_EXPRESSION_CHARS + 1)})
