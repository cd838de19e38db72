"""Fixtures shared by integration modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.triton import LocalTritonServer, TritonRepoOptions, cpu_twin_server


@pytest.fixture(scope="package")
def triton_twin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTritonServer]:
    """One real tritonserver on the CPU-twin repository (decoupled, 8 slots), shared by the Triton modules and stopped
    after tests/integration: a start takes a minute of both cores, and their tests only read metric deltas, so they
    need not have one each."""
    server = cpu_twin_server(tmp_path_factory.mktemp("twin"), TritonRepoOptions(twin_threads=2, max_batch_size=8))
    server.start()
    try:
        server.wait_ready(timeout=600)
        yield server
    finally:
        server.stop()
