"""OpenAPI 3 documents as tools: each operation is a tool <source>.<operation> that calls one allowlisted server."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx2
import jsonschema
import yaml
from jsonschema.exceptions import SchemaError

from services.common.config import OpenApiSourceConfig
from services.tools.registry import Tool, ToolFailure

log = logging.getLogger(__name__)

_MAX_MESSAGE_CHARS = 400
_MAX_VALUE_CHARS = 60
_MAX_DESCRIPTION_CHARS = 1000
_MAX_DOCUMENT_CHARS = 10_000_000
# A YAML alias bomb (a few lines that expand to billions of values) is refused instead of expanded.
_MAX_DOCUMENT_VALUES = 1_000_000
_MAX_DOCUMENT_DEPTH = 100
# Input schemas are inlined (a "$ref" would not resolve once the planner nests the schema in its action schema);
# these bound the expansion, which refs used twice at each level make exponential.
_MAX_SCHEMA_DEPTH = 32
_MAX_SCHEMA_NODES = 5000
_MAX_REF_HOPS = 16
# httpx's own limit, for a call nobody waits on any more: the registry's time limit normally ends a call first.
_DEFAULT_HTTP_TIMEOUT_SECONDS = 60.0
# How much of a non-2xx response is read for the error observation.
_ERROR_BODY_BYTES = 2048
_ERROR_SNIPPET_CHARS = 200

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# OpenAPI says header parameters with these names are ignored: the request's own machinery sets them.
_IGNORED_HEADERS = frozenset({"accept", "content-type", "authorization"})
_STYLES = {"path": {"simple"}, "header": {"simple"}, "query": {"form", "spaceDelimited", "pipeDelimited", "deepObject"}}
_DELIMITERS = {"spaceDelimited": " ", "pipeDelimited": "|"}
_SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_TEMPLATE = re.compile(r"\{([^{}]*)\}")

_SUBSCHEMA = frozenset(
    {"items", "not", "additionalProperties", "contains", "propertyNames", "if", "then", "else"}
    | {"unevaluatedItems", "unevaluatedProperties"}
)
_SUBSCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SUBSCHEMA_MAPS = frozenset({"properties", "patternProperties", "dependentSchemas", "$defs"})
# OpenAPI's own schema keywords, meaningless to a JSON Schema validator and noise in the agent's prompt.
_OPENAPI_ONLY = frozenset({"nullable", "discriminator", "xml", "externalDocs"})


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _brief(value: Any) -> str:
    """``value`` as it appears in a message: its repr, cut short."""
    return _shorten(repr(value), _MAX_VALUE_CHARS)


def _kind(value: Any) -> str:
    """What a JSON value is, in a message's words ("a list")."""
    kinds = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return kinds.get(type(value), "null")


class OpenApiError(ValueError):
    """An OpenAPI document or source that cannot be used; the message (bounded) says what to change."""

    def __init__(self, message: str) -> None:
        super().__init__(_shorten(message, _MAX_MESSAGE_CHARS))


class _Unsupported(Exception):
    """An operation that is valid OpenAPI but cannot be offered as a tool: it is left out with this reason."""


def parse_document(text: str) -> dict[str, Any]:
    """The OpenAPI 3 document in ``text`` (JSON or YAML) as plain JSON values; OpenApiError saying what is wrong.

    Only the parts tools are made of are checked here (the version, paths); the rest when a source is built.
    """
    if len(text) > _MAX_DOCUMENT_CHARS:
        raise OpenApiError(f"the document is {len(text)} characters, more than the {_MAX_DOCUMENT_CHARS} allowed")
    try:
        loaded = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise OpenApiError(f"the document does not parse as JSON: line {e.lineno} column {e.colno}: {e.msg}") from None
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1} column {e.problem_mark.column + 1}: " if e.problem_mark else ""
        raise OpenApiError(f"the document does not parse as YAML: {where}{e.problem or e.context}") from None
    except (yaml.YAMLError, ValueError, TypeError) as e:
        raise OpenApiError(f"the document does not parse as YAML: {e}") from None
    except RecursionError:
        raise OpenApiError(f"the document is nested more than {_MAX_DOCUMENT_DEPTH} levels deep") from None
    document = _plain(loaded)
    _check_document(document)
    return document


def _plain(value: Any) -> Any:
    """``value`` with YAML's extras made JSON (keys as strings, dates as ISO text); bounded in size and depth."""
    budget = _MAX_DOCUMENT_VALUES

    def walk(node: Any, depth: int) -> Any:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise OpenApiError(
                f"the document holds more than {_MAX_DOCUMENT_VALUES} values once its YAML aliases are expanded"
            )
        if depth > _MAX_DOCUMENT_DEPTH:
            raise OpenApiError(f"the document is nested more than {_MAX_DOCUMENT_DEPTH} levels deep")
        if isinstance(node, dict):
            return {str(key): walk(item, depth + 1) for key, item in node.items()}
        if isinstance(node, list):
            return [walk(item, depth + 1) for item in node]
        if node is None or isinstance(node, str | bool | int) or (isinstance(node, float) and math.isfinite(node)):
            return node
        return str(node)

    return walk(value, 0)


def _check_document(document: Any) -> None:
    if document is None:
        raise OpenApiError("the document is empty: an OpenAPI 3 document is a mapping with 'openapi' and 'paths'")
    if not isinstance(document, dict):
        raise OpenApiError(f"the document is {_kind(document)}, not a mapping with 'openapi' and 'paths'")
    if "swagger" in document:
        raise OpenApiError(
            f"this is a Swagger {_brief(document['swagger'])} document and only OpenAPI 3.x is supported: convert it "
            "to OpenAPI 3 (e.g. with swagger2openapi) and register the result"
        )
    version = document.get("openapi")
    if version is None:
        raise OpenApiError("the document has no 'openapi' field: an OpenAPI 3 document starts with openapi: 3.0.3")
    if not str(version).startswith("3."):
        raise OpenApiError(f"openapi {_brief(version)} is not supported: only OpenAPI 3.x documents (3.0.x, 3.1.x)")
    paths = document.get("paths")
    if not isinstance(paths, dict) or not paths:
        raise OpenApiError("the document has no 'paths': each operation under paths becomes a tool, so add some")


def _substitute(url: str, variables: Any, where: str) -> str:
    """``url`` with each {variable} replaced by its default."""

    def default(match: re.Match[str]) -> str:
        spec = variables.get(match[1]) if isinstance(variables, dict) else None
        if not isinstance(spec, dict) or "default" not in spec:
            raise OpenApiError(f"{where} uses the variable {{{match[1]}}} without a default; add one")
        return str(spec["default"])

    return _TEMPLATE.sub(default, url)


def _server_urls(servers: Any, where: str) -> list[str]:
    """The URLs of an OpenAPI ``servers`` list, variables at their defaults, without a trailing slash."""
    if not isinstance(servers, list):
        raise OpenApiError(f"{where} must be a list of {{url: ...}}")
    urls = []
    for index, server in enumerate(servers):
        if not isinstance(server, dict) or not isinstance(server.get("url"), str):
            raise OpenApiError(f"{where}[{index}] must be a mapping with a url")
        urls.append(_substitute(server["url"], server.get("variables"), f"{where}[{index}]").rstrip("/"))
    return urls


def _url_key(url: str, what: str) -> tuple[str, str, int, str]:
    """What makes two absolute http(s) URLs the same server: scheme, host, port and path."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise OpenApiError(f"{what} must not carry credentials (user:password@): send them in headers instead")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OpenApiError(
            f"{what} {_brief(url)} is not an absolute http(s) URL; set base_url to the absolute URL of one of the "
            "document's servers"
        )
    if parts.query or parts.fragment:
        raise OpenApiError(f"{what} {_brief(url)} must not have a query or a fragment")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise OpenApiError(f"{what} {_brief(url)} has an invalid port") from None
    return parts.scheme, parts.hostname, port, "/" + parts.path.strip("/")


def _serves(server_url: str, key: tuple[str, str, int, str]) -> bool:
    """Whether ``server_url`` names the server of ``key``; a relative one (served wherever the document is) names
    any origin with its path, which base_url supplies."""
    parts = urlsplit(server_url)
    if not parts.scheme and not parts.netloc:
        return "/" + parts.path.strip("/") == key[3]
    try:
        return _url_key(server_url, "server") == key
    except OpenApiError:
        return False


def _allowed_base_url(document: dict[str, Any], base_url: str | None) -> tuple[str, tuple[str, str, int, str]]:
    """The base URL calls go to: ``base_url`` if the document lists it among its servers, else its first server."""
    servers = _server_urls(document.get("servers") or [{"url": "/"}], "servers")
    if base_url is None:
        return servers[0], _url_key(servers[0], "the document's first server")
    key = _url_key(base_url, "base_url")
    if not any(_serves(server, key) for server in servers):
        listed = _shorten(", ".join(servers), 150)
        raise OpenApiError(
            f"base_url {_brief(base_url)} is not one of the document's servers ({listed}); use one of them "
            "(server variables take their defaults)"
        )
    return base_url.rstrip("/"), key


def _checked_headers(headers: dict[str, str]) -> dict[str, str]:
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise OpenApiError(f"header name {_brief(name)} is not a valid HTTP header name")
        if any(c in value for c in "\r\n\0"):
            raise OpenApiError(f"the value of header {name!r} holds a line break or NUL; remove it (value not shown)")
    return dict(headers)


def _tool_name(operation_id: Any, method: str, path: str) -> str:
    """The operationId in snake_case (getPetById -> get_pet_by_id), else method_path (get_pets_pet_id)."""
    text = operation_id if isinstance(operation_id, str) else ""
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text)
    text = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", text)
    name = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    if not name:
        return _tool_name(f"{method}_{path}", method, path)
    if not name[0].isalpha():
        name = f"{method}_{name}"
    return name[:64].rstrip("_")


def _is_json(media_type: str) -> bool:
    media = media_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class _Resolver:
    """Reads a document: follows its local $refs and turns its schemas into self-contained JSON Schemas."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self._nodes = 0

    def target(self, ref: Any) -> Any:
        """What the local $ref ``ref`` (#/components/schemas/Pet) points to."""
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise _Unsupported(f"$ref {_brief(ref)} points outside the document; only local refs (#/...) are supported")
        node: Any = self.document
        for part in ref[2:].split("/") if ref != "#" else []:
            key = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                raise OpenApiError(f"$ref {_brief(ref)} points to nothing in the document; fix it or add its target")
        return node

    def follow(self, node: Any, where: str) -> dict[str, Any]:
        """``node`` (a path item, a parameter, a request body) with its $refs followed; it must be a mapping."""
        for _ in range(_MAX_REF_HOPS):
            if not isinstance(node, dict):
                raise OpenApiError(f"{where} must be a mapping, not {_kind(node)}")
            if "$ref" not in node:
                return node
            node = self.target(node["$ref"])
        raise OpenApiError(f"{where}: its $refs lead to more $refs {_MAX_REF_HOPS} times (a cycle?)")

    def schema(self, node: Any, *, writing: bool) -> Any:
        """An OpenAPI schema as a JSON Schema (2020-12) that stands on its own.

        Local $refs are inlined; a recursive one is cut where it recurs (any value is accepted there, the server
        checks it). OpenAPI 3.0's ``nullable`` and boolean ``exclusiveMinimum``/``exclusiveMaximum`` become their
        JSON Schema forms. When ``writing`` (a request body), readOnly properties are dropped: the server sets them.
        """
        self._nodes = 0
        return self._schema(node, writing, (), 0)

    def _schema(self, node: Any, writing: bool, refs: tuple[str, ...], depth: int) -> Any:
        self._nodes += 1
        if self._nodes > _MAX_SCHEMA_NODES:
            raise _Unsupported(f"its input schema expands to more than {_MAX_SCHEMA_NODES} nodes")
        if not isinstance(node, dict):
            return node  # a boolean schema, or a malformed one the JSON Schema check reports
        if depth > _MAX_SCHEMA_DEPTH:
            return {"description": f"(nested more than {_MAX_SCHEMA_DEPTH} levels deep; not described)"}
        if "$ref" in node:
            ref = node["$ref"]
            target = self.target(ref)
            if ref in refs:
                return {"description": f"a {ref.rsplit('/', 1)[-1]} (recursive; not expanded again)"}
            resolved = self._schema(target, writing, (*refs, ref), depth + 1)
            if not isinstance(resolved, dict):
                return resolved
            # OpenAPI 3.1 lets keywords beside a $ref refine it (a description, nullable): they win.
            siblings = {key: value for key, value in node.items() if key not in ("$ref", "nullable")}
            merged = {**resolved, **self._schema(siblings, writing, refs, depth)} if siblings else resolved
            return _allow_null(merged) if node.get("nullable") is True else merged
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _SUBSCHEMA:
                out[key] = self._schema(value, writing, refs, depth + 1)
            elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
                out[key] = [self._schema(item, writing, refs, depth + 1) for item in value]
            elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
                out[key] = {name: self._schema(item, writing, refs, depth + 1) for name, item in value.items()}
            elif key not in _OPENAPI_ONLY and not key.startswith("x-"):
                out[key] = value
        for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            # 3.0's exclusiveMinimum: true qualifies minimum; JSON Schema's exclusiveMinimum is the bound itself.
            if isinstance(out.get(exclusive), bool) and out.pop(exclusive) and bound in out:
                out[exclusive] = out.pop(bound)
        properties = out.get("properties")
        if writing and isinstance(properties, dict):
            read_only = {name for name, spec in properties.items() if isinstance(spec, dict) and spec.get("readOnly")}
            out["properties"] = {name: spec for name, spec in properties.items() if name not in read_only}
            if isinstance(out.get("required"), list):
                out["required"] = [name for name in out["required"] if name not in read_only]
        return _allow_null(out) if node.get("nullable") is True else out


def _allow_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` that also accepts null (OpenAPI 3.0's ``nullable: true``)."""
    if isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
        if isinstance(schema.get("enum"), list) and None not in schema["enum"]:
            schema["enum"] = [*schema["enum"], None]
        return schema
    return {"anyOf": [schema, {"type": "null"}]}


@dataclass(frozen=True)
class _Input:
    """One argument of an operation's tool and where it goes in the request."""

    name: str
    location: str  # path, query or header
    style: str
    explode: bool


class _Arguments:
    """A tool's arguments as they are gathered: one property per input, which are required, where each goes."""

    def __init__(self) -> None:
        self.inputs: list[_Input] = []
        self.properties: dict[str, Any] = {}
        self.required: list[str] = []

    def add(self, name: str, schema: Any, required: bool, where: _Input | None = None) -> None:
        if name in self.properties:
            raise _Unsupported(f"two of its inputs are named {_brief(name)}")
        self.properties[name] = schema
        if required:
            self.required.append(name)
        if where is not None:
            self.inputs.append(where)

    def schema(self) -> dict[str, Any]:
        """The input schema: an object of these properties and no others, checked as JSON Schema 2020-12."""
        schema: dict[str, Any] = {"type": "object", "properties": self.properties, "additionalProperties": False}
        if self.required:
            schema["required"] = self.required
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except SchemaError as e:
            where = "/".join(map(str, e.path)) or "(root)"
            raise _Unsupported(f"its input schema is not valid JSON Schema at {where}: {e.message}") from None
        return schema


def _add_body(arguments: _Arguments, resolver: _Resolver, body: dict[str, Any]) -> str | None:
    """Adds a JSON request body as the argument "body"; the media type it is sent as (None: no JSON body)."""
    content: dict[str, Any] = body["content"] if isinstance(body.get("content"), dict) else {}
    media_type = next((media for media in content if _is_json(media)), None)
    if media_type is None:
        if body.get("required") is True:
            kinds = _shorten(", ".join(content) or "no content", 80)
            raise _Unsupported(f"its request body ({kinds}) is required and only JSON bodies are supported")
        return None
    media = resolver.follow(content[media_type], f"requestBody.content[{media_type}]")
    arguments.add("body", resolver.schema(media.get("schema", {}), writing=True), body.get("required") is True)
    return media_type


def _text(value: Any) -> str:
    """A primitive as it is written in a URL or a header (booleans in lowercase, as JSON writes them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def _simple(value: Any, explode: bool) -> str:
    """The OpenAPI "simple" style (path and header parameters): a,b,c; k,v,k,v or, exploded, k=v,k=v."""
    if isinstance(value, list):
        return ",".join(_text(item) for item in value)
    if isinstance(value, dict):
        pairs = ((_text(k), _text(v)) for k, v in value.items())
        return ",".join(f"{k}={v}" if explode else f"{k},{v}" for k, v in pairs)
    return _text(value)


def _query_pairs(item: _Input, value: Any) -> list[tuple[str, str]]:
    """A query parameter as name=value pairs in its style (form, spaceDelimited, pipeDelimited, deepObject)."""
    if isinstance(value, list):
        if item.style == "form" and item.explode:
            return [(item.name, _text(v)) for v in value]
        return [(item.name, _DELIMITERS.get(item.style, ",").join(_text(v) for v in value))]
    if isinstance(value, dict):
        if item.style == "deepObject":
            return [(f"{item.name}[{k}]", _text(v)) for k, v in value.items()]
        if item.explode:
            return [(str(k), _text(v)) for k, v in value.items()]
        return [(item.name, _simple(value, explode=False))]
    return [(item.name, _text(value))]


@dataclass(frozen=True)
class _OperationCall:
    """The handler of one operation's tool: builds the request from the validated arguments and sends it."""

    source: OpenApiSource
    method: str
    path: str
    inputs: tuple[_Input, ...]
    body_media_type: str | None

    @property
    def label(self) -> str:
        return f"{self.method.upper()} {self.path}"

    def url(self, arguments: dict[str, Any]) -> str:
        """The base URL and the path, each path parameter percent-encoded whole (even "/"), so that no value
        ("../admin", "a/b", "..") can change which path is called."""
        by_name = {item.name: item for item in self.inputs if item.location == "path"}

        def fill(match: re.Match[str]) -> str:
            item = by_name[match[1]]
            text = _simple(arguments[item.name], item.explode) if arguments.get(item.name) is not None else ""
            if not text:
                raise ToolFailure(f"{self.label}: path parameter {item.name!r} must not be empty")
            encoded = quote(text, safe="")
            # "." and ".." are the only values that would still move the path (dot-segments); other dots stay.
            return encoded.replace(".", "%2E") if encoded.strip(".") == "" else encoded

        return self.source.base_url + _TEMPLATE.sub(fill, self.path)

    async def __call__(self, arguments: dict[str, Any]) -> Any:
        params: list[tuple[str, str]] = []
        headers: dict[str, str] = {}
        for item in self.inputs:
            value = arguments.get(item.name)
            if value is None:
                continue
            if item.location == "query":
                params += _query_pairs(item, value)
            elif item.location == "header":
                headers[item.name] = _simple(value, item.explode)
        content = None
        if self.body_media_type is not None and "body" in arguments:
            content = json.dumps(arguments["body"], ensure_ascii=False).encode()
            headers["Content-Type"] = self.body_media_type
        url = self.url(arguments)
        return await self.source._send(self.label, self.method, url, params, headers, content)


class OpenApiSource:
    """The operations of an OpenAPI 3 document as tools named <name>.<operation>, all calling one server.

    Calls go to ``base_url``, which must be one of the document's servers (their variables at their defaults); a
    relative server ("/v1") names any origin with that path, so base_url gives the origin. Without base_url, calls
    go to the first server, which must then be absolute. Redirects are not followed (one could leave the server).
    ``headers`` (e.g. Authorization) go with every call and never into a message. A response larger than
    ``max_response_bytes``, a non-2xx status or a failed connection is an error observation (ToolFailure).

    An operation that is valid OpenAPI but cannot be a tool (a required cookie parameter or non-JSON body, an
    external $ref, two inputs with one name) is left out with a warning, its reason kept in ``left_out``; a document
    that is broken, or whose operations map to the same tool name, raises OpenApiError.
    """

    def __init__(
        self,
        name: str,
        document: dict[str, Any],
        *,
        base_url: str | None = None,
        headers: dict[str, str] | None = None,
        timeout_seconds: float | None = None,
        max_response_bytes: int = 1_048_576,
    ) -> None:
        if not _SOURCE_NAME.match(name):
            raise OpenApiError(f"source name {_brief(name)} must match {_SOURCE_NAME.pattern} (it prefixes the tools)")
        try:
            if timeout_seconds is not None and not timeout_seconds > 0:
                raise OpenApiError(f"timeout_seconds must be positive (got {timeout_seconds}); leave it unset instead")
            if max_response_bytes < 1:
                raise OpenApiError(f"max_response_bytes must be positive (got {max_response_bytes})")
            _check_document(document)
            self.name = name
            self.headers = _checked_headers(headers or {})
            self.base_url, self._base_key = _allowed_base_url(document, base_url)
            self.timeout_seconds = timeout_seconds
            self.max_response_bytes = max_response_bytes
            self.left_out: list[str] = []
            """Why each operation that is not offered as a tool was left out ("POST /upload left out: ...")."""
            self._tools = self._build_tools(document)
        except OpenApiError as e:
            raise OpenApiError(f"OpenAPI source {name!r}: {e}") from None
        self._client = httpx2.AsyncClient(
            headers=self.headers,
            timeout=timeout_seconds or _DEFAULT_HTTP_TIMEOUT_SECONDS,
            follow_redirects=False,
        )

    @classmethod
    def from_config(cls, config: OpenApiSourceConfig) -> OpenApiSource:
        """The source ``config`` declares, its document read from the file config.document."""
        where = _shorten(repr(config.document), 200)
        try:
            text = Path(config.document).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or "it is not UTF-8 text"
            raise OpenApiError(f"OpenAPI source {config.name!r}: cannot read {where}: {reason}") from e
        try:
            document = parse_document(text)
        except OpenApiError as e:
            raise OpenApiError(f"OpenAPI source {config.name!r} ({where}): {e}") from None
        return cls(
            config.name,
            document,
            base_url=config.base_url,
            headers=config.headers,
            timeout_seconds=config.timeout_seconds,
            max_response_bytes=config.max_response_bytes,
        )

    def tools(self) -> list[Tool]:
        """One tool per usable operation, in document order."""
        return list(self._tools)

    async def close(self) -> None:
        """Closes the HTTP connections; calls after this fail."""
        await self._client.aclose()

    def _build_tools(self, document: dict[str, Any]) -> list[Tool]:
        resolver = _Resolver(document)
        labels: dict[str, str] = {}
        tools = []
        for path, item, method, operation in _operations(document, resolver):
            label = f"{method.upper()} {path}"
            try:
                tool = self._tool(resolver, path, item, method, operation)
            except _Unsupported as e:
                reason = f"{label} left out: {_shorten(str(e), 200)}"
                self.left_out.append(reason)
                log.warning("OpenAPI source %r: %s", self.name, reason)
                continue
            except OpenApiError as e:
                raise OpenApiError(f"{label}: {e}") from None
            if tool.name in labels:
                raise OpenApiError(
                    f"{labels[tool.name]} and {label} both become the tool {tool.name!r}; give one of them another "
                    "operationId"
                )
            labels[tool.name] = label
            tools.append(tool)
        if not tools:
            raise OpenApiError(f"no operation can be offered as a tool: {self.left_out[0]}")
        return tools

    def _tool(
        self, resolver: _Resolver, path: str, item: dict[str, Any], method: str, operation: dict[str, Any]
    ) -> Tool:
        servers = operation.get("servers") or item.get("servers")
        if servers and not any(_serves(url, self._base_key) for url in _server_urls(servers, "servers")):
            raise _Unsupported(f"it is served by its own servers, not by {self.base_url}")
        arguments = _Arguments()
        for parameter in _parameters(resolver, item, operation):
            self._add_parameter(arguments, resolver, parameter)
        declared = {each.name for each in arguments.inputs if each.location == "path"}
        for placeholder in _TEMPLATE.findall(path):
            if placeholder not in declared:
                raise _Unsupported(f"its path parameter {{{placeholder}}} is not declared in its parameters")
        body_media_type = None
        if operation.get("requestBody") is not None:
            body_media_type = _add_body(arguments, resolver, resolver.follow(operation["requestBody"], "requestBody"))
        return Tool(
            name=f"{self.name}.{_tool_name(operation.get('operationId'), method, path)}",
            description=_description(operation, method, path, self.name),
            input_schema=arguments.schema(),
            handler=_OperationCall(self, method, path, tuple(arguments.inputs), body_media_type),
            timeout_seconds=self.timeout_seconds,
            # HTTP's safe methods: running one again after a crash does no harm.
            idempotent=method.lower() in ("get", "head"),
        )

    def _add_parameter(self, arguments: _Arguments, resolver: _Resolver, parameter: dict[str, Any]) -> None:
        name, location = parameter["name"], parameter["in"]
        required = location == "path" or parameter.get("required") is True
        if location == "cookie":
            if required:
                raise _Unsupported(f"its cookie parameter {_brief(name)} is required; cookies are not supported")
            return
        # Configured headers (credentials) win over header parameters of the same name.
        if location == "header" and name.lower() in _IGNORED_HEADERS | {header.lower() for header in self.headers}:
            return
        style = parameter.get("style", "form" if location == "query" else "simple")
        if style not in _STYLES[location]:
            raise _Unsupported(f"parameter {_brief(name)} has style {_brief(style)}, which is not supported")
        schema = resolver.schema(parameter.get("schema", {}), writing=False)
        if isinstance(parameter.get("description"), str) and isinstance(schema, dict):
            schema = {**schema, "description": _shorten(parameter["description"].strip(), 300)}
        explode = parameter.get("explode", style == "form") is True
        arguments.add(name, schema, required, _Input(name, location, style, explode))

    async def _send(
        self,
        label: str,
        method: str,
        url: str,
        params: list[tuple[str, str]],
        headers: dict[str, str],
        content: bytes | None,
    ) -> Any:
        """Sends one request and returns its response as a JSON value; ToolFailure for anything but a 2xx answer
        within the size cap."""
        try:
            async with self._client.stream(
                method.upper(), url, params=tuple(params), headers=headers, content=content
            ) as response:
                return await self._result(label, response)
        except httpx2.TimeoutException:
            timeout = self.timeout_seconds or _DEFAULT_HTTP_TIMEOUT_SECONDS
            raise ToolFailure(f"{label}: no response from {self.base_url} within {timeout:g}s") from None
        except httpx2.HTTPError as e:
            reason = _shorten(f"{type(e).__name__}: {e}", 200)
            raise ToolFailure(f"{label}: the call to {self.base_url} failed: {reason}") from None

    async def _result(self, label: str, response: httpx2.Response) -> Any:
        status = response.status_code
        if not 200 <= status < 300:
            data, _ = await _read(response, _ERROR_BODY_BYTES)
            location = response.headers.get("location")
            if 300 <= status < 400 and location:
                raise ToolFailure(
                    f"{label}: HTTP {status}, a redirect to {_brief(location)} that is not followed "
                    f"(calls go only to {self.base_url})"
                )
            snippet = _shorten(" ".join(data.decode("utf-8", "replace").split()), _ERROR_SNIPPET_CHARS)
            raise ToolFailure(f"{label}: HTTP {status} {response.reason_phrase}" + (f": {snippet}" if snippet else ""))
        too_big = ToolFailure(
            f"{label}: the response is larger than {self.max_response_bytes} bytes (max_response_bytes); ask for "
            "less (a filter, a smaller page)"
        )
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_response_bytes:
            raise too_big
        data, complete = await _read(response, self.max_response_bytes)
        if not complete:
            raise too_big
        return _decoded(label, response, data)


async def _read(response: httpx2.Response, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the (decompressed) body, and whether that is all of it; stops reading past it."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], False
    return b"".join(chunks), True


def _decoded(label: str, response: httpx2.Response, data: bytes) -> Any:
    """A JSON body parsed, text as a string, anything else (an image) described: None when there is no body."""
    if not data:
        return None
    content_type = response.headers.get("content-type", "")
    if _is_json(content_type):
        try:
            return json.loads(data)
        except ValueError as e:
            raise ToolFailure(f"{label}: the response is not the JSON its content-type says ({e})") from None
    try:
        return data.decode(response.charset_encoding or "utf-8")
    except (UnicodeDecodeError, LookupError):
        media = content_type.split(";")[0].strip() or "unknown"
        return {"content_type": media, "bytes": len(data), "note": "binary content, not shown"}


def _operations(document: dict[str, Any], resolver: _Resolver) -> Iterator[tuple[str, dict[str, Any], str, Any]]:
    """(path, path item, method, operation) for each operation under ``paths``, in document order."""
    for path, item in document["paths"].items():
        if not path.startswith("/"):
            raise OpenApiError(f"path {_brief(path)} must start with '/'")
        item = resolver.follow(item, f"paths[{path}]")
        for method in _METHODS:
            if method in item:
                if not isinstance(item[method], dict):
                    raise OpenApiError(f"paths[{path}].{method} must be a mapping (an operation)")
                yield path, item, method, item[method]


def _parameters(resolver: _Resolver, item: dict[str, Any], operation: dict[str, Any]) -> list[dict[str, Any]]:
    """The operation's parameters, $refs followed: the path item's, then its own (which replace those it repeats)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for where, parameters in (
        ("parameters", item.get("parameters")),
        ("operation parameters", operation.get("parameters")),
    ):
        if parameters is None:
            continue
        if not isinstance(parameters, list):
            raise OpenApiError(f"{where} must be a list")
        for index, parameter in enumerate(parameters):
            parameter = resolver.follow(parameter, f"{where}[{index}]")
            if not isinstance(parameter.get("name"), str) or parameter.get("in") not in (*_STYLES, "cookie"):
                raise OpenApiError(f"{where}[{index}] needs a name and an 'in' of path, query, header or cookie")
            merged[(parameter["name"], parameter["in"])] = parameter
    return list(merged.values())


def _description(operation: dict[str, Any], method: str, path: str, source: str) -> str:
    """The operation's summary and description, bounded; its method and path when it has neither."""
    parts = [text.strip() for text in (operation.get("summary"), operation.get("description")) if isinstance(text, str)]
    parts = [text for text in parts if text]
    if len(parts) == 2 and parts[0] != parts[1]:
        text = f"{parts[0].rstrip('.')}. {parts[1]}"
    else:
        text = parts[0] if parts else f"{method.upper()} {path} of the {source} API"
    return _shorten(text, _MAX_DESCRIPTION_CHARS)
