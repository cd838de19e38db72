"""Per-tenant quotas of the planner: calls per minute, concurrent runs and model tokens per minute.

A call over a quota is RESOURCE_EXHAUSTED with the delay after which it would pass (sent as google.rpc.RetryInfo),
so well-behaved clients back off instead of hammering. Token usage is charged as each model call returns, and
exported per tenant as a Prometheus counter.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

from services.common import ResourceExhaustedError
from services.common.auth import OPEN_SERVICES, REFLECTION_SERVICES, acting_as, current_principal
from services.common.config import QuotaConfig, QuotaLimits
from services.planner.types import Generation, Sampling, ToolOutcome, ToolSpec, Usage

WINDOW_SECONDS = 60.0


class QuotaExceededError(ResourceExhaustedError):
    """A tenant is over one of its quotas; ``retry_after_seconds`` says when the call would pass."""

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = max(retry_after_seconds, 0.001)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TenantQuotas:
    """The quotas of every tenant (``config.default``, overridden by ``config.tenants``), enforced in memory.

    Counts are per planner process: with N replicas a tenant gets up to N times its per-minute limits (a shared
    store would fix that; concurrent runs are counted from the runs this process drives).
    """

    def __init__(
        self,
        config: QuotaConfig,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self.tokens_total = Counter(
            "meshpilot_tenant_tokens",
            "Model tokens charged to each tenant's runs, by kind (prompt or completion).",
            ["tenant", "kind"],
            registry=registry,
        )

    def limits(self, tenant: str) -> QuotaLimits:
        return self.config.tenants.get(tenant, self.config.default)

    def admit_request(self, tenant: str) -> None:
        """Takes one call from the tenant's bucket (refilled at requests_per_minute, holding at most that many)."""
        rate = self.limits(tenant).requests_per_minute
        if rate is None:
            return
        now = self._clock()
        bucket = self._buckets.setdefault(tenant, _Bucket(float(rate), now))
        bucket.tokens = min(float(rate), bucket.tokens + (now - bucket.updated) * rate / WINDOW_SECONDS)
        bucket.updated = now
        if bucket.tokens < 1:
            wait = (1 - bucket.tokens) * WINDOW_SECONDS / rate
            raise QuotaExceededError(
                f"tenant {tenant!r} is over its quota of {rate} requests per minute; retry in {math.ceil(wait)}s",
                wait,
            )
        bucket.tokens -= 1

    def admit_run(self, tenant: str, active_runs: int) -> None:
        """Whether the tenant may start another run next to ``active_runs`` going, and within its token rate."""
        limits = self.limits(tenant)
        if limits.max_concurrent_runs is not None and active_runs >= limits.max_concurrent_runs:
            raise QuotaExceededError(
                f"tenant {tenant!r} has {active_runs} runs going, its quota of concurrent runs; wait for one to end "
                "or cancel one",
                1.0,
            )
        if limits.tokens_per_minute is not None:
            used, oldest = self._window(tenant)
            if used >= limits.tokens_per_minute:
                wait = oldest + WINDOW_SECONDS - self._clock()
                raise QuotaExceededError(
                    f"tenant {tenant!r} used {used} model tokens in the last minute, its quota of "
                    f"{limits.tokens_per_minute}; retry in {math.ceil(wait)}s",
                    wait,
                )

    def charge(self, tenant: str, usage: Usage) -> None:
        """Counts a model call's tokens against the tenant (the token rate and the exported counter)."""
        self._tokens.setdefault(tenant, deque()).append((self._clock(), usage.total_tokens))
        self.tokens_total.labels(tenant, "prompt").inc(usage.prompt_tokens)
        self.tokens_total.labels(tenant, "completion").inc(usage.completion_tokens)

    def tokens_last_minute(self, tenant: str) -> int:
        return self._window(tenant)[0]

    def _window(self, tenant: str) -> tuple[int, float]:
        """Tokens charged within the last minute, and when the oldest of them was charged."""
        charges = self._tokens.get(tenant)
        if not charges:
            return 0, self._clock()
        horizon = self._clock() - WINDOW_SECONDS
        while charges and charges[0][0] <= horizon:
            charges.popleft()
        return sum(tokens for _, tokens in charges), charges[0][0] if charges else self._clock()


class ChargedLLM:
    """An LLM client that charges every generation's tokens to ``tenant`` (the run's) in ``quotas``, and makes its
    calls on the tenant's behalf (``acting_as``: the inference client sends the tenant along)."""

    def __init__(self, llm: Any, tenant: str, quotas: TenantQuotas) -> None:
        self._llm = llm
        self.tenant = tenant
        self._quotas = quotas

    async def generate(
        self,
        messages: list[dict[str, str]],
        json_schema: dict[str, Any],
        max_tokens: int,
        *,
        timeout: float | None = None,
        model: str = "",
        sampling: Sampling | None = None,
    ) -> Generation:
        extra = {"sampling": sampling} if sampling is not None else {}
        with acting_as(self.tenant):  # the inference service shares its capacity between tenants by it
            generation: Generation = await self._llm.generate(
                messages, json_schema, max_tokens, timeout=timeout, model=model, **extra
            )
        self._quotas.charge(self.tenant, generation.usage)
        return generation

    async def list_models(self, *, timeout: float | None = None) -> list[str]:
        result: list[str] = await self._llm.list_models(timeout=timeout)
        return result


class TenantTools:
    """A tool client whose calls act for ``tenant`` (the run's): the tools service shows it the tenant's tools."""

    def __init__(self, tools: Any, tenant: str) -> None:
        self._tools = tools
        self.tenant = tenant

    async def list_tools(self, *, timeout: float | None = None) -> list[ToolSpec]:
        with acting_as(self.tenant):
            result: list[ToolSpec] = await self._tools.list_tools(timeout=timeout)
        return result

    async def execute(self, call_id: str, name: str, arguments: dict[str, Any], **options: Any) -> ToolOutcome:
        with acting_as(self.tenant):
            result: ToolOutcome = await self._tools.execute(call_id, name, arguments, **options)
        return result


class QuotaInterceptor(grpc.aio.ServerInterceptor):
    """Takes every call (health and reflection excepted) from its tenant's requests_per_minute before the handler
    runs; inside the AuthInterceptor, so the tenant is the authenticated caller's."""

    def __init__(self, quotas: TenantQuotas) -> None:
        self._quotas = quotas

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.lstrip("/").startswith(OPEN_SERVICES + REFLECTION_SERVICES):
            return handler
        admit = self._quotas.admit_request
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                admit(current_principal().tenant)
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                admit(current_principal().tenant)
                async for response in stream(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
