"""Context parallelism (chapter 05b): attention itself split along the sequence over N ranks.

Every rank holds s/N positions of q, k and v, shaped (batch, heads, local_seq, d_head):

    q_mine = shard_sequence(q, rank, N, dim=2)            # zig-zag: chunks r and 2N−1−r of 2N
    out_mine = ring_attention(q_mine, k_mine, v_mine)      # k/v blocks travel around a ring
    out = unshard_sequence([out_0, …, out_{N−1}], dim=2)   # the whole sequence again
    out_mine = ulysses_attention(q_mine, k_mine, v_mine)   # all-to-all: sequence ⇄ heads (contiguous)

Ring attention merges each k/v block's partial result with an online softmax (running
max and log-sum-exp); its backward is a second trip around the ring in which dk and dv
travel with the blocks. Ulysses swaps the sequence split for a head split, runs whole-
sequence attention on its heads, and swaps back. :class:`ContextParallelBlock` is a
transformer block on a sequence shard (optionally tensor-parallel too).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course_lib.models import attention
from course_lib.p2p import ring_of

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

LAYOUTS = ("zigzag", "contiguous")
# Point-to-point tags: the k/v blocks and the dk/dv accumulators travel the same links.
_KV_TAG, _GRAD_TAG = 51, 52


# ----------------------------------------------------------------------------
# which positions a rank holds


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'zigzag' or 'contiguous', got {layout!r}")


def num_chunks(world_size: int, layout: str = "zigzag") -> int:
    """How many equal chunks the sequence is cut into: 2N for zig-zag, N for contiguous."""
    _check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def chunks_of(rank: int, world_size: int, layout: str = "zigzag") -> tuple[int, ...]:
    """The chunks rank holds, in the order its shard stores them: (r, 2N−1−r) or (r,)."""
    _check_layout(layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    return (rank, 2 * world_size - 1 - rank) if layout == "zigzag" else (rank,)


def _chunk_size(seq_len: int, world_size: int, layout: str) -> int:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    n = num_chunks(world_size, layout)
    if seq_len % n:
        how = f"2N = {n} chunks (zig-zag)" if layout == "zigzag" else f"N = {n} chunks"
        raise ValueError(
            f"a sequence of {seq_len} positions does not split into {how} of equal size; "
            f"use a multiple of {n}"
        )
    return seq_len // n


def positions(rank: int, world_size: int, seq_len: int, layout: str = "zigzag") -> torch.Tensor:
    """The global positions of rank's shard, in the order the shard stores them."""
    size = _chunk_size(seq_len, world_size, layout)
    return torch.cat([torch.arange(c * size, (c + 1) * size) for c in chunks_of(rank, world_size, layout)])


def shard_sequence(
    x: torch.Tensor, rank: int, world_size: int, dim: int, layout: str = "zigzag"
) -> torch.Tensor:
    """Rank's shard of ``x`` along ``dim``: zig-zag, chunks r and 2N−1−r of 2N; contiguous, chunk r of N."""
    dim = dim % x.dim()
    size = _chunk_size(x.shape[dim], world_size, layout)
    pieces = x.split(size, dim)
    mine = [pieces[c] for c in chunks_of(rank, world_size, layout)]
    return mine[0] if len(mine) == 1 else torch.cat(mine, dim)


def unshard_sequence(shards: Sequence[torch.Tensor], dim: int, layout: str = "zigzag") -> torch.Tensor:
    """Every rank's shard (a list in rank order) back into the whole sequence along ``dim``."""
    _check_layout(layout)
    if not shards:
        raise ValueError("unshard_sequence needs every rank's shard, got an empty list")
    n, shape = len(shards), shards[0].shape
    if any(s.shape != shape for s in shards):
        raise ValueError(f"every shard must have the same shape, got {[tuple(s.shape) for s in shards]}")
    dim = dim % shards[0].dim()
    if layout == "contiguous":
        return torch.cat(list(shards), dim)
    if shape[dim] % 2:
        raise ValueError(f"a zig-zag shard holds two equal chunks; its length {shape[dim]} is odd")
    halves = [s.chunk(2, dim) for s in shards]
    order = [halves[r][0] for r in range(n)] + [halves[r][1] for r in reversed(range(n))]
    return torch.cat(order, dim)


# ----------------------------------------------------------------------------
# attention on blocks, and the online softmax that merges them


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, diagonal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over one block of k/v: (out, lse), out normalised over this block only.

    ``lse`` = log Σ_j exp(score_j), the log-sum-exp of each query's scores in this block
    (its running max is folded in: logsumexp subtracts it before exponentiating).
    ``diagonal=True``: q and k are the same positions, so the causal mask applies inside.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if diagonal:
        scores = scores.masked_fill(_above_diagonal(scores), float("-inf"))
    lse = scores.logsumexp(dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v, lse


def _above_diagonal(scores):
    s_q, s_k = scores.shape[-2:]
    return torch.ones(s_q, s_k, dtype=torch.bool, device=scores.device).triu(1)


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two blocks' (out, lse) → the attention over both blocks: the online softmax's merge.

    Each output is weighted by its share of the total softmax mass, exp(lse − lse_total);
    the running max m = max(lse_a, lse_b) is subtracted before exponentiating, so nothing
    overflows however large the scores are.
    """
    m = torch.maximum(lse_a, lse_b)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    out = (w_a / total).unsqueeze(-1) * out_a + (w_b / total).unsqueeze(-1) * out_b
    return out, m + torch.log(total)


def _pairs(q_ids, k_ids, causal: bool):
    """(i, j, diagonal) for every (q chunk i, k chunk j) pair with something unmasked."""
    for i, cq in enumerate(q_ids):
        for j, ck in enumerate(k_ids):
            if not causal or ck < cq:
                yield i, j, False
            elif ck == cq:
                yield i, j, True  # the diagonal chunk: mask inside
            # ck > cq: every score masked, the block is skipped


# ----------------------------------------------------------------------------
# counting the work and the largest score block (the lesson measures both)


@dataclass
class Work:
    """What ring attention computed on this rank while :func:`count_work` was on."""

    blocks: int = 0  # chunk-pair blocks of scores formed in forward
    scores: int = 0  # score entries formed, per (batch, head)
    unmasked: int = 0  # of those, entries the causal mask keeps
    largest: int = 0  # entries of the largest score tensor, per (batch, head)
    backward_blocks: int = 0


_COUNTERS: list[Work] = []


@contextlib.contextmanager
def count_work() -> Iterator[Work]:
    """Count ring attention's block computations on this rank; yields a :class:`Work`."""
    work = Work()
    _COUNTERS.append(work)
    try:
        yield work
    finally:
        _COUNTERS.remove(work)


def _count(rows: int, cols: int, diagonal: bool, backward: bool = False) -> None:
    for w in _COUNTERS:
        if backward:
            w.backward_blocks += 1
            continue
        w.blocks += 1
        w.scores += rows * cols
        w.unmasked += rows * (rows + 1) // 2 if diagonal else rows * cols
        w.largest = max(w.largest, rows * cols)


# ----------------------------------------------------------------------------
# ring attention


def _ids(rank, n, layout, causal):
    # Without a mask, where a key sits does not matter: one block per rank, whatever the layout.
    return chunks_of(rank, n, layout) if causal else (0,)


def _exchange(send: torch.Tensor, recv: torch.Tensor, ring, tag: int) -> list:
    """Post: send to the right neighbour, receive from the left (returns the requests)."""
    return [
        dist.isend(send, ring.right, group=ring.group, tag=tag),
        dist.irecv(recv, ring.left, group=ring.group, tag=tag),
    ]


_OVERLAP = [True]


@contextlib.contextmanager
def transfers_after_compute() -> Iterator[None]:
    """Ring attention's forward posts each transfer *after* its block (no overlap): a baseline
    for the benchmark; the library's default posts it before."""
    _OVERLAP[0] = False
    try:
        yield
    finally:
        _OVERLAP[0] = True


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, layout):
        ring = ring_of(group)
        n, r = ring.size, ring.rank
        q_ids = _ids(r, n, layout, causal)
        q_parts = q.chunk(len(q_ids), dim=-2)
        partial = [None] * len(q_ids)  # (out, lse) of each q chunk so far
        kv = torch.stack([k, v])  # one message per step carries both
        for step in range(n):
            src = (r - step) % n  # whose block this rank holds now
            if step < n - 1 and _OVERLAP[0]:  # post the next transfer first, compute while it travels
                incoming = torch.empty_like(kv)
                requests = _exchange(kv, incoming, ring, _KV_TAG)
            k_ids = _ids(src, n, layout, causal)
            k_parts, v_parts = kv[0].chunk(len(k_ids), dim=-2), kv[1].chunk(len(k_ids), dim=-2)
            for i, j, diagonal in _pairs(q_ids, k_ids, causal):
                block = block_attention(q_parts[i], k_parts[j], v_parts[j], diagonal)
                _count(q_parts[i].shape[-2], k_parts[j].shape[-2], diagonal)
                partial[i] = block if partial[i] is None else merge_partials(*partial[i], *block)
            if step < n - 1 and not _OVERLAP[0]:  # the benchmark's baseline: transfer after compute
                incoming = torch.empty_like(kv)
                requests = _exchange(kv, incoming, ring, _KV_TAG)
            if step < n - 1:
                for request in requests:
                    request.wait()
                kv = incoming
        out = torch.cat([o for o, _ in partial], dim=-2)
        lse = torch.cat([s for _, s in partial], dim=-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.layout = group, causal, layout
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring = ring_of(ctx.group)
        n, r = ring.size, ring.rank
        scale = 1 / math.sqrt(q.shape[-1])
        dout = dout.contiguous()
        delta = (dout * out).sum(dim=-1)  # D_i = Σ_d dO·O, the softmax backward's row term
        q_ids = _ids(r, n, ctx.layout, ctx.causal)
        pieces = [t.chunk(len(q_ids), dim=-2) for t in (q, dout)]
        rows = [t.chunk(len(q_ids), dim=-1) for t in (lse, delta)]
        dq_parts = [torch.zeros_like(p) for p in pieces[0]]
        kv, sends = torch.stack([k, v]), []
        for step in range(n):
            src = (r - step) % n
            if step < n - 1:  # the next k/v block, posted before computing
                incoming = torch.empty_like(kv)
                requests = _exchange(kv, incoming, ring, _KV_TAG)
            if step > 0:  # dk/dv accumulated so far for the block held now, from the left
                arriving = torch.empty_like(kv)
                grad_request = dist.irecv(arriving, ring.left, group=ring.group, tag=_GRAD_TAG)
            k_ids = _ids(src, n, ctx.layout, ctx.causal)
            dkv = torch.zeros_like(kv)
            k_parts, v_parts = kv[0].chunk(len(k_ids), dim=-2), kv[1].chunk(len(k_ids), dim=-2)
            dk_parts, dv_parts = dkv[0].chunk(len(k_ids), dim=-2), dkv[1].chunk(len(k_ids), dim=-2)
            for i, j, diagonal in _pairs(q_ids, k_ids, ctx.causal):
                qi, doi, lse_i, delta_i = pieces[0][i], pieces[1][i], rows[0][i], rows[1][i]
                scores = qi @ k_parts[j].transpose(-2, -1) * scale
                if diagonal:
                    scores = scores.masked_fill(_above_diagonal(scores), float("-inf"))
                p = torch.exp(scores - lse_i.unsqueeze(-1))  # the final softmax, rebuilt
                dv_parts[j].add_(p.transpose(-2, -1) @ doi)
                ds = p * (doi @ v_parts[j].transpose(-2, -1) - delta_i.unsqueeze(-1))
                dq_parts[i].add_(ds @ k_parts[j] * scale)
                dk_parts[j].add_(ds.transpose(-2, -1) @ qi * scale)
                _count(0, 0, diagonal, backward=True)
            if step > 0:
                grad_request.wait()
                dkv += arriving
            if n > 1:  # pass the accumulator on: after N hops it is home
                sends.append((dist.isend(dkv, ring.right, group=ring.group, tag=_GRAD_TAG), dkv))
            if step < n - 1:
                for request in requests:
                    request.wait()
                kv = incoming
        if n > 1:
            dkv = torch.empty_like(kv)
            dist.irecv(dkv, ring.left, group=ring.group, tag=_GRAD_TAG).wait()
            for request, _ in sends:
                request.wait()
        return torch.cat(dq_parts, dim=-2), dkv[0], dkv[1], None, None, None


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (batch, heads, local_seq, d_head) tensor, got {shape}")
    if not q.shape == k.shape == v.shape:
        raise ValueError(
            f"q, k and v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    layout: str = "zigzag",
) -> torch.Tensor:
    """This rank's shard of attention over the whole sequence, from its shards of q, k, v.

    q, k, v: (batch, heads, local_seq, d_head), this rank's positions in ``layout``
    ("zigzag": chunks r and 2N−1−r of 2N; "contiguous": chunk r of N). Returns the
    output for the same positions, in the same layout. k/v blocks travel N−1 hops
    around the ring of ``group``; every transfer is posted before the current block is
    computed. Backward sends k/v round again, with dk/dv travelling beside them.
    """
    _check_layout(layout)
    _check_qkv(q, k, v)
    n = dist.get_world_size(group)
    _chunk_size(q.shape[-2] * n, n, layout)  # a zig-zag shard must hold two equal chunks
    return _RingAttention.apply(q, k, v, group, causal, layout)


# ----------------------------------------------------------------------------
# Ulysses: all-to-all from a sequence split to a head split and back


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """(b, a, s/N, d) sequence shard → (b, a/N, s, d): the whole sequence of my a/N heads."""
    n = dist.get_world_size(group)
    b, a, length, d = x.shape
    send = x.reshape(b, n, a // n, length, d).transpose(0, 1).contiguous()  # head group j → rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's positions of my heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, a // n, n * length, d)


def heads_to_seq(y: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """(b, a/N, s, d) head shard → (b, a, s/N, d): every head, my contiguous positions."""
    n = dist.get_world_size(group)
    b, h, s, d = y.shape
    send = y.reshape(b, h, n, s // n, d).permute(2, 0, 1, 3, 4).contiguous()  # positions j → rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: my positions of rank j's heads
    return recv.transpose(0, 1).reshape(b, n * h, s // n, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return heads_to_seq(grad.contiguous(), ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        return heads_to_seq(y, group)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_heads(grad.contiguous(), ctx.group), None


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """DeepSpeed-Ulysses: this rank's (contiguous) shard of attention over the whole sequence.

    Three all-to-alls turn the sequence-sharded q, k, v into head-sharded ones (every
    position of a/N heads), attention runs locally, and a fourth all-to-all turns the
    output back; backward runs the four in reverse. Needs heads % N == 0.
    """
    _check_qkv(q, k, v)
    n = dist.get_world_size(group)
    heads = q.shape[1]
    if heads % n:
        raise ValueError(
            f"Ulysses splits the {heads} heads over N={n} ranks, but heads % N = {heads % n}: "
            f"use N dividing the number of heads (or ring attention, which has no such limit)"
        )
    q, k, v = (_SeqToHeads.apply(t, group) for t in (q, k, v))
    return _HeadsToSeq.apply(attention(q, k, v, causal), group)


# ----------------------------------------------------------------------------
# a context-parallel transformer block (optionally tensor-parallel as well)


class ContextParallelBlock(nn.Module):
    """A pre-norm transformer block whose input and output are this rank's sequence shard.

    LayerNorms, projections and the MLP work token by token on s/N positions; attention
    is ring attention (``method="ring"``, either layout) or Ulysses (contiguous only)
    over ``cp_group``. With ``tp_group`` the heads and the MLP are also split Megatron-
    style (chapter 04). Each rank's parameter gradients cover its own tokens only:
    :meth:`sync_grads` sums them over ``cp_group``.
    """

    def __init__(self, block, cp_group=None, tp_group=None, layout="zigzag", method="ring", causal=True):
        super().__init__()
        _check_layout(layout)
        if method not in ("ring", "ulysses"):
            raise ValueError(f"method must be 'ring' or 'ulysses', got {method!r}")
        if method == "ulysses" and layout != "contiguous":
            raise ValueError("Ulysses works on the contiguous layout: pass layout='contiguous'")
        from course_lib import tensor_parallel as tp

        self.cp_group, self.tp_group = cp_group, tp_group
        self.layout, self.method, self.causal = layout, method, causal
        self.ln1, self.ln2 = copy.deepcopy(block.ln1), copy.deepcopy(block.ln2)
        attn = block.attn
        if tp_group is None:
            self.qkv, self.proj = copy.deepcopy(attn.qkv), copy.deepcopy(attn.proj)
            self.mlp = copy.deepcopy(block.mlp)
            self.n_heads = attn.n_heads
        else:
            tp_attn = tp.TensorParallelAttention.from_dense(attn, tp_group)
            self.qkv, self.proj, self.n_heads = tp_attn.qkv, tp_attn.proj, tp_attn.n_heads
            self.mlp = tp.TensorParallelMLP.from_dense(block.mlp, tp_group)
        self.d_head = attn.d_head

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, self.d_head)).unbind(dim=-3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, local_seq, d_head)
        if self.method == "ring":
            out = ring_attention(q, k, v, self.cp_group, self.causal, self.layout)
        else:
            out = ulysses_attention(q, k, v, self.cp_group, self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, length, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, local_seq, d_model), this rank's positions
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def sync_grads(self) -> None:
        """Sum every parameter's gradient over the cp group (one all-reduce per step)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and dist.get_world_size(self.cp_group) > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.cp_group)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))


def train_context_parallel(
    dp: int, tp: int, cp: int, steps: int = 2, layout: str = "zigzag", method: str = "ring", seed: int = 0
) -> dict[str, Any]:
    """Inside each of dp·tp·cp ranks: train a causal block on a (dp, tp, cp) grid and the same
    block in one process on the whole batch; returns the losses and the largest parameter
    difference (each rank compares its own part with the same part of the dense block)."""
    from course_lib.mesh import RankGrid
    from course_lib.models import make_block

    grid = RankGrid(dp=dp, tp=tp, cp=cp)
    d_model, heads, batch, seq = 16, 4, 2, 8 * cp
    dense = make_block(d_model, heads, seed=seed, causal=True)
    ours = ContextParallelBlock(dense, grid.cp_group, grid.tp_group if tp > 1 else None, layout, method)
    g = torch.Generator().manual_seed(seed + 1)
    data = [
        (
            torch.randn(dp * batch, seq, d_model, generator=g),
            torch.randn(dp * batch, seq, d_model, generator=g),
        )
    ]
    data = data * steps
    lr, count = 0.1, dp * batch * seq * d_model
    losses, dense_losses = [], []
    for x, y in data:
        # one process: the whole batch and sequence, mean squared error
        loss = F.mse_loss(dense(x), y)
        dense.zero_grad()
        loss.backward()
        dense_losses.append(loss.item())
        with torch.no_grad():
            for p in dense.parameters():
                p -= lr * p.grad
        # this rank: its dp slice of the batch, its cp shard of the sequence
        rows = slice(grid.dp_rank * batch, (grid.dp_rank + 1) * batch)
        x_mine = shard_sequence(x[rows], grid.cp_rank, cp, 1, layout)
        y_mine = shard_sequence(y[rows], grid.cp_rank, cp, 1, layout)
        local = ((ours(x_mine) - y_mine) ** 2).sum() / count  # my share of the global mean
        ours.zero_grad()
        local.backward()
        ours.sync_grads()
        total = local.detach().clone()
        for group in (grid.cp_group, grid.dp_group):
            dist.all_reduce(total, group=group)
        _all_reduce_grads(ours, grid.dp_group)
        losses.append(total.item())
        with torch.no_grad():
            for p in ours.parameters():
                p -= lr * p.grad
    expected = ContextParallelBlock(dense, grid.cp_group, grid.tp_group if tp > 1 else None, layout, method)
    mine, theirs = dict(ours.named_parameters()), dict(expected.named_parameters())
    diff = max((mine[k] - theirs[k]).abs().max().item() for k in mine)
    return {"losses": losses, "dense_losses": dense_losses, "max_param_diff": diff, "rank": grid.rank}


def _all_reduce_grads(model, group) -> None:
    if dist.get_world_size(group) == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
