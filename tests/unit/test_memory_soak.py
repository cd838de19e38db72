"""The memory soak's verdict: flat after the warm-up, or growing (benchmarks/memory_soak.py)."""

from __future__ import annotations

import os

import pytest

from benchmarks.memory_soak import SoakResult, tree_rss_mb


def result(samples: list[tuple[float, float]], warmup_s: float = 10) -> SoakResult:
    return SoakResult(seconds=samples[-1][0], warmup_s=warmup_s, clients=4, calls=10, failed=0, output_tokens=640,
                      samples=samples)  # fmt: skip


def test_growth_during_the_warmup_only_is_flat() -> None:
    samples = [(t, 500 + 10 * t) for t in range(10)] + [(t, 600 + (t % 3)) for t in range(10, 130)]
    verdict = result(samples).verdict()
    assert verdict["flat"] is True
    assert verdict["growth_mb"] == pytest.approx(0, abs=2)
    assert abs(float(verdict["slope_mb_per_min"])) < 1
    assert verdict["peak_rss_mb"] == 602


def test_steady_growth_after_the_warmup_is_a_leak() -> None:
    samples = [(float(t), 1000 + 0.5 * t) for t in range(0, 610, 2)]  # 30 MB a minute
    verdict = result(samples, warmup_s=60).verdict()
    assert verdict["flat"] is False
    assert verdict["slope_mb_per_min"] == pytest.approx(30, rel=0.01)
    assert float(verdict["growth_mb"]) > float(verdict["allowed_mb"])


def test_the_allowance_is_a_share_of_the_rss_with_a_floor() -> None:
    big = [(float(t), 4000 + (100 if t > 60 else 0)) for t in range(0, 130)]  # +100 MB on 4 GB: 2.5%, within 3%
    assert result(big).verdict()["flat"] is True
    small = [(float(t), 300 + (40 if t > 60 else 0)) for t in range(0, 130)]  # +40 MB on 300: over the 32 MB floor
    assert result(small).verdict()["flat"] is False


def test_a_run_no_longer_than_its_warmup_has_no_verdict() -> None:
    with pytest.raises(ValueError, match="run longer than the warm-up"):
        result([(0.0, 100.0), (5.0, 100.0), (9.0, 100.0)]).verdict()


def test_tree_rss_reads_this_process_and_is_zero_for_a_gone_one() -> None:
    assert tree_rss_mb(os.getpid()) > 10
    assert tree_rss_mb(2**22 + 12345) == 0.0
