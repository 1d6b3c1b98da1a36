"""One output tensor merged from its inputs: the method's pure function, in float32, block by block where it
can be. Both the executor (:mod:`.executor`) and the plan preview (:mod:`mergescope.analysis.preview`) merge
through :func:`merge_tensor`, so a preview and a merge cannot disagree.

Random methods draw from a seed per output tensor derived from (seed, tensor name) — :func:`tensor_seed` —
and from it a generator per chunk of entries (:mod:`.draws`), so a merge is bit-identical across runs on the
same device and depends neither on the order tensors are processed nor on how a tensor is cut into blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import replace
from typing import TYPE_CHECKING

from mergescope.checkpoints.dtypes import torch_dtype

from .draws import derive_seed
from .job import TensorTask
from .methods import MergeMethod

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the seed of random methods when neither the caller nor the plan's ``mergescope.seed`` gives one
DEFAULT_SEED = 0

#: entries per block when a method runs block by block (16 MB of float32 per input)
ELEMENTWISE_BLOCK = 1 << 18


def tensor_seed(seed: int, tensor: str) -> int:
    """A 63-bit seed for one output tensor: the first 8 bytes (little-endian) of BLAKE2b(f"{seed}\\0{tensor}"),
    top bit cleared (:func:`~.draws.derive_seed`)."""
    return derive_seed(seed, tensor)


def in_blocks(numel: int, merge_block: Callable[[int, int], None], pool: Executor | None = None, *,
              step: int = ELEMENTWISE_BLOCK, first_entry: int = 0) -> None:
    """``merge_block(start, stop)`` over blocks of ``numel`` entries, cut where the tensor's flat index (entry 0
    being ``first_entry``) is a multiple of ``step`` (:data:`ELEMENTWISE_BLOCK` entries); on a thread ``pool``
    (one-threaded torch kernels, which release the GIL) the blocks run in parallel."""
    if numel <= 0:
        return
    cuts = range(step - first_entry % step, numel, step)
    ranges = list(zip([0, *cuts], [*cuts, numel]))
    if pool is None or len(ranges) == 1:
        for start, stop in ranges:
            merge_block(start, stop)
        return
    for future in [pool.submit(merge_block, start, stop) for start, stop in ranges]:
        future.result()


def merge_tensor(method: MergeMethod, task: TensorTask, tensors: list, *, seed: int, device: str,
                 out_dtype: str, pool: Executor | None = None) -> torch.Tensor:
    """``method`` applied to one output tensor's inputs ``tensors`` (``task.reads`` order, any float dtype), in
    float32.

    On large tensors, elementwise methods run block by block, writing into ``out_dtype`` directly, so only one
    block's float32 copies exist at a time; two-phase methods (the task-arithmetic family: TIES, DARE,
    breadcrumbs, DELLA; slerp, nuslerp, multislerp, karcher, model_stock, sce, ramplus_tl, arcee_fusion) first
    decide their trims over the whole tensor with ``method.prepare`` (masks, rescale factors, norms and cosines,
    karcher's mean direction, weights, boosts; the selections — TIES' and breadcrumbs' thresholds and tie cuts,
    sce's variance cut, arcee_fusion's quantiles — in one blockwise pass; DARE's and DELLA's drops as data,
    each block drawing its own mask), then ``method.combine`` them block by block. The bits equal a
    whole-tensor merge. A thread ``pool`` runs the blocks in parallel (:func:`in_blocks`).
    """
    import torch

    options = {**task.options, "tensor_name": task.output}
    draw_seed = tensor_seed(seed, task.output) if method.random else None

    def apply(inputs: list):
        inputs = [t.float() for t in inputs]
        base = inputs[0] if task.base else None
        return method.function(base, inputs[1:] if task.base else inputs, task.params, options, draw_seed)

    with torch.no_grad():
        numel = tensors[0].numel()
        if numel <= ELEMENTWISE_BLOCK or not (method.elementwise or method.two_phase):
            return apply(tensors)
        flat = [t.reshape(-1) for t in tensors]
        if not method.two_phase:
            out = torch.empty(numel, dtype=torch_dtype(out_dtype), device=tensors[0].device)

            def merge_block(start: int, stop: int) -> None:
                out[start:stop] = apply([t[start:stop] for t in flat])

            in_blocks(numel, merge_block, pool)
            return out.reshape(task.shape)
        # two phases: masks, draws and rescale factors over the whole tensor, then the elementwise rest
        trims = method.prepare(tensors[0], tensors[1:], task.params, options, draw_seed)
        out = torch.empty(numel, dtype=torch_dtype(out_dtype), device=tensors[0].device)  # after the peak
        combine_blocks(method, task, flat, trims, 0, out, options, pool)
        return out.reshape(task.shape)


def combine_blocks(method: MergeMethod, task: TensorTask, flat: list, trims: list, first_entry: int,
                   out: torch.Tensor, options: dict, pool: Executor | None) -> None:
    """A two-phase method's ``combine`` into ``out`` over blocks of the flat inputs, the inputs' entry 0 being
    the tensor's entry ``first_entry`` (each trim is cut to its block). A trim with a ``row_numel`` (DELLA's,
    which ranks |τ| within rows) is given blocks of whole rows of that many entries; the inputs then start on a
    row."""

    def merge_block(start: int, stop: int) -> None:
        blocks = [t[start:stop] for t in flat]
        trimmed = [trim.block(first_entry + start, first_entry + stop) for trim in trims]
        out[start:stop] = method.combine(blocks[0], blocks[1:], trimmed, task.params, options)

    in_blocks(out.numel(), merge_block, pool, step=sub_block(trims), first_entry=first_entry)


def sub_block(trims: list) -> int:
    """Entries per block of :func:`combine_blocks`: :data:`ELEMENTWISE_BLOCK`, or the most whole rows that fit
    in it (one at least) when a trim must see whole rows of ``row_numel`` entries."""
    row = max((getattr(trim, "row_numel", None) or 1 for trim in trims), default=1)
    return max(1, ELEMENTWISE_BLOCK // row) * row


def merge_rows(method: MergeMethod, task: TensorTask, tensors: list, *, first_entry: int, trims: list | None,
               seed: int, device: str, out_dtype: str, pool: Executor | None = None) -> torch.Tensor:
    """A row block of the output tensor from the same rows of its inputs ``tensors`` (``task.reads`` order),
    starting at flat entry ``first_entry`` of the tensor: an elementwise method applied to the block; a
    two-phase method's ``combine`` given ``trims``, its whole-tensor trims (from ``stream_prepare``, or
    ``prepare`` on the whole inputs), each cut to the block. The bits of the same rows of
    :func:`merge_tensor`."""
    import torch

    shape = tuple(tensors[0].shape)
    if trims is None:
        return merge_tensor(method, replace(task, shape=shape), tensors, seed=seed, device=device,
                            out_dtype=out_dtype, pool=pool)
    options = {**task.options, "tensor_name": task.output}
    flat = [t.reshape(-1) for t in tensors]
    out = torch.empty(flat[0].numel(), dtype=torch_dtype(out_dtype), device=tensors[0].device)
    with torch.no_grad():
        combine_blocks(method, task, flat, trims, first_entry, out, options, pool)
    return out.reshape(shape)
