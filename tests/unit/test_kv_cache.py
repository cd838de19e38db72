"""Prefix cache: exact block keys, longest-prefix lookup, leaf-first LRU eviction inside a fixed pool."""

import torch

from inference_core.kv_cache import KVShape, PrefixCache, SlotKVCache, common_prefix_length

SHAPE = KVShape(num_layers=2, kv_heads=1, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))


def _filled_slot(slots: SlotKVCache, slot: int, length: int, seed: float) -> None:
    values = torch.arange(length, dtype=torch.float32) + seed
    slots.keys[:, slot, :, :length] = values.view(1, 1, length, 1)
    slots.values[:, slot, :, :length] = -values.view(1, 1, length, 1)


def test_lookup_returns_the_longest_cached_prefix_and_restores_its_kv() -> None:
    slots = SlotKVCache(SHAPE, num_slots=2, max_len=32)
    cache = PrefixCache(SHAPE, num_blocks=8, block_size=4)
    prompt = list(range(10))
    _filled_slot(slots, 0, 10, seed=100)
    assert cache.insert(prompt, slots, 0) == 2  # two full blocks; the partial third is not stored
    blocks = cache.lookup([*prompt[:8], 99, 98])
    assert len(blocks) == 2
    assert cache.restore(blocks, slots, 1) == 8
    assert torch.equal(slots.keys[:, 1, :, :8], slots.keys[:, 0, :, :8])
    assert torch.equal(slots.values[:, 1, :, :8], slots.values[:, 0, :, :8])


def test_a_different_earlier_block_means_no_hit_even_with_equal_later_blocks() -> None:
    slots = SlotKVCache(SHAPE, num_slots=1, max_len=32)
    cache = PrefixCache(SHAPE, num_blocks=8, block_size=4)
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8, 9], slots, 0)
    assert cache.lookup([0, 2, 3, 4, 5, 6, 7, 8, 9]) == []


def test_lookup_always_leaves_a_token_to_compute() -> None:
    slots = SlotKVCache(SHAPE, num_slots=1, max_len=32)
    cache = PrefixCache(SHAPE, num_blocks=8, block_size=4)
    cache.insert(list(range(8)), slots, 0)
    assert len(cache.lookup(list(range(8)))) == 1
    assert cache.hit_tokens == 4 and cache.queried_tokens == 8
    assert cache.hit_rate == 0.5


def test_eviction_is_lru_and_never_exceeds_the_pool() -> None:
    slots = SlotKVCache(SHAPE, num_slots=1, max_len=64)
    cache = PrefixCache(SHAPE, num_blocks=4, block_size=4)
    first, second, third = [1] * 8, [2] * 8, [3] * 8
    cache.insert(first, slots, 0)
    cache.insert(second, slots, 0)
    cache.lookup([*first, 0])  # first is now the most recently used
    cache.insert(third, slots, 0)
    assert cache.used_blocks == 4
    assert len(cache.lookup([*first, 0])) == 2
    assert len(cache.lookup([*third, 0])) == 2
    assert cache.lookup([*second, 0]) == []


def test_eviction_takes_leaves_before_their_parents() -> None:
    slots = SlotKVCache(SHAPE, num_slots=1, max_len=64)
    cache = PrefixCache(SHAPE, num_blocks=3, block_size=2)
    cache.insert([1, 1, 2, 2, 3, 3], slots, 0)  # a chain of three blocks fills the pool
    cache.insert([9, 9], slots, 0)  # needs one block: the chain's last block goes, not its first
    assert len(cache.lookup([1, 1, 2, 2, 3, 3, 0])) == 2
    assert len(cache.lookup([9, 9, 0])) == 1


def test_slot_move_copies_only_the_used_positions() -> None:
    slots = SlotKVCache(SHAPE, num_slots=3, max_len=8)
    _filled_slot(slots, 2, 5, seed=7)
    slots.move(2, 0, 5)
    assert torch.equal(slots.keys[:, 0, :, :5], slots.keys[:, 2, :, :5])
    assert torch.count_nonzero(slots.keys[:, 0, :, 5:]) == 0


def test_common_prefix_length_of_token_lists() -> None:
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 9], [1, 2, 3]]) == 2
    assert common_prefix_length([[5, 6], [5, 6, 7]]) == 2
    assert common_prefix_length([[1], [2]]) == 0
    assert common_prefix_length([[3, 4]]) == 2
    assert common_prefix_length([]) == 0
