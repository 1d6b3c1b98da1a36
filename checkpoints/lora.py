"""PEFT LoRA adapters as checkpoints.

An adapter stores, for each target module, two thin matrices ``A`` (r × in) and ``B`` (out × r). Its task
vector on the module's weight is ``Δ = s · B @ A`` with ``s = α / r`` (``α / √r`` for rsLoRA), transposed
for ``fan_in_fan_out`` layers (GPT-2's Conv1D) and for embeddings (whose ``lora_embedding_A`` is r × vocab).
``α`` may be overridden per module by ``alpha_pattern``; ``r`` is read from ``A``'s shape, which is what
``rank_pattern`` sets. Tensors saved whole (``modules_to_save``: a retrained ``lm_head`` or a grown
embedding) replace the base's. Every other tensor is the base's, so its task vector is exactly zero.

:class:`LoraCheckpoint` is "base with the adapter applied": it reads ``θ = θ_base + Δ`` and hands the exact
``Δ`` to the analysis through :meth:`LoraCheckpoint.stored_delta`, without the rounding of subtracting.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint, file_identity
from .dtypes import torch_dtype
from .errors import CheckpointError
from .model_files import ModelConfig, model_files_in, read_json, tokenizer_fingerprint
from .safetensors_format import TensorInfo, read_header, read_tensor
from .tensor_spec import TensorSpec

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?!weight$)[^.]+)?(?:\.weight)?$"
)
_PREFIX = "base_model.model."
#: ``.modules_to_save`` and the adapter name peft may keep after it, before the parameter's own name
_TRAINED_COPY = re.compile(r"\.modules_to_save(?:\.[^.]+)?(?=\.[^.]+$)")


@dataclass(frozen=True)
class LoraTarget:
    """One adapted weight: ``Δ = scale · B @ A``, transposed when ``transpose``."""

    weight: str
    a: TensorInfo
    b: TensorInfo
    scale: float
    transpose: bool

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def delta_shape(self) -> tuple[int, int]:
        out, inner = self.b.shape[0], self.a.shape[1]
        return (inner, out) if self.transpose else (out, inner)


class LoraAdapter:
    """A PEFT LoRA adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = read_json(folder / ADAPTER_CONFIG, ADAPTER_CONFIG)
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            if (folder / "adapter_model.bin").is_file():
                raise CheckpointError(
                    f"{folder}: adapter weights are in adapter_model.bin; save the adapter with "
                    "safe_serialization=True (the default in PEFT) to get adapter_model.safetensors"
                )
            raise CheckpointError(f"{folder}: has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
        self.weights_file = weights
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise CheckpointError(f"{folder}: PEFT type {peft_type} is not supported; only LoRA adapters are")
        if self.config.get("use_dora"):
            raise CheckpointError(f"{folder}: DoRA adapters are not supported yet; merge it into its base first")
        self.targets, self.replaced = self._parse(read_header(weights).tensors)

    @property
    def base_reference(self) -> str | None:
        """The base model the adapter names (``base_model_name_or_path``), if any."""
        ref = self.config.get("base_model_name_or_path")
        return ref if isinstance(ref, str) and ref else None

    def _parse(self, tensors: dict[str, TensorInfo]) -> tuple[dict[str, LoraTarget], dict[str, TensorInfo]]:
        parts: dict[str, dict[str, TensorInfo]] = {}
        trained: dict[str, TensorInfo] = {}  # modules_to_save: the adapter's own copy, what the merged model holds
        saved: dict[str, TensorInfo] = {}  # whole layers saved beside it (peft's save_embedding_layers after a resize)
        for key, info in tensors.items():
            name = key.removeprefix(_PREFIX)
            if "lora_magnitude_vector" in name:
                raise CheckpointError(f"{self.weights_file}: DoRA tensor {key!r} is not supported yet")
            match = _LORA_KEY.match(name)
            if match:
                parts.setdefault(match["module"], {})[match["part"]] = info
            elif ".original_module." in name:
                continue  # the base's copy peft keeps next to a modules_to_save one: not what the adapter applies
            elif _TRAINED_COPY.search(name):
                whole = _TRAINED_COPY.sub("", name)  # X.modules_to_save[.adapter].weight -> X.weight
                trained[whole] = dataclasses.replace(info, name=whole)
            else:
                saved[name] = dataclasses.replace(info, name=name)
        replaced = {**saved, **trained}
        targets = {}
        for module, found in parts.items():
            embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
            a = found.get("lora_embedding_A" if embedding else "lora_A")
            b = found.get("lora_embedding_B" if embedding else "lora_B")
            if a is None or b is None:
                raise CheckpointError(f"{self.weights_file}: module {module!r} has only one of LoRA A and B")
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                raise CheckpointError(
                    f"{self.weights_file}: module {module!r}: LoRA A {list(a.shape)} and B {list(b.shape)} "
                    "are not (r × in) and (out × r)"
                )
            rank = a.shape[0]
            alpha = self._alpha_for(module)
            scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
            transpose = embedding or bool(self.config.get("fan_in_fan_out"))
            targets[f"{module}.weight"] = LoraTarget(f"{module}.weight", a, b, scale, transpose)
        return targets, replaced

    def _alpha_for(self, module: str) -> float:
        patterns = self.config.get("alpha_pattern") or {}
        for pattern, alpha in patterns.items():
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
                return float(alpha)
        alpha = self.config.get("lora_alpha", 8)
        if not isinstance(alpha, (int, float)):
            raise CheckpointError(f"{self.folder / ADAPTER_CONFIG}: lora_alpha {alpha!r} is not a number")
        return float(alpha)

    def delta(self, weight: str) -> torch.Tensor:
        """``Δ = scale · B @ A`` for the adapted weight ``weight``, in float32."""
        import torch

        target = self.targets[weight]
        a = read_tensor(target.a).to(torch.float32)
        b = read_tensor(target.b).to(torch.float32)
        delta = (b @ a).mul_(target.scale)
        return delta.T.contiguous() if target.transpose else delta


class LoraCheckpoint(Checkpoint):
    """A base checkpoint with a LoRA adapter applied: ``θ = θ_base + Δ`` on each target weight."""

    kind = "lora"

    def __init__(self, source: str, base: Checkpoint, adapter: LoraAdapter, name: str | None = None):
        self._base = base
        self.adapter = adapter
        specs: dict[str, TensorSpec] = dict(base._specs)
        for weight, target in adapter.targets.items():
            if weight not in base:
                raise CheckpointError(
                    f"{adapter.folder}: adapts {weight!r}, which base {base.source} does not have; "
                    "is this the adapter's base model?"
                )
            if tuple(base.spec(weight).shape) != target.delta_shape:
                raise CheckpointError(
                    f"{adapter.folder}: LoRA on {weight!r} has shape {list(target.delta_shape)} but the base "
                    f"tensor is {list(base.spec(weight).shape)}; is this the adapter's base model?"
                )
        specs.update(adapter.replaced)
        super().__init__(source, adapter.folder, specs, name or adapter.folder.name)

    @property
    def base(self) -> Checkpoint:
        return self._base

    @property
    def files(self) -> list[Path]:
        return [self.adapter.weights_file, *self._base.files]

    @cached_property
    def config(self) -> ModelConfig:
        return self._base.config

    @cached_property
    def tokenizer_fingerprint(self) -> str | None:
        return tokenizer_fingerprint(self.adapter.folder) or self._base.tokenizer_fingerprint

    def model_files(self) -> list[Path]:
        """The base's config; the adapter's own tokenizer files where it has them (a grown vocabulary)."""
        files = {p.name: p for p in self._base.model_files()}
        files.update({p.name: p for p in model_files_in(self.adapter.folder) if p.name != "config.json"})
        return list(files.values())

    def _fingerprint_parts(self) -> list[str]:
        return [self._base.fingerprint, file_identity(self.adapter.weights_file)]

    def _read(self, spec: TensorSpec, buffer: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        if spec.name in self.adapter.replaced:
            return read_tensor(self.adapter.replaced[spec.name], buffer)
        if spec.name in self.adapter.targets:
            merged = self._base.read(spec.name, torch.float32).add_(self.adapter.delta(spec.name))
            return merged.to(torch_dtype(spec.dtype))
        return self._base.read(spec.name, buffer=buffer)

    def _read_rows(self, spec: TensorSpec, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Untouched and replaced tensors read only the rows; an adapted weight is formed whole and cut, so its
        rows carry the bits of :meth:`_read`."""
        if spec.name in self.adapter.replaced:
            return read_tensor(self.adapter.replaced[spec.name], buffer, rows=(start, stop))
        if spec.name in self.adapter.targets:
            return super()._read_rows(spec, start, stop, buffer)
        return self._base.read_rows(spec.name, start, stop, buffer=buffer)

    def stored_delta_rows(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        """Rows of :meth:`stored_delta`; an untouched weight's zeros are made for those rows only."""
        import torch

        if name in self.adapter.targets or name in self.adapter.replaced:
            return super().stored_delta_rows(name, start, stop)
        return torch.zeros((stop - start, *self.spec(name).shape[1:]), dtype=torch.float32)

    def stored_delta(self, name: str) -> torch.Tensor | None:
        """Exact ``Δ`` on adapted weights, exact zeros on untouched ones, None on replaced tensors."""
        import torch

        if name in self.adapter.targets:
            return self.adapter.delta(name)
        if name in self.adapter.replaced:
            return None
        return torch.zeros(self.spec(name).shape, dtype=torch.float32)
