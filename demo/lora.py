"""LoRA fine-tuning of a demo model, saved as a PEFT adapter folder.

A LoRA layer keeps the base weight W frozen and learns two thin matrices A (r × in) and B (out × r):

    y = W·x + (α / r) · B·(A·x)         so the task vector on W is  Δ = (α / r) · B @ A

A starts small and random, B at zero (so training starts at the base). The adapter is written the way PEFT
writes it — ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` /
``lora_B.weight`` and an ``adapter_config.json`` naming the base — which mergescope's checkpoint layer
opens as ``θ_base + Δ``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .model import DemoLlama

ADAPTER_PREFIX = "base_model.model."


class LoraLinear(nn.Module):
    """``W·x + (α/r)·B·(A·x)`` with W frozen."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, linear.in_features, generator=generator)
                                   / math.sqrt(linear.in_features))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def delta(self) -> torch.Tensor:
        """``Δ = (α/r)·B @ A``."""
        return self.scale * (self.lora_B @ self.lora_A)


def with_lora(base: DemoLlama, targets: tuple[str, ...], rank: int, alpha: float, seed: int) -> DemoLlama:
    """A copy of ``base`` whose linear layers named in ``targets`` (e.g. ``q_proj``) carry LoRA matrices."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoraLinear(child, rank, alpha, generator))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def is_lora_parameter(name: str) -> bool:
    return ".lora_A" in name or ".lora_B" in name


def lora_modules(model: DemoLlama) -> dict[str, LoraLinear]:
    """Module path (``model.layers.0.self_attn.q_proj``) → its LoRA layer."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_tensors(model: DemoLlama) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names."""
    tensors = {}
    for name, module in lora_modules(model).items():
        tensors[f"{ADAPTER_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().clone().contiguous()
        tensors[f"{ADAPTER_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().clone().contiguous()
    return tensors


def merged_state(model: DemoLlama) -> dict[str, torch.Tensor]:
    """The state dict of the base with the adapter applied: ``W + Δ`` on every LoRA layer."""
    state = {}
    modules = lora_modules(model)
    for name, tensor in model.state_dict().items():
        if is_lora_parameter(name):
            continue
        module = name.removesuffix(".weight")
        state[name] = tensor + modules[module].delta().detach() if module in modules else tensor
    return state


def adapter_config(base_reference: str, targets: tuple[str, ...], rank: int, alpha: float) -> dict:
    """PEFT's ``adapter_config.json`` for this adapter."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_reference,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def write_adapter_config(folder: Path, base_reference: str, targets: tuple[str, ...], rank: int, alpha: float) -> None:
    config = adapter_config(base_reference, targets, rank, alpha)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
