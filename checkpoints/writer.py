"""Writing a checkpoint tensor by tensor, in bounded memory, appearing only when complete.

The writer is told every output tensor's name, dtype and shape up front. From that it lays out the shards
(consecutive tensors up to ``max_shard_bytes`` each) and writes each shard's header immediately, so every
tensor's byte range is known before any tensor exists. :meth:`CheckpointWriter.write` then puts one
tensor's bytes at its place with positioned writes, in any order, and the caller can free it at once:
memory never holds more than the tensor being written.

Everything goes into a hidden temporary folder beside the output; :meth:`CheckpointWriter.commit` checks
that every tensor was written, syncs, adds ``model.safetensors.index.json`` (when there is more than one
shard, as ``transformers`` writes it) and renames the folder into place. Until then the output path does
not exist, so an interrupted write never looks complete. From creation to commit (or abort) the writer holds
the output folder's lock (:mod:`.output_lock`): a second writer of the same folder fails at once, and the
temporary folders that killed writers of it left behind are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint
from .dtypes import ITEMSIZE, dtype_name, torch_dtype
from .errors import CheckpointError, MergescopeError
from .output_lock import PARTIAL_SUFFIX, OutputLock, partial_prefix
from .tensor_spec import TensorSpec

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
INDEX_NAME = "model.safetensors.index.json"


def check_destination(out: Path, *, overwrite: bool) -> None:
    """Refuse, with a one-line error, an output path that is a file, or a folder holding files unless
    ``overwrite``, or a symbolic link (replacing a link would leave its target's contents wherever it points)."""
    if out.is_symlink():
        raise CheckpointError(f"{out}: is a symbolic link to {os.path.realpath(out)}; give that folder itself, or "
                              "another output folder")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: folder exists and is not empty; choose another output folder or pass --force to "
                              "replace it")


def check_output_folder(out: Path, inputs: Iterable[Checkpoint], *, overwrite: bool) -> None:
    """Refuse, with a one-line error, an output folder that is the folder of one of ``inputs`` or holds it
    (replacing it would delete the input), or that :func:`check_destination` refuses. Run before any work, so
    that a long job cannot end by failing to write, or by replacing its own input."""
    target = out.resolve()
    for checkpoint in inputs:
        root = checkpoint.root.resolve() if checkpoint.root else None
        if root is not None and (root == target or target in root.parents):
            raise CheckpointError(
                f"{out}: is (or is inside) the input {checkpoint.source}; choose another output folder"
            )
    check_destination(out, overwrite=overwrite)


@dataclass
class _Shard:
    filename: str
    specs: list[TensorSpec]
    offsets: dict[str, int]  # absolute file offset of each tensor's data
    size: int


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split ``specs``, in order, into consecutive runs of at most ``max_shard_bytes`` (one tensor minimum)."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _layout(filename: str, specs: list[TensorSpec], metadata: Mapping[str, str]) -> tuple[_Shard, bytes]:
    """A shard's header bytes and each tensor's offset; wider dtypes first so every tensor is aligned."""
    ordered = sorted(specs, key=lambda s: -ITEMSIZE[s.dtype])
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    position = 0
    relative: dict[str, int] = {}
    for spec in ordered:
        offsets = [position, position + spec.nbytes]
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": offsets}
        relative[spec.name] = position
        position += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data_start = 8 + len(text)
    offsets = {name: data_start + rel for name, rel in relative.items()}
    return _Shard(filename, ordered, offsets, data_start + position), struct.pack("<Q", len(text)) + text


class CheckpointWriter:
    """Write the tensors of ``specs`` into ``out_dir`` as safetensors shards.

    Use as a context manager: leaving the block without :meth:`commit` (an error, Ctrl-C) removes the
    temporary folder and leaves ``out_dir`` untouched.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        specs: Iterable[TensorSpec],
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        overwrite: bool = False,
        metadata: Mapping[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.specs = {s.name: s for s in specs}
        self.overwrite = overwrite
        self.total_bytes = sum(s.nbytes for s in self.specs.values())
        parent = self.out_dir.parent
        check_destination(self.out_dir, overwrite=overwrite)
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"{self.out_dir}: cannot create the output folder: {exc.strerror or exc}") from None
        self._lock = OutputLock(self.out_dir)  # one writer per output folder, until commit or abort
        try:
            self._lock.remove_leftovers()  # of writers of this folder that were killed
            check_destination(self.out_dir, overwrite=overwrite)  # again: a writer may have finished meanwhile
            free = shutil.disk_usage(parent).free
            if free < self.total_bytes:
                raise CheckpointError(
                    f"{parent}: {_gb(free)} free but the checkpoint needs {_gb(self.total_bytes)}; free space or "
                    "choose another output folder"
                )
            prefix = partial_prefix(self.out_dir)
            self.tmp_dir = Path(tempfile.mkdtemp(prefix=prefix, suffix=PARTIAL_SUFFIX, dir=parent))
            os.chmod(self.tmp_dir, 0o755)  # mkdtemp's 0700 would make the finished model private
        except OSError as exc:
            self._lock.release()
            raise CheckpointError(f"{self.out_dir}: cannot create the output folder: {exc.strerror or exc}") from None
        except BaseException:
            self._lock.release()
            raise
        self._written: set[str] = set()
        self._rows_written: dict[str, list[tuple[int, int]]] = {}  # row ranges of tensors written in parts
        self._fds: dict[str, int] = {}
        self._committed = False
        runs = plan_shards(list(self.specs.values()), max_shard_bytes)
        names = (
            ["model.safetensors"]
            if len(runs) == 1
            else [f"model-{i + 1:05d}-of-{len(runs):05d}.safetensors" for i in range(len(runs))]
        )
        self.shards: list[_Shard] = []
        self._shard_of: dict[str, _Shard] = {}
        header_metadata = {"format": "pt", **(metadata or {})}
        try:
            for filename, run in zip(names, runs):
                shard, header = _layout(filename, run, header_metadata)
                fd = os.open(self.tmp_dir / filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds[filename] = fd
                _pwrite_all(fd, memoryview(header), 0, self.tmp_dir / filename)
                os.ftruncate(fd, shard.size)
                self.shards.append(shard)
                self._shard_of.update({s.name: shard for s in run})
        except BaseException:
            self.abort()
            raise

    # --- writing ----------------------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write tensor ``name`` (converted to its planned dtype) at its place in its shard."""
        spec = self._planned(name)
        if name in self._written or name in self._rows_written:
            raise MergescopeError(f"writer: tensor {name!r} written twice")
        if tuple(tensor.shape) != spec.shape:
            raise MergescopeError(f"writer: tensor {name!r} has shape {list(tensor.shape)}, planned {list(spec.shape)}")
        self._put(spec, tensor, 0)
        self._written.add(name)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write rows ``start…start + len(rows) − 1`` of tensor ``name`` (along its first dimension) at their place:
        one positioned write of a contiguous byte range. The tensor counts as written once every row is, each
        exactly once, in any order."""
        spec = self._planned(name)
        fits = spec.shape and tuple(rows.shape[1:]) == spec.shape[1:] and 0 <= start <= start + len(rows) <= spec.rows
        if not fits:
            raise MergescopeError(f"writer: rows {start}:{start + len(rows)} of shape {list(rows.shape)} do not fit "
                                  f"tensor {name!r} of shape {list(spec.shape)}")
        ranges = self._rows_written.setdefault(name, [])
        stop = start + len(rows)
        if name in self._written or any(a < stop and start < b for a, b in ranges):
            raise MergescopeError(f"writer: rows {start}:{stop} of tensor {name!r} written twice")
        self._put(spec, rows, start * spec.row_numel * ITEMSIZE[spec.dtype])
        ranges.append((start, stop))
        if sum(b - a for a, b in ranges) == spec.rows:
            del self._rows_written[name]
            self._written.add(name)

    def _planned(self, name: str) -> TensorSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise MergescopeError(f"writer: tensor {name!r} was not planned for {self.out_dir}")
        return spec

    def _put(self, spec: TensorSpec, tensor: torch.Tensor, skip: int) -> None:
        """The bytes of ``tensor`` (converted to the planned dtype) at ``skip`` bytes into ``spec``'s place."""
        import torch  # start-up cost (see the imports)

        data = tensor.detach().to(device="cpu", dtype=torch_dtype(spec.dtype)).contiguous()
        if data.numel():
            raw = data.reshape(-1).view(torch.uint8).numpy()
            shard = self._shard_of[spec.name]
            _pwrite_all(self._fds[shard.filename], memoryview(raw), shard.offsets[spec.name] + skip,
                        self.tmp_dir / shard.filename)

    def add_file(self, source: Path, name: str | None = None) -> None:
        """Copy a non-weight file (config, tokenizer) into the checkpoint."""
        shutil.copyfile(source, self.tmp_dir / (name or source.name))

    def add_text(self, name: str, text: str) -> None:
        """Write a text file (an edited ``config.json``, a model card) into the checkpoint."""
        (self.tmp_dir / name).write_text(text, encoding="utf-8")

    # --- finishing --------------------------------------------------------------------------------
    def commit(self) -> Path:
        """Check completeness, sync, write the index and move the folder into place."""
        missing = [n for n in self.specs if n not in self._written]
        if missing:
            raise MergescopeError(f"writer: {len(missing)} planned tensors were never written, e.g. {missing[0]!r}")
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {n: self._shard_of[n].filename for n in sorted(self.specs)},
            }
            (self.tmp_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        check_destination(self.out_dir, overwrite=self.overwrite)
        trash = None
        if self.out_dir.is_dir():
            trash = self.out_dir.with_name(f".{self.out_dir.name}.replaced-{os.getpid()}")
            os.rename(self.out_dir, trash)
        os.rename(self.tmp_dir, self.out_dir)
        self._committed = True
        _fsync_folder(self.out_dir.parent)  # the rename survives a power loss
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        self._lock.release()
        return self.out_dir

    def abort(self) -> None:
        """Remove everything written so far; the output path is left as it was."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if not self._committed:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._lock.release()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self._committed:
            self.abort()


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def save_checkpoint(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    files: Iterable[Path] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a whole in-memory state dict (small models: the demo, tests) through :class:`CheckpointWriter`."""
    specs = [TensorSpec(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    with CheckpointWriter(out_dir, specs, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        for path in files:
            writer.add_file(path)
        return writer.commit()
