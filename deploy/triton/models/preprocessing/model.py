"""Triton python model `preprocessing`: prompt text to token ids, word lists to TensorRT-LLM's id-list tensors."""

from __future__ import annotations

import json

import numpy as np
import text_codec
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Inputs QUERY, REQUEST_OUTPUT_LEN and optional word lists / ids; outputs what the tensorrt_llm step takes."""

    def initialize(self, args: dict) -> None:
        params = text_codec.model_parameters(json.loads(args["model_config"]))
        self.tokenizer = text_codec.load_tokenizer(params.get("tokenizer_dir", ""))
        self.add_special_tokens = text_codec.parse_flag(params.get("add_special_tokens", "true"), "add_special_tokens")
        self.vocab_size = len(self.tokenizer)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._process(request)))
            except ValueError as e:
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
                )
        return responses

    def _process(self, request: object) -> list:
        queries = _input(request, "QUERY")
        if queries is None:
            raise ValueError("text_input is missing; send the prompt as a [1, 1] BYTES tensor")
        batch = queries.shape[0]
        prompts = [text_codec.strings(row)[0] if text_codec.strings(row) else "" for row in queries]
        if not all(prompts):
            raise ValueError("text_input is empty; send some text")
        tokenizer = self.tokenizer
        ids = [tokenizer.encode(p, add_special_tokens=self.add_special_tokens) for p in prompts]
        end_id = _scalar(request, "END_ID", tokenizer.eos_token_id)
        pad_id = _scalar(request, "PAD_ID", tokenizer.pad_token_id)
        width = max(len(row) for row in ids)
        input_ids = np.full((batch, width), pad_id, dtype=np.int32)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
        output_len = _input(request, "REQUEST_OUTPUT_LEN")
        if output_len is None:
            raise ValueError("max_tokens is missing; send it as a [1, 1] INT32 tensor")
        bias_words = _rows(request, "EMBEDDING_BIAS_WORDS", batch)
        bias_weights = _input(request, "EMBEDDING_BIAS_WEIGHTS")
        biases = [
            text_codec.embedding_bias(
                tokenizer,
                words,
                [] if bias_weights is None else [float(w) for w in np.asarray(bias_weights[i]).reshape(-1)],
                self.vocab_size,
            )
            for i, words in enumerate(bias_words)
        ]
        return [
            pb_utils.Tensor("INPUT_ID", input_ids),
            pb_utils.Tensor("REQUEST_INPUT_LEN", np.array([[len(row)] for row in ids], dtype=np.int32)),
            pb_utils.Tensor("BAD_WORDS_IDS", self._word_lists(_rows(request, "BAD_WORDS_DICT", batch))),
            pb_utils.Tensor("STOP_WORDS_IDS", self._word_lists(_rows(request, "STOP_WORDS_DICT", batch))),
            pb_utils.Tensor("EMBEDDING_BIAS", _stack_padded(biases, np.float32, 0.0)),
            pb_utils.Tensor("REQUEST_OUTPUT_LEN", np.asarray(output_len, dtype=np.int32).reshape(batch, 1)),
            pb_utils.Tensor("OUT_END_ID", np.full((batch, 1), end_id, dtype=np.int32)),
            pb_utils.Tensor("OUT_PAD_ID", np.full((batch, 1), pad_id, dtype=np.int32)),
        ]

    def _word_lists(self, rows: list[list[str]]) -> np.ndarray:
        lists = [text_codec.words_to_ids_list(self.tokenizer, words) for words in rows]
        width = max(a.shape[1] for a in lists)
        out = np.full((len(lists), 2, width), -1, dtype=np.int32)
        for i, array in enumerate(lists):
            out[i, :, : array.shape[1]] = array
        return out


def _input(request: object, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _scalar(request: object, name: str, default: int) -> int:
    value = _input(request, name)
    return int(np.asarray(value).reshape(-1)[0]) if value is not None else int(default)


def _rows(request: object, name: str, batch: int) -> list[list[str]]:
    value = _input(request, name)
    if value is None:
        return [[] for _ in range(batch)]
    return [text_codec.strings(row) for row in np.asarray(value).reshape(batch, -1)]


def _stack_padded(rows: list[np.ndarray], dtype: type, fill: float) -> np.ndarray:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
