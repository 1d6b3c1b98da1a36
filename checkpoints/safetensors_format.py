"""Reading safetensors files: the header as untrusted input, tensor bytes on demand.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON + the data region. The JSON maps
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``, offsets relative to the start
of the data region. Opening a file reads only the first ``8 + N`` bytes; tensor data is read later with
one positioned read per tensor (``os.preadv``), so a reader holds no mapping of the file and its memory is
only the tensors it is currently using.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .dtypes import ITEMSIZE, torch_dtype
from .errors import CheckpointError
from .tensor_spec import TensorSpec

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the safetensors library refuses headers above 100 MB; so do we
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo(TensorSpec):
    """A tensor's spec plus where its bytes live: the file and the absolute offset of its data."""

    file: Path = Path()
    offset: int = 0


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file."""

    file: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise CheckpointError(f"tensor {key!r} is listed twice")
        seen[key] = value
    return seen


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of ``path`` without reading any tensor data.

    Raises :class:`CheckpointError` naming the file for every way the header can be wrong: a file too
    short, a header length past the end of the file, a header that is not JSON or not the format, unknown
    dtypes, shapes whose byte count disagrees with the offsets, offsets outside the data region or
    overlapping each other.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise CheckpointError(
                    f"{path}: header length {header_len} runs past the end of the file "
                    f"({size} bytes); the file is truncated or not safetensors"
                )
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header of {header_len} bytes is larger than the 100 MB limit")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) < header_len:
        raise CheckpointError(f"{path}: file ended inside the header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc}); the file is not safetensors") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is not safetensors")
    data_start = 8 + header_len
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    tensors = {name: _tensor_info(path, name, entry, data_start, data_size) for name, entry in header.items()}
    _check_no_overlap(path, tensors.values(), data_start)
    return SafetensorsHeader(file=path, tensors=tensors, metadata=metadata, data_start=data_start)


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: entry is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise CheckpointError(f"{where}: unsupported dtype {dtype!r} (known: {', '.join(ITEMSIZE)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: {dtype} {shape} needs {expected} bytes but its offsets span {end - begin}"
        )
    if end > data_size:
        raise CheckpointError(
            f"{where}: data ends at byte {end} of a {data_size}-byte data region; the file is truncated"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin)


def _check_no_overlap(path: Path, infos, data_start: int) -> None:
    previous: TensorInfo | None = None
    for info in sorted((i for i in infos if i.nbytes), key=lambda i: i.offset):
        if previous is not None and info.offset < previous.offset + previous.nbytes:
            raise CheckpointError(
                f"{path}: tensors {previous.name!r} and {info.name!r} overlap "
                f"(bytes {previous.offset - data_start}..{previous.offset - data_start + previous.nbytes} "
                f"and {info.offset - data_start}..)"
            )
        previous = info


def read_bytes(info: TensorInfo, out: torch.Tensor | None = None, *,
               rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One tensor's bytes as a uint8 tensor, read with positioned reads that release the GIL.

    ``rows = (a, b)`` reads only rows a…b−1 (along the first dimension): in safetensors' row-major layout
    they are one contiguous byte range, so this is one positioned read of ``(b − a) · row bytes``.
    Into ``out[:nbytes]`` when a large enough flat uint8 ``out`` is given; otherwise into a buffer from
    torch's allocator, uninitialised (a ``bytearray`` would be zero-filled first), so each byte is
    written once, by the kernel.
    """
    import torch

    offset, nbytes = info.offset, info.nbytes
    if rows is not None:
        row_bytes = info.nbytes // max(1, info.shape[0]) if info.shape else info.nbytes
        offset, nbytes = info.offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
    if out is not None and out.dtype == torch.uint8 and out.dim() == 1 and out.numel() >= nbytes:
        buf = out[:nbytes]
    else:
        buf = torch.empty(nbytes, dtype=torch.uint8)
    if not nbytes:
        return buf
    try:
        with open(info.file, "rb", buffering=0) as f:
            _read_into(f, memoryview(buf.numpy()), info, offset, nbytes)
    except OSError as exc:
        raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r}: {exc.strerror or exc}") from None
    return buf


def _read_into(f, view: memoryview, info: TensorInfo, offset: int, nbytes: int) -> None:
    done = 0
    fd = f.fileno()
    while done < nbytes:
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - Windows
            f.seek(offset + done)
            n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(
                f"{info.file}: tensor {info.name!r} ends past the end of the file; the file was truncated"
            )
        done += n


def read_tensor(info: TensorInfo, buffer: torch.Tensor | None = None, *, rows: tuple[int, int] | None = None
                ) -> torch.Tensor:
    """Tensor ``info`` in its stored dtype, on the CPU: owning its memory, or a view of ``buffer``; with
    ``rows = (a, b)`` only rows a…b−1 (one positioned read, see :func:`read_bytes`)."""
    import torch

    dtype = torch_dtype(info.dtype)
    shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    return read_bytes(info, buffer, rows=rows).view(dtype).reshape(shape)
