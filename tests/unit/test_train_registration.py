"""Registering a trained model: a HF directory in <data_dir>/models is listed by ListModels and served under its
folder's name, loaded on first use; folders that are not models (or not loadable) are left out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest

from inference_core.model_loading import find_models
from inference_core.testing import FakeEngine, write_tiny_llama
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common import load_config
from services.inference import create_server, servicer_of
from services.inference.models_dir import models_directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-registered"))


def test_find_models_lists_model_directories_by_id(tmp_path: Path, tiny: Path) -> None:
    assert find_models(tmp_path / "absent") == {}
    shutil.copytree(tiny, tmp_path / "kg-r1")
    (tmp_path / ".kg-r2.partial").mkdir()  # an export being written
    (tmp_path / "Not An Id").mkdir()
    (tmp_path / "empty").mkdir()
    assert find_models(tmp_path) == {"kg-r1": tmp_path / "kg-r1"}


async def test_a_registered_model_is_listed_and_served_without_a_restart(tmp_path: Path, tiny: Path) -> None:
    config = load_config(data_dir=str(tmp_path))
    config.inference.server.port = 0
    config.inference.model_id = "fake-model"
    server = create_server(config, engine=FakeEngine(["hello"]))
    await server.start()
    await servicer_of(server).start_engines()
    await server.set_serving()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            listed = await stub.ListModels(inference_pb2.ListModelsRequest())
            assert [m.id for m in listed.models] == ["fake-model"]

            models = models_directory(config.data_dir)
            shutil.copytree(tiny, models / "kg-r1")
            broken = models / "kg-broken"
            broken.mkdir()
            (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))

            listed = await stub.ListModels(inference_pb2.ListModelsRequest())
            assert {m.id: m.is_default for m in listed.models} == {"fake-model": True, "kg-r1": False}
            assert next(m for m in listed.models if m.id == "kg-r1").backend == "torch"
            request = inference_pb2.GenerateRequest(model="kg-r1", prompt="Hello", max_tokens=3)
            replies = [reply async for reply in stub.Generate(request)]
            assert replies[-1].model == "kg-r1" and replies[-1].usage.completion_tokens >= 1

            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.CountTokens(inference_pb2.CountTokensRequest(model="kg-broken", prompt="x"))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            assert "fake-model" in (error.value.details() or "") and "kg-r1" in (error.value.details() or "")
    finally:
        await server.stop(0)
        await servicer_of(server).shutdown_engines()
