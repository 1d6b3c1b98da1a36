"""Counter-based random draws: the keep decisions of DARE and DELLA, entry by entry, from seeds derived per chunk.

A random trim of model i of an output tensor keeps flat entry j with probability pⱼ:

    keep ⇔ uⱼ < pⱼ,  uⱼ = torch.rand(RANDOM_CHUNK, generator=g_c)[j mod RANDOM_CHUNK],
    g_c = torch.Generator(device).manual_seed(chunk_seed(seed, i, c)),  c = j // RANDOM_CHUNK

with ``seed`` the output tensor's draw seed (:func:`~mergescope.merge.tensor_merge.tensor_seed` of the merge's
seed and the tensor's name), uⱼ float32 in [0, 1) and pⱼ compared as float32. Every chunk draws a whole
:data:`RANDOM_CHUNK` uniforms (the tensor's last chunk too), so a chunk's draws depend only on its seed, never
on where a block starts or ends or on the tensor's length: a block of entries a:b draws the chunks it overlaps
and keeps its part of them, and blocks side by side, in any order, on any thread, give the whole tensor's
draws bit for bit. No draw comes from torch's global generator; the same seed gives the same bits on the same
device (a CUDA generator draws other numbers than a CPU one).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch

#: entries per chunk of draws: each chunk is drawn from a generator of its own
RANDOM_CHUNK = 1 << 16


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``: the first 8 bytes (little-endian) of BLAKE2b of their ``str``s joined by
    NUL, top bit cleared. ``derive_seed(seed, name)`` is an output tensor's seed."""
    text = "\0".join(str(part) for part in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def chunk_seed(seed: int, model: int, chunk: int) -> int:
    """The seed of chunk ``chunk`` (flat entries chunk·RANDOM_CHUNK …) of model ``model`` (0-based, the base
    not counted) of a tensor whose draw seed is ``seed``: ``derive_seed(seed, model, chunk)``."""
    return derive_seed(seed, model, chunk)


def uniforms(first_entry: int, count: int, seed: int, model: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """u for flat entries ``first_entry : first_entry + count`` of model ``model`` (module docstring), float32."""
    import torch

    if count <= 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    first, last = first_entry // RANDOM_CHUNK, (first_entry + count - 1) // RANDOM_CHUNK
    parts = []
    for chunk in range(first, last + 1):
        generator = torch.Generator(device=device).manual_seed(chunk_seed(seed, model, chunk))
        parts.append(torch.rand(RANDOM_CHUNK, generator=generator, device=device))
    drawn = parts[0] if len(parts) == 1 else torch.cat(parts)
    skip = first_entry - first * RANDOM_CHUNK
    return drawn[skip : skip + count]


def draw_keep_mask(probabilities: torch.Tensor | float, first_entry: int, count: int, seed: int, model: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean keep mask of flat entries ``first_entry : first_entry + count`` of model ``model``: uⱼ < pⱼ, with
    ``probabilities`` the flat float32 pⱼ of those entries or one p for all (compared as a float32)."""
    import torch

    u = uniforms(first_entry, count, seed, model, device)
    if isinstance(probabilities, torch.Tensor):
        return u < probabilities.reshape(-1).to(torch.float32)
    return u < torch.tensor(probabilities, dtype=torch.float32, device=u.device)
