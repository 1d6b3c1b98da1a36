"""The C heap held to the memory budget (checkpoints/heap.py): small results kept across blocks fragment glibc's
heap so that freed block temporaries are never reused; release_over_budget hands their pages back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergescope.checkpoints import heap
from mergescope.merge import row_source
from mergescope.merge.row_source import RowBlocks

# What a first pass over row blocks did to the heap, built on purpose with malloc itself: per block a 4 MiB
# temporary, then a result (64 KiB) kept until the end, placed after it; the temporaries freed leave 4 MiB holes
# between kept results, resident, which glibc's own trim (the top of the heap only) never returns.
FRAGMENTED_HEAP = r"""
import ctypes, json
from mergescope.checkpoints import heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
heap.keep_freed_memory()
start = heap.resident_bytes()
heap.hold_to_budget(start + (256 << 20))
temporaries, kept = [], []
for _ in range(100):
    temporaries.append(libc.malloc(4 << 20))
    ctypes.memset(temporaries[-1], 1, 4 << 20)
    kept.append(libc.malloc(64 << 10))
for pointer in temporaries:
    libc.free(pointer)
freed = heap.resident_bytes() - start
released = heap.release_over_budget()
print(json.dumps({"freed_mib": freed / (1 << 20), "released": released,
                  "after_mib": (heap.resident_bytes() - start) / (1 << 20),
                  "again": heap.release_over_budget()}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or sys.platform != "linux", reason="glibc and /proc")
def test_free_pages_between_kept_results_are_handed_back_past_the_ceiling():
    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["freed_mib"] > 350, result  # 400 MiB freed, still resident: past the ceiling (0.8 × 256 MiB)
    assert result["released"] is True and result["after_mib"] < 32, result
    assert result["again"] is False, result  # under the ceiling now: nothing to do


def test_release_is_inert_without_a_budget(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "give_back_free_memory", lambda: calls.append(1))
    heap.hold_to_budget(None)
    assert heap.release_over_budget() is False and calls == []
    heap.hold_to_budget(1)  # any resident size is over one byte: released once, then only after REGROWTH
    assert heap.release_over_budget() is (heap.resident_bytes() > 0)
    assert heap.release_over_budget() is False
    heap.hold_to_budget(None)


def test_every_first_pass_block_checks_the_budget(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from mergescope.checkpoints import open_checkpoint

    for name in ("base", "ft"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.zeros(64, 8)}, str(tmp_path / name / "model.safetensors"))
    checkpoints = {name: open_checkpoint(tmp_path / name) for name in ("base", "ft")}
    calls = []
    monkeypatch.setattr(row_source, "release_over_budget", lambda: calls.append(1))
    source = RowBlocks(checkpoints, [("base", "w"), ("ft", "w")], (64, 8), 16, "cpu")
    assert len(list(source.blocks([0]))) == 4
    assert len(calls) == 4
