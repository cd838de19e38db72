"""KV memory under a fixed budget: per-sequence slots for compute and a block-granular LRU prefix cache.

Design (CPU first): attention reads each running sequence's keys and values as one contiguous run, so running
sequences live in *slots* of a preallocated tensor ``[layers, slots, kv_heads, max_len, head_dim]``, kept compact
(rows 0..B-1) so a decode step slices a view instead of gathering. Prompt prefixes worth keeping (agents resend the same
system prompt and tool schemas) are copied block by block into a separate preallocated pool; a later prompt that starts
with the same tokens copies those blocks into its slot instead of recomputing them. Both tensors are allocated once, so
memory never grows past the budget, ``slots * max_len + prefix_blocks * block_size`` tokens, whatever the load.

On CPU the slots are reserved, not written (``reserved_zeros``, an anonymous memory map): pages become resident when a
step first writes them, so a process holds the memory of the slots its load has used (slots are kept compact: 4
clients touch slots 0-3) and an idle one none of it, where ``torch.zeros`` wrote every byte at start. The prefix pool
is written at start (see ``PrefixCache``).
"""

from __future__ import annotations

import math
import mmap
from collections import OrderedDict
from dataclasses import dataclass

import torch


def reserved_zeros(size: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero tensor of ``size``. On CPU its memory is an anonymous memory map, which the kernel fills with zeros page by
    page on first touch: nothing is written and nothing becomes resident until it is used, and the zeros are the
    mapping's contract, not an assumption. Elsewhere, ``torch.zeros``.

    Not numpy's ``zeros`` (calloc): numpy advises transparent huge pages for large arrays, and first writes to those
    made a 16-client run ~18% slower in-process (75-84 against 91-101 tok/s written up front; 4 KB pages: 94-100)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(size, dtype=dtype, device=device)
    element = torch.empty((), dtype=dtype).element_size()
    mapping = mmap.mmap(-1, max(1, math.prod(size) * element))
    # The tensor holds a reference to the mapping, which lives as long as the tensor.
    return torch.frombuffer(mapping, dtype=dtype, count=math.prod(size)).view(size)


def common_prefix_length(token_lists: list[list[int]]) -> int:
    """How many leading tokens all of ``token_lists`` share (0 for an empty list)."""
    if not token_lists:
        return 0
    # The lexicographic min and max differ first where any two lists differ.
    low, high = min(token_lists), max(token_lists)
    for i, (a, b) in enumerate(zip(low, high, strict=False)):
        if a != b:
            return i
    return len(low)


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * self.head_dim * element


class SlotKVCache:
    """Keys and values of the running sequences, one slot (of ``max_len`` positions) per sequence."""

    def __init__(self, shape: KVShape, num_slots: int, max_len: int) -> None:
        self.shape = shape
        self.num_slots = num_slots
        self.max_len = max_len
        size = (shape.num_layers, num_slots, shape.kv_heads, max_len, shape.head_dim)
        self.keys = reserved_zeros(size, shape.dtype, shape.device)
        self.values = reserved_zeros(size, shape.dtype, shape.device)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def move(self, src: int, dst: int, length: int) -> None:
        """Copies the first ``length`` positions of slot ``src`` into slot ``dst`` (compaction on retire)."""
        if src != dst and length > 0:
            self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
            self.values[:, dst, :, :length] = self.values[:, src, :, :length]


@dataclass
class _Block:
    index: int
    parent: tuple | None


class PrefixCache:
    """LRU cache of prompt-prefix KV in blocks of ``block_size`` tokens.

    Block ``i`` of a prompt is keyed by (key of block ``i-1``, its tokens), so a key names a whole prefix exactly, never
    by hash alone. Eviction takes the least recently used *leaf*: lookups and inserts touch a chain from its last block
    back to its first, so a parent is always more recent than its children.
    """

    def __init__(self, shape: KVShape, num_blocks: int, block_size: int = 32) -> None:
        self.shape = shape
        self.block_size = block_size
        self.num_blocks = num_blocks
        size = (shape.num_layers, num_blocks, shape.kv_heads, block_size, shape.head_dim)
        # Written at start, unlike the slots: blocks are handed out fresh until the pool is full, so a reserved pool
        # paged in over the first ~1,000 distinct prompts (~8 minutes of 16 agents) and a memory soak could not tell
        # that from a leak; the slots page in within the first calls.
        self.keys = torch.zeros(size, dtype=shape.dtype, device=shape.device)
        self.values = torch.zeros(size, dtype=shape.dtype, device=shape.device)
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()
        self._free = list(range(num_blocks - 1, -1, -1))
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def hit_rate(self) -> float:
        """Share of prompt tokens (of all lookups so far) whose KV came from the cache."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    @property
    def used_blocks(self) -> int:
        return len(self._blocks)

    def _chain(self, tokens: list[int], limit: int) -> list[tuple]:
        keys: list[tuple] = []
        parent: tuple | None = None
        for start in range(0, limit - self.block_size + 1, self.block_size):
            key = (parent, tuple(tokens[start : start + self.block_size]))
            keys.append(key)
            parent = key
        return keys

    def _touch(self, keys: list[tuple]) -> None:
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def lookup(self, tokens: list[int]) -> list[int]:
        """Block indices of the longest cached prefix of ``tokens``, leaving at least one token to compute."""
        hits: list[tuple] = []
        for key in self._chain(tokens, len(tokens) - 1):
            if key not in self._blocks:
                break
            hits.append(key)
        self._touch(hits)
        self.queried_tokens += len(tokens)
        self.hit_tokens += len(hits) * self.block_size
        return [self._blocks[key].index for key in hits]

    def restore(self, blocks: list[int], slots: SlotKVCache, slot: int) -> int:
        """Copies ``blocks`` into positions 0.. of ``slot``; returns the number of positions filled."""
        for i, block in enumerate(blocks):
            span = slice(i * self.block_size, (i + 1) * self.block_size)
            slots.keys[:, slot, :, span] = self.keys[:, block]
            slots.values[:, slot, :, span] = self.values[:, block]
        return len(blocks) * self.block_size

    def insert(self, tokens: list[int], slots: SlotKVCache, slot: int) -> int:
        """Stores the full blocks of ``tokens`` (whose KV sits in ``slot``); returns how many blocks were new."""
        chain = self._chain(tokens, len(tokens))
        added = 0
        for i, key in enumerate(chain):
            if key in self._blocks:
                continue
            index = self._allocate(protect=chain[:i])
            if index is None:
                break
            span = slice(i * self.block_size, (i + 1) * self.block_size)
            self.keys[:, index] = slots.keys[:, slot, :, span]
            self.values[:, index] = slots.values[:, slot, :, span]
            self._blocks[key] = _Block(index, key[0])
            added += 1
        self._touch([key for key in chain if key in self._blocks])
        return added

    def _allocate(self, protect: list[tuple]) -> int | None:
        if self._free:
            return self._free.pop()
        protected = set(protect)
        for key in self._blocks:
            if key not in protected:
                return self._blocks.pop(key).index
        return None
