"""The calculator tool: arithmetic evaluated by walking a whitelisted Python AST (never eval/exec), with size limits."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from services.tools.registry import Tool, ToolFailure

MAX_EXPRESSION_CHARS = 500
# Below sys.int_info.default_max_str_digits (4300 digits), so every integer we produce can be printed.
MAX_INT_BITS = 10_000
# Integers beyond this lose digits as a JSON/protobuf double, so they are returned as strings of digits.
_EXACT_INT_LIMIT = 2**53
_MAX_ROUND_DIGITS = 100

Number = int | float

CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _round(x: Number, digits: Number = 0) -> Number:
    if not isinstance(digits, int) or abs(digits) > _MAX_ROUND_DIGITS:
        raise ToolFailure(f"round: digits must be an integer between -{_MAX_ROUND_DIGITS} and {_MAX_ROUND_DIGITS}")
    return round(x, digits) if digits else round(x)


def _log(x: Number, base: Number | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    # name: (function, fewest arguments, most arguments)
    "sqrt": (math.sqrt, 1, 1),
    "log": (_log, 1, 2),
    "log10": (math.log10, 1, 1),
    "log2": (math.log2, 1, 1),
    "exp": (math.exp, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (min, 2, 64),
    "max": (max, 2, 64),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
}

_OPERATOR_SYMBOLS: dict[type[ast.AST], str] = {
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.MatMult: "@",
    ast.Invert: "~",
    ast.Not: "not",
}


def _too_large() -> ToolFailure:
    return ToolFailure(f"the result is too large (more than {MAX_INT_BITS} bits); use smaller numbers")


def _check(value: Number) -> Number:
    if isinstance(value, complex):
        raise ToolFailure("the result is a complex number; only real arithmetic is supported")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolFailure("the result is not a finite number (it overflowed); use smaller numbers")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _too_large()
    return value


def _power(base: Number, exponent: Number) -> Number:
    # Refuse before computing: 9**9**9 would take minutes and gigabytes.
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and abs(base) > 1
        and exponent * math.log2(abs(base)) > MAX_INT_BITS
    ):
        raise _too_large()
    return operator.pow(base, exponent)


def _multiply(a: Number, b: Number) -> Number:
    if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
        raise _too_large()
    return operator.mul(a, b)


_BINARY: dict[type[ast.AST], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: _multiply,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}
_UNARY: dict[type[ast.AST], Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant):
        # type() rather than isinstance: True and False are ints to isinstance.
        if type(node.value) is int or type(node.value) is float:
            return _check(node.value)
        raise ToolFailure(f"{node.value!r} is not a number; the calculator works on numbers only")
    if isinstance(node, ast.BinOp):
        binary = _BINARY.get(type(node.op))
        if binary is None:
            raise _unsupported_operator(node.op)
        return _check(binary(_evaluate(node.left), _evaluate(node.right)))
    if isinstance(node, ast.UnaryOp):
        unary = _UNARY.get(type(node.op))
        if unary is None:
            raise _unsupported_operator(node.op)
        return _check(unary(_evaluate(node.operand)))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        if node.id in FUNCTIONS:
            raise ToolFailure(f"{node.id} is a function; call it with parentheses, e.g. {node.id}(2)")
        raise ToolFailure(f"unknown name {node.id!r}; the constants are {', '.join(CONSTANTS)}")
    if isinstance(node, ast.Call):
        return _check(_call(node))
    if isinstance(node, ast.Attribute):
        raise ToolFailure("attribute access (a.b) is not allowed; write a plain arithmetic expression")
    raise ToolFailure(f"{type(node).__name__} is not allowed; use numbers, + - * / // % **, parentheses and functions")


def _call(node: ast.Call) -> Number:
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
        called = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
        raise ToolFailure(f"unknown function {called!r}; the functions are {', '.join(FUNCTIONS)}")
    name = node.func.id
    function, fewest, most = FUNCTIONS[name]
    if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
        raise ToolFailure(f"{name}: pass plain positional arguments, e.g. {name}(2)")
    if not fewest <= len(node.args) <= most:
        expected = str(fewest) if fewest == most else f"{fewest} to {most}"
        raise ToolFailure(f"{name} takes {expected} argument(s), got {len(node.args)}")
    args = [_evaluate(arg) for arg in node.args]
    try:
        return function(*args)
    except ValueError as e:
        raise ToolFailure(f"{name}({', '.join(map(repr, args))}): {e}") from e
    except OverflowError as e:
        raise ToolFailure(f"{name}: the result is too large ({e})") from e


def _unsupported_operator(op: ast.AST) -> ToolFailure:
    symbol = _OPERATOR_SYMBOLS.get(type(op), type(op).__name__)
    hint = "; use ** for powers" if symbol == "^" else ""
    return ToolFailure(f"the operator {symbol!r} is not supported{hint}")


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression; ToolFailure saying what is wrong for anything else.

    Accepts numbers, + - * / // % ** (Python precedence), unary + and -, parentheses, the functions in FUNCTIONS and
    the constants in CONSTANTS. Names, attributes, calls to anything else, strings, comparisons, lambdas and
    comprehensions are refused; integers beyond MAX_INT_BITS and non-finite floats are refused before they grow.
    """
    text = expression.strip().removesuffix("=").strip().replace("×", "*").replace("÷", "/")
    if not text:
        raise ToolFailure("the expression is empty; pass e.g. '2 * (3 + 4)'")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolFailure(f"the expression is {len(text)} characters long; the limit is {MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ToolFailure(
            f"cannot parse {text!r}: {e.msg}; write an arithmetic expression such as '2 * (3 + 4)'"
        ) from e
    except (ValueError, RecursionError, MemoryError) as e:
        raise ToolFailure(f"cannot parse {text!r}: the expression is malformed or nested too deeply") from e
    try:
        return _evaluate(tree.body)
    except ZeroDivisionError as e:
        raise ToolFailure(f"division by zero in {text!r}") from e
    except OverflowError as e:
        raise ToolFailure(f"the result is too large ({e}); use smaller numbers") from e
    except RecursionError as e:
        raise ToolFailure("the expression is nested too deeply") from e


def _presentable(value: Number) -> Number | str:
    if isinstance(value, int):
        return value if abs(value) <= _EXACT_INT_LIMIT else str(value)
    # 15 significant digits hide binary noise (0.1 + 0.2 -> 0.3) that a small model would copy into its answer.
    return float(f"{value:.15g}")


async def _calculate(arguments: dict[str, Any]) -> dict[str, Any]:
    return {"result": _presentable(evaluate(arguments["expression"]))}


def calculator_tool() -> Tool:
    """The ``calculator`` tool: {"expression": "2 * (3 + 4)"} -> {"result": 14}."""
    return Tool(
        name="calculator",
        description=(
            "Evaluate an arithmetic expression and return the number. Supports + - * / // % ** and parentheses, "
            f'functions {", ".join(FUNCTIONS)} and constants pi, e. Example: {{"expression": "2 * (3 + 4)"}}'
        ),
        input_schema={
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_EXPRESSION_CHARS,
                    "description": "The arithmetic expression, e.g. 'sqrt(16) + 2**10'.",
                }
            },
            "required": ["expression"],
            "additionalProperties": False,
        },
        handler=_calculate,
        timeout_seconds=5.0,
        idempotent=True,  # no side effects: safe to run again
    )
