"""Exact selection on large tensors: the sampled bracket must give kthvalue's answer on any input."""

from __future__ import annotations

import pytest
import torch

from mergescope.merge.sparsify import kth_smallest, select_extreme


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 100_001
    return {
        "gaussian": torch.randn(n, generator=g).abs(),
        "bf16 ties": (torch.randn(n, generator=g) * 0.01).bfloat16().float().abs(),
        "all equal": torch.full((n,), 0.5),
        "sorted": torch.arange(n, dtype=torch.float32),
        "reversed": torch.arange(n, dtype=torch.float32).flip(0),
        "periodic": (torch.arange(n) % 65536).float(),  # aliases with the stride of the sample
        "mostly zero": torch.where(torch.rand(n, generator=g) < 0.99, 0.0, torch.rand(n, generator=g)),
    }


@pytest.mark.parametrize("name", list(inputs()))
def test_kth_smallest_equals_kthvalue(name):
    values = inputs()[name]
    n = values.numel()
    for k in (1, 2, 100, n // 3, n // 2, n - 5, n):
        assert kth_smallest(values, k) == values.kthvalue(k).values, (name, k)


def test_select_extreme_keeps_exactly_count_lowest_index_ties_first():
    values = (torch.randn(100_000, generator=torch.Generator().manual_seed(1)) * 0.01).bfloat16().float().abs()
    for count in (1, 12_345, 50_000, 99_999):
        mask = select_extreme(values, count, largest=True, low_index_first=True)
        assert int(mask.sum()) == count
        order = torch.sort(-values, stable=True).indices  # independent: a stable full sort
        expected = torch.zeros_like(mask)
        expected[order[:count]] = True
        assert torch.equal(mask, expected)
