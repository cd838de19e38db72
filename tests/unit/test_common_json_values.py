"""Numbers out of protobuf Structs: whole doubles back to ints, within the range a double holds exactly."""

from google.protobuf import struct_pb2

from services.common.json_values import message_to_json, plain_numbers


def test_whole_doubles_become_ints_recursively_and_others_stay() -> None:
    assert plain_numbers({"a": 3.0, "b": [1.0, 2.5, {"c": -0.0}], "d": "4.0", "e": True}) == {
        "a": 3,
        "b": [1, 2.5, {"c": 0}],
        "d": "4.0",
        "e": True,
    }
    big = float(2**60)
    assert plain_numbers(big) == big and isinstance(plain_numbers(big), float)


def test_a_struct_comes_back_as_plain_json() -> None:
    struct = struct_pb2.Struct()
    struct.update({"line": 1, "text": "call the plumber", "nested": {"n": [2, 3.5]}})

    assert message_to_json(struct) == {"line": 1, "text": "call the plumber", "nested": {"n": [2, 3.5]}}
