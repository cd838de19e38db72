"""JSON values as they come out of protobuf: Struct carries every number as a double, so 3 arrives as 3.0."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

# Beyond 2**53 an integral double no longer stands for exactly one integer.
_EXACT_INT_LIMIT = 2**53


def plain_numbers(value: Any) -> Any:
    """``value`` with integral floats (within ±2**53) turned back into ints, recursively: JSON does not tell 3 from
    3.0, but "integer" schemas, handlers that index or count, and people reading the output do."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT_INT_LIMIT:
        return int(value)
    if isinstance(value, dict):
        return {key: plain_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_numbers(item) for item in value]
    return value


def message_to_json(message: Message) -> Any:
    """A Struct, Value or ListValue (or any message) as plain JSON, whole numbers as ints."""
    return plain_numbers(json_format.MessageToDict(message))
