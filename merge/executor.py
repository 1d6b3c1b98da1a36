"""Running a merge job: tensor by tensor, on the GPU when there is one, into an atomic checkpoint.

For each output tensor, a reader thread fetches its inputs (in their stored dtype, moved to the device)
while the previous tensor is merged (:func:`~mergescope.checkpoints.read_ahead.read_ahead`); the method's pure
function merges them in float32 (:func:`~.tensor_merge.merge_tensor`); the result is cast to the output dtype
and written in place by :class:`~mergescope.checkpoints.CheckpointWriter` in a writer thread while the next
tensor is merged, then freed.

Memory bound: at most ``prefetch + 1`` input sets are alive, plus the method's temporaries and two output
tensors (one being written): a few copies of the largest tensor, never the model. Elementwise methods and
the task-arithmetic family hold float32 copies of one block only; the family's whole-tensor trims hold a
mask per model (DARE, breadcrumbs, DELLA) or, for TIES without rescale, two numbers per model (a
threshold and a tie cut, found block by block). Non-finite inputs stop the merge naming the model and
tensor (``allow_non_finite`` overrides); so does a cancel (between tensors). Either way the writer removes
its temporary folder: the output appears only when complete.
"""

from __future__ import annotations

import ctypes
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mergescope.checkpoints import Cancelled, CheckpointWriter, MergescopeError, TensorSpec, resolve_device
from mergescope.checkpoints.read_ahead import read_ahead
from mergescope.checkpoints.writer import DEFAULT_MAX_SHARD_BYTES

from .chat_templates import resolve_chat_template
from .job import MergeJob, TensorTask
from .model_card import model_card
from .plan import PLAN_FILE_NAME
from .tensor_merge import DEFAULT_SEED, merge_tensor
from .tokenizer_files import tokenizer_outputs

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)

#: around merging a tensor this large (an embedding, a head), freed heap memory is handed back to the OS
_TRIM_AFTER = 1 << 24


class MergeCancelled(Cancelled):
    """The merge was cancelled; nothing was written."""


@dataclass
class MergeProgress:
    tensor: str
    tensors_done: int
    tensors_total: int
    bytes_done: int  # input bytes read and merged so far
    bytes_total: int
    elapsed_s: float
    device_memory: int | None  # bytes allocated on the GPU, None on the CPU

    @property
    def throughput(self) -> float:
        return self.bytes_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.throughput
        return None if rate == 0 else (self.bytes_total - self.bytes_done) / rate


def run_merge(
    job: MergeJob,
    out_dir: str | Path,
    *,
    device: str | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    allow_non_finite: bool | None = None,
    on_event: Callable[[MergeProgress], None] | None = None,
    cancel: threading.Event | None = None,
    prefetch: int = 1,
) -> Path:
    """Merge ``job`` into ``out_dir`` and return it. Settings left None come from the plan's
    ``mergescope:`` block, then the defaults."""
    import torch

    options = job.plan.options
    device = resolve_device(device or options.get("device", "auto"))
    seed = seed if seed is not None else options.get("seed", DEFAULT_SEED)
    allow_non_finite = allow_non_finite if allow_non_finite is not None else options.get("allow_non_finite", False)
    shard = max_shard_bytes or _shard_bytes(options.get("shard_size", DEFAULT_MAX_SHARD_BYTES))
    specs = [TensorSpec(task.output, job.out_dtype, task.shape) for task in job.tasks]
    total = job.bytes_to_read
    done = 0
    start = time.perf_counter()

    def read(task: TensorTask):
        # stored dtype (bf16 is half of float32) while waiting; float32 only for the tensor being merged
        tensors = [job.checkpoints[ref].read(name, device=device) for ref, name in task.reads]
        return task.vocabulary.align(tensors) if task.vocabulary is not None else tensors  # rows by token

    with CheckpointWriter(out_dir, specs, max_shard_bytes=shard, overwrite=overwrite) as writer, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergescope-write") as writing:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergescope-read") as reader:
            written = None  # the write in flight: one output tensor at most, written while the next merges
            for index, (task, future) in enumerate(read_ahead(job.tasks, read, reader, prefetch)):
                if cancel is not None and cancel.is_set():
                    raise MergeCancelled(f"merge cancelled; nothing was written to {out_dir}")
                tensors = future.result()
                if not allow_non_finite:
                    _check_finite(task, tensors)
                large = task.numel >= _TRIM_AFTER
                if large:
                    _give_back_free_memory()
                merged = merge_tensor(job.method, task, tensors, seed=seed, device=device, out_dtype=job.out_dtype)
                if written is not None:
                    written.result()
                written = writing.submit(writer.write, task.output, merged)
                del tensors, merged
                if large:
                    _give_back_free_memory()
                done += sum(job.checkpoints[ref].spec(name).nbytes for ref, name in task.reads)
                if on_event is not None:
                    memory = torch.cuda.memory_allocated(device) if device.startswith("cuda") else None
                    elapsed = time.perf_counter() - start
                    on_event(MergeProgress(task.output, index + 1, len(job.tasks), done, total, elapsed, memory))
            if written is not None:
                written.result()
        _write_model_files(job, writer)
        return writer.commit()


def _give_back_free_memory() -> None:
    """glibc keeps freed blocks for reuse, so earlier temporaries would still count against the peak while
    the largest tensors are merged; ``malloc_trim`` returns them (a no-op without glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _check_finite(task: TensorTask, tensors: list) -> None:
    """Refuse NaN/Inf inputs. ``aminmax`` propagates NaN and keeps ±Inf, so one reduction decides it (20×
    faster than ``isfinite`` on bf16, 3× faster than ``amax`` and ``amin``); only a failing tensor is
    counted, for the message."""
    import torch

    for (ref, name), tensor in zip(task.reads, tensors):
        if tensor.numel() == 0 or not tensor.is_floating_point():
            continue
        if bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all()):
            continue
        bad = int(torch.count_nonzero(~torch.isfinite(tensor)))
        raise MergescopeError(
            f"{ref}: tensor {name} has {bad} NaN/Inf values; a merge would spread them. "
            "Fix the model or pass --allow-non-finite"
        )


def _shard_bytes(value: int | str) -> int:
    if isinstance(value, int):
        return value
    text = value.strip().upper().replace(" ", "")
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * scale)
    if text.isdigit():
        return int(text)
    raise MergescopeError(f"shard_size {value!r}: use bytes or a size like 5GB")


def _write_model_files(job: MergeJob, writer: CheckpointWriter) -> None:
    """config.json (adjusted), generation config, tokenizer, model card and the plan itself."""
    if job.config is not None:
        config = dict(job.config)
        torch_names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
        config["torch_dtype"] = torch_names.get(job.out_dtype, config.get("torch_dtype"))
        writer.add_text("config.json", json.dumps(config, indent=2) + "\n")
    for path in job.reference.model_files():
        if path.name == "generation_config.json":
            writer.add_file(path)
    if job.tokenizer_from is not None:
        sources = [job.checkpoints[ref].model_files() for ref in job.plan_models]
        template = resolve_chat_template(job.plan.chat_template, sources)
        texts, copies = tokenizer_outputs(job.tokenizer_from.model_files(), job.vocabulary, template)
        for path in copies:
            writer.add_file(path)
        for name, text in texts.items():
            writer.add_text(name, text)
    writer.add_text(PLAN_FILE_NAME, job.plan.to_yaml())
    writer.add_text("README.md", model_card(job.plan, list(job.checkpoints)))
