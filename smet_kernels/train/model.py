"""A small LLaMA-style decoder (RMSNorm, SwiGLU MLP, RoPE, causal SDPA) for the reference trainer.

Every hidden linear layer (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``,
``down_proj``) is a plain ``nn.Linear`` without bias, so :func:`smet_kernels.modules.sparsify` can swap it
for a ``BlockSparseLinear`` (see :data:`HIDDEN_LINEAR_NAMES`). Embedding, norms and the untied LM head
stay dense.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..recompute import checkpoint

HIDDEN_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a LLaMA model; ``intermediate_size`` is the SwiGLU width."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    vocab_size: int = 256
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


# SPEC §5 plus ``tiny`` for CPU tests.
MODEL_CONFIGS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(hidden_size=64, intermediate_size=128, num_heads=2, num_layers=2),
    "20m": LlamaConfig(hidden_size=256, intermediate_size=688, num_heads=4, num_layers=4),
    "60m": LlamaConfig(hidden_size=512, intermediate_size=1376, num_heads=8, num_layers=8),
    "130m": LlamaConfig(hidden_size=768, intermediate_size=2048, num_heads=12, num_layers=12),
    "350m": LlamaConfig(hidden_size=1024, intermediate_size=2736, num_heads=16, num_layers=24),
    "1b": LlamaConfig(hidden_size=2048, intermediate_size=5461, num_heads=32, num_layers=24),
    "7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_heads=32, num_layers=32),
}


def rounded_swiglu_width(intermediate_size: int) -> int:
    """The SwiGLU width rounded up to a multiple of 128 (SPEC §5) so that every block size divides it."""
    return 128 * math.ceil(intermediate_size / 128)


def model_config(
    name: str, vocab_size: int = 256, block_size: int | None = None, max_seq_len: int = 2048
) -> LlamaConfig:
    """The preset ``name`` with ``vocab_size``; with ``block_size``, an intermediate size that the block size
    does not divide is rounded up to a multiple of 128 (SPEC §5), e.g. 5461 -> 5504."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"config must be one of {sorted(MODEL_CONFIGS)}, got {name!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    config = replace(MODEL_CONFIGS[name], vocab_size=vocab_size, max_seq_len=max_seq_len)
    if block_size is not None:
        if config.hidden_size % block_size != 0:
            raise ValueError(
                f"block_size={block_size} does not divide the hidden size {config.hidden_size} of config {name!r}"
            )
        if config.intermediate_size % block_size != 0:
            config = replace(config, intermediate_size=rounded_swiglu_width(config.intermediate_size))
    return config


# --- the shape catalog: the hidden linear layers of a configuration (the memory model, the kernel and optimizer
#     benchmarks and the roofline all read their shapes here)
SUBLAYER = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "attn", "gate_proj": "mlp",
            "up_proj": "mlp", "down_proj": "mlp"}  # the module holding each hidden linear of a decoder layer
SHAPE_GROUPS = {"qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"), "gate_up": ("gate_proj", "up_proj"),
                "down": ("down_proj",)}  # the hidden linears that share one shape


def layer_linear_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """``name -> (out_features, in_features)`` of the hidden linears of one decoder layer: ``h × h`` attention
    projections, ``i × h`` gate/up, ``h × i`` down (``h`` hidden size, ``i`` SwiGLU width)."""
    h, i = config.hidden_size, config.intermediate_size
    return {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h), "gate_proj": (i, h),
            "up_proj": (i, h), "down_proj": (h, i)}


def hidden_linear_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """``module name -> (out_features, in_features)`` of every hidden linear layer of ``config``."""
    per_layer = layer_linear_shapes(config)
    return {f"layers.{layer}.{SUBLAYER[name]}.{name}": shape
            for layer in range(config.num_layers) for name, shape in per_layer.items()}


@dataclass(frozen=True)
class LinearShape:
    """A linear layer ``W [N, K]`` of a model configuration (``label`` names config and layers, e.g. ``60m:qkvo``)."""

    label: str
    N: int
    K: int


def linear_shapes(config_names) -> list[LinearShape]:
    """The distinct ``(N, K)`` hidden linear shapes of the configurations ``config_names``, the SwiGLU width rounded
    up to a multiple of 128 where 128 does not divide it (SPEC §5), so that every block size of the benchmark grid
    divides every shape and the dense baseline has the same shape for all of them."""
    shapes: dict[tuple[int, int], LinearShape] = {}
    for name in config_names:
        if name not in MODEL_CONFIGS:
            raise ValueError(f"configs must name presets of {sorted(MODEL_CONFIGS)}, got {name!r}")
        config = MODEL_CONFIGS[name]
        config = replace(config, intermediate_size=rounded_swiglu_width(config.intermediate_size))
        per_layer = layer_linear_shapes(config)
        for group, names in SHAPE_GROUPS.items():
            out_features, in_features = per_layer[names[0]]
            shapes.setdefault((out_features, in_features), LinearShape(f"{name}:{group}", out_features, in_features))
    return list(shapes.values())


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x²) + eps) * weight`` (computed in fp32)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [max_seq_len, head_dim]`` for rotary embeddings: angle(t, i) = t · theta^(-2i/head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [batch, heads, seq, head_dim]`` by position: ``x·cos + rotate_half(x)·sin``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, device=None, dtype=None):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden, bias=False, device=device, dtype=dtype)
        self.k_proj = nn.Linear(hidden, hidden, bias=False, device=device, dtype=dtype)
        self.v_proj = nn.Linear(hidden, hidden, bias=False, device=device, dtype=dtype)
        self.o_proj = nn.Linear(hidden, hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(x)), cos, sin)
        k = apply_rope(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, hidden))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, device=None, dtype=None):
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inter, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inter, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(inter, hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, device=None, dtype=None):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps, device=device, dtype=dtype)
        self.attn = Attention(config, device=device, dtype=dtype)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps, device=device, dtype=dtype)
        self.mlp = SwiGLU(config, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, recompute: bool = False) -> torch.Tensor:
        """With ``recompute`` the layer's activations are recomputed in backward: the checkpoint is taken inside the
        layer's own call, within the hooks on it (FSDP2's), which ``torch.compile`` cannot trace inside a checkpoint
        (it ran the whole sharded model eagerly)."""
        if recompute:
            return checkpoint(self, x, cos, sin, function=self.block)
        return self.block(x, cos, sin)

    def block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LlamaModel(nn.Module):
    """Decoder-only LM: ``logits = head(norm(layers(embed(tokens))))``; weights ~ N(0, init_std²).

    ``activation_checkpointing = True`` checkpoints each decoder layer while gradients are enabled: only the layer's
    input stays saved and the layer runs again in backward (:func:`smet_kernels.recompute.checkpoint`, non-reentrant;
    the same numbers: no dropout, RoPE tables are fixed).
    """

    def __init__(self, config: LlamaConfig, device=None, dtype=None):
        super().__init__()
        if config.hidden_size % config.num_heads != 0:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
        if config.head_dim % 2:  # RoPE rotates pairs of the head's dims
            raise ValueError(f"head dim hidden_size / num_heads = {config.head_dim} must be even for RoPE (hidden_size "
                             f"{config.hidden_size}, num_heads {config.num_heads})")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, device=device, dtype=dtype) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [batch, seq]`` (int64) -> ``logits [batch, seq, vocab]``."""
        x, cos, sin = self.embed_tokens(tokens)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            x = layer(x, cos, sin, recompute=recompute)
        return self.logits(x)

    # the parts before and after the layers are methods of their own: where torch.compile cannot trace forward as a
    # whole (FSDP2's hooks on each layer are opaque to Dynamo: a graph break inside the loop, and forward's frame runs
    # eagerly), each still compiles as a graph of its own, as each decoder layer does
    def embed_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tokens [batch, seq]`` -> the embeddings ``x`` and the RoPE tables ``cos, sin`` in ``x``'s dtype."""
        seq = tokens.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds max_seq_len {self.config.max_seq_len}")
        x = self.embed(tokens)
        cos = self.rope_cos[:seq].to(x.dtype)  # cast once: every layer shares (and saves) the same two tables
        sin = self.rope_sin[:seq].to(x.dtype)
        return x, cos, sin

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden states -> ``logits = lm_head(norm(x))``."""
        return self.lm_head(self.norm(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of ``logits [batch, seq, vocab]`` against ``targets [batch, seq]``."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
