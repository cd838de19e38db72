"""Structured decoding with xgrammar: compiled grammars cached by (kind, text), one matcher per sequence."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
import xgrammar as xgr

from inference_core.errors import InvalidRequestError
from inference_core.types import Constraint

KIND_NAMES = {"json_schema": "JSON schema", "regex": "regex", "ebnf": "EBNF grammar"}


class GrammarCache:
    """Compiles constraints for one tokenizer and keeps the ``max_entries`` most recently used (agents resend the same
    schema on every call). Thread-safe; compilation runs outside the lock."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], max_entries: int = 64) -> None:
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, constraint: Constraint) -> xgr.CompiledGrammar:
        """The compiled grammar; raises InvalidRequestError carrying xgrammar's message when the text is invalid."""
        key = (constraint.kind, constraint.value)
        with self._lock:
            compiled = self._entries.get(key)
            if compiled is not None:
                self._entries.move_to_end(key)
                return compiled
        compiled = self._compile(constraint)
        with self._lock:
            self._entries[key] = compiled
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return compiled

    def _compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        name = KIND_NAMES.get(constraint.kind)
        if name is None:
            raise InvalidRequestError(
                f"constraint kind {constraint.kind!r} is unknown; use one of {', '.join(KIND_NAMES)}"
            )
        try:
            if constraint.kind == "json_schema":
                try:
                    schema = json.loads(constraint.value)
                except json.JSONDecodeError as e:
                    raise InvalidRequestError(
                        f"the JSON schema is not valid JSON: {e}; send the schema as JSON text"
                    ) from e
                if not isinstance(schema, dict | bool):
                    raise InvalidRequestError("the JSON schema must be a JSON object (or true/false)")
                return self._compiler.compile_json_schema(constraint.value, any_whitespace=False)
            if constraint.kind == "regex":
                return self._compiler.compile_regex(constraint.value)
            return self._compiler.compile_grammar(constraint.value)
        except InvalidRequestError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError subclasses with the parser's message
            message = str(e).strip() or type(e).__name__
            raise InvalidRequestError(f"invalid {name}: {message}") from e


class RowConstraint:
    """The grammar state of one sequence: masks its logits row and advances with each accepted token."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._vocab_size = vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Sets the logits of tokens the grammar forbids next to -inf, in place; ``logits`` is one row (vocab,)."""
        self._matcher.fill_next_token_bitmask(self._bitmask, 0)
        bitmask = self._bitmask if logits.device.type == "cpu" else self._bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits.view(1, -1), bitmask, vocab_size=self._vocab_size)
        if logits.shape[-1] > self._vocab_size:
            logits[self._vocab_size :] = float("-inf")

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(token_id):
            # Cannot happen when the token was drawn from masked logits; failing loudly beats emitting invalid output.
            raise RuntimeError(f"token {token_id} was rejected by the grammar after masking")

    @property
    def is_terminated(self) -> bool:
        """True once the grammar is complete and its stop token was accepted."""
        return self._matcher.is_terminated()
