"""Incremental detokenization that keeps spaces and multibyte characters intact (windowed decode, as in vLLM/TGI)."""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# How many prompt tokens seed the decode window: enough for tokenizers that drop a leading space at the start.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one sequence's tokens into text deltas.

    Decoding each token alone loses SentencePiece's leading spaces and splits multibyte characters across tokens.
    Instead each step decodes a short window ``tokens[prefix_offset:]`` and emits what it adds to
    ``tokens[prefix_offset:read_offset]``; text that ends in U+FFFD (an incomplete UTF-8 sequence) is held back until
    the next token completes it. ``flush()`` at the end returns whatever is still held back, so the concatenated
    deltas equal ``tokenizer.decode(generated, skip_special_tokens=..., clean_up_tokenization_spaces=False)``.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._tokens: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Appends one generated token and returns the text it completes (possibly empty)."""
        self._tokens.append(token_id)
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._tokens[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """The text of tokens added but not yet emitted (e.g. a character cut off by max_tokens shows as U+FFFD)."""
        if self._read_offset == len(self._tokens):
            return ""
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._tokens[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._tokens)
        return new_text[len(prefix_text) :]
