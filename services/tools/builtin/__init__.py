"""The built-in tools: calculator, current_time, the knowledge-graph tools, append_note and python."""

from pathlib import Path

from services.tools.builtin.calculator import calculator_tool
from services.tools.builtin.country_facts import country_facts_tool
from services.tools.builtin.current_time import current_time_tool
from services.tools.builtin.entity_facts import entity_facts_tool
from services.tools.builtin.knowledge import KnowledgeClient
from services.tools.builtin.notes import append_note_tool
from services.tools.builtin.python_tool import python_tool, sandboxed_python_tool
from services.tools.builtin.sparql_query import sparql_query_tool
from services.tools.registry import Tool
from services.tools.sandbox import ToolSandbox


def builtin_tools(
    knowledge: KnowledgeClient | None, notes_dir: Path | None = None, sandbox: ToolSandbox | None = None
) -> list[Tool]:
    """Every built-in tool; the knowledge-graph ones only when a knowledge client is given, append_note (writing
    notebooks under ``notes_dir``) only when a directory is, python only when a sandbox is and passes its probe."""
    tools = [calculator_tool(), current_time_tool()]
    if knowledge is not None:
        tools += [country_facts_tool(knowledge), entity_facts_tool(knowledge), sparql_query_tool(knowledge)]
    if notes_dir is not None:
        tools.append(append_note_tool(notes_dir))
    if sandbox is not None and (python := sandboxed_python_tool(sandbox)) is not None:
        tools.append(python)
    return tools


__all__ = [
    "KnowledgeClient",
    "append_note_tool",
    "builtin_tools",
    "calculator_tool",
    "country_facts_tool",
    "current_time_tool",
    "entity_facts_tool",
    "python_tool",
    "sandboxed_python_tool",
    "sparql_query_tool",
]
