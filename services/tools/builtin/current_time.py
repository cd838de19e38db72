"""The current_time tool: the time now in an IANA time zone (UTC by default)."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from services.tools.registry import Tool, ToolFailure

Clock = Callable[[], datetime]


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


@functools.cache
def _zone_index() -> tuple[dict[str, str], dict[str, list[str]]]:
    """Zones by lowercase full name, and by lowercase last component ("tokyo" -> ["Asia/Tokyo"])."""
    names: dict[str, str] = {}
    cities: dict[str, list[str]] = {}
    for zone in sorted(available_timezones()):
        names[_key(zone)] = zone
        cities.setdefault(_key(zone.rsplit("/", 1)[-1]), []).append(zone)
    return names, cities


def resolve_zone(name: str) -> ZoneInfo:
    """The zone named ``name``: an IANA name such as "Europe/Paris" (any case), or a city naming exactly one zone.

    Raises ToolFailure naming the problem and the closest zone names.
    """
    name = name.strip()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        pass
    names, cities = _zone_index()
    if _key(name) in names:
        return ZoneInfo(names[_key(name)])
    by_city = cities.get(_key(name), [])
    if len(by_city) == 1:
        return ZoneInfo(by_city[0])
    candidates = by_city or difflib.get_close_matches(name, sorted(available_timezones()), n=3, cutoff=0.6)
    if not candidates:
        close_cities = difflib.get_close_matches(_key(name), list(cities), n=3, cutoff=0.7)
        candidates = [zone for city in close_cities for zone in cities[city]][:3]
    hint = f"; did you mean {', '.join(candidates)}?" if candidates else ""
    raise ToolFailure(
        f"unknown time zone {name!r}: use an IANA name such as 'Europe/Paris' or 'America/New_York'{hint}"
    )


def current_time(timezone: str = "UTC", clock: Clock = lambda: datetime.now(UTC)) -> dict[str, Any]:
    """The time now in ``timezone``: ISO 8601 time (seconds precision), weekday, zone name and UTC offset."""
    zone = resolve_zone(timezone)
    now = clock().astimezone(zone).replace(microsecond=0)
    offset = now.isoformat()[19:] or "+00:00"
    return {
        "time": now.isoformat(),
        "weekday": now.strftime("%A"),
        "timezone": zone.key,
        "utc_offset": offset,
    }


def current_time_tool(clock: Clock = lambda: datetime.now(UTC)) -> Tool:
    """The ``current_time`` tool; ``clock`` (an aware datetime) is injectable for tests."""

    async def handler(arguments: dict[str, Any]) -> dict[str, Any]:
        return current_time(arguments.get("timezone", "UTC"), clock)

    return Tool(
        name="current_time",
        description=(
            "Get the current date and time in a time zone. Returns ISO 8601 time, weekday and UTC offset. "
            'Example: {"timezone": "Europe/Paris"}; without a timezone it answers in UTC.'
        ),
        input_schema={
            "type": "object",
            "properties": {
                "timezone": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 64,
                    "description": "IANA time zone such as 'Asia/Tokyo' or 'America/New_York'; default UTC.",
                }
            },
            "additionalProperties": False,
        },
        handler=handler,
        timeout_seconds=2.0,
        idempotent=True,  # no side effects: safe to run again
    )
