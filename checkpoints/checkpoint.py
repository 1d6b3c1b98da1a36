"""A lazy view of one model's weights.

A :class:`Checkpoint` knows every tensor's name, dtype and shape from headers alone; :meth:`Checkpoint.read`
fetches one tensor when asked. Subclasses differ only in where bytes come from: safetensors files
(:class:`SafetensorsCheckpoint`), legacy pickled ``pytorch_model.bin`` files read with
``weights_only=True`` (:class:`TorchBinCheckpoint`), or a base with a LoRA adapter applied
(:class:`~mergescope.checkpoints.lora.LoraCheckpoint`).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from .dtypes import dtype_name, torch_dtype
from .errors import CheckpointError
from .model_files import ModelConfig, model_files_in, read_config, tokenizer_fingerprint
from .naming import group_tensors, natural_key
from .safetensors_format import TensorInfo, read_header, read_tensor
from .tensor_spec import TensorSpec

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch


class Checkpoint(ABC):
    """One model's tensors, read on demand.

    ``source`` is what the user wrote (a path, a hub id, ``path+lora``); ``root`` is the folder holding
    ``config.json`` and the tokenizer, when there is one; ``name`` is the short name shown in tables.
    """

    kind: str = "checkpoint"

    def __init__(self, source: str, root: Path | None, specs: dict[str, TensorSpec], name: str | None = None):
        self.source = source
        self.root = root
        self.name = name or _default_name(source)
        self._specs = {n: specs[n] for n in sorted(specs, key=natural_key)}

    # --- what is known without reading -------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        """Every tensor name, in natural order (``layers.2`` before ``layers.10``)."""
        return list(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def spec(self, name: str) -> TensorSpec:
        """Name, dtype and shape of tensor ``name``."""
        try:
            return self._specs[name]
        except KeyError:
            raise CheckpointError(f"{self.source}: has no tensor {name!r}") from None

    @property
    def num_parameters(self) -> int:
        return sum(s.numel for s in self._specs.values())

    @property
    def num_bytes(self) -> int:
        return sum(s.nbytes for s in self._specs.values())

    @property
    def dtypes(self) -> Counter:
        """Parameter count per safetensors dtype name."""
        counts: Counter = Counter()
        for s in self._specs.values():
            counts[s.dtype] += s.numel
        return counts

    @property
    def files(self) -> list[Path]:
        """The weight files behind this checkpoint (shards, adapter files)."""
        return []

    def groups(self) -> dict[str, list[str]]:
        """Layer groups in model order, each with its tensor names (see :mod:`.naming`)."""
        return group_tensors(self._specs)

    @cached_property
    def config(self) -> ModelConfig:
        return read_config(self.root)

    @cached_property
    def tokenizer_fingerprint(self) -> str | None:
        return tokenizer_fingerprint(self.root)

    def model_files(self) -> list[Path]:
        """Config and tokenizer files to carry into a merged model."""
        return model_files_in(self.root)

    @cached_property
    def fingerprint(self) -> str:
        """Identifies this checkpoint's contents for caches: every weight file's :func:`file_identity`."""
        digest = hashlib.sha256(self.kind.encode())
        for part in self._fingerprint_parts():
            digest.update(part.encode() + b"\0")
        return digest.hexdigest()[:32]

    def _fingerprint_parts(self) -> list[str]:
        return [file_identity(path) for path in self.files]

    # --- reading --------------------------------------------------------------------------------------
    def read(
        self,
        name: str,
        dtype: torch.dtype | str | None = None,
        device: str | None = None,
        *,
        buffer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tensor ``name``, converted to ``dtype`` and moved to ``device`` when given.

        Without ``buffer`` the tensor owns fresh memory. With ``buffer`` (a flat uint8 tensor of at least
        the tensor's byte size) stored bytes are read into it and the result may be a view of it: a
        streaming reader reuses a few buffers instead of faulting in new pages for every tensor.
        """
        tensor = self._read(self.spec(name), buffer)
        if dtype is not None:
            tensor = tensor.to(torch_dtype(dtype_name(dtype)))
        if device is not None:
            tensor = tensor.to(device)
        return tensor

    def read_rows(
        self,
        name: str,
        start: int,
        stop: int,
        dtype: torch.dtype | str | None = None,
        device: str | None = None,
        *,
        buffer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows ``start…stop−1`` of tensor ``name`` (along its first dimension), converted and moved as
        :meth:`read` does: shape ``(stop − start, *shape[1:])``, the same values as ``read(name)[start:stop]``.

        Safetensors checkpoints read only those rows (one positioned read of a contiguous byte range);
        other formats read the tensor and keep the rows.
        """
        spec = self.spec(name)
        if not spec.shape or not 0 <= start <= stop <= spec.shape[0]:
            raise CheckpointError(f"{self.source}: tensor {name!r} of shape {list(spec.shape)} has no rows "
                                  f"{start}:{stop}")
        tensor = self._read_rows(spec, start, stop, buffer)
        if dtype is not None:
            tensor = tensor.to(torch_dtype(dtype_name(dtype)))
        if device is not None:
            tensor = tensor.to(device)
        return tensor

    def read_row_list(self, name: str, rows: list[int], device: str | None = None) -> torch.Tensor:
        """Rows ``rows`` (any order, repeats allowed) of tensor ``name`` in the stored dtype, moved to ``device``:
        the same values as ``read(name)[rows]``. Reads one span from the first to the last row when the rows
        fill at least half of it (or the format reads whole tensors anyway), else each run of consecutive rows."""
        import torch

        spec = self.spec(name)
        wanted = sorted(set(rows))
        if not wanted:
            return torch.empty((0, *spec.shape[1:]), dtype=torch_dtype(spec.dtype), device=device)
        first, last = wanted[0], wanted[-1] + 1
        if last - first <= 2 * len(wanted) or type(self)._read_rows is Checkpoint._read_rows:
            held = self.read_rows(name, first, last)
            index = torch.tensor(rows, dtype=torch.long) - first
        else:
            runs, begin = [], wanted[0]
            for previous, row in zip(wanted, wanted[1:]):
                if row != previous + 1:
                    runs.append((begin, previous + 1))
                    begin = row
            runs.append((begin, wanted[-1] + 1))
            held = torch.cat([self.read_rows(name, a, b) for a, b in runs])
            index = torch.searchsorted(torch.tensor(wanted, dtype=torch.long), torch.tensor(rows, dtype=torch.long))
        out = held[index]
        return out if device is None else out.to(device)

    def _read_rows(self, spec: TensorSpec, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` in the stored dtype, on the CPU; by default the whole tensor, cut (a copy, so
        the rest is freed)."""
        whole = self._read(spec)
        return whole if (start, stop) == (0, spec.shape[0]) else whole[start:stop].clone()

    def stored_delta(self, name: str) -> torch.Tensor | None:
        """The float32 task vector against :attr:`base` when this checkpoint stores it (LoRA), else None."""
        return None

    def stored_delta_rows(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        """Rows ``start:stop`` of :meth:`stored_delta` (None where that is None)."""
        delta = self.stored_delta(name)
        return None if delta is None else delta[start:stop]

    @property
    def base(self) -> Checkpoint | None:
        """The checkpoint this one is a delta on, for adapters; None for full checkpoints."""
        return None

    @abstractmethod
    def _read(self, spec: TensorSpec, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``spec.name`` in its stored dtype, on the CPU, in ``buffer`` when the format allows."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {len(self)} tensors from {self.source!r}>"


def _default_name(source: str) -> str:
    core = source.split("+", 1)[0].rstrip("/").split("@", 1)[0]
    path = Path(core)
    return path.stem if path.suffix in (".safetensors", ".bin") else (path.name or core)


class SafetensorsCheckpoint(Checkpoint):
    """A single ``.safetensors`` file or a folder of shards with ``*.safetensors.index.json``."""

    kind = "safetensors"

    def __init__(self, source: str, root: Path | None, infos: dict[str, TensorInfo], files: list[Path], name=None):
        super().__init__(source, root, infos, name)
        self._files = files

    @classmethod
    def from_file(cls, source: str, path: Path, root: Path | None, name=None) -> SafetensorsCheckpoint:
        header = read_header(path)
        return cls(source, root, header.tensors, [path], name)

    @classmethod
    def from_index(cls, source: str, index_path: Path, weight_map: dict[str, Path], name=None) -> SafetensorsCheckpoint:
        """Open the shards named by an index; ``weight_map`` maps tensor name → shard path (validated)."""
        headers = {shard: read_header(shard) for shard in dict.fromkeys(weight_map.values())}
        infos: dict[str, TensorInfo] = {}
        for tensor, shard in weight_map.items():
            info = headers[shard].tensors.get(tensor)
            if info is None:
                raise CheckpointError(
                    f"{index_path}: names tensor {tensor!r} in {shard.name}, but that shard has no such tensor"
                )
            infos[tensor] = info
        return cls(source, index_path.parent, infos, list(headers), name)

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    def _read(self, spec: TensorSpec, buffer: torch.Tensor | None = None) -> torch.Tensor:
        assert isinstance(spec, TensorInfo)
        return read_tensor(spec, buffer)

    def _read_rows(self, spec: TensorSpec, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        assert isinstance(spec, TensorInfo)
        return read_tensor(spec, buffer, rows=(start, stop))


class TorchBinCheckpoint(Checkpoint):
    """Legacy ``pytorch_model*.bin`` weights, loaded only with ``torch.load(weights_only=True)``.

    Plain unpickling can run arbitrary code from a stranger's file; ``weights_only`` refuses anything but
    tensors and plain containers. Zip-format files are memory-mapped, so opening reads no tensor data.
    """

    kind = "pytorch"

    def __init__(self, source: str, root: Path | None, files: list[Path], name=None):
        self._files = files
        self._tensors: dict = {}
        for path in files:
            for key, tensor in _load_weights_only(path).items():
                if key in self._tensors:
                    raise CheckpointError(f"{path}: tensor {key!r} is also stored in another shard")
                self._tensors[key] = tensor
        specs = {k: TensorSpec(k, dtype_name(t.dtype), tuple(t.shape)) for k, t in self._tensors.items()}
        super().__init__(source, root, specs, name)

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    def _read(self, spec: TensorSpec, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensors[spec.name].clone()


def _load_weights_only(path: Path) -> dict:
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # pre-zip format
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refusing to unpickle: the file holds objects other than tensors, which could run code. "
            "If you trust it, convert it to safetensors (load it yourself and call safetensors.torch.save_file)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: expected a mapping of tensor names to tensors")
    return state


#: how many bytes at each end of a weight file its identity hashes (the header, and the last tensor's tail)
IDENTITY_SAMPLE_BYTES = 1 << 16


def file_identity(path: Path) -> str:
    """What tells one version of a weight file from another without reading it all: its resolved path, size,
    modification time, inode and inode change time (``st_ctime``, which every write updates and which, unlike
    the modification time, cannot be set back), and a SHA-256 of its first and last 64 KiB (the safetensors
    header with every name, shape and offset, and the last tensor's tail), for file systems whose times are
    coarse. A file rewritten in place with the same size and modification time gets another identity."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            digest = hashlib.sha256(f.read(IDENTITY_SAMPLE_BYTES))
            if st.st_size > IDENTITY_SAMPLE_BYTES:
                f.seek(max(IDENTITY_SAMPLE_BYTES, st.st_size - IDENTITY_SAMPLE_BYTES))
                digest.update(f.read(IDENTITY_SAMPLE_BYTES))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    times = f"{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_dev}:{st.st_ino}"
    return f"{Path(path).resolve()}|{st.st_size}|{times}|{digest.hexdigest()[:32]}"
