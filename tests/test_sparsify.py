"""Exact selection on large tensors: the sampled bracket must give kthvalue's answer on any input."""

from __future__ import annotations

import pytest
import torch

from mergescope.merge.sparsify import kth_smallest, select_extreme


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 300_001  # above 4 × the sample size, so the sampled bracket is what runs
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
    ordered = torch.sort(values).values  # independent: a full sort
    n = values.numel()
    for k in (1, 2, 100, n // 3, n // 2, n - 5, n):
        assert kth_smallest(values, k) == ordered[k - 1], (name, k)


def test_select_extreme_keeps_exactly_count_lowest_index_ties_first():
    values = (torch.randn(300_000, generator=torch.Generator().manual_seed(1)) * 0.01).bfloat16().float().abs()
    for count in (1, 12_345, 150_000, 299_999):
        for largest in (True, False):
            mask = select_extreme(values, count, largest=largest, low_index_first=largest)
            assert int(mask.sum()) == count
            # independent: a stable full sort; the smallest are taken highest index first
            order = (
                torch.sort(-values, stable=True).indices if largest else torch.sort(values.flip(0), stable=True).indices
            )
            if not largest:
                order = values.numel() - 1 - order
            expected = torch.zeros_like(mask)
            expected[order[:count]] = True
            assert torch.equal(mask, expected), (count, largest)
