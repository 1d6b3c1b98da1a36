"""The documented draw contract of DARE and DELLA, written out independently of mergescope.merge.draws: flat entry
j of model i (0-based, base not counted) of a tensor with draw seed s is kept ⇔ uⱼ < float32(pⱼ), uⱼ being entry
j mod 2¹⁶ of ``torch.rand(2**16, generator=torch.Generator().manual_seed(c_seed))`` and c_seed the first 8 bytes
(little-endian) of BLAKE2b(f"{s}\\0{i}\\0{j // 2**16}"), top bit cleared; s is the same hash of f"{seed}\\0{name}".
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

CHUNK = 1 << 16


def seed_of(*parts) -> int:
    digest = hashlib.blake2b("\0".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def tensor_draw_seed(seed: int, name: str) -> int:
    return seed_of(seed, name)


def keep(probabilities, seed: int, model: int) -> np.ndarray:
    """Boolean keep mask (the shape of ``probabilities``, a scalar allowed with ``shape``) of model ``model``."""
    p = np.asarray(probabilities, dtype=np.float32)
    flat = p.reshape(-1)
    chunks = -(-flat.size // CHUNK)
    u = np.concatenate([
        torch.rand(CHUNK, generator=torch.Generator().manual_seed(seed_of(seed, model, c))).numpy()
        for c in range(chunks)
    ])[: flat.size]
    return (u < flat).reshape(p.shape)


def dare_keep(shape, density: float, seed: int, model: int) -> np.ndarray:
    return keep(np.full(shape, density, dtype=np.float32), seed, model)
