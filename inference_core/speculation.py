"""Prompt-lookup drafts for speculative decoding: guess a sequence's next tokens from its own earlier tokens.

Agent calls copy a lot from their context: tool names, argument keys, entity names, JSON punctuation seen in the
system prompt's examples. When the last few tokens occurred before, the tokens that followed them then are a good guess
for what follows now. The scheduler sends such a guess (the *draft*) through the model alongside the row's decode
token, one pass for all of them, and keeps the drafted tokens the model itself would have chosen (see
ContinuousBatchScheduler): greedy output is unchanged, only fewer steps produce it. Needs no draft model, as in
"prompt lookup decoding" (Saxena, 2023) and vLLM's n-gram proposer.
"""

from __future__ import annotations

from collections.abc import Iterable


class NgramProposer:
    """Drafts the continuation of the latest earlier occurrence of the sequence's last ``n`` tokens (longest ``n``
    of ``sizes`` first). Indexes each n-gram as tokens arrive, so a proposal costs a dictionary lookup."""

    def __init__(self, tokens: Iterable[int], sizes: tuple[int, ...] = (3, 2)) -> None:
        self.sizes = tuple(sorted(sizes, reverse=True))
        self.tokens: list[int] = []
        # n-gram -> the position right after its latest occurrence that has a token after it.
        self._latest: dict[tuple[int, ...], int] = {}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        # The n-grams ending at the current last token now have a successor: index them before adding it.
        end = len(self.tokens)
        for n in self.sizes:
            if end >= n:
                self._latest[tuple(self.tokens[end - n : end])] = end
        self.tokens.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the last n tokens before; empty when they never occurred."""
        if k <= 0:
            return []
        for n in self.sizes:
            if len(self.tokens) < n:
                continue
            start = self._latest.get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start : start + k]
        return []
