"""Triton python model `tensorrt_llm` (CPU twin): the TensorRT-LLM backend's I/O served by inference_core's engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from typing import Any

import numpy as np
import text_codec
import triton_python_backend_utils as pb_utils
from twin_request import TwinRequest, parse_request

from inference_core import EngineClosedError, EngineError, FinishReason, InvalidRequestError, QueueFullError

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    """Runs one TorchEngine on its own event loop thread; every request is a task on it.

    Decoupled: streamed responses carry only new token ids, grouped so that each group ends on a whole character;
    the last response carries FINAL. Non-streaming responses carry the whole sequence (prompt included unless
    exclude_input_in_output). A cancelled request (client cancel, or a `stop` request naming its request id) aborts
    its engine request and ends with a flags-only FINAL.
    """

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = text_codec.model_parameters(config)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.tokenizer = text_codec.load_tokenizer(params.get("tokenizer_dir", ""))
        self.special_prefix = text_codec.special_prefix(self.tokenizer)
        self.exclude_input_default = text_codec.parse_flag(
            params.get("exclude_input_in_output"), "exclude_input_in_output"
        )
        self.guided_decoding = bool(params.get("guided_decoding_backend"))
        self.check_period_s = max(int(params.get("cancellation_check_period_ms") or 100), 1) / 1000.0
        threads = int(params.get("threads") or 0)
        # Imported here, not at the top: Triton also imports this file to read its config, and torch takes seconds.
        from inference_core import TorchEngine

        self.engine = TorchEngine(
            params.get("model_path") or None,
            device=params.get("device") or "cpu",
            dtype=params.get("dtype") or "float32",
            threads=threads or None,
            max_queue=max(int(params.get("max_batch_size") or 64), 1),
        )
        self.requests_metric = pb_utils.MetricFamily(
            name="meshpilot_twin_requests_total",
            description="Requests the CPU twin ended, by outcome (finished, cancelled, error)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.outcomes = {
            outcome: self.requests_metric.Metric(labels={"outcome": outcome})
            for outcome in ("finished", "cancelled", "error")
        }
        self.tokens_metric = pb_utils.MetricFamily(
            name="meshpilot_twin_generated_tokens_total",
            description="Tokens the CPU twin's engine generated",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.generated_tokens = self.tokens_metric.Metric(labels={})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="twin-engine", daemon=True)
        self.thread.start()
        self.inflight: dict[str, str] = {}
        self._call(self.engine.start())

    def execute(self, requests: list) -> list | None:
        if not self.decoupled:
            return self._call(self._complete_all(requests))
        for request in requests:
            sender = request.get_response_sender()
            if _stop_requested(request):
                self._stop(request.request_id())
                sender.send(flags=FINAL)
                continue
            try:
                job = self._parse(request)
            except ValueError as e:
                sender.send(_error(str(e), pb_utils.TritonError.INVALID_ARG), flags=FINAL)
                continue
            asyncio.run_coroutine_threadsafe(self._stream(job, request.request_id(), sender), self.loop)
        return None

    def finalize(self) -> None:
        self._call(self.engine.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def _parse(self, request: Any) -> TwinRequest:
        inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
        return parse_request(
            inputs,
            self.tokenizer,
            exclude_input_default=self.exclude_input_default,
            guided_decoding=self.guided_decoding,
            special_prefix=self.special_prefix,
        )

    def _stop(self, triton_id: str) -> None:
        engine_id = self.inflight.get(triton_id)
        if engine_id is not None:
            asyncio.run_coroutine_threadsafe(self.engine.abort(engine_id), self.loop)

    async def _complete_all(self, requests: list) -> list:
        return list(await asyncio.gather(*(self._complete(r) for r in requests)))

    async def _complete(self, request: Any) -> Any:
        """Non-decoupled: one response with the whole output."""
        try:
            job = self._parse(request)
        except ValueError as e:
            return _error(str(e), pb_utils.TritonError.INVALID_ARG)
        generated: list[int] = []
        metrics = _Metrics()
        try:
            async for chunk in self.engine.generate(job.generation):
                metrics.tokens(len(chunk.token_ids))
                generated.extend(chunk.token_ids)
        except EngineError as e:
            self._count("error", generated)
            return _error(str(e), _engine_error_code(e))
        self._count("finished", generated)
        return self._response(job, generated, generated, metrics)

    async def _stream(self, job: TwinRequest, triton_id: str, sender: Any) -> None:
        engine_id = job.generation.request_id
        if triton_id:
            self.inflight[triton_id] = engine_id
        watcher = asyncio.create_task(self._watch_cancellation(engine_id, sender))
        generated: list[int] = []
        pending: list[int] = []
        metrics = _Metrics()
        finished = False
        try:
            async with contextlib.aclosing(self.engine.generate(job.generation)) as chunks:
                async for chunk in chunks:
                    metrics.tokens(len(chunk.token_ids))
                    generated.extend(chunk.token_ids)
                    pending.extend(chunk.token_ids)
                    if chunk.finish_reason is not None:
                        finished = chunk.finish_reason is not FinishReason.CANCELLED
                        break
                    if job.streaming and pending and not text_codec.ends_mid_character(self.tokenizer, pending):
                        sender.send(self._response(job, pending, generated, metrics))
                        pending = []
        except EngineError as e:
            self._count("error", generated)
            sender.send(_error(str(e), _engine_error_code(e)), flags=FINAL)
            return
        except Exception as e:  # the stream must end with FINAL whatever broke, or the client waits forever
            self._count("error", generated)
            sender.send(
                _error(f"internal error in the CPU twin: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL),
                flags=FINAL,
            )
            raise
        finally:
            watcher.cancel()
            self.inflight.pop(triton_id, None)
        if not finished or sender.is_cancelled():
            self._count("cancelled", generated)
            sender.send(flags=FINAL)
            return
        self._count("finished", generated)
        sender.send(self._response(job, pending if job.streaming else generated, generated, metrics), flags=FINAL)

    def _count(self, outcome: str, generated: list[int]) -> None:
        self.outcomes[outcome].increment(1)
        self.generated_tokens.increment(len(generated))

    async def _watch_cancellation(self, engine_id: str, sender: Any) -> None:
        while not sender.is_cancelled():
            await asyncio.sleep(self.check_period_s)
        await self.engine.abort(engine_id)

    def _response(self, job: TwinRequest, ids: list[int], generated: list[int], metrics: _Metrics) -> Any:
        if not job.streaming and not job.exclude_input_in_output:
            ids = job.prompt_ids + list(ids)
        tensors = [
            pb_utils.Tensor("output_ids", np.array([[ids]], dtype=np.int32).reshape(1, 1, len(ids))),
            pb_utils.Tensor("sequence_length", np.array([[len(ids)]], dtype=np.int32)),
            pb_utils.Tensor("batch_index", np.zeros((1, 1), dtype=np.int32)),
            pb_utils.Tensor("sequence_index", np.zeros((1, 1), dtype=np.int32)),
        ]
        if job.return_num_input_tokens:
            tensors.append(pb_utils.Tensor("num_input_tokens", np.array([[len(job.prompt_ids)]], dtype=np.int32)))
        if job.return_num_output_tokens:
            tensors.append(pb_utils.Tensor("num_output_tokens", np.array([[len(generated)]], dtype=np.int32)))
        if job.return_perf_metrics:
            for name, value in metrics.as_dict().items():
                tensors.append(pb_utils.Tensor(name, np.array([[value]], dtype=np.int64)))
        return pb_utils.InferenceResponse(output_tensors=tensors)


class _Metrics:
    """The perf-metric timestamps TensorRT-LLM reports, in ns since the epoch."""

    def __init__(self) -> None:
        self.arrival = time.time_ns()
        self.first_token = 0
        self.last_token = 0

    def tokens(self, count: int) -> None:
        if count:
            now = time.time_ns()
            self.first_token = self.first_token or now
            self.last_token = now

    def as_dict(self) -> dict[str, int]:
        return {
            "arrival_time_ns": self.arrival,
            "first_scheduled_time_ns": self.arrival,
            "first_token_time_ns": self.first_token,
            "last_token_time_ns": self.last_token,
        }


def _stop_requested(request: Any) -> bool:
    tensor = pb_utils.get_input_tensor_by_name(request, "stop")
    return tensor is not None and bool(np.asarray(tensor.as_numpy()).reshape(-1)[0])


def _error(message: str, code: int) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def _engine_error_code(error: EngineError) -> int:
    if isinstance(error, InvalidRequestError):
        return pb_utils.TritonError.INVALID_ARG
    if isinstance(error, (QueueFullError, EngineClosedError)):
        return pb_utils.TritonError.UNAVAILABLE
    return pb_utils.TritonError.INTERNAL
