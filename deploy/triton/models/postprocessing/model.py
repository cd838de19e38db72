"""Triton python model `postprocessing`: token ids from the tensorrt_llm step to text."""

from __future__ import annotations

import json

import numpy as np
import text_codec
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """TOKENS_BATCH [batch, beams, tokens] and SEQUENCE_LENGTH [batch, beams] to OUTPUT [batch, beams] text.

    Tokens that do not begin with the tokenizer's BOS continue earlier text (a streamed delta, or the generated part
    without the prompt) and are decoded as a continuation, so the leading space of their first token survives.
    """

    def initialize(self, args: dict) -> None:
        params = text_codec.model_parameters(json.loads(args["model_config"]))
        self.tokenizer = text_codec.load_tokenizer(params.get("tokenizer_dir", ""))
        self.skip_special_tokens = text_codec.parse_flag(
            params.get("skip_special_tokens", "true"), "skip_special_tokens"
        )
        self.prefix = text_codec.special_prefix(self.tokenizer)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            texts = [
                [self._decode(list(beam[: int(length)])) for beam, length in zip(row, row_lengths, strict=True)]
                for row, row_lengths in zip(tokens, lengths.reshape(tokens.shape[0], -1), strict=True)
            ]
            output = np.array([[t.encode("utf-8") for t in row] for row in texts], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", output)]))
        return responses

    def _decode(self, ids: list[int]) -> str:
        return text_codec.decode_output(self.tokenizer, ids, self.prefix, skip_special_tokens=self.skip_special_tokens)
