"""current_time: the time in an IANA zone from an injected clock; unknown zones are error observations."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.common import InvalidArgumentError
from services.tools import ToolErrorKind, ToolRegistry
from services.tools.builtin.current_time import current_time_tool

# A Monday in winter (no daylight saving in Europe or New York).
NOW = datetime(2024, 1, 15, 12, 30, 45, 123456, tzinfo=UTC)


@pytest.fixture
def registry() -> ToolRegistry:
    registry = ToolRegistry()
    registry.register(current_time_tool(clock=lambda: NOW))
    return registry


async def test_defaults_to_utc(registry: ToolRegistry) -> None:
    outcome = await registry.execute("current_time", {})
    assert outcome.result == {
        "time": "2024-01-15T12:30:45+00:00",
        "weekday": "Monday",
        "timezone": "UTC",
        "utc_offset": "+00:00",
    }


@pytest.mark.parametrize(
    ("timezone", "time", "weekday", "zone", "offset"),
    [
        ("Europe/Paris", "2024-01-15T13:30:45+01:00", "Monday", "Europe/Paris", "+01:00"),
        ("America/New_York", "2024-01-15T07:30:45-05:00", "Monday", "America/New_York", "-05:00"),
        ("Pacific/Kiritimati", "2024-01-16T02:30:45+14:00", "Tuesday", "Pacific/Kiritimati", "+14:00"),
        ("Asia/Kolkata", "2024-01-15T18:00:45+05:30", "Monday", "Asia/Kolkata", "+05:30"),
        ("europe/paris", "2024-01-15T13:30:45+01:00", "Monday", "Europe/Paris", "+01:00"),
        ("Tokyo", "2024-01-15T21:30:45+09:00", "Monday", "Asia/Tokyo", "+09:00"),
        ("New York", "2024-01-15T07:30:45-05:00", "Monday", "America/New_York", "-05:00"),
    ],
)
async def test_time_in_zone(
    registry: ToolRegistry, timezone: str, time: str, weekday: str, zone: str, offset: str
) -> None:
    outcome = await registry.execute("current_time", {"timezone": timezone})
    assert outcome.result == {"time": time, "weekday": weekday, "timezone": zone, "utc_offset": offset}


@pytest.mark.parametrize(
    ("timezone", "hint"),
    [
        ("Mars/Olympus_Mons", ""),
        ("../../etc/passwd", ""),
        ("Europe/Pari", "; did you mean Europe/Paris"),
        ("Londn", "; did you mean Europe/London"),
    ],
)
async def test_unknown_zone_is_an_error_observation(registry: ToolRegistry, timezone: str, hint: str) -> None:
    outcome = await registry.execute("current_time", {"timezone": timezone})
    assert outcome.result is None
    assert outcome.error is not None
    assert outcome.error.kind is ToolErrorKind.FAILED
    assert outcome.error.message.startswith(
        f"unknown time zone {timezone!r}: use an IANA name such as 'Europe/Paris' or 'America/New_York'{hint}"
    )


async def test_schema_refuses_non_string_zone(registry: ToolRegistry) -> None:
    with pytest.raises(InvalidArgumentError, match=r"arguments\.timezone: 1 is not of type 'string'"):
        await registry.execute("current_time", {"timezone": 1})
