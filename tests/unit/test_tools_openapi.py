"""OpenAPI tools: schemas from a petstore-like document, calls through the registry to a real local HTTP server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from services.common import InvalidArgumentError
from services.common.config import OpenApiSourceConfig
from services.tools import ToolErrorKind, ToolFailure, ToolRegistry
from services.tools.openapi import OpenApiError, OpenApiSource, parse_document
from tests.conftest import free_port

SECRET = "Bearer s3cret-token"
CAP = 2048

DOCUMENT = """
openapi: 3.0.3
info: {title: Petstore, version: "1.0"}
servers:
  - url: http://{host}:{port}/api
    variables:
      host: {default: 127.0.0.1}
      port: {default: "PORT"}
  - url: https://petstore.example.com/v1
paths:
  /pets:
    get:
      operationId: listPets
      summary: List the pets.
      description: Newest first.
      parameters:
        - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 100}}
        - {name: tags, in: query, schema: {type: array, items: {type: string}}}
        - {name: filter, in: query, style: deepObject, schema: {type: object}}
        - {name: X-Request-Id, in: header, description: Traces the call., schema: {type: string}}
        - {name: Authorization, in: header, schema: {type: string}}
      responses: {"200": {description: the pets}}
    post:
      operationId: createPet
      summary: Add a pet.
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Pet"}
      responses: {"201": {description: created}}
  /pets/{petId}:
    parameters:
      - $ref: "#/components/parameters/PetId"
    get:
      operationId: getPetById
      description: One pet by its id.
      responses: {"200": {description: the pet}}
  /pets/{petId}/photo:
    get:
      parameters:
        - $ref: "#/components/parameters/PetId"
      responses: {"200": {description: a PNG}}
  /misbehave/{mode}:
    get:
      operationId: misbehave
      summary: Answers badly, as its mode says.
      parameters:
        - name: mode
          in: path
          required: true
          schema: {type: string, enum: [big, big_unsized, slow, redirect, fail, text, bad_json, empty]}
      responses: {"200": {description: whatever}}
components:
  parameters:
    PetId: {name: petId, in: path, required: true, schema: {type: string}}
  schemas:
    Pet:
      type: object
      required: [id, name]
      properties:
        id: {type: integer, readOnly: true}
        name: {type: string, minLength: 1}
        age: {type: integer, minimum: 0, exclusiveMinimum: true, nullable: true}
        category: {$ref: "#/components/schemas/Category"}
        size: {type: string, enum: [S, L], nullable: true}
        owner: {allOf: [{$ref: "#/components/schemas/Owner"}], nullable: true}
        rival: {$ref: "#/components/schemas/Owner", description: The other owner., nullable: true}
    Owner: {type: object, properties: {name: {type: string}}}
    Category:
      type: object
      properties:
        name: {type: string}
        parent: {$ref: "#/components/schemas/Category"}
        children: {type: array, items: {$ref: "#/components/schemas/Category"}}
"""


class PetstoreHandler(BaseHTTPRequestHandler):
    """Answers /api/...: echoes what it received, or misbehaves. Every request line is recorded."""

    seen: list[str]

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append(self.path)
        path = urlsplit(self.path).path
        if path == "/api/misbehave/big":
            self.answer(200, b"x" * (CAP + 1), "text/plain")
        elif path == "/api/misbehave/big_unsized":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'"' + b"y" * (CAP * 4) + b'"')
        elif path == "/api/misbehave/slow":
            time.sleep(1)
            self.answer(200, b"late", "text/plain")
        elif path == "/api/misbehave/redirect":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/api/pets?redirected=1")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/api/misbehave/fail":
            self.answer(500, b"database\n  on fire " + b"!" * 5000, "text/plain")
        elif path == "/api/misbehave/bad_json":
            self.answer(200, b"{'not': json}", "application/json")
        elif path == "/api/misbehave/empty":
            self.answer(204, b"", "application/json")
        elif path == "/api/misbehave/text":
            self.answer(200, "plain text, é".encode(), "text/plain; charset=utf-8")
        elif path.endswith("/photo"):
            self.answer(200, b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "image/png")
        else:
            self.echo(None)

    def do_POST(self) -> None:
        self.seen.append(self.path)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.echo(json.loads(body))

    def echo(self, body: Any) -> None:
        received = {
            "path": self.path,
            "authorization": self.headers.get("Authorization"),
            "request_id": self.headers.get("X-Request-Id"),
            "content_type": self.headers.get("Content-Type"),
            "body": body,
        }
        self.answer(200, json.dumps(received).encode(), "application/json")

    def answer(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up on the slow endpoint


class Petstore:
    def __init__(self, port: int, seen: list[str]) -> None:
        self.port = port
        self.seen = seen
        self.text = DOCUMENT.replace("PORT", str(port))

    def document(self) -> dict[str, Any]:
        return parse_document(self.text)


@pytest.fixture(scope="module")
def petstore() -> Iterator[Petstore]:
    port = free_port()
    seen: list[str] = []
    handler = type("Handler", (PetstoreHandler,), {"seen": seen})
    server = QuietServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Petstore(port, seen)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def registry(petstore: Petstore) -> AsyncIterator[ToolRegistry]:
    source = OpenApiSource("petstore", petstore.document(), headers={"Authorization": SECRET}, max_response_bytes=CAP)
    registry = ToolRegistry(default_timeout_seconds=5.0)
    for tool in source.tools():
        registry.register(tool)
    yield registry
    await source.close()


def test_each_operation_is_a_tool_with_a_schema_from_its_parameters_and_body(petstore: Petstore) -> None:
    source = OpenApiSource("petstore", petstore.document())
    tools = {tool.name: tool for tool in source.tools()}
    assert list(tools) == [
        "petstore.list_pets",
        "petstore.create_pet",
        "petstore.get_pet_by_id",
        "petstore.get_pets_pet_id_photo",
        "petstore.misbehave",
    ]
    assert source.base_url == f"http://127.0.0.1:{petstore.port}/api"
    assert source.left_out == []
    listing = tools["petstore.list_pets"]
    assert listing.description == "List the pets. Newest first."
    assert listing.input_schema == {
        "type": "object",
        "properties": {
            "limit": {"type": "integer", "minimum": 1, "maximum": 100},
            "tags": {"type": "array", "items": {"type": "string"}},
            "filter": {"type": "object"},
            "X-Request-Id": {"type": "string", "description": "Traces the call."},
        },  # the Authorization header parameter is left to the source's headers, as OpenAPI says
        "additionalProperties": False,
    }
    assert tools["petstore.get_pet_by_id"].input_schema["required"] == ["petId"]
    assert tools["petstore.get_pets_pet_id_photo"].description == "GET /pets/{petId}/photo of the petstore API"
    create = tools["petstore.create_pet"].input_schema
    assert create["required"] == ["body"]
    pet = create["properties"]["body"]
    assert pet["required"] == ["name"]  # id is readOnly: the server sets it
    assert set(pet["properties"]) == {"name", "age", "category", "size", "owner", "rival"}
    assert pet["properties"]["age"] == {"type": ["integer", "null"], "exclusiveMinimum": 0}
    assert pet["properties"]["size"] == {"type": ["string", "null"], "enum": ["S", "L", None]}
    owner = {"type": "object", "properties": {"name": {"type": "string"}}}
    assert pet["properties"]["owner"] == {"anyOf": [{"allOf": [owner]}, {"type": "null"}]}
    assert pet["properties"]["rival"] == {**owner, "type": ["object", "null"], "description": "The other owner."}
    category = pet["properties"]["category"]
    assert category["properties"]["name"] == {"type": "string"}
    assert category["properties"]["parent"]["description"] == "a Category (recursive; not expanded again)"
    assert "recursive" in category["properties"]["children"]["items"]["description"]
    registry = ToolRegistry()
    for tool in source.tools():
        registry.register(tool)  # each schema passes the registry's Draft 2020-12 check


async def test_a_get_sends_path_query_and_header_parameters_and_the_configured_headers(
    registry: ToolRegistry,
) -> None:
    arguments = {"limit": 2, "tags": ["a", "b c"], "filter": {"kind": "cat"}, "X-Request-Id": "r-1"}
    outcome = await registry.execute("petstore.list_pets", arguments)
    assert outcome.ok, outcome.error
    assert outcome.result["path"] == "/api/pets?limit=2&tags=a&tags=b+c&filter%5Bkind%5D=cat"
    assert outcome.result["request_id"] == "r-1"
    assert outcome.result["authorization"] == SECRET
    outcome = await registry.execute("petstore.get_pet_by_id", {"petId": "7"})
    assert outcome.result["path"] == "/api/pets/7"


async def test_a_post_sends_the_json_body(registry: ToolRegistry) -> None:
    pet = {"name": "Rex", "age": None, "owner": None, "category": {"name": "dog", "parent": {"name": "animal"}}}
    outcome = await registry.execute("petstore.create_pet", {"body": pet})
    assert outcome.ok, outcome.error
    assert outcome.result["body"] == pet
    assert outcome.result["content_type"] == "application/json"


@pytest.mark.parametrize(
    ("value", "path"),
    [("../admin", "/api/pets/..%2Fadmin"), ("a/b", "/api/pets/a%2Fb"), ("..", "/api/pets/%2E%2E"), ("?x=1#y", None)],
)
async def test_path_parameters_are_encoded_so_they_cannot_change_the_path(
    registry: ToolRegistry, value: str, path: str | None
) -> None:
    outcome = await registry.execute("petstore.get_pet_by_id", {"petId": value})
    assert outcome.ok, outcome.error
    assert outcome.result["path"] == (path or "/api/pets/%3Fx%3D1%23y")


async def test_an_empty_path_parameter_is_an_error_observation(registry: ToolRegistry) -> None:
    outcome = await registry.execute("petstore.get_pet_by_id", {"petId": ""})
    assert outcome.error is not None
    assert outcome.error.message == "GET /pets/{petId}: path parameter 'petId' must not be empty"


async def test_a_non_2xx_answer_is_an_error_observation_with_a_short_snippet(registry: ToolRegistry) -> None:
    outcome = await registry.execute("petstore.misbehave", {"mode": "fail"})
    assert outcome.error is not None and outcome.error.kind is ToolErrorKind.FAILED
    message = outcome.error.message
    assert message.startswith("GET /misbehave/{mode}: HTTP 500 Internal Server Error: database on fire !!!")
    assert len(message) < 300
    assert "s3cret" not in message


@pytest.mark.parametrize("mode", ["big", "big_unsized"])
async def test_a_response_over_the_cap_is_an_error_observation(registry: ToolRegistry, mode: str) -> None:
    outcome = await registry.execute("petstore.misbehave", {"mode": mode})
    assert outcome.error is not None
    assert f"the response is larger than {CAP} bytes (max_response_bytes)" in outcome.error.message


async def test_text_is_a_string_and_binary_content_is_described(registry: ToolRegistry) -> None:
    outcome = await registry.execute("petstore.misbehave", {"mode": "text"})
    assert outcome.result == "plain text, é"
    outcome = await registry.execute("petstore.get_pets_pet_id_photo", {"petId": "7"})
    assert outcome.result == {"content_type": "image/png", "bytes": 264, "note": "binary content, not shown"}


async def test_a_slow_endpoint_times_out(registry: ToolRegistry) -> None:
    outcome = await registry.execute("petstore.misbehave", {"mode": "slow"}, timeout_seconds=0.3)
    assert outcome.error is not None and outcome.error.kind is ToolErrorKind.TIMEOUT


async def test_the_http_client_has_its_own_timeout_for_calls_nobody_waits_for(petstore: Petstore) -> None:
    source = OpenApiSource("petstore", petstore.document(), timeout_seconds=0.3)
    misbehave = next(tool for tool in source.tools() if tool.name == "petstore.misbehave")
    try:
        with pytest.raises(ToolFailure) as raised:
            await misbehave.handler({"mode": "slow"})  # straight to the handler, without the registry's limit
    finally:
        await source.close()
    assert str(raised.value) == (
        f"GET /misbehave/{{mode}}: no response from http://127.0.0.1:{petstore.port}/api within 0.3s"
    )


async def test_a_redirect_is_not_followed(registry: ToolRegistry, petstore: Petstore) -> None:
    outcome = await registry.execute("petstore.misbehave", {"mode": "redirect"})
    assert outcome.error is not None
    target = f"http://localhost:{petstore.port}/api/pets?redirected=1"
    assert outcome.error.message == (
        f"GET /misbehave/{{mode}}: HTTP 302, a redirect to {target!r} that is not followed "
        f"(calls go only to http://127.0.0.1:{petstore.port}/api)"
    )
    assert "/api/misbehave/redirect" in petstore.seen
    assert "/api/pets?redirected=1" not in petstore.seen


async def test_json_that_does_not_parse_is_an_error_and_no_body_is_null(registry: ToolRegistry) -> None:
    outcome = await registry.execute("petstore.misbehave", {"mode": "bad_json"})
    assert outcome.error is not None
    assert outcome.error.message.startswith("GET /misbehave/{mode}: the response is not the JSON its content-type says")
    outcome = await registry.execute("petstore.misbehave", {"mode": "empty"})
    assert outcome.ok and outcome.result is None


async def test_parameters_are_written_in_their_styles(petstore: Petstore) -> None:
    document = {
        "openapi": "3.1.0",
        "servers": [{"url": f"http://127.0.0.1:{petstore.port}/api"}],
        "paths": {
            "/styles/{ids}/{point}": {
                "get": {
                    "operationId": "styles",
                    "parameters": [
                        {"name": "ids", "in": "path", "schema": {"type": "array"}},
                        {"name": "point", "in": "path", "explode": True, "schema": {"type": "object"}},
                        {"name": "csv", "in": "query", "explode": False, "schema": {"type": "array"}},
                        {"name": "spaced", "in": "query", "style": "spaceDelimited", "schema": {"type": "array"}},
                        {"name": "piped", "in": "query", "style": "pipeDelimited", "schema": {"type": "array"}},
                        {"name": "spread", "in": "query", "schema": {"type": "object"}},
                        {"name": "pair", "in": "query", "explode": False, "schema": {"type": "object"}},
                        {"name": "flag", "in": "query", "schema": {"type": "boolean"}},
                        {"name": "nested", "in": "query", "schema": {"type": "array"}},
                        {"name": "X-Request-Id", "in": "header", "schema": {"type": "array"}},
                        {"name": "session", "in": "cookie", "schema": {"type": "string"}},
                    ],
                }
            }
        },
    }
    source = OpenApiSource("s", document)
    registry = ToolRegistry()
    registry.register(source.tools()[0])
    assert "session" not in source.tools()[0].input_schema["properties"]  # an optional cookie is not offered
    arguments = {
        "ids": [1, 2],
        "point": {"x": 1, "y": 2},
        "csv": ["a", "b"],
        "spaced": ["a", "b"],
        "piped": ["a", "b"],
        "spread": {"k": "v"},
        "pair": {"k": "v"},
        "flag": True,
        "nested": [{"a": 1}],
        "X-Request-Id": ["r", "s"],
    }
    try:
        outcome = await registry.execute("s.styles", arguments)
    finally:
        await source.close()
    assert outcome.ok, outcome.error
    assert outcome.result["path"] == (
        "/api/styles/1%2C2/x%3D1%2Cy%3D2?csv=a%2Cb&spaced=a+b&piped=a%7Cb&k=v&pair=k%2Cv&flag=true"
        "&nested=%7B%22a%22%3A1%7D"
    )
    assert outcome.result["request_id"] == "r,s"


async def test_an_unreachable_server_is_an_error_observation(petstore: Petstore) -> None:
    port = free_port()  # nothing listens there
    document = petstore.document()
    document["servers"] = [{"url": f"http://127.0.0.1:{port}"}]
    source = OpenApiSource("gone", document)
    registry = ToolRegistry()
    registry.register(source.tools()[0])
    try:
        outcome = await registry.execute("gone.list_pets", {})
    finally:
        await source.close()
    assert outcome.error is not None
    assert outcome.error.message.startswith(f"GET /pets: the call to http://127.0.0.1:{port} failed: ConnectError")


@pytest.mark.parametrize(
    ("tool", "arguments", "complaint"),
    [
        ("petstore.get_pet_by_id", {}, "'petId' is a required property"),
        ("petstore.get_pet_by_id", {"petId": "1", "extra": 1}, "Additional properties are not allowed"),
        ("petstore.list_pets", {"limit": 0}, "arguments.limit: 0 is less than the minimum of 1"),
        ("petstore.create_pet", {"body": {"age": 3}}, "arguments.body: 'name' is a required property"),
        ("petstore.create_pet", {"body": {"name": "Rex", "age": 0}}, "less than or equal to the minimum of 0"),
        ("petstore.misbehave", {"mode": "explode"}, "is not one of"),
    ],
)
def test_arguments_that_break_the_schema_are_refused_before_any_call(
    petstore: Petstore, tool: str, arguments: dict[str, Any], complaint: str
) -> None:
    registry = ToolRegistry()
    for each in OpenApiSource("petstore", petstore.document()).tools():
        registry.register(each)
    with pytest.raises(InvalidArgumentError, match="invalid arguments") as raised:
        registry.validate(tool, arguments)
    assert complaint in str(raised.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("openapi: 3.0.0\npaths: {/a: [", "does not parse as YAML: line 2"),
        ('{"openapi": "3.0.0", "paths": }', "does not parse as JSON: line 1 column 31: Expecting value"),
        ("", "the document is empty"),
        ("- openapi", "the document is a list"),
        ("swagger: '2.0'\npaths: {}", "Swagger '2.0' document and only OpenAPI 3.x is supported: convert it"),
        ("info: {title: x}\npaths: {}", "no 'openapi' field"),
        ("openapi: 4.0.0\npaths: {}", "openapi '4.0.0' is not supported"),
        ("openapi: 3.1.0\ninfo: {title: x}", "no 'paths'"),
        ("[" * 500 + "]" * 500, "nested more than 100 levels"),
        ('{"a": ' * 150 + "1" + "}" * 150, "nested more than 100 levels"),
        ("openapi: 3.0.0\ninfo: {version: 2001-13-99}", "does not parse as YAML: month must be in 1..12"),
        ("x" * 10_000_001, "more than the 10000000 allowed"),
        (
            "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            ),
            "more than 1000000 values once its YAML aliases are expanded",
        ),
    ],
)
def test_a_document_that_is_not_openapi_3_is_refused_with_what_to_change(text: str, message: str) -> None:
    with pytest.raises(OpenApiError) as raised:
        parse_document(text)
    assert message in str(raised.value)


def test_a_huge_unparseable_document_gives_a_short_message() -> None:
    with pytest.raises(OpenApiError) as raised:
        parse_document("openapi: 3.0.0\npaths: " + "{" * 50 + "'" + "x" * 2_000_000)
    assert len(str(raised.value)) <= 400


def test_base_url_must_be_one_of_the_servers(petstore: Petstore) -> None:
    document = petstore.document()
    assert OpenApiSource("p", document, base_url="https://PETSTORE.example.com:443/v1/").base_url == (
        "https://PETSTORE.example.com:443/v1"
    )
    with pytest.raises(OpenApiError) as raised:
        OpenApiSource("p", document, base_url="https://evil.example.com/v1")
    assert str(raised.value) == (
        "OpenAPI source 'p': base_url 'https://evil.example.com/v1' is not one of the document's servers "
        f"(http://127.0.0.1:{petstore.port}/api, https://petstore.example.com/v1); use one of them (server variables "
        "take their defaults)"
    )
    for bad, message in [
        ("https://petstore.example.com/v2", "is not one of the document's servers"),
        ("ftp://petstore.example.com/v1", r"is not an absolute http\(s\) URL"),
        ("https://user:pw@petstore.example.com/v1", "must not carry credentials"),
        ("https://petstore.example.com/v1?key=1", "must not have a query or a fragment"),
        ("https://petstore.example.com:99999/v1", "has an invalid port"),
    ]:
        with pytest.raises(OpenApiError, match=message) as raised:
            OpenApiSource("p", document, base_url=bad)
        assert "pw" not in str(raised.value)


def test_a_relative_server_needs_base_url_for_its_origin(petstore: Petstore) -> None:
    document = {**petstore.document(), "servers": [{"url": "/api/v3"}]}
    with pytest.raises(OpenApiError, match=r"first server '/api/v3' is not an absolute http\(s\) URL; set base_url"):
        OpenApiSource("p", document)
    assert (
        OpenApiSource("p", document, base_url="https://host.example/api/v3").base_url == "https://host.example/api/v3"
    )
    with pytest.raises(OpenApiError, match="is not one of the document's servers"):
        OpenApiSource("p", document, base_url="https://host.example/admin")
    del document["servers"]  # OpenAPI's default server is "/"
    assert OpenApiSource("p", document, base_url="http://127.0.0.1:9").base_url == "http://127.0.0.1:9"


def test_a_server_variable_without_a_default_is_refused(petstore: Petstore) -> None:
    document = {**petstore.document(), "servers": [{"url": "https://{region}.example.com"}]}
    with pytest.raises(OpenApiError, match=r"servers\[0\] uses the variable \{region\} without a default"):
        OpenApiSource("p", document)


def test_two_operations_with_one_tool_name_are_refused_naming_both(petstore: Petstore) -> None:
    document = petstore.document()
    document["paths"]["/pets/{petId}"]["get"]["operationId"] = "list_pets"
    with pytest.raises(OpenApiError) as raised:
        OpenApiSource("petstore", document)
    assert str(raised.value) == (
        "OpenAPI source 'petstore': GET /pets and GET /pets/{petId} both become the tool 'petstore.list_pets'; "
        "give one of them another operationId"
    )


def test_operations_that_cannot_be_tools_are_left_out_with_the_reason(
    petstore: Petstore, caplog: pytest.LogCaptureFixture
) -> None:
    document = petstore.document()
    paths = document["paths"]
    paths["/session"] = {"get": {"parameters": [{"name": "sid", "in": "cookie", "required": True}]}}
    paths["/upload"] = {"post": {"requestBody": {"required": True, "content": {"image/png": {}}}}}
    paths["/remote"] = {"get": {"parameters": [{"$ref": "other.yaml#/components/parameters/Id"}]}}
    paths["/clash/{body}"] = {
        "put": {
            "parameters": [{"name": "body", "in": "path", "required": True}],
            "requestBody": {"content": {"application/merge-patch+json": {"schema": {"type": "object"}}}},
        }
    }
    paths["/undeclared/{id}"] = {"get": {}}
    paths["/matrix/{id}"] = {"get": {"parameters": [{"name": "id", "in": "path", "style": "matrix"}]}}
    paths["/elsewhere"] = {"get": {"servers": [{"url": "https://other.example.com"}]}}
    source = OpenApiSource("petstore", document)
    assert len(source.tools()) == 5
    assert source.left_out == [
        "GET /session left out: its cookie parameter 'sid' is required; cookies are not supported",
        "POST /upload left out: its request body (image/png) is required and only JSON bodies are supported",
        "GET /remote left out: $ref 'other.yaml#/components/parameters/Id' points outside the document; only local "
        "refs (#/...) are supported",
        "PUT /clash/{body} left out: two of its inputs are named 'body'",
        "GET /undeclared/{id} left out: its path parameter {id} is not declared in its parameters",
        "GET /matrix/{id} left out: parameter 'id' has style 'matrix', which is not supported",
        f"GET /elsewhere left out: it is served by its own servers, not by http://127.0.0.1:{petstore.port}/api",
    ]
    assert "GET /session left out" in caplog.text


async def test_an_optional_non_json_body_is_left_out_and_a_json_variant_is_sent_as_declared(
    petstore: Petstore,
) -> None:
    document = petstore.document()
    document["paths"]["/pets"]["post"]["requestBody"] = {
        "content": {"text/plain": {}, "application/merge-patch+json": {"schema": {"type": "object"}}}
    }
    document["paths"]["/pets/{petId}"]["put"] = {"requestBody": {"content": {"text/plain": {}}}}
    source = OpenApiSource("petstore", document)
    tools = {tool.name: tool for tool in source.tools()}
    assert tools["petstore.put_pets_pet_id"].input_schema["properties"] == {"petId": {"type": "string"}}
    registry = ToolRegistry()
    registry.register(tools["petstore.create_pet"])
    try:
        outcome = await registry.execute("petstore.create_pet", {"body": {"name": "Rex"}})
    finally:
        await source.close()
    assert outcome.result["content_type"] == "application/merge-patch+json"
    assert outcome.result["body"] == {"name": "Rex"}


def test_broken_documents_are_refused_with_the_place(petstore: Petstore) -> None:
    cases = [
        ({"/pets": {"get": {"parameters": [{"$ref": "#/components/parameters/Nope"}]}}}, "points to nothing"),
        ({"/pets": {"get": {"parameters": [{"in": "query"}]}}}, "needs a name and an 'in'"),
        ({"/pets": {"get": "list them"}}, r"paths\[/pets\].get must be a mapping"),
        ({"pets": {"get": {}}}, "path 'pets' must start with '/'"),
        ({"/pets": {"parameters": {"name": "id"}, "get": {}}}, "parameters must be a list"),
        ({"/pets": {"get": {"parameters": [42]}}}, r"operation parameters\[0\] must be a mapping, not a number"),
        ({"/pets": {"get": {"servers": "https://x.example"}}}, "servers must be a list of {url: ...}"),
        ({"/pets": {"get": {"servers": [{"description": "x"}]}}}, r"servers\[0\] must be a mapping with a url"),
        ({"/a": {"$ref": "#/paths/~1b"}, "/b": {"$ref": "#/paths/~1a"}}, "lead to more \\$refs 16 times"),
        (
            {"/pets": {"post": {"requestBody": {"content": {"application/json": {"schema": {"type": "strnig"}}}}}}},
            "not valid JSON Schema at properties/body/type",
        ),
    ]
    for paths, message in cases:
        document = {"openapi": "3.1.0", "servers": [{"url": "http://127.0.0.1"}], "paths": paths}
        with pytest.raises(OpenApiError, match=message):
            OpenApiSource("p", document)


def test_a_huge_recursive_schema_is_bounded(petstore: Petstore) -> None:
    # Each level uses the next twice: inlined, that is 2**40 nodes.
    schemas = {
        f"S{i}": {
            "type": "object",
            "properties": {
                "a": {"$ref": f"#/components/schemas/S{i + 1}"},
                "b": {"$ref": f"#/components/schemas/S{i + 1}"},
            },
        }
        for i in range(40)
    }
    schemas["S40"] = {"type": "string"}
    document = petstore.document()
    document["components"]["schemas"] = schemas
    document["paths"]["/pets"]["post"]["requestBody"]["content"]["application/json"]["schema"] = {
        "$ref": "#/components/schemas/S0"
    }
    source = OpenApiSource("petstore", document)
    assert source.left_out == ["POST /pets left out: its input schema expands to more than 5000 nodes"]


def test_a_deeply_nested_schema_is_cut(petstore: Petstore) -> None:
    schemas = {f"S{i}": {"type": "array", "items": {"$ref": f"#/components/schemas/S{i + 1}"}} for i in range(40)}
    schemas["S40"] = {"type": "string"}
    document = petstore.document()
    document["components"]["schemas"] = schemas
    document["paths"]["/pets"]["post"]["requestBody"]["content"]["application/json"]["schema"] = {
        "$ref": "#/components/schemas/S0"
    }
    body = next(t for t in OpenApiSource("p", document).tools() if t.name == "p.create_pet").input_schema
    node = body["properties"]["body"]
    depth = 0
    while "items" in node:
        node, depth = node["items"], depth + 1
    assert depth == 16  # each $ref and each "items" is a level
    assert node == {"description": "(nested more than 32 levels deep; not described)"}


def test_names_from_operation_ids_and_paths(petstore: Petstore) -> None:
    document = {
        "openapi": "3.0.0",
        "servers": [{"url": "http://127.0.0.1"}],
        "paths": {
            "/a": {"get": {"operationId": "getHTTPResponseCode"}, "put": {"operationId": "2fa-Enable"}},
            "/b/{id}/c.json": {"parameters": [{"name": "id", "in": "path"}], "get": {}, "post": {"operationId": "--"}},
            "/long": {"get": {"operationId": "x" * 100}},
        },
    }
    names = [tool.name for tool in OpenApiSource("api", document).tools()]
    assert names == [
        "api.get_http_response_code",
        "api.put_2fa_enable",
        "api.get_b_id_c_json",
        "api.post_b_id_c_json",
        "api." + "x" * 64,
    ]


def test_configured_headers_are_checked_without_showing_their_values(petstore: Petstore) -> None:
    with pytest.raises(OpenApiError) as raised:
        OpenApiSource("p", petstore.document(), headers={"Authorization": "Bearer x\r\nX-Evil: 1"})
    assert str(raised.value) == (
        "OpenAPI source 'p': the value of header 'Authorization' holds a line break or NUL; remove it (value not shown)"
    )
    with pytest.raises(OpenApiError, match="header name 'Bad Header' is not a valid HTTP header name"):
        OpenApiSource("p", petstore.document(), headers={"Bad Header": "x"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Pet-Store"}, "source name 'Pet-Store' must match"),
        ({"timeout_seconds": 0}, "timeout_seconds must be positive"),
        ({"max_response_bytes": 0}, "max_response_bytes must be positive"),
    ],
)
def test_bad_source_settings_are_refused(petstore: Petstore, kwargs: dict[str, Any], message: str) -> None:
    arguments = {"name": "p", **kwargs}
    with pytest.raises(OpenApiError, match=message):
        OpenApiSource(arguments.pop("name"), petstore.document(), **arguments)


async def test_from_config_reads_the_document_file(petstore: Petstore, tmp_path: Path) -> None:
    path = tmp_path / "petstore.yaml"
    path.write_text(petstore.text)
    config = OpenApiSourceConfig(name="store", document=str(path), timeout_seconds=3, max_response_bytes=4096)
    source = OpenApiSource.from_config(config)
    try:
        assert source.tools()[0].name == "store.list_pets"
        assert source.tools()[0].timeout_seconds == 3
        assert source.max_response_bytes == 4096
    finally:
        await source.close()
    with pytest.raises(OpenApiError, match=r"OpenAPI source 'x': cannot read '.*missing.yaml': No such file"):
        OpenApiSource.from_config(OpenApiSourceConfig(name="x", document=str(tmp_path / "missing.yaml")))
    path.write_bytes(b"\xff\xfe openapi")
    with pytest.raises(OpenApiError, match=r"cannot read '.*petstore.yaml': it is not UTF-8 text"):
        OpenApiSource.from_config(OpenApiSourceConfig(name="x", document=str(path)))
    path.write_text("swagger: '2.0'")
    with pytest.raises(OpenApiError, match=r"OpenAPI source 'x' \('.*petstore.yaml'\): this is a Swagger"):
        OpenApiSource.from_config(OpenApiSourceConfig(name="x", document=str(path)))
