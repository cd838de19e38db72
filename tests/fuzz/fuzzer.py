"""A descriptor-driven fuzzer for the mesh's gRPC services: requests built from each method's input descriptor,
mutated (oversized strings, NaN/±Infinity, extreme numbers, corrupt bytes) and sent as raw bytes."""

from __future__ import annotations

import asyncio
import math
import random
import struct
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message

import meshpilot

# A client-visible error message longer than this copies input it should not (the status travels in a header).
MAX_DETAILS_CHARS = 2000
# Streams are read this far, then cancelled: a stream that starts answering has accepted its request.
MAX_STREAM_MESSAGES = 50
STREAM_IDLE_S = 0.5
# Struct/ListValue nesting sent as raw bytes, past protobuf's recursion limit of 100.
DEEP_NESTING = 120

_INT_BOUNDS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
_NON_FINITE = (math.nan, math.inf, -math.inf)
_HOSTILE_FLOATS = (*_NON_FINITE, -0.0, 1e308, -1e308, 5e-324, 3.5e38, -1.0, 1e-9)
_HOSTILE_STRINGS = (
    "",
    " ",
    "\x00",
    "\n\r\t",
    "'; DROP TABLE runs; --",
    "../../../../etc/passwd",
    "%s%n%x{0}${jndi:x}",
    "\u202e\u0301\ufeff",
    "🎉" * 50,
    "a" * 5000,
    "<script>alert(1)</script>",
    '{"a": NaN}',
    "NaN",
    "-Infinity",
)
_DURATION_SECONDS = (0, -1, 1, 86_400, 86_401, 315_576_000_000, -315_576_000_000, 2**63 - 1, -(2**63))
_TIMESTAMP_SECONDS = (0, -1, 253_402_300_799, 253_402_300_800, -62_135_596_801, 2**63 - 1)


@dataclass(frozen=True)
class Method:
    """One RPC found in the descriptors: its path, input type and streaming kinds."""

    service: str
    name: str
    input_type: Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


def _fits(fd: FieldDescriptor, value: Any) -> bool:
    """Whether ``value`` can be set on a field like ``fd`` (a message field also takes JSON-like dicts and lists)."""
    if fd.type == FieldDescriptor.TYPE_STRING:
        return isinstance(value, str)
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return isinstance(value, bool)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return isinstance(value, int) and not isinstance(value, bool)
    if fd.type in _INT_BOUNDS:
        return isinstance(value, int) and not isinstance(value, bool)
    if fd.type in _FLOATS:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return isinstance(value, bytes)
    return isinstance(value, (Message, dict, list, str, int, float))


def discover_services(extra_modules: Sequence[ModuleType] = ()) -> list[ServiceDescriptor]:
    """Every service declared in the generated ``meshpilot/*/v1/*_pb2.py`` modules (and in ``extra_modules``, such
    as the stock health and reflection ones), sorted by full name."""
    root = Path(meshpilot.__file__).parent
    modules = [
        import_module(".".join(path.relative_to(root.parent).with_suffix("").parts))
        for path in sorted(root.glob("*/v1/*_pb2.py"))
    ]
    found = {
        service.full_name: service
        for module in (*modules, *extra_modules)
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    return [found[name] for name in sorted(found)]


def methods_of(service: ServiceDescriptor) -> list[Method]:
    return [
        Method(service.full_name, m.name, m.input_type, m.client_streaming, m.server_streaming) for m in service.methods
    ]


@dataclass(frozen=True)
class Case:
    """One request to send: its bytes and what was done to them (for reports)."""

    kind: str
    payload: bytes
    note: str


class RequestMaker:
    """Builds requests for one method from its descriptor with a seeded RNG.

    ``hints`` maps a field name (``"sparql"``) or a full field name (``"meshpilot.tools.v1.ExecuteToolRequest.name"``)
    to values a real client would send; they are used often, so the fuzz reaches past the first validation.
    """

    def __init__(self, rng: random.Random, hints: Mapping[str, Sequence[Any]] | None = None) -> None:
        self.rng = rng
        self.hints = dict(hints or {})

    # -- plausible values ---------------------------------------------------------------------------------------

    def plausible(self, descriptor: Descriptor, depth: int = 0) -> Message:
        """A message whose fields are set (or left unset) the way a client would, hints preferred."""
        proto = message_factory.GetMessageClass(descriptor)()
        if descriptor.full_name in ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"):
            self._fill_json(proto, self._json(depth))
            return proto
        if descriptor.full_name == "google.protobuf.Duration":
            proto.FromNanoseconds(self.rng.choice((0, 500_000_000, 2_000_000_000, 30_000_000_000)))
            return proto
        if descriptor.full_name == "google.protobuf.Timestamp":
            proto.FromSeconds(int(time.time()))
            return proto
        for fd in descriptor.fields:
            if self.rng.random() < 0.35:
                continue
            self._set(proto, fd, self._plausible_value(fd, depth), repeated_count=self.rng.randint(0, 3))
        return proto

    def _hint(self, fd: FieldDescriptor) -> Any | None:
        values = self.hints.get(fd.full_name)
        if not values:
            # A hint by short name fits only fields of its kind: "role" is a string in meshpilot's chat messages and
            # an enum in A2A's.
            values = [v for v in self.hints.get(fd.name, ()) if _fits(fd, v)]
        if values and self.rng.random() < 0.8:
            return self.rng.choice(list(values))
        return None

    def _plausible_value(self, fd: FieldDescriptor, depth: int) -> Any:
        hinted = self._hint(fd)
        if hinted is not None:
            return hinted
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if _is_map(fd):
                return {self._word(): self._plausible_value(fd.message_type.fields_by_name["value"], depth + 1)}
            return self.plausible(fd.message_type, depth + 1) if depth < 4 else None
        if fd.type == FieldDescriptor.TYPE_ENUM:
            return self.rng.choice(fd.enum_type.values).number
        if fd.type in _INT_BOUNDS:
            low, high = _INT_BOUNDS[fd.type]
            return self.rng.randint(max(low, 0), min(high, 20))
        if fd.type in _FLOATS:
            return round(self.rng.uniform(0, 2), 3)
        if fd.type == FieldDescriptor.TYPE_BOOL:
            return self.rng.random() < 0.5
        if fd.type == FieldDescriptor.TYPE_BYTES:
            return self.rng.randbytes(self.rng.randint(0, 16))
        return self._word()

    def _word(self) -> str:
        return "".join(self.rng.choices("abcdefghijklmnopqrstuvwxyz-_0123456789", k=self.rng.randint(1, 12)))

    def _json(self, depth: int) -> Any:
        roll = self.rng.random()
        if depth > 2 or roll < 0.5:
            return self.rng.choice((self._word(), self.rng.randint(-5, 100), True, None, 2.5))
        if roll < 0.8:
            return {self._word(): self._json(depth + 1) for _ in range(self.rng.randint(0, 3))}
        return [self._json(depth + 1) for _ in range(self.rng.randint(0, 3))]

    # -- hostile values -----------------------------------------------------------------------------------------

    def hostile_value(self, fd: FieldDescriptor) -> tuple[Any, str]:
        """A value of the field's type that a careless server mishandles, and a short description of it."""
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            name = fd.message_type.full_name
            if _is_map(fd):
                count, key_chars = self.rng.choice(((1000, 8), (1, 100_000)))
                value = self._plausible_value(fd.message_type.fields_by_name["value"], 3)
                entries = {f"{i}".rjust(key_chars, "k"): value for i in range(count)}
                return entries, f"{count} entries, keys of {key_chars} chars"
            if name == "google.protobuf.Duration":
                seconds = self.rng.choice(_DURATION_SECONDS)
                return _wkt(fd, seconds=seconds, nanos=self.rng.choice((0, 999_999_999, -1))), f"seconds={seconds}"
            if name == "google.protobuf.Timestamp":
                seconds = self.rng.choice(_TIMESTAMP_SECONDS)
                return _wkt(fd, seconds=seconds), f"seconds={seconds}"
            if name in ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"):
                number = self.rng.choice(_NON_FINITE)
                payload = {"x": number, "nested": {"list": [1, number]}}
                proto = message_factory.GetMessageClass(fd.message_type)()
                self._fill_json(proto, payload if name == "google.protobuf.Struct" else [number])
                return proto, f"JSON holding {number}"
            return self.plausible(fd.message_type, 3), "plausible message"
        if fd.type == FieldDescriptor.TYPE_ENUM:
            number = self.rng.choice((-1, 999, 2**31 - 1, -(2**31)))
            return number, f"unknown enum number {number}"
        if fd.type in _INT_BOUNDS:
            low, high = _INT_BOUNDS[fd.type]
            number = self.rng.choice((low, high, -1 if low < 0 else high, 0, high // 2 + 1))
            return number, str(number)
        if fd.type in _FLOATS:
            number = self.rng.choice(_HOSTILE_FLOATS)
            return number, repr(number)
        if fd.type == FieldDescriptor.TYPE_BOOL:
            return True, "true"
        if fd.type == FieldDescriptor.TYPE_BYTES:
            size = self.rng.choice((0, 100_000, 1_000_000))
            return self.rng.randbytes(size), f"{size} random bytes"
        if self.rng.random() < 0.3:
            return self.oversized(), "oversized string"
        text = self.rng.choice(_HOSTILE_STRINGS)
        return text, f"string {text[:20]!r}" + ("..." if len(text) > 20 else "")

    def oversized(self) -> str:
        size = self.rng.choice((100_000, 300_000, 1_000_000))
        return self.rng.choice(("a", "é", "日", "%", "?")) * size

    # -- cases --------------------------------------------------------------------------------------------------

    def cases(self, method: Method) -> Iterator[Case]:
        """An endless stream of requests for ``method``: plausible ones, one hostile field, an oversized string,
        NaN/±Infinity, and corrupt bytes (random, bit-flipped, truncated, over-nested)."""
        kinds = ("plausible", "field", "oversized", "non_finite", "bytes")
        weights = (2, 4, 1, 1, 2)
        while True:
            kind = self.rng.choices(kinds, weights)[0]
            base = self.plausible(method.input_type)
            if kind == "plausible":
                yield Case(kind, base.SerializeToString(), "plausible")
            elif kind == "bytes":
                yield self._corrupt(base, method.input_type)
            else:
                yield self._mutated(kind, base)

    def _mutated(self, kind: str, base: Message) -> Case:
        leaves = list(_leaf_fields(base.DESCRIPTOR))
        if kind == "oversized":
            candidates = [p for p in leaves if p[-1].type == FieldDescriptor.TYPE_STRING]
        elif kind == "non_finite":
            candidates = [p for p in leaves if p[-1].type in _FLOATS or _is_json(p[-1])]
        else:
            candidates = leaves
        if not candidates:
            return Case("plausible", base.SerializeToString(), "plausible (no field to mutate)")
        path = self.rng.choice(candidates)
        fd = path[-1]
        if kind == "oversized":
            value: Any = self.oversized()
            note = f"{len(value)} chars"
        elif kind == "non_finite" and fd.type in _FLOATS:
            value = self.rng.choice(_NON_FINITE)
            note = repr(value)
        else:
            value, note = self.hostile_value(fd)
        target = base
        for parent in path[:-1]:
            target = getattr(target, parent.name)
        # A thousand copies of a small value, never of a large one (a gigabyte request tests nothing more).
        small = not isinstance(value, str | bytes) or len(value) < 1000
        self._set(target, fd, value, repeated_count=self.rng.choice((1, 1, 1000)) if small else 1)
        dotted = ".".join(p.name for p in path)
        return Case(kind, base.SerializeToString(), f"{dotted} = {note}")

    def _corrupt(self, base: Message, descriptor: Descriptor) -> Case:
        data = base.SerializeToString()
        how = self.rng.choice(("random", "flip", "truncate", "junk", "nesting", "bad_utf8"))
        if how == "random" or not data:
            payload = self.rng.randbytes(self.rng.choice((1, 7, 64, 4096)))
        elif how == "flip":
            payload = bytearray(data)
            for _ in range(self.rng.randint(1, 4)):
                payload[self.rng.randrange(len(payload))] ^= 1 << self.rng.randrange(8)
            payload = bytes(payload)
        elif how == "truncate":
            payload = data[: self.rng.randrange(len(data))]
        elif how == "junk":
            payload = data + self.rng.randbytes(self.rng.randint(1, 32))
        elif how == "nesting":
            payload = _deeply_nested(descriptor) or self.rng.randbytes(16)
        else:
            payload = _bad_utf8(descriptor) or self.rng.randbytes(16)
        return Case("bytes", bytes(payload), how)

    # -- setting fields -----------------------------------------------------------------------------------------

    def _set(self, proto: Message, fd: FieldDescriptor, value: Any, *, repeated_count: int) -> None:
        if value is None:
            return
        if _is_map(fd):
            container = getattr(proto, fd.name)
            value_fd = fd.message_type.fields_by_name["value"]
            for key, item in value.items():
                if item is None:
                    continue
                if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                    container[key].CopyFrom(item)
                else:
                    container[key] = item
            return
        if fd.is_repeated:
            container = getattr(proto, fd.name)
            for _ in range(repeated_count):
                if fd.type == FieldDescriptor.TYPE_MESSAGE:
                    container.add().CopyFrom(value)
                else:
                    container.append(value)
            return
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if isinstance(value, Message):
                getattr(proto, fd.name).CopyFrom(value)
            else:
                self._fill_json(getattr(proto, fd.name), value)
            return
        if fd.type == FieldDescriptor.TYPE_FLOAT and math.isfinite(value) and abs(value) > 3.4e38:
            value = math.copysign(math.inf, value)
        setattr(proto, fd.name, value)

    @staticmethod
    def _fill_json(proto: Message, value: Any) -> None:
        name = proto.DESCRIPTOR.full_name
        if name == "google.protobuf.Struct":
            proto.update(value if isinstance(value, dict) else {"value": value})
        elif name == "google.protobuf.ListValue":
            proto.extend(value if isinstance(value, list) else [value])
        else:
            _set_json_value(proto, value)


def _set_json_value(proto: Any, value: Any) -> None:
    if value is None:
        proto.null_value = 0
    elif isinstance(value, bool):
        proto.bool_value = value
    elif isinstance(value, int | float):
        proto.number_value = value
    elif isinstance(value, str):
        proto.string_value = value
    elif isinstance(value, dict):
        proto.struct_value.update(value)
    else:
        proto.list_value.extend(value)


def _wkt(fd: FieldDescriptor, **fields: int) -> Message:
    """A Duration or Timestamp with any int64 seconds and int32 nanos (only JSON conversion checks their range)."""
    return message_factory.GetMessageClass(fd.message_type)(**fields)


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry


def _is_json(fd: FieldDescriptor) -> bool:
    return fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.full_name in (
        "google.protobuf.Struct",
        "google.protobuf.Value",
        "google.protobuf.ListValue",
    )


_OPAQUE_MESSAGES = (
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.Duration",
    "google.protobuf.Timestamp",
)


def _leaf_fields(descriptor: Descriptor, depth: int = 0) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Paths to every field a mutation can target (well-known types and maps as a whole; no repeated parents)."""
    for fd in descriptor.fields:
        nested = (
            fd.type == FieldDescriptor.TYPE_MESSAGE
            and not _is_map(fd)
            and fd.message_type.full_name not in _OPAQUE_MESSAGES
            and not fd.is_repeated
        )
        if nested and depth < 3:
            for path in _leaf_fields(fd.message_type, depth + 1):
                yield (fd, *path)
        elif not nested:
            yield (fd,)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _length_delimited(number: int, data: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(data)) + data


def _deeply_nested(descriptor: Descriptor) -> bytes | None:
    """The request with a Struct/Value/ListValue field nested DEEP_NESTING levels (past the parser's limit), or with
    a self-recursive message nested as deep; None when the type has no such field."""
    for fd in descriptor.fields:
        if _is_json(fd) or (fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type is descriptor):
            value = b""
            for _ in range(DEEP_NESTING):
                # Value.list_value (6) -> ListValue.values (1) -> Value ...
                value = _length_delimited(1, _length_delimited(6, value))
            return _length_delimited(fd.number, value)
    return None


def _bad_utf8(descriptor: Descriptor) -> bytes | None:
    """The request with a string field holding bytes that are not UTF-8; None when it has no string field."""
    for fd in descriptor.fields:
        if fd.type == FieldDescriptor.TYPE_STRING:
            return _length_delimited(fd.number, b"\xff\xfe\xc0\x80" + struct.pack("<I", 0xDEADBEEF))
    return None


@dataclass
class Violation:
    method: str
    case: Case
    code: str
    details: str

    def __str__(self) -> str:
        return f"{self.method} [{self.case.kind}: {self.case.note}] -> {self.code}: {self.details[:300]!r}"


@dataclass
class MethodReport:
    """What one method answered: calls per status code and the calls that broke a rule."""

    method: str
    codes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    longest_details: int = 0
    seconds: float = 0.0

    @property
    def calls(self) -> int:
        return sum(self.codes.values())


def violation_of(code: grpc.StatusCode, details: str) -> str | None:
    """Why an answer breaks the rules for bad input, or None: never UNKNOWN, never INTERNAL, no unbounded messages
    (an error too large for its header comes back as RESOURCE_EXHAUSTED about metadata size)."""
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        return f"status {code.name}"
    if len(details) > MAX_DETAILS_CHARS:
        return f"error message of {len(details)} characters"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata" in details.lower():
        return "error message too large for its header"
    return None


async def call_raw(
    channel: grpc.aio.Channel, method: Method, payload: bytes, *, timeout: float
) -> tuple[grpc.StatusCode, str]:
    """Sends ``payload`` as the request of ``method`` (no serializer: the bytes go as they are) and returns the
    status code and details; a stream cancelled by ``_drain`` counts as OK."""
    try:
        if method.server_streaming:
            if method.client_streaming:
                stream_call = channel.stream_stream(method.path)(iter([payload]), timeout=timeout)
            else:
                stream_call = channel.unary_stream(method.path)(payload, timeout=timeout)
            return await _drain(stream_call)
        if method.client_streaming:
            await channel.stream_unary(method.path)(iter([payload]), timeout=timeout)
        else:
            await channel.unary_unary(method.path)(payload, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


async def _drain(stream_call: Any) -> tuple[grpc.StatusCode, str]:
    """Reads the stream to its end, or until it has sent MAX_STREAM_MESSAGES or stays quiet for STREAM_IDLE_S
    after its first message (a Watch that only reports changes): then it is cancelled and counts as OK."""
    received = 0
    while received < MAX_STREAM_MESSAGES:
        read = stream_call.read()
        try:
            message = await (asyncio.wait_for(read, STREAM_IDLE_S) if received else read)
        except TimeoutError:
            break
        if message is grpc.aio.EOF:
            return await stream_call.code(), await stream_call.details() or ""
        received += 1
    stream_call.cancel()
    return grpc.StatusCode.OK, ""


async def fuzz_method(
    channel: grpc.aio.Channel,
    method: Method,
    *,
    budget: int,
    seed: int,
    hints: Mapping[str, Sequence[Any]] | None = None,
    timeout: float = 15.0,
) -> MethodReport:
    """Sends ``budget`` fuzzed requests to ``method``, one at a time, and reports what came back."""
    report = MethodReport(method.path)
    maker = RequestMaker(random.Random(f"{seed}:{method.path}"), hints)
    started = time.monotonic()
    for case, _ in zip(maker.cases(method), range(budget), strict=False):
        code, details = await call_raw(channel, method, case.payload, timeout=timeout)
        report.codes[code.name] += 1
        report.kinds[case.kind] += 1
        report.longest_details = max(report.longest_details, len(details))
        if (why := violation_of(code, details)) is not None:
            report.violations.append(Violation(method.path, case, code.name, f"{why}: {details}"))
    report.seconds = time.monotonic() - started
    return report


def table(reports: Sequence[MethodReport]) -> str:
    """A Markdown table: calls per method and how many ended with each status code."""
    codes = sorted({code for r in reports for code in r.codes}, key=lambda c: (c != "OK", c))
    lines = [
        "| method | calls | " + " | ".join(codes) + " | longest message | violations |",
        "|---|---:|" + "---:|" * len(codes) + "---:|---:|",
    ]
    for r in reports:
        counts = " | ".join(str(r.codes.get(code, 0)) for code in codes)
        lines.append(f"| `{r.method}` | {r.calls} | {counts} | {r.longest_details} | {len(r.violations)} |")
    totals = " | ".join(str(sum(r.codes.get(code, 0) for r in reports)) for code in codes)
    lines.append(
        f"| **all** | {sum(r.calls for r in reports)} | {totals} | {max((r.longest_details for r in reports), default=0)}"
        f" | {sum(len(r.violations) for r in reports)} |"
    )
    return "\n".join(lines)
