"""Small, seeded models and synthetic data that every chapter reuses.

Everything is deterministic given a seed, so N ranks that build "the same model"
really hold the same numbers, and a single-process reference can be rebuilt
bit for bit to check a parallel run against.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """The transformer's feed-forward block: ``fc2(gelu(fc1(x)))``.

    ``fc1`` is Megatron's matrix A (split by columns in chapter 04), ``fc2`` its
    matrix B (split by rows).
    """

    def __init__(self, d_model: int, d_hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden, bias=bias)
        self.fc2 = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v over the last two dims of (batch, heads, seq, d_head) tensors.

    ``causal=True``: position i attends to positions j ≤ i only (the scores above the
    diagonal are set to −inf before the softmax).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        s_q, s_k = scores.shape[-2:]
        above = torch.ones(s_q, s_k, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    return scores.softmax(dim=-1) @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (no dropout; a causal mask
    with ``causal=True``)."""

    def __init__(self, d_model: int, n_heads: int, bias: bool = True, causal: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.causal = causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, seq, d_model)
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, self.d_head).unbind(dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, d_head)
        out = attention(q, k, v, self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, s, -1))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))``, then ``+ mlp(ln2(x))``."""

    def __init__(self, d_model: int, n_heads: int, d_hidden: int | None = None, causal: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, causal=causal)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_hidden or 4 * d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def make_mlp(d_model: int = 16, d_hidden: int = 64, seed: int = 0) -> MLP:
    """An MLP whose weights depend only on ``seed``: the same on every rank."""
    torch.manual_seed(seed)
    return MLP(d_model, d_hidden)


def make_block(
    d_model: int = 16, n_heads: int = 4, d_hidden: int | None = None, seed: int = 0, causal: bool = False
) -> TransformerBlock:
    torch.manual_seed(seed)
    return TransformerBlock(d_model, n_heads, d_hidden, causal)


def make_stack(depth: int = 4, d_model: int = 16, d_hidden: int = 32, seed: int = 0) -> nn.Sequential:
    """``depth`` residual-free MLP layers in an ``nn.Sequential`` (for pipelines)."""
    torch.manual_seed(seed)
    return nn.Sequential(*[MLP(d_model, d_hidden) for _ in range(depth)])


def regression_data(num_samples: int, d_model: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``x`` and targets ``y`` from a fixed random "teacher" plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, d_model, generator=g)
    teacher = torch.randn(d_model, d_model, generator=g) / math.sqrt(d_model)
    y = torch.tanh(x @ teacher) + 0.01 * torch.randn(num_samples, d_model, generator=g)
    return x, y


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of ``batch`` along dim 0 (equal sizes only)."""
    if batch.shape[0] % world_size:
        raise ValueError(
            f"a batch of {batch.shape[0]} does not split evenly over "
            f"{world_size} ranks; use a multiple of {world_size}"
        )
    size = batch.shape[0] // world_size
    return batch[rank * size : (rank + 1) * size]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class MaskDropout(nn.Module):
    """Dropout that keeps a 1-byte mask for backward, as the fused GPU kernel does.

    ``torch.native_dropout`` saves a boolean mask; ``nn.Dropout`` on the CPU saves
    its scaled mask in the activation's own dtype instead (2 or 4 bytes per element).
    """

    def __init__(self, p: float = 0.1):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return torch.native_dropout(x, self.p, True)[0]


class DropoutSelfAttention(SelfAttention):
    """:class:`SelfAttention` with dropout on the attention probabilities (Megatron's place)."""

    def __init__(self, d_model: int, n_heads: int, p: float = 0.1, bias: bool = True):
        super().__init__(d_model, n_heads, bias)
        self.dropout = MaskDropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, self.d_head).unbind(dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
        out = self.dropout(scores.softmax(dim=-1)) @ v
        return self.proj(out.transpose(1, 2).reshape(b, s, -1))


class DropoutTransformerBlock(TransformerBlock):
    """:class:`TransformerBlock` with dropout where Megatron-LM has it: on the attention
    probabilities, and on the attention's and the MLP's outputs before each residual add.
    (Chapter 05 measures its saved activations against Korthikanti et al.'s count.)"""

    def __init__(self, d_model: int, n_heads: int, d_hidden: int | None = None, p: float = 0.1):
        super().__init__(d_model, n_heads, d_hidden)
        self.attn = DropoutSelfAttention(d_model, n_heads, p)
        self.attn_out_dropout, self.mlp_out_dropout = MaskDropout(p), MaskDropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_out_dropout(self.attn(self.ln1(x)))
        return x + self.mlp_out_dropout(self.mlp(self.ln2(x)))


def make_dropout_block(
    d_model: int = 16, n_heads: int = 4, d_hidden: int | None = None, p: float = 0.1, seed: int = 0
) -> DropoutTransformerBlock:
    torch.manual_seed(seed)
    return DropoutTransformerBlock(d_model, n_heads, d_hidden, p)
