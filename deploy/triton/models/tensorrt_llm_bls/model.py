"""Triton python model `tensorrt_llm_bls`: the ensemble's I/O, chaining preprocessing and tensorrt_llm by BLS calls and
detokenizing the stream over the whole sequence (deltas keep spaces and multibyte characters)."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import text_codec
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PREPROCESSING_INPUTS = {
    "text_input": "QUERY",
    "max_tokens": "REQUEST_OUTPUT_LEN",
    "bad_words": "BAD_WORDS_DICT",
    "stop_words": "STOP_WORDS_DICT",
    "embedding_bias_words": "EMBEDDING_BIAS_WORDS",
    "embedding_bias_weights": "EMBEDDING_BIAS_WEIGHTS",
    "end_id": "END_ID",
    "pad_id": "PAD_ID",
}
PREPROCESSING_OUTPUTS = {
    "INPUT_ID": "input_ids",
    "REQUEST_INPUT_LEN": "input_lengths",
    "REQUEST_OUTPUT_LEN": "request_output_len",
    "BAD_WORDS_IDS": "bad_words_list",
    "STOP_WORDS_IDS": "stop_words_list",
    "EMBEDDING_BIAS": "embedding_bias",
    "OUT_END_ID": "end_id",
    "OUT_PAD_ID": "pad_id",
}
# Front input name -> tensorrt_llm input name, for the inputs passed through unchanged.
ENGINE_INPUTS = {
    "top_k": "runtime_top_k",
    "top_p": "runtime_top_p",
    "length_penalty": "len_penalty",
    "stream": "streaming",
    **{
        name: name
        for name in (
            "temperature",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "min_tokens",
            "seed",
            "exclude_input_in_output",
            "return_log_probs",
            "return_context_logits",
            "return_generation_logits",
            "return_perf_metrics",
            "return_num_input_tokens",
            "return_num_output_tokens",
            "beam_width",
            "num_return_sequences",
            "lora_task_id",
            "lora_weights",
            "lora_config",
            "guided_decoding_guide_type",
            "guided_decoding_guide",
        )
    },
}
TOKEN_OUTPUTS = ("output_ids", "sequence_length")


class _Cancelled(Exception):
    pass


class _Refused(Exception):
    """A step answered with an error; it goes back to the client with the step's message and code."""

    def __init__(self, error: Any) -> None:
        super().__init__(error.message())
        self.code = error.code() if hasattr(error, "code") else pb_utils.TritonError.INTERNAL


class TritonPythonModel:
    """Each request runs on a worker thread (decoupled) so one instance serves many streams at once."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = text_codec.model_parameters(config)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.engine_model = params.get("tensorrt_llm_model_name") or "tensorrt_llm"
        self.accumulate = text_codec.parse_flag(params.get("accumulate_tokens"), "accumulate_tokens")
        self.skip_special = text_codec.parse_flag(params.get("skip_special_tokens", "true"), "skip_special_tokens")
        self.tokenizer = text_codec.load_tokenizer(params.get("tokenizer_dir", ""))
        self.prefix = text_codec.special_prefix(self.tokenizer)
        self.output_names = [o["name"] for o in config.get("output", [])]
        self.pool = ThreadPoolExecutor(max_workers=max(int(config.get("max_batch_size") or 1), 1))

    def execute(self, requests: list) -> list | None:
        if not self.decoupled:
            return [self._unary(_inputs(request)) for request in requests]
        for request in requests:
            self.pool.submit(self._serve, _inputs(request), request.get_response_sender())
        return None

    def finalize(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _unary(self, inputs: dict[str, np.ndarray]) -> Any:
        try:
            engine_inputs = self._preprocess(inputs)
            responses = list(self._engine_responses(engine_inputs, None))
        except _Refused as e:
            return _error(str(e), e.code)
        ids, extras = _collect(responses)
        return self._text_response(self._full_text(ids), extras)

    def _serve(self, inputs: dict[str, np.ndarray], sender: Any) -> None:
        try:
            engine_inputs = self._preprocess(inputs)
            streaming = _flag(inputs, "stream")
            if not streaming:
                ids, extras = _collect(self._engine_responses(engine_inputs, sender))
                sender.send(self._text_response(self._full_text(ids), extras), flags=FINAL)
                return
            prompt = [
                int(i) for i in engine_inputs["input_ids"].reshape(-1)[: int(engine_inputs["input_lengths"].item())]
            ]
            decoder = text_codec.IncrementalDecoder(self.tokenizer, prompt, skip_special_tokens=self.skip_special)
            text = ""
            for response in self._engine_responses(engine_inputs, sender):
                ids, extras = _collect([response])
                delta = decoder.push(ids)
                text += delta
                if delta or extras:
                    sender.send(self._text_response(text if self.accumulate else delta, extras))
            tail = decoder.flush()
            if tail:
                sender.send(self._text_response(text + tail if self.accumulate else tail, {}), flags=FINAL)
            else:
                sender.send(flags=FINAL)
        except _Cancelled:
            sender.send(flags=FINAL)
        except _Refused as e:
            sender.send(_error(str(e), e.code), flags=FINAL)
        except Exception as e:  # the stream must end with FINAL whatever broke, or the client waits forever
            message = f"internal error in tensorrt_llm_bls: {type(e).__name__}: {e}"
            sender.send(_error(message, pb_utils.TritonError.INTERNAL), flags=FINAL)
            raise

    def _preprocess(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = [pb_utils.Tensor(PREPROCESSING_INPUTS[n], v) for n, v in inputs.items() if n in PREPROCESSING_INPUTS]
        response = pb_utils.InferenceRequest(
            model_name="preprocessing", inputs=tensors, requested_output_names=list(PREPROCESSING_OUTPUTS)
        ).exec()
        if response.has_error():
            raise _Refused(response.error())
        engine_inputs = {
            PREPROCESSING_OUTPUTS[t.name()]: t.as_numpy()
            for t in response.output_tensors()
            if t.name() in PREPROCESSING_OUTPUTS
        }
        for name, value in inputs.items():
            if name in ENGINE_INPUTS:
                engine_inputs[ENGINE_INPUTS[name]] = value
        return engine_inputs

    def _engine_responses(self, engine_inputs: dict[str, np.ndarray], sender: Any) -> Any:
        """The tensorrt_llm responses carrying tensors; on client cancellation asks tensorrt_llm to stop, drains it and
        raises _Cancelled."""
        request_id = uuid.uuid4().hex
        tensors = [pb_utils.Tensor(name, value) for name, value in engine_inputs.items()]
        request = pb_utils.InferenceRequest(
            model_name=self.engine_model,
            inputs=tensors,
            requested_output_names=[*TOKEN_OUTPUTS, *(n for n in self.output_names if n != "text_output")],
            request_id=request_id,
        )
        if not self.decoupled:
            response = request.exec()
            if response.has_error():
                raise _Refused(response.error())
            yield response
            return
        cancelled = False
        for response in request.exec(decoupled=True):
            if response.has_error():
                raise _Refused(response.error())
            if not cancelled and sender is not None and sender.is_cancelled():
                cancelled = True
                self._stop(request_id)
            if not cancelled and response.output_tensors():
                yield response
        if cancelled:
            raise _Cancelled()

    def _stop(self, request_id: str) -> None:
        one = np.ones((1, 1), dtype=np.int32)
        stop = pb_utils.InferenceRequest(
            model_name=self.engine_model,
            inputs=[
                pb_utils.Tensor("input_ids", one),
                pb_utils.Tensor("input_lengths", one),
                pb_utils.Tensor("request_output_len", one),
                pb_utils.Tensor("stop", np.ones((1, 1), dtype=np.bool_)),
            ],
            requested_output_names=list(TOKEN_OUTPUTS),
            request_id=request_id,
        )
        for _ in stop.exec(decoupled=True):
            pass

    def _full_text(self, ids: list[int]) -> str:
        return text_codec.decode_output(self.tokenizer, ids, self.prefix, skip_special_tokens=self.skip_special)

    def _text_response(self, text: str, extras: dict[str, np.ndarray]) -> Any:
        tensors = [pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_))]
        tensors += [pb_utils.Tensor(name, value) for name, value in extras.items()]
        return pb_utils.InferenceResponse(output_tensors=tensors)


def _inputs(request: Any) -> dict[str, np.ndarray]:
    return {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}


def _collect(responses: Any) -> tuple[list[int], dict[str, np.ndarray]]:
    """The token ids of the responses (first beam) and their other outputs (the last value of each)."""
    ids: list[int] = []
    extras: dict[str, np.ndarray] = {}
    for response in responses:
        tensors = {t.name(): t.as_numpy() for t in response.output_tensors()}
        if "output_ids" in tensors:
            length = int(np.asarray(tensors["sequence_length"]).reshape(-1)[0])
            ids.extend(int(i) for i in np.asarray(tensors["output_ids"]).reshape(-1)[:length])
        extras.update({name: value for name, value in tensors.items() if name not in TOKEN_OUTPUTS})
    return ids, extras


def _flag(inputs: dict[str, np.ndarray], name: str, default: bool = False) -> bool:
    value = inputs.get(name)
    return default if value is None else bool(np.asarray(value).reshape(-1)[0])


def _error(message: str, code: int) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
