"""A scripted in-process Triton gRPC server (tritonclient's service protos) and a tiny tokenizer, for TritonEngine tests."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from services.triton import TritonRepoOptions, parse_model_config, render_configs


@dataclass(frozen=True)
class Fail:
    """Ends the stream with Triton's error: a status (with the triton_grpc_error header) or an error_message."""

    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class Hang:
    """Sends nothing more until the client cancels."""


@dataclass(frozen=True)
class Close:
    """Ends the stream without a final response (a server bug or a dropped stream)."""


# A script step: text for one response (with the cumulative output token count when the model returns counts).
Step = str | Fail | Hang | Close
Script = Callable[[service_pb2.ModelInferRequest], list[Step]]


def repository_configs(**options: Any) -> dict[str, model_config_pb2.ModelConfig]:
    """The ModelConfigs of our GPU-flavour TensorRT-LLM repository (the contract real deployments serve)."""
    values = {"engine_dir": "/engines/model", "tokenizer_dir": "/nowhere/tokenizer", **options}
    texts = render_configs(TritonRepoOptions(**values).validated())
    return {name: parse_model_config(text, name) for name, text in texts.items()}


def drop_inputs(config: model_config_pb2.ModelConfig, *names: str) -> model_config_pb2.ModelConfig:
    copy = model_config_pb2.ModelConfig()
    copy.CopyFrom(config)
    kept = [t for t in copy.input if t.name not in names]
    del copy.input[:]
    copy.input.extend(kept)
    return copy


def rename_inputs(config: model_config_pb2.ModelConfig, **renames: str) -> model_config_pb2.ModelConfig:
    copy = model_config_pb2.ModelConfig()
    copy.CopyFrom(config)
    for tensor in copy.input:
        tensor.name = renames.get(tensor.name, tensor.name)
    return copy


def decode_inputs(request: service_pb2.ModelInferRequest) -> dict[str, Any]:
    """A request's inputs as Python values: lists of str for BYTES, scalars or lists for numbers."""
    formats = {"INT32": "<i", "INT64": "<q", "UINT64": "<Q", "UINT32": "<I", "FP32": "<f", "BOOL": "<?"}
    values: dict[str, Any] = {}
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        if tensor.datatype == "BYTES":
            items, offset = [], 0
            while offset < len(raw):
                (length,) = struct.unpack_from("<I", raw, offset)
                items.append(raw[offset + 4 : offset + 4 + length].decode())
                offset += 4 + length
            values[tensor.name] = items
        else:
            fmt = formats[tensor.datatype]
            items = [v for (v,) in struct.iter_unpack(fmt, raw)]
            values[tensor.name] = items[0] if len(items) == 1 else items
        values.setdefault("_shapes", {})[tensor.name] = list(tensor.shape)
    return values


def _bytes_output(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<I", len(data)) + data


@dataclass
class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Serves ``configs``; each ModelStreamInfer request is answered by ``script(request)``: one response per text
    step (num_input_tokens = prompt words, num_output_tokens = steps so far, when requested), then a flags-only
    final. Records requests, stop requests (TensorRT-LLM's ``stop`` input) and streams the client cancelled."""

    configs: dict[str, model_config_pb2.ModelConfig]
    script: Script = lambda request: ["Hello", " world"]
    ready: dict[str, bool] = field(default_factory=dict)
    requests: list[service_pb2.ModelInferRequest] = field(default_factory=list)
    stops: list[tuple[str, str]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    error_header: bool = True
    """False: behave like servers older than the triton_grpc_error header (errors as error_message)."""

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> service_pb2.ModelReadyResponse:
        return service_pb2.ModelReadyResponse(ready=self.ready.get(request.name, request.name in self.configs))

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> service_pb2.ModelConfigResponse:
        if request.name not in self.configs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.name}' is not found")
        return service_pb2.ModelConfigResponse(config=self.configs[request.name])

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[service_pb2.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        metadata = {k: v for k, v in context.invocation_metadata() or ()}
        self.metadata.append(metadata)
        request = await anext(aiter(request_iterator))
        if any(t.name == "stop" for t in request.inputs):
            self.stops.append((request.model_name, request.id))
            yield self._final(request)
            return
        self.requests.append(request)
        wanted = {o.name for o in request.outputs}
        try:
            for count, step in enumerate(self.script(request), start=1):
                if isinstance(step, Fail):
                    if self.error_header and metadata.get("triton_grpc_error") == "true":
                        await context.abort(step.code, step.message)
                    yield service_pb2.ModelStreamInferResponse(error_message=step.message)
                    return
                if isinstance(step, Hang):
                    await asyncio.Event().wait()
                if isinstance(step, Close):
                    return
                yield self._response(request, step, count, wanted)
            yield self._final(request)
        except asyncio.CancelledError:
            self.cancelled.append(request.id)
            raise

    def _response(
        self, request: service_pb2.ModelInferRequest, text: str, count: int, wanted: set[str]
    ) -> service_pb2.ModelStreamInferResponse:
        response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        outputs = {"text_output": ("BYTES", _bytes_output(text))}
        words = len(decode_inputs(request)["text_input"][0].split())
        outputs["num_input_tokens"] = ("INT32", struct.pack("<i", words))
        outputs["num_output_tokens"] = ("INT32", struct.pack("<i", count))
        for name, (datatype, raw) in outputs.items():
            if name in wanted:
                response.outputs.add(name=name, datatype=datatype, shape=[1, 1])
                response.raw_output_contents.append(raw)
        response.parameters["triton_final_response"].bool_param = False
        return service_pb2.ModelStreamInferResponse(infer_response=response)

    @staticmethod
    def _final(request: service_pb2.ModelInferRequest) -> service_pb2.ModelStreamInferResponse:
        response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.parameters["triton_final_response"].bool_param = True
        return service_pb2.ModelStreamInferResponse(infer_response=response)


async def start_fake(fake: FakeTriton) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def write_word_tokenizer(directory: Path) -> Path:
    """A whitespace-and-punctuation word tokenizer with a chat template (one token per word), saved as a HF dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "Hello", "world", ":", "user", "assistant", "system"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(directory)
    return directory
