"""The knowledge service process: builds the gRPC server over the graph store and runs it."""

from __future__ import annotations

import logging
import time

from meshpilot.knowledge.v1 import knowledge_pb2, knowledge_pb2_grpc
from services.common.config import MeshConfig
from services.common.server import MeshServer, ServiceBinding, serve
from services.common.tls import server_tls
from services.knowledge.servicer import KnowledgeServicer
from services.knowledge.store import GraphStore, OxigraphStore

log = logging.getLogger(__name__)

SERVICE_NAME = knowledge_pb2.DESCRIPTOR.services_by_name["KnowledgeService"].full_name
# Requests are a query, a label or an IRI: kilobytes. 30 GetEntity calls with a 4 MB IRI took the service's RSS from
# 121 MB to 410 MB, where it stayed (the allocator keeps what gRPC and protobuf used), even when the handler refused
# them at once; refused by gRPC before they are read, such calls leave it at 137 MB.
MAX_REQUEST_BYTES = 1024 * 1024


def create_server(config: MeshConfig, store: GraphStore | None = None) -> MeshServer:
    """The knowledge gRPC server over ``store`` (default: an OxigraphStore at config.knowledge.store_path).

    The store is not started here: ``main`` starts it in ``serve``'s startup, so health stays NOT_SERVING until the
    store is loaded; tests that inject a store start it themselves.
    """
    store = store if store is not None else OxigraphStore.from_config(config.knowledge)
    servicer = KnowledgeServicer(store)
    binding = ServiceBinding(SERVICE_NAME, servicer, knowledge_pb2_grpc.add_KnowledgeServiceServicer_to_server)
    return MeshServer(
        config.knowledge.server, [binding], max_request_bytes=MAX_REQUEST_BYTES, tls=server_tls(config, "knowledge")
    )


async def main(config: MeshConfig) -> None:
    """Runs the knowledge service until SIGTERM: loads (or reopens) the store in startup, closes it on shutdown."""
    store = OxigraphStore.from_config(config.knowledge)
    server = create_server(config, store)

    async def startup() -> None:
        started = time.monotonic()
        await store.start()
        report = store.load_report
        if report is not None and report.loaded:
            log.info(
                "knowledge store loaded at first start: %d triples, bulk load %.2fs, ready in %.2fs, %.1f MB on disk",
                report.triples,
                report.load_seconds,
                time.monotonic() - started,
                report.size_bytes / 1e6,
            )
        else:
            log.info("knowledge store reopened in %.2fs", time.monotonic() - started)

    await serve(server, startup=startup, shutdown=store.close)
