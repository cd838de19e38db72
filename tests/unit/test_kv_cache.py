"""Prefix cache: exact block keys, longest-prefix lookup, leaf-first LRU eviction inside a fixed pool."""

import torch

from inference_core.kv_cache import KVShape, PrefixCache, SlotKVCache, common_prefix_length, reserved_zeros

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


def _resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_a_cpu_cache_is_zero_and_becomes_resident_only_where_it_is_written() -> None:
    shape = KVShape(num_layers=8, kv_heads=4, head_dim=64, dtype=torch.float32, device=torch.device("cpu"))
    before = _resident_mb()
    cache = SlotKVCache(shape, num_slots=16, max_len=4096)  # 2 x 512 MiB reserved
    reserved = cache.nbytes / 2**20
    assert reserved == 1024 and _resident_mb() - before < 0.1 * reserved
    assert cache.keys.is_contiguous() and cache.keys.shape == (8, 16, 4, 4096, 64)
    assert not cache.keys[:, 3].any() and not cache.values[:, 15].any()  # reading maps no memory either
    cache.keys[:, 0] = 1.0  # one slot of one tensor: 1/32 of the reservation
    assert _resident_mb() - before < 0.2 * reserved
    assert cache.keys[:, 0].eq(1.0).all() and not cache.keys[:, 1].any()


def test_reserved_zeros_keep_the_dtype_and_shape_asked_for() -> None:
    half = reserved_zeros((3, 5, 7), torch.bfloat16, "cpu")
    assert half.dtype == torch.bfloat16 and half.shape == (3, 5, 7) and not half.any()
    half += 1
    assert half.sum().item() == 105
