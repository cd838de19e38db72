"""The append_note tool: one fsynced line per call with its number, arguments checked, failures as observations."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.common import InvalidArgumentError
from services.tools import ToolErrorKind, ToolRegistry
from services.tools.builtin.notes import append_note_tool


def registry(notes_dir: Path) -> ToolRegistry:
    registry = ToolRegistry()
    registry.register(append_note_tool(notes_dir))
    return registry


async def test_appends_numbered_lines_to_the_default_and_named_notebooks(tmp_path: Path) -> None:
    tools = registry(tmp_path / "notes")
    first = await tools.execute("append_note", {"text": "buy milk"})
    second = await tools.execute("append_note", {"text": "call\nmum\r\nat 5\rpm"})
    other = await tools.execute("append_note", {"notebook": "work-2_x", "text": "ship it"})
    assert first.result == {"notebook": "notes", "line": 1, "text": "buy milk"}
    assert second.result == {"notebook": "notes", "line": 2, "text": "call mum at 5 pm"}
    assert other.result == {"notebook": "work-2_x", "line": 1, "text": "ship it"}
    assert (tmp_path / "notes" / "notes.txt").read_text() == "buy milk\ncall mum at 5 pm\n"
    assert (tmp_path / "notes" / "work-2_x.txt").read_text() == "ship it\n"


async def test_concurrent_appends_get_distinct_line_numbers(tmp_path: Path) -> None:
    tools = registry(tmp_path)
    outcomes = await asyncio.gather(*(tools.execute("append_note", {"text": f"line {i}"}) for i in range(20)))
    assert sorted(o.result["line"] for o in outcomes) == list(range(1, 21))
    lines = (tmp_path / "notes.txt").read_text().splitlines()
    assert all(lines[o.result["line"] - 1] == o.result["text"] for o in outcomes)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "arguments: 'text' is a required property"),
        ({"text": ""}, "arguments.text: '' should be non-empty"),
        ({"text": "x" * 501}, "arguments.text: 'xxxxxxxxxxxxxxxx"),
        ({"text": "hi", "notebook": "Notes"}, "arguments.notebook: 'Notes' does not match"),
        ({"text": "hi", "notebook": "../etc"}, "arguments.notebook: '../etc' does not match"),
        ({"text": "hi", "notebook": "n" * 41}, "arguments.notebook: 'nnnnnnnn"),
        ({"text": "hi", "extra": 1}, "Additional properties are not allowed ('extra' was unexpected)"),
    ],
)
async def test_arguments_are_validated_before_writing(tmp_path: Path, arguments: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match="invalid arguments for tool 'append_note'") as caught:
        await registry(tmp_path).execute("append_note", arguments)
    assert message in str(caught.value)
    assert list(tmp_path.iterdir()) == []


async def test_notebook_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    # The schema's "$" lets "notes\n" through (Python's re); the tool itself must not make "notes\n.txt".
    outcome = await registry(tmp_path).execute("append_note", {"text": "hi", "notebook": "notes\n"})
    assert outcome.error is not None
    assert outcome.error.kind == ToolErrorKind.FAILED
    assert outcome.error.message == "notebook 'notes\\n' must be 1-40 lowercase letters, digits, '_' or '-'"
    assert list(tmp_path.iterdir()) == []


async def test_unwritable_notes_directory_is_an_error_observation(tmp_path: Path) -> None:
    blocker = tmp_path / "notes"
    blocker.write_text("a file where the directory should be")
    outcome = await registry(blocker).execute("append_note", {"text": "hi"})
    assert outcome.error is not None
    assert outcome.error.message.startswith("could not append to notebook 'notes': ")
