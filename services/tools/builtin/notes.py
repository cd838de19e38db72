"""The append_note tool: appends one line to a notebook file; a tool with an effect, to approve and count."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from pathlib import Path
from typing import Any

from services.tools.registry import Tool, ToolFailure

NOTEBOOK_PATTERN = r"^[a-z0-9_-]{1,40}$"
# The schema's pattern is searched with Python's re, where "$" also matches before a final "\n"; fullmatch is exact.
_NOTEBOOK = re.compile(NOTEBOOK_PATTERN)
MAX_TEXT_CHARS = 500
_LINE_BREAK = re.compile(r"\r\n|[\r\n]")


def append_note(notes_dir: Path, notebook: str, text: str) -> dict[str, Any]:
    """Appends ``text`` (line breaks made spaces) as one line of ``<notes_dir>/<notebook>.txt`` and fsyncs it.

    Returns the notebook, the line's number (1-based) and the line. Raises ToolFailure for a notebook name that is
    not a plain file name or when the file cannot be written. Not safe to call concurrently for one notebook (the
    tool serialises its calls).
    """
    if not _NOTEBOOK.fullmatch(notebook):
        raise ToolFailure(f"notebook {notebook!r} must be 1-40 lowercase letters, digits, '_' or '-'")
    line = _LINE_BREAK.sub(" ", text)
    path = notes_dir / f"{notebook}.txt"
    try:
        created = not path.exists()
        notes_dir.mkdir(parents=True, exist_ok=True)
        with path.open("a+b") as f:
            f.seek(0)
            number = f.read().count(b"\n") + 1
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if created:
            # A new file's name lives in the directory: fsync it too, or a crash could lose the whole notebook.
            directory = os.open(notes_dir, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
    except OSError as e:
        raise ToolFailure(f"could not append to notebook {notebook!r}: {e.strerror or e}") from e
    return {"notebook": notebook, "line": number, "text": line}


def append_note_tool(notes_dir: Path) -> Tool:
    """The ``append_note`` tool, writing notebooks under ``notes_dir`` (created on first use)."""
    # Counting lines and appending must not interleave between two calls, or both would report the same number.
    lock = threading.Lock()

    def locked_append(notebook: str, text: str) -> dict[str, Any]:
        with lock:
            return append_note(notes_dir, notebook, text)

    async def handler(arguments: dict[str, Any]) -> dict[str, Any]:
        # In a thread: the fsync takes milliseconds the event loop should spend on other calls.
        return await asyncio.to_thread(locked_append, arguments.get("notebook", "notes"), arguments["text"])

    return Tool(
        name="append_note",
        description=(
            "Append one line of text to a notebook (a file kept by the tools service) and return its line number. "
            'Example: {"notebook": "groceries", "text": "buy milk"}; the default notebook is "notes".'
        ),
        input_schema={
            "type": "object",
            "properties": {
                "notebook": {
                    "type": "string",
                    "pattern": NOTEBOOK_PATTERN,
                    "default": "notes",
                    "description": "Notebook name: 1-40 lowercase letters, digits, '_' or '-'; default 'notes'.",
                },
                "text": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_TEXT_CHARS,
                    "description": "The line to append; line breaks become spaces.",
                },
            },
            "required": ["text"],
            "additionalProperties": False,
        },
        handler=handler,
        timeout_seconds=5.0,
    )
