"""Building and running the inference server."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from pathlib import Path

from prometheus_client import CollectorRegistry

from inference_core import BatchingConfig, Engine, EngineError, TorchEngine
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common import ConfigError, MeshConfig, MeshServer, serve
from services.common.server import ServiceBinding
from services.common.tls import server_tls
from services.inference.metrics import InferenceMetrics
from services.inference.models_dir import ModelDirectory, models_directory
from services.inference.servicer import InferenceServicer

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def create_engine(config: MeshConfig) -> Engine:
    """The engine ``config.inference`` describes (not started: ``start()`` loads the model)."""
    section = config.inference
    backend: str = section.backend
    if backend == "auto":
        backend = _auto_backend(config)
    if backend == "triton":
        return _triton_engine(config)
    if backend == "openvino":
        return _openvino_engine(config)
    if backend != "torch":
        raise ConfigError(f"inference.backend {backend!r} is not available in this build; set it to 'torch'")
    return TorchEngine(
        section.model_path or None,
        model_id=section.model_id,
        device=section.device,
        dtype=section.dtype,
        threads=section.threads,
        max_queue=section.max_queue,
        continuous=section.continuous_batching,
        weights=section.torch_weights,
        prepack=section.torch_prepack,
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


def _openvino_cache_dir(config: MeshConfig) -> Path:
    return config.inference.openvino_cache_dir or config.data_dir / "openvino"


def _auto_backend(config: MeshConfig) -> str:
    """openvino when its runtime is installed and the model is exported or an exporter is at hand (it served agent
    calls faster on CPU, docs/bench/inference.md), else torch; on a GPU device always torch."""
    section = config.inference
    if section.device != "cpu":
        return "torch"
    if importlib.util.find_spec("openvino_genai") is None:
        log.info("inference.backend auto: torch (openvino-genai is not installed; `make install-openvino` adds it)")
        return "torch"
    from inference_core.openvino_export import find_exporter, ir_directory, is_exported

    try:
        ir_dir = ir_directory(section.model_path or None, _openvino_cache_dir(config), section.openvino_weight_format)
    except EngineError as e:
        log.info("inference.backend auto: torch (%s)", e)
        return "torch"
    if is_exported(ir_dir) or find_exporter(section.openvino_exporter or None) is not None:
        log.info("inference.backend auto: openvino")
        return "openvino"
    log.info("inference.backend auto: torch (the model has no OpenVINO IR and optimum-cli was not found)")
    return "torch"


def _openvino_engine(config: MeshConfig) -> Engine:
    from inference_core.openvino_engine import OpenVINOConfig, OpenVINOEngine

    section = config.inference
    # InferenceConfig has validated every value OpenVINOConfig checks.
    openvino = OpenVINOConfig(
        cache_dir=_openvino_cache_dir(config),
        weight_format=section.openvino_weight_format,
        exporter=section.openvino_exporter,
        max_num_seqs=section.openvino_max_num_seqs,
        max_num_batched_tokens=max(section.prefill_chunk_tokens, section.openvino_max_num_seqs),
        kv_cache_gb=section.openvino_kv_cache_gb,
        prefix_caching=section.prefix_cache_tokens > 0,
        inference_precision=section.openvino_precision,
        threads=section.threads,
        prompt_lookup_tokens=section.openvino_prompt_lookup_tokens,
        max_queue=section.max_queue,
        fair_share=section.fair_share,
        max_queue_per_tenant=section.max_queue_per_tenant,
        tenant_weights=dict(section.tenant_weights),
    )
    return OpenVINOEngine(
        section.model_path or None, model_id=section.model_id, config=openvino, max_seq_len=section.max_seq_len
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
        models=ModelDirectory(
            models_directory(config.data_dir), lambda name, path: _registered_engine(config, name, path)
        ),
    )
    binding = ServiceBinding(SERVICE_NAME, servicer, inference_pb2_grpc.add_InferenceServiceServicer_to_server)
    return MeshServer(config.inference.server, [binding], registry=registry, tls=server_tls(config, "inference"))


def _registered_engine(config: MeshConfig, model_id: str, path: Path) -> Engine:
    """A torch engine for a registered model (a HF directory), with the default model's engine settings."""
    section = config.inference.model_copy(update={"model_path": str(path), "model_id": model_id, "backend": "torch"})
    return create_engine(config.model_copy(update={"inference": section}))


def servicer_of(server: MeshServer) -> InferenceServicer:
    servicer = server.bindings[0].servicer
    assert isinstance(servicer, InferenceServicer)
    return servicer


async def main(config: MeshConfig) -> None:
    """Serves until SIGTERM/SIGINT: the model loads after the port is bound (health NOT_SERVING meanwhile). Exits with
    status 1 when the engine is lost while serving, so that its supervisor starts a new process."""
    engine = create_engine(config)
    server = create_server(config, engine)
    if not await serve_watched(server, engine):
        raise SystemExit(1)


async def serve_watched(
    server: MeshServer, engine: Engine, *, stop_event: asyncio.Event | None = None, every_s: float = 1.0
) -> bool:
    """``serve`` with a watch on the default engine. An engine that stops being ready while the service runs (the
    openvino backend's pipeline process died: every call in flight has failed with UNAVAILABLE) turns health
    NOT_SERVING and stops the service, so that a supervisor (meshpilot up, Kubernetes) starts a new one instead of
    keeping a process that answers UNAVAILABLE. False when that happened."""
    servicer = servicer_of(server)
    stop = stop_event or asyncio.Event()
    watching: list[asyncio.Task[None]] = []
    lost = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            await asyncio.sleep(every_s)
            if not engine.is_ready and not stop.is_set():
                log.error("the engine is no longer ready; stopping so that a new inference process starts")
                lost.set()
                await server.set_serving(False)
                stop.set()

    async def startup() -> None:
        await servicer.start_engines()
        watching.append(asyncio.create_task(watch()))

    async def shutdown() -> None:
        for task in watching:
            task.cancel()
        await servicer.shutdown_engines()

    await serve(server, startup=startup, shutdown=shutdown, stop_event=stop)
    return not lost.is_set()
