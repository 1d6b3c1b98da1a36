"""Eval commands for tests: small standard-library scripts (they start in ~30 ms, numpy would take 200) that
read a merged checkpoint's safetensors file directly and print a score the tests compute independently."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np

DISTANCE_SCRIPT = '''
import array, json, math, struct, sys
with open(sys.argv[1] + "/model.safetensors", "rb") as f:
    size = struct.unpack("<Q", f.read(8))[0]
    entry = json.loads(f.read(size))[{name!r}]
    assert entry["dtype"] == "F32", entry["dtype"]
    begin, end = entry["data_offsets"]
    f.seek(8 + size + begin)
    values = array.array("f", f.read(end - begin))
target = array.array("d", open({target!r}, "rb").read())
print("scoring", sys.argv[1])
print(repr(-math.sqrt(sum((float(v) - t) ** 2 for v, t in zip(values, target)))))
'''


def distance_eval_command(folder: Path, tensor: str, target: np.ndarray) -> str:
    """An eval command printing −‖merged[tensor] − target‖₂ (float32 checkpoints, a little-endian host)."""
    target_path = folder / f"target-{tensor}.f64"
    target_path.write_bytes(np.ascontiguousarray(target, dtype="<f8").tobytes())
    script = folder / "score.py"
    script.write_text(DISTANCE_SCRIPT.format(name=tensor, target=str(target_path)))
    return f"{shlex.quote(sys.executable)} -S {shlex.quote(str(script))} {{model}}"
