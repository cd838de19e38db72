"""The built-in tools: calculator, current_time and the knowledge-graph tools."""

from services.tools.builtin.calculator import calculator_tool
from services.tools.builtin.country_facts import country_facts_tool
from services.tools.builtin.current_time import current_time_tool
from services.tools.builtin.entity_facts import entity_facts_tool
from services.tools.builtin.knowledge import KnowledgeClient
from services.tools.builtin.sparql_query import sparql_query_tool
from services.tools.registry import Tool


def builtin_tools(knowledge: KnowledgeClient | None) -> list[Tool]:
    """Every built-in tool; the knowledge-graph ones only when a knowledge client is given."""
    tools = [calculator_tool(), current_time_tool()]
    if knowledge is not None:
        tools += [country_facts_tool(knowledge), entity_facts_tool(knowledge), sparql_query_tool(knowledge)]
    return tools


__all__ = [
    "KnowledgeClient",
    "builtin_tools",
    "calculator_tool",
    "country_facts_tool",
    "current_time_tool",
    "entity_facts_tool",
    "sparql_query_tool",
]
