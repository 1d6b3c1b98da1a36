"""The analysis cache is an optimisation, never a reason to fail or to be wrong: a corrupted, truncated or
foreign cache is recomputed (and repaired), and a checkpoint rewritten in place is never served stale.

Every result is checked against ‖θ_model − θ_base‖ computed here with numpy in float64."""

from __future__ import annotations

import json
import os
import sqlite3

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from builders import llama_state, write_model
from mergescope.analysis.cache import TABLE, AnalysisCache, cache_key
from mergescope.analysis.report import run_analysis
from mergescope.checkpoints import open_checkpoint


@pytest.fixture
def pair(tmp_path):
    base = llama_state(seed=0)
    model = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in base.items()}
    return base, write_model(tmp_path / "base", base), write_model(tmp_path / "ft", model)


def delta_norm(base: dict, folder) -> float:
    from safetensors.numpy import load_file

    model = load_file(folder / "model.safetensors")
    return float(np.sqrt(sum(((model[k].astype(np.float64) - base[k].double().numpy()) ** 2).sum() for k in base)))


def analysed_norm(base_folder, folder) -> float:
    report = run_analysis(open_checkpoint(base_folder), [open_checkpoint(folder)], device="cpu")
    return report["total"]["delta"]["ft"]["norm"]


def cached_rows(cache_dir) -> int:
    with sqlite3.connect(cache_dir / "analysis.sqlite") as connection:
        return connection.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0]


def test_a_cache_hit_returns_the_same_report(pair, cache_dir):
    base, base_folder, ft = pair
    first = analysed_norm(base_folder, ft)
    assert cached_rows(cache_dir) == 1
    assert analysed_norm(base_folder, ft) == first == pytest.approx(delta_norm(base, ft), rel=1e-6)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty-header"])
def test_a_corrupted_or_truncated_cache_file_is_recomputed_and_replaced(pair, cache_dir, damage):
    base, base_folder, ft = pair
    analysed_norm(base_folder, ft)
    path = cache_dir / "analysis.sqlite"
    data = path.read_bytes()
    path.write_bytes({"garbage": b"not a database at all" * 100, "truncated": data[: len(data) // 2 + 7],
                      "empty-header": b"\0" * 100 + data[100:]}[damage])
    assert analysed_norm(base_folder, ft) == pytest.approx(delta_norm(base, ft), rel=1e-6)
    assert cached_rows(cache_dir) == 1  # the cache works again


@pytest.mark.parametrize("stored", [
    "[]",
    json.dumps({"schema": "mergescope.analysis/0", "tensors": {}}),
    "[" * 100_000 + "]" * 100_000,  # deeper than the JSON parser goes
    "{not json",
], ids=["a-list", "another-schema", "nested-too-deep", "not-json"])
def test_an_entry_of_another_shape_is_recomputed(pair, stored):
    base, base_folder, ft = pair
    key = cache_key(open_checkpoint(base_folder), [open_checkpoint(ft)], ["ft"], 1.0)
    cache = AnalysisCache()
    cache.put(key, {})
    with sqlite3.connect(cache.path) as connection:
        connection.execute(f"UPDATE {TABLE} SET report = ? WHERE key = ?", (stored, key))
    assert analysed_norm(base_folder, ft) == pytest.approx(delta_norm(base, ft), rel=1e-6)


def test_a_table_written_by_another_version_is_left_alone(pair, cache_dir):
    base, base_folder, ft = pair
    with sqlite3.connect(cache_dir / "analysis.sqlite") as connection:
        connection.execute("CREATE TABLE reports (key TEXT PRIMARY KEY, blob BLOB)")
        connection.execute("CREATE TABLE " + TABLE + " (key TEXT PRIMARY KEY, created REAL, report TEXT)")
        connection.execute("DROP TABLE " + TABLE)
    assert analysed_norm(base_folder, ft) == pytest.approx(delta_norm(base, ft), rel=1e-6)
    assert cached_rows(cache_dir) == 1


def test_a_checkpoint_rewritten_in_place_with_the_same_size_and_mtime_is_recomputed(pair):
    """The same names, shapes and dtypes (so the same header and size), other values, the old mtime put back:
    only the inode change time and the sampled bytes tell the two apart."""
    base, base_folder, ft = pair
    before = analysed_norm(base_folder, ft)
    weights = ft / "model.safetensors"
    st = weights.stat()
    other = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for k, v in base.items()}
    save_file(other, str(weights), metadata={"format": "pt"})
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    after = analysed_norm(base_folder, ft)
    assert after == pytest.approx(delta_norm(base, ft), rel=1e-6) and after != pytest.approx(before, rel=1e-3)
