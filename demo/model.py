"""A compact Llama decoder in plain torch, with Hugging Face's tensor names, so that ``transformers``'
``LlamaForCausalLM`` loads a demo checkpoint and computes the same logits.

For token ids x₁…x_T the model computes

    h⁰ = E[x]                                                  (embed_tokens)
    a  = hˡ + W_o · Attn(RoPE(W_q·n), RoPE(W_k·n), W_v·n)        n = RMSNorm(hˡ; g_in)
    hˡ⁺¹ = a + W_down · (silu(W_gate·m) ⊙ W_up·m)                m = RMSNorm(a; g_post)
    logits = W_head · RMSNorm(h^L; g_final)

with ``RMSNorm(x; g) = g ⊙ x / √(mean(x²) + ε)``, causal softmax attention scaled by 1/√d_head, and rotary
embeddings rotating each head's halves ``(x₁, x₂) ↦ (x₁ cos − x₂ sin, x₂ cos + x₁ sin)`` by angles
``p · θ^(−2i/d_head)`` at position p — exactly Hugging Face's ``rotate_half`` convention. No biases; the
head is untied from the embedding (``tie_word_embeddings: false``, Llama's default).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mergescope.checkpoints.errors import MergescopeError


@dataclass(frozen=True)
class DemoConfig:
    """The sizes of a demo model; :meth:`to_hf` is its ``config.json``."""

    vocab_size: int
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf(self) -> dict:
        """A ``config.json`` that ``transformers`` reads as this exact Llama model."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **asdict(self),
            "num_key_value_heads": self.num_attention_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "rope_scaling": None,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> DemoConfig:
        """Read a ``config.json``; a one-line :class:`MergescopeError` unless it is a demo-architecture Llama."""
        if raw.get("model_type") != "llama":
            found = raw.get("model_type") or (raw.get("architectures") or ["no architecture"])[0]
            raise MergescopeError(f"{source}: not a mergescope demo model (model_type {found!r}, expected llama)")
        kv_heads = raw.get("num_key_value_heads", raw.get("num_attention_heads"))
        if kv_heads != raw.get("num_attention_heads") or raw.get("tie_word_embeddings") or raw.get("attention_bias"):
            raise MergescopeError(f"{source}: not a mergescope demo model "
                                  "(a Llama with grouped-query attention, a tied head or biases)")
        names = [f.name for f in cls.__dataclass_fields__.values()]
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [n for n in required if n not in raw]
        if missing:
            raise MergescopeError(f"{source}: not a mergescope demo model: config.json lacks {', '.join(missing)}")
        config = cls(**{n: raw[n] for n in names if raw.get(n) is not None})
        if (config.hidden_size % config.num_attention_heads or config.hidden_size > 1024
                or config.num_hidden_layers > 16):
            raise MergescopeError(
                f"{source}: a Llama model of hidden size {config.hidden_size} and {config.num_hidden_layers} layers is "
                "not a mergescope demo model (they are tiny character-level models)"
            )
        return config


class RMSNorm(nn.Module):
    """``g ⊙ x / √(mean(x²) + ε)`` over the last dimension, computed in float32."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary_tables(positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of the angles ``p · θ^(−2i/d)`` for p < positions, each (positions, d), halves repeated."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    angles = torch.arange(positions, dtype=torch.float)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (batch, heads, T, d): ``x·cos + rotate_half(x)·sin`` with ``rotate_half(x₁, x₂) = (−x₂, x₁)``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: DemoConfig):
        super().__init__()
        h = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q = apply_rotary(split(self.q_proj(x)), cos, sin)
        k = apply_rotary(split(self.k_proj(x)), cos, sin)
        out = F.scaled_dot_product_attention(q, k, split(self.v_proj(x)), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: ``W_down · (silu(W_gate·x) ⊙ W_up·x)``."""

    def __init__(self, config: DemoConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DemoConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Hugging Face's ``LlamaModel`` part: ``model.embed_tokens``, ``model.layers.N``, ``model.norm``."""

    def __init__(self, config: DemoConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DemoLlama(nn.Module):
    """The demo decoder; ``state_dict()`` names match ``LlamaForCausalLM``'s."""

    def __init__(self, config: DemoConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        cos, sin = rotary_tables(config.max_position_embeddings, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, T, vocab) for token ids (batch, T); position p of every row is p (no left padding)."""
        t = ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise MergescopeError(f"sequence of {t} tokens is longer than the model's "
                                  f"{self.config.max_position_embeddings} positions")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


def init_weights(model: DemoLlama, seed: int) -> None:
    """Seeded initialisation: matrices ~ N(0, 1/fan_in) (output projections scaled by 1/√(2·layers)), norms 1."""
    generator = torch.Generator().manual_seed(seed)
    depth_scale = 1.0 / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0)
                continue
            std = 1.0 / math.sqrt(param.shape[1])
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std *= depth_scale
            if name.endswith("embed_tokens.weight"):
                std = 1.0
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def new_model(config: DemoConfig, seed: int) -> DemoLlama:
    """A freshly initialised demo model (deterministic in ``seed``)."""
    model = DemoLlama(config)
    init_weights(model, seed)
    return model
