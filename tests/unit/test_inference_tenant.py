"""The inference service serves each Generate for the tenant its x-meshpilot-tenant metadata names, and counts
refusals per tenant with a bounded set of labels."""

from __future__ import annotations

import grpc
import pytest

from inference_core import QueueFullError
from inference_core.testing import FakeEngine
from meshpilot.inference.v1 import inference_pb2
from services.common.auth import TENANT_METADATA
from services.inference.metrics import OTHER_TENANT, TenantLabels
from tests.unit.test_inference_servicer import Harness, config  # noqa: F401  (config is a fixture)


async def generate_as(h: Harness, metadata: tuple[tuple[str, str], ...]) -> None:
    request = inference_pb2.GenerateRequest(prompt="hi")
    [_ async for _ in h.stub.Generate(request, metadata=metadata)]


@pytest.mark.parametrize(
    ("metadata", "tenant"),
    [
        (((TENANT_METADATA, "acme"),), "acme"),
        (((TENANT_METADATA, "team-7"), ("other", "x")), "team-7"),
        ((), "default"),
        (((TENANT_METADATA, "Acme"),), "default"),
        (((TENANT_METADATA, "7up"),), "default"),
        (((TENANT_METADATA, "a" * 64),), "default"),
        (((TENANT_METADATA, "a" * 4_000),), "default"),
        (((TENANT_METADATA, "acme corp"),), "default"),
        (((TENANT_METADATA, "acme_corp"),), "default"),
    ],
)
async def test_the_tenant_metadata_reaches_the_engine_request_and_anything_else_is_default(
    config,  # noqa: F811
    metadata: tuple[tuple[str, str], ...],
    tenant: str,
) -> None:
    engine = FakeEngine(["ok"])
    async with Harness(engine, config) as h:
        await generate_as(h, metadata)
    assert engine.requests[0].tenant == tenant


async def test_a_refused_generate_is_resource_exhausted_and_counted_for_its_tenant(config) -> None:  # noqa: F811
    engine = FakeEngine([QueueFullError("tenant 'acme' has 16 requests waiting"), "ok"])
    async with Harness(engine, config) as h:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate_as(h, ((TENANT_METADATA, "acme"),))
        await generate_as(h, ((TENANT_METADATA, "acme"),))
        registry = h.server.registry
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    labels = {"model": "fake-model", "tenant": "acme"}
    assert registry.get_sample_value("meshpilot_inference_refused_total", labels) == 1


def test_tenant_labels_are_bounded() -> None:
    labels = TenantLabels(limit=2)
    assert [labels(t) for t in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER_TENANT, "a", OTHER_TENANT, "b"]
