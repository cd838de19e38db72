"""The python tool: runs a short program the agent wrote in the tool sandbox and returns what it printed."""

from __future__ import annotations

import logging
from typing import Any

from services.tools.registry import Tool, ToolFailure
from services.tools.sandbox import SandboxUnavailableError, ToolSandbox

log = logging.getLogger(__name__)

MAX_CODE_CHARS = 20_000
MAX_STDIN_CHARS = 100_000
# The registry's limit sits above the sandbox's own deadline, so a slow program comes back as a result with
# timed_out=true (and its output so far) rather than as a bare timeout error.
_REGISTRY_GRACE_SECONDS = 5.0


def python_tool(sandbox: ToolSandbox) -> Tool:
    """The ``python`` tool running programs in ``sandbox`` (which the caller has probed)."""

    async def handler(arguments: dict[str, Any]) -> dict[str, Any]:
        try:
            result = await sandbox.run(arguments["code"], arguments.get("stdin", ""))
        except SandboxUnavailableError as e:
            raise ToolFailure(str(e)) from e
        return {
            "stdout": result.stdout,
            "stderr": result.stderr,
            "exit_code": result.exit_code,
            "timed_out": result.timed_out,
            "truncated": result.truncated,
        }

    return Tool(
        name="python",
        description=(
            "Run a short Python 3 program (standard library only, no network, no files kept between calls) and "
            "return its stdout, stderr and exit code. Print what you want to see. "
            'Example: {"code": "print(sum(range(10)))"}.'
        ),
        input_schema={
            "type": "object",
            "properties": {
                "code": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_CODE_CHARS,
                    "description": "The program's source.",
                },
                "stdin": {
                    "type": "string",
                    "maxLength": MAX_STDIN_CHARS,
                    "description": "Text given to the program on standard input; empty by default.",
                },
            },
            "required": ["code"],
            "additionalProperties": False,
        },
        handler=handler,
        timeout_seconds=sandbox.limits.timeout_seconds + _REGISTRY_GRACE_SECONDS,
    )


def sandboxed_python_tool(sandbox: ToolSandbox) -> Tool | None:
    """The python tool when ``sandbox`` passes its probe; None (and a warning saying why) when it does not, so code
    is never run unsandboxed."""
    probe = sandbox.probe()
    if not probe.ok:
        log.warning("the python tool is not offered: %s", probe.reason)
        return None
    return python_tool(sandbox)
