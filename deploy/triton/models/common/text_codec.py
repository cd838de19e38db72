"""Tokenizer loading and token <-> text conversions shared by the python models (copied next to each model.py).

Depends on numpy and transformers only: it runs in Triton's python stub, on the CPU twin and in the NGC container.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

REPLACEMENT_CHAR = "\ufffd"
# A token decoded in front of a continuation, so tokenizers that drop the leading space of a sequence's first token
# (SentencePiece) keep it: the continuation is whatever the anchor's decode grows by.
ANCHOR_TEXT = "a"
# Tokens of the earlier text that seed the decode window of IncrementalDecoder.
CONTEXT_TOKENS = 5
TRUE_WORDS = ("true", "1", "yes", "y", "t", "on")
FALSE_WORDS = ("false", "0", "no", "n", "f", "off", "")


def parse_flag(value: str | None, name: str) -> bool:
    """A config parameter's "true"/"false" as bool; ValueError naming the parameter otherwise."""
    text = (value or "").strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"parameter {name} is {value!r}; use true or false")


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """The string values of a model config's ``parameters`` map."""
    return {key: entry.get("string_value", "") for key, entry in model_config.get("parameters", {}).items()}


def load_tokenizer(path: str) -> Any:
    """A HF tokenizer from a tokenizer directory or a .gguf file, offline."""
    if not path:
        raise ValueError("parameter tokenizer_dir is empty; regenerate the repository with a tokenizer_dir")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    source = Path(path)
    if source.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def decode(tokenizer: Any, ids: list[int], *, skip_special_tokens: bool = True) -> str:
    """The text of ``ids`` decoded as the start of a sequence."""
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


def decode_continuation(tokenizer: Any, ids: list[int], *, skip_special_tokens: bool = True) -> str:
    """The text ``ids`` add after earlier text: leading spaces kept where decoding them alone would drop them."""
    if not ids:
        return ""
    anchor = tokenizer.encode(ANCHOR_TEXT, add_special_tokens=False)
    anchor_text = decode(tokenizer, anchor, skip_special_tokens=skip_special_tokens)
    text = decode(tokenizer, anchor + list(ids), skip_special_tokens=skip_special_tokens)
    if anchor and text.startswith(anchor_text):
        return text[len(anchor_text) :]
    return decode(tokenizer, list(ids), skip_special_tokens=skip_special_tokens)


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts in front of every encoded text (e.g. BOS), often none."""
    with_special = tokenizer.encode(ANCHOR_TEXT, add_special_tokens=True)
    plain = tokenizer.encode(ANCHOR_TEXT, add_special_tokens=False)
    return list(with_special[: len(with_special) - len(plain)])


def decode_output(tokenizer: Any, ids: list[int], prefix: list[int], *, skip_special_tokens: bool = True) -> str:
    """Text of output ids that either start a sequence (they begin with ``prefix``, the tokenizer's BOS: a prompt
    echoed back) or continue one (streamed deltas, generated text without the prompt)."""
    if prefix and list(ids[: len(prefix)]) == prefix:
        return decode(tokenizer, list(ids), skip_special_tokens=skip_special_tokens)
    return decode_continuation(tokenizer, list(ids), skip_special_tokens=skip_special_tokens)


def ends_mid_character(tokenizer: Any, ids: list[int]) -> bool:
    """True when ``ids`` stop inside a multibyte character (their decode ends in U+FFFD)."""
    return decode_continuation(tokenizer, ids, skip_special_tokens=False).endswith(REPLACEMENT_CHAR)


class IncrementalDecoder:
    """Turns a growing list of generated tokens into text deltas that keep spaces and multibyte characters.

    Each ``push`` decodes a short window ``tokens[prefix:]`` and returns what it adds to ``tokens[prefix:read]``;
    text ending in U+FFFD (an incomplete UTF-8 sequence) waits for the token that completes it. ``flush`` returns
    what is still held back. The deltas concatenate to the decode of all generated tokens.
    """

    def __init__(self, tokenizer: Any, context_ids: list[int] | None = None, *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(context_ids or [])[-CONTEXT_TOKENS:]
        if not context:
            context = tokenizer.encode(ANCHOR_TEXT, add_special_tokens=False)
        self._tokens = context
        self._prefix = 0
        self._read = len(context)

    def push(self, ids: list[int]) -> str:
        """Appends tokens and returns the text they complete (possibly empty)."""
        self._tokens.extend(int(i) for i in ids)
        prefix_text = decode(self._tokenizer, self._tokens[self._prefix : self._read], skip_special_tokens=self._skip)
        new_text = decode(self._tokenizer, self._tokens[self._prefix :], skip_special_tokens=self._skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self._tokens)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Text of tokens pushed but not yet returned (a character cut off at the end shows as U+FFFD)."""
        if self._read == len(self._tokens):
            return ""
        prefix_text = decode(self._tokenizer, self._tokens[self._prefix : self._read], skip_special_tokens=self._skip)
        new_text = decode(self._tokenizer, self._tokens[self._prefix :], skip_special_tokens=self._skip)
        self._prefix = self._read = len(self._tokens)
        return new_text[len(prefix_text) :]


def words_to_ids_list(tokenizer: Any, words: list[str]) -> np.ndarray:
    """TensorRT-LLM's word-list tensor ``[2, n]`` INT32: row 0 the words' token ids end to end, row 1 the end offset
    of each word, both padded with -1 (a list with no words is ``[[0], [-1]]``)."""
    flat: list[int] = []
    offsets: list[int] = []
    for word in words:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if not ids:
            continue
        flat.extend(ids)
        offsets.append(len(flat))
    if not flat:
        return np.array([[0], [-1]], dtype=np.int32)
    width = max(len(flat), len(offsets))
    out = np.full((2, width), -1, dtype=np.int32)
    out[0, : len(flat)] = flat
    out[1, : len(offsets)] = offsets
    return out


def ids_list_to_token_lists(ids_list: np.ndarray) -> list[list[int]]:
    """The inverse of words_to_ids_list: each word's token ids."""
    array = np.asarray(ids_list).reshape(2, -1)
    flat, offsets = array[0].tolist(), array[1].tolist()
    words: list[list[int]] = []
    start = 0
    for end in offsets:
        if end < 0:
            break
        words.append([int(i) for i in flat[start:end]])
        start = end
    return words


def embedding_bias(tokenizer: Any, words: list[str], weights: list[float], vocab_size: int) -> np.ndarray:
    """A per-token logit bias of length ``vocab_size`` (empty when no words): each word's tokens get its weight."""
    if len(words) != len(weights):
        raise ValueError(
            f"embedding_bias_words has {len(words)} entries but embedding_bias_weights has {len(weights)}; "
            "send one weight per word"
        )
    if not words:
        return np.zeros((0,), dtype=np.float32)
    bias = np.zeros((vocab_size,), dtype=np.float32)
    for word, weight in zip(words, weights, strict=True):
        for token in tokenizer.encode(word, add_special_tokens=False):
            bias[token] += weight
    return bias


def strings(array: np.ndarray | None) -> list[str]:
    """A BYTES tensor's elements as UTF-8 strings (empty elements dropped)."""
    if array is None:
        return []
    values = []
    for item in np.asarray(array).reshape(-1):
        text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        if text:
            values.append(text)
    return values
