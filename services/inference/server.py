"""Building and running the inference server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from inference_core import BatchingConfig, Engine, TorchEngine
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common import ConfigError, MeshConfig, MeshServer, serve
from services.common.server import ServiceBinding
from services.common.tls import server_tls
from services.inference.metrics import InferenceMetrics
from services.inference.servicer import InferenceServicer

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def create_engine(config: MeshConfig) -> Engine:
    """The engine ``config.inference`` describes (not started: ``start()`` loads the model)."""
    section = config.inference
    if section.backend == "triton":
        return _triton_engine(config)
    if section.backend != "torch":
        raise ConfigError(f"inference.backend {section.backend!r} is not available in this build; set it to 'torch'")
    return TorchEngine(
        section.model_path or None,
        model_id=section.model_id,
        device=section.device,
        dtype=section.dtype,
        threads=section.threads,
        max_queue=section.max_queue,
        continuous=section.continuous_batching,
        batching=BatchingConfig(
            max_batch_size=section.max_batch_size,
            max_seq_len=section.max_seq_len,
            prefix_cache_tokens=section.prefix_cache_tokens,
            prefix_block_size=section.prefix_block_size,
            prefill_chunk_tokens=section.prefill_chunk_tokens,
            speculative_tokens=section.speculative_tokens,
            max_queue=section.max_queue,
            fair_share=section.fair_share,
            max_queue_per_tenant=section.max_queue_per_tenant,
            tenant_weights=dict(section.tenant_weights),
        ),
    )


def _triton_engine(config: MeshConfig) -> Engine:
    section = config.inference
    try:
        from inference_core.triton_engine import TritonEngine
    except ImportError as e:
        raise ConfigError(
            f"inference.backend 'triton' needs tritonclient ({e}); run `pip install 'meshpilot[triton]'`"
        ) from e
    return TritonEngine(
        section.triton_url,
        section.triton_model,
        model_id=section.model_id,
        tokenizer_path=section.model_path or None,
        context_length=section.max_seq_len,
    )


def create_server(config: MeshConfig, engine: Engine | None = None) -> MeshServer:
    """The inference MeshServer over ``engine`` (built from config.inference when None) served as
    ``config.inference.model_id``. Health stays NOT_SERVING until ``servicer.start_engines()`` has loaded it."""
    engine = engine or create_engine(config)
    registry = CollectorRegistry()
    model_id = config.inference.model_id
    servicer = InferenceServicer(
        [engine],
        default_max_tokens=config.inference.default_max_tokens,
        model_ids=[model_id],
        metrics=InferenceMetrics(registry, {model_id: engine}),
    )
    binding = ServiceBinding(SERVICE_NAME, servicer, inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    return MeshServer(config.inference.server, [binding], registry=registry, tls=server_tls(config, "inference"))


def servicer_of(server: MeshServer) -> InferenceServicer:
    servicer = server.bindings[0].servicer
    assert isinstance(servicer, InferenceServicer)
    return servicer


async def main(config: MeshConfig) -> None:
    """Serves until SIGTERM/SIGINT: the model loads after the port is bound (health NOT_SERVING meanwhile)."""
    server = create_server(config)
    servicer = servicer_of(server)
    await serve(server, startup=servicer.start_engines, shutdown=servicer.shutdown_engines)
