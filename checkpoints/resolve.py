"""From what a user writes to a :class:`Checkpoint`.

``open_checkpoint`` accepts a folder (``model.safetensors``, sharded safetensors with an index, a PEFT
LoRA adapter, or legacy ``pytorch_model*.bin``), a single ``.safetensors`` or ``.bin`` file, a Hugging
Face hub id (``org/name[@revision]``) and mergekit's ``model+lora`` syntax for a model with an adapter
applied. It reads headers only.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from .checkpoint import Checkpoint, SafetensorsCheckpoint, TorchBinCheckpoint
from .errors import CheckpointError
from .hub import parse_hub_id, resolve_hub_id
from .lora import ADAPTER_CONFIG, LoraAdapter, LoraCheckpoint
from .model_files import checkpoint_roots, read_json

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"


def open_checkpoint(
    source: str | os.PathLike, *, base: Checkpoint | None = None, name: str | None = None
) -> Checkpoint:
    """Open ``source`` lazily (headers only).

    ``base`` is used for a LoRA adapter folder instead of the base model the adapter names.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        return _open_local(text, path, base, name)
    if "+" in text:
        model_part, adapter_part = text.rsplit("+", 1)
        model = open_checkpoint(model_part)
        adapter = LoraAdapter(_as_folder(adapter_part, "LoRA adapter"))
        return LoraCheckpoint(text, model, adapter, name or f"{model.name}+{adapter.folder.name}")
    if parse_hub_id(text) and not _first_component_exists(path):
        return _open_local(text, resolve_hub_id(text), base, name)
    raise CheckpointError(_missing_path_message(text, path))


def _first_component_exists(path: Path) -> bool:
    """``ws/ft_ad`` where ``ws`` is a local folder: a typo in a path, not a hub id (nothing is downloaded)."""
    return len(path.parts) > 1 and Path(path.parts[0]).exists()


def close_names(path: Path, limit: int = 3) -> list[str]:
    """Paths beside the first missing component of ``path`` whose names are close to it (difflib's ratio ≥ 0.6),
    written as the user wrote the part that exists."""
    parts = path.parts
    for depth in range(len(parts)):
        parent = Path(*parts[:depth]) if depth else Path(".")
        if not (parent / parts[depth]).exists():
            try:
                siblings = sorted(child.name for child in parent.iterdir())
            except OSError:
                return []
            found = difflib.get_close_matches(parts[depth], siblings, n=limit, cutoff=0.6)
            return [str(parent / name) if depth else name for name in found]
    return []


def _missing_path_message(text: str, path: Path) -> str:
    """One line: no such folder (and why it was not tried as a hub id), with close names."""
    if _first_component_exists(path):
        why = f" ({path.parts[0]} is a local folder, so this is not tried as a hub id)"
    else:
        why = ", and not a hub id (org/name)"
    close = close_names(path)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"{text}: no such folder or file{why}{hint}"


def _as_folder(text: str, what: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists() and parse_hub_id(text):
        path = resolve_hub_id(text)
    if not path.is_dir():
        raise CheckpointError(f"{text}: {what} must be a folder (or hub id), and this is not one")
    return path


def _open_local(source: str, path: Path, base: Checkpoint | None, name: str | None) -> Checkpoint:
    if path.is_file():
        return _open_file(source, path, name)
    if not path.is_dir():
        raise CheckpointError(f"{source}: neither a file nor a folder")
    if (path / ADAPTER_CONFIG).is_file():
        return _open_adapter(source, path, base, name)
    for index_name in (SAFETENSORS_INDEX, *sorted(p.name for p in path.glob("*.safetensors.index.json"))):
        if (path / index_name).is_file():
            return _open_safetensors_index(source, path / index_name, name)
    if (path / SAFETENSORS_SINGLE).is_file():
        return SafetensorsCheckpoint.from_file(source, path / SAFETENSORS_SINGLE, path, name)
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return SafetensorsCheckpoint.from_file(source, singles[0], path, name)
    if len(singles) > 1:
        raise CheckpointError(
            f"{source}: {len(singles)} .safetensors files and no {SAFETENSORS_INDEX} to say which tensors "
            "are where; add the index or point at one file"
        )
    if (path / TORCH_INDEX).is_file():
        shards = sorted(set(_index_weight_map(path / TORCH_INDEX).values()))
        return TorchBinCheckpoint(source, path, shards, name)
    if (path / TORCH_SINGLE).is_file():
        return TorchBinCheckpoint(source, path, [path / TORCH_SINGLE], name)
    raise CheckpointError(
        f"{source}: no weights found; expected {SAFETENSORS_SINGLE}, shards with {SAFETENSORS_INDEX}, "
        f"{ADAPTER_CONFIG} (LoRA) or {TORCH_SINGLE}"
    )


def _open_file(source: str, path: Path, name: str | None) -> Checkpoint:
    filename = path.name
    if filename.endswith(".safetensors.index.json"):
        return _open_safetensors_index(source, path, name)
    if filename.endswith(".safetensors"):
        return SafetensorsCheckpoint.from_file(source, path, path.parent, name)
    if filename.endswith(".bin.index.json"):
        return TorchBinCheckpoint(source, path.parent, sorted(set(_index_weight_map(path).values())), name)
    if filename.endswith((".bin", ".pt", ".pth")):
        return TorchBinCheckpoint(source, path.parent, [path], name)
    raise CheckpointError(f"{source}: not a checkpoint file (expected .safetensors, .safetensors.index.json or .bin)")


def _open_safetensors_index(source: str, index_path: Path, name: str | None) -> Checkpoint:
    return SafetensorsCheckpoint.from_index(source, index_path, _index_weight_map(index_path), name)


def _index_weight_map(index_path: Path) -> dict[str, Path]:
    """The index's tensor → shard map, every shard resolved inside the index's folder.

    A shard named by an absolute path, through ``..``, or through a symlink that leaves the folder is an
    error, as is a shard that does not exist: an index is untrusted input like a header.
    """
    index = read_json(index_path, "shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: has no weight_map (tensor name → shard file)")
    folder = index_path.parent.resolve()
    allowed = checkpoint_roots(index_path.parent)
    resolved: dict[str, Path] = {}
    shards: dict[str, Path] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index_path}: tensor {tensor!r} maps to {shard!r}, not a file name")
        if shard not in shards:
            shards[shard] = _shard_inside(index_path, folder, allowed, shard)
        resolved[tensor] = shards[shard]
    return resolved


def _shard_inside(index_path: Path, folder: Path, allowed: list[Path], shard: str) -> Path:
    relative = Path(shard)
    if relative.is_absolute() or ".." in relative.parts or shard.startswith(("/", "\\")):
        raise CheckpointError(f"{index_path}: shard path {shard!r} leaves the checkpoint folder; refusing it")
    target = (folder / relative).resolve()
    if not any(target.is_relative_to(root) for root in allowed):
        raise CheckpointError(f"{index_path}: shard {shard!r} is a link to {target}, outside the checkpoint folder")
    if not target.is_file():
        raise CheckpointError(f"{index_path}: shard {shard!r} is missing")
    return target


def _open_adapter(source: str, folder: Path, base: Checkpoint | None, name: str | None) -> Checkpoint:
    adapter = LoraAdapter(folder)
    if base is None:
        reference = adapter.base_reference
        if reference is None:
            raise CheckpointError(f"{source}: the LoRA adapter does not name its base model; give the base explicitly")
        try:
            base = open_checkpoint(reference)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{source}: cannot open the adapter's base {reference!r} ({exc}); give the base explicitly"
            ) from None
    return LoraCheckpoint(source, base, adapter, name)
