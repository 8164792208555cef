"""Chapters 04 and 05: tensor parallelism (Megatron's 1D split) and sequence parallelism.

    mlp_tp = TensorParallelMLP.from_dense(mlp)             # inside each of N ranks
    attn_tp = TensorParallelAttention.from_dense(attn)
    block_sp = SequenceParallelBlock.from_dense(block)     # takes this rank's sequence shard

Every rank of the tensor-parallel group (N ranks, Megatron's t) keeps a contiguous
block of each weight. ``nn.Linear`` stores its weight as (out, in), so Megatron's
"split A = fc1.weight.T by columns" is "split fc1.weight by rows" here.

All communication lives in these autograd functions; each one's backward is the
transpose of its forward (f and g are each other's mirror image, and so are the
all-gather and the reduce-scatter):

    f  copy_to_tp_region                  forward: identity     backward: all-reduce
    g  reduce_from_tp_region              forward: all-reduce   backward: identity
       gather_from_sequence_region        forward: all-gather   backward: reduce-scatter
       reduce_scatter_to_sequence_region  forward: reduce-scatter  backward: all-gather
       scatter_to_sequence_region         forward: keep my shard   backward: all-gather

Activations are (batch, seq, d_model); the sequence dimension is ``SEQ_DIM``.

To look inside: ``who_holds_what`` says which rank keeps each weight element
(chapter 04's picture), ``saved_activation_bytes`` what autograd saves for
backward, by module (chapter 05's memory measurements).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course_lib.dp import flatten, unflatten_into
from course_lib.models import attention

if TYPE_CHECKING:
    from course_lib.models import MLP, SelfAttention, TransformerBlock

SEQ_DIM = 1


def block_of(size: int, world_size: int, rank: int, what: str = "size") -> slice:
    """Rank ``rank``'s contiguous block of ``range(size)``; ValueError if it does not split evenly."""
    if size % world_size:
        raise ValueError(
            f"{what}={size} does not split evenly over N={world_size} ranks "
            f"({size} % {world_size} = {size % world_size})"
        )
    step = size // world_size
    return slice(rank * step, (rank + 1) * step)


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, in rank order."""
    n = dist.get_world_size(group)
    if n == 1:
        return x
    rows = x.movedim(dim, 0).contiguous()  # all_gather_single stacks along dim 0
    out = rows.new_empty((n * rows.shape[0], *rows.shape[1:]))
    dist.all_gather_single(out, rows, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum ``x`` over the ranks and keep this rank's block along ``dim``.

    Built as an all-to-all plus a local sum: rank j receives every rank's block j.
    Each rank sends (N-1)/N of ``x``, like a ring reduce-scatter. (gloo's own
    reduce_scatter is an all-reduce in disguise on the CPU: measured, it sends
    2(N-1)/N, which would hide chapter 05's point.)
    """
    n = dist.get_world_size(group)
    if n == 1:
        return x
    block_of(x.shape[dim], n, 0, "sequence length")
    rows = x.movedim(dim, 0).contiguous()
    received = torch.empty_like(rows)
    dist.all_to_all_single(received, rows, group=group)
    mine = received.view(n, rows.shape[0] // n, *rows.shape[1:]).sum(0)
    return mine.movedim(0, dim)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    # A copy (never change a tensor autograd handed us), and a contiguous one: gloo sums a
    # transposed (non-contiguous) tensor's storage in the wrong order, without an error.
    x = x.clone(memory_format=torch.contiguous_format)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


# ----------------------------------------------------------------------------
# f and g (chapter 04) and their sequence-parallel relatives (chapter 05)


class _CopyToTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        return x[(slice(None),) * dim + (block_of(x.shape[dim], n, rank, "sequence length"),)].clone()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


def copy_to_tp_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """f: identity forward; all-reduce of the gradient backward."""
    return _CopyToTPRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """g: all-reduce forward (sum of the ranks' partial results); identity backward."""
    return _ReduceFromTPRegion.apply(x, group)


def gather_from_sequence_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = SEQ_DIM
) -> torch.Tensor:
    """All-gather the sequence shards forward; reduce-scatter the gradient backward."""
    return _GatherFromSequence.apply(x, group, dim)


def reduce_scatter_to_sequence_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = SEQ_DIM
) -> torch.Tensor:
    """Sum partial results and keep my sequence shard forward; all-gather the gradient backward."""
    return _ReduceScatterToSequence.apply(x, group, dim)


def scatter_to_sequence_region(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = SEQ_DIM
) -> torch.Tensor:
    """Keep my sequence shard of a replicated tensor forward; all-gather the gradient backward."""
    return _ScatterToSequence.apply(x, group, dim)


class _GatherThenLinear(torch.autograd.Function):
    """``linear(all_gather(x_shard))`` that keeps only the shard for backward.

    Megatron's memory trick for sequence parallelism: instead of saving the
    gathered input (full sequence) for the weight gradient, gather it again in
    backward. Saves (N-1)/N of that activation; costs one more all-gather.
    """

    @staticmethod
    def forward(ctx, x_shard, weight, bias, group, dim):
        ctx.save_for_backward(x_shard, weight)
        ctx.group, ctx.dim, ctx.has_bias = group, dim, bias is not None
        return F.linear(_all_gather(x_shard, dim, group), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x_shard, weight = ctx.saved_tensors
        x = _all_gather(x_shard, ctx.dim, ctx.group)  # the extra all-gather
        grad_x = _reduce_scatter(grad @ weight, ctx.dim, ctx.group)
        grad_weight = grad.flatten(0, -2).T @ x.flatten(0, -2)
        grad_bias = grad.flatten(0, -2).sum(0) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None, None


# ----------------------------------------------------------------------------
# parallel linear layers


class ColumnParallelLinear(nn.Module):
    """Rank r computes its block of the output features: ``x @ W_r.T + b_r``.

    The input is replicated, so its gradient is a sum over ranks: f. With
    ``sequence_parallel`` the input arrives as a sequence shard and is
    all-gathered instead (the all-gather's backward does the sum).
    """

    def __init__(self, weight, bias, group=None, sequence_parallel=False, recompute_gather=False):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group, self.sequence_parallel = group, sequence_parallel
        self.recompute_gather = recompute_gather

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, group: dist.ProcessGroup | None = None, parts: int = 1, **options
    ) -> ColumnParallelLinear:
        """Keep rank r's block of rows of ``linear.weight`` (and of its bias).

        ``parts > 1``: the output features are ``parts`` stacked matrices (a fused
        [q; k; v]); rank r keeps its block of *each*, so it holds whole heads.
        """
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        rows = block_of(linear.out_features // parts, n, rank, "output features per part")

        def mine(t):
            return None if t is None else torch.cat([p[rows] for p in t.detach().chunk(parts)]).clone()

        return cls(mine(linear.weight), mine(linear.bias), group, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and self.recompute_gather:
            return _GatherThenLinear.apply(x, self.weight, self.bias, self.group, SEQ_DIM)
        if self.sequence_parallel:
            x = gather_from_sequence_region(x, self.group)
        else:
            x = copy_to_tp_region(x, self.group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Rank r multiplies its block of input features by its block of columns of W.

    The partial products are summed by g (all-reduce), or, with
    ``sequence_parallel``, reduce-scattered along the sequence. The bias is added
    once, after the sum: added before it, it would be counted N times.
    """

    def __init__(self, weight, bias, group=None, sequence_parallel=False):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group, self.sequence_parallel = group, sequence_parallel

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, group: dist.ProcessGroup | None = None, sequence_parallel: bool = False
    ) -> RowParallelLinear:
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        cols = block_of(linear.in_features, n, rank, "input features")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.weight.detach()[:, cols].clone(), bias, group, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_region(partial, self.group)
        else:
            out = reduce_from_tp_region(partial, self.group)
        return out if self.bias is None else out + self.bias


# ----------------------------------------------------------------------------
# the transformer's two halves, and the sequence-parallel block


class TensorParallelMLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` with fc1 column- and fc2 row-parallel: one all-reduce each way."""

    def __init__(self, fc1: ColumnParallelLinear, fc2: RowParallelLinear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    @classmethod
    def from_dense(
        cls,
        mlp: MLP,
        group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        recompute_gather: bool = False,
    ) -> TensorParallelMLP:
        n, hidden = dist.get_world_size(group), mlp.fc1.out_features
        if hidden % n:
            raise ValueError(
                f"the MLP's hidden size H={hidden} does not split over N={n} ranks "
                f"(H % N = {hidden % n}); choose N dividing H"
            )
        return cls(
            ColumnParallelLinear.from_dense(
                mlp.fc1, group, sequence_parallel=sequence_parallel, recompute_gather=recompute_gather
            ),
            RowParallelLinear.from_dense(mlp.fc2, group, sequence_parallel),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GELU acts element by element on this rank's own columns: no sync needed.
        return self.fc2(F.gelu(self.fc1(x)))


class TensorParallelAttention(nn.Module):
    """Self-attention with the heads split across ranks: each rank runs n_heads/N whole heads."""

    def __init__(
        self,
        qkv: ColumnParallelLinear,
        proj: RowParallelLinear,
        n_heads: int,
        d_head: int,
        causal: bool = False,
    ):
        super().__init__()
        self.qkv, self.proj = qkv, proj
        self.n_heads, self.d_head = n_heads, d_head  # this rank's heads
        self.causal = causal  # the dense attention's mask (a decoder's: position i sees j <= i)

    @classmethod
    def from_dense(
        cls,
        attn: SelfAttention,
        group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        recompute_gather: bool = False,
    ) -> TensorParallelAttention:
        n = dist.get_world_size(group)
        if attn.n_heads % n:
            raise ValueError(
                f"n_heads={attn.n_heads} does not split over N={n} ranks "
                f"(n_heads % N = {attn.n_heads % n}); choose N dividing n_heads"
            )
        qkv = ColumnParallelLinear.from_dense(
            attn.qkv, group, parts=3, sequence_parallel=sequence_parallel, recompute_gather=recompute_gather
        )
        proj = RowParallelLinear.from_dense(attn.proj, group, sequence_parallel)
        return cls(qkv, proj, attn.n_heads // n, attn.d_head, getattr(attn, "causal", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, self.d_head)).unbind(dim=-3)
        b, s = q.shape[:2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, my heads, seq, d_head)
        if self.causal:
            out = attention(q, k, v, causal=True)  # the whole sequence is here: the usual mask
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
            out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, s, -1))


class TensorParallelBlock(nn.Module):
    """A pre-norm transformer block: tensor-parallel attention and MLP, replicated LayerNorms."""

    def __init__(self, ln1, attn, ln2, mlp, group=None):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp, self.group = ln1, attn, ln2, mlp, group

    @classmethod
    def from_dense(
        cls, block: TransformerBlock, group: dist.ProcessGroup | None = None, **options
    ) -> TensorParallelBlock:
        # LayerNorm acts on each token alone and is tiny: every rank keeps all of it.
        return cls(
            copy.deepcopy(block.ln1),
            TensorParallelAttention.from_dense(block.attn, group, **options),
            copy.deepcopy(block.ln2),
            TensorParallelMLP.from_dense(block.mlp, group, **options),
            group,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class SequenceParallelBlock(TensorParallelBlock):
    """The same block, but its input and output are this rank's sequence shard.

    LayerNorms and residual adds run on s/N tokens; attention and MLP run
    tensor-parallel on the whole sequence between an all-gather (before the
    column-parallel layer) and a reduce-scatter (after the row-parallel one).
    """

    @classmethod
    def from_dense(
        cls, block: TransformerBlock, group: dist.ProcessGroup | None = None, recompute_gather: bool = False
    ) -> SequenceParallelBlock:
        """``recompute_gather``: keep only the shard of each gathered input, gather it again in backward."""
        return super().from_dense(block, group, sequence_parallel=True, recompute_gather=recompute_gather)

    def replicated_parameters(self) -> list:
        """Parameters every rank holds whole but trains on its own tokens only."""
        return [*self.ln1.parameters(), *self.ln2.parameters(), self.attn.proj.bias, self.mlp.fc2.bias]

    def sync_replicated_grads(self) -> None:
        """Sum the replicated parameters' gradients over the group: one all-reduce per step."""
        params = [p for p in self.replicated_parameters() if p is not None and p.grad is not None]
        if not params or dist.get_world_size(self.group) == 1:
            return
        grads = [p.grad for p in params]
        flat = flatten(grads)
        dist.all_reduce(flat, group=self.group)
        unflatten_into(flat, grads)


# ----------------------------------------------------------------------------
# looking inside (chapters 04 and 05): who holds which weight, what autograd saves


def _holdings_rank(d_model, d_hidden, n_heads):
    from course_lib.models import make_block

    block = make_block(d_model, n_heads, d_hidden)
    with torch.no_grad():  # every weight element holds its own index
        for p in block.parameters():
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).view_as(p))
    mlp = TensorParallelMLP.from_dense(block.mlp)
    attn = TensorParallelAttention.from_dense(block.attn)
    return {
        **{f"mlp.{k}": p.detach() for k, p in mlp.named_parameters()},
        **{f"attn.{k}": p.detach() for k, p in attn.named_parameters()},
    }


def who_holds_what(
    world_size: int = 4, d_model: int = 8, d_hidden: int = 32, n_heads: int = 4, **run_kwargs
) -> dict:
    """Which rank holds each element of an MLP's and an attention's weights after ``from_dense``.

    Fills every dense weight with its own element numbers, shards it with
    :meth:`TensorParallelMLP.from_dense` and :meth:`TensorParallelAttention.from_dense`
    on ``world_size`` ranks, and reads back the numbers each rank kept. Returns
    name -> a tensor of the dense weight's shape (a bias as one column) holding
    the rank that owns each element, or −1 where every rank holds it.
    """
    from course_lib.launch import run
    from course_lib.models import make_block

    held = run(_holdings_rank, world_size, d_model, d_hidden, n_heads, backend="gloo", **run_kwargs)
    dense = dict(make_block(d_model, n_heads, d_hidden).named_parameters())
    owners = {}
    for name in held[0]:
        shape = dense[name].shape
        count, owner = torch.zeros(shape.numel()), torch.zeros(shape.numel())
        for rank, h in enumerate(held):
            count[h[name].long().view(-1)] += 1
            owner[h[name].long().view(-1)] = rank
        owner[count > 1] = -1
        owners[name] = owner.view(shape if len(shape) == 2 else (shape[0], 1))
    return owners


def saved_activation_bytes(model: nn.Module, *inputs) -> dict:
    """Bytes of activations autograd saves for backward while ``model(*inputs)`` runs, by module name.

    ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor as it is saved;
    each distinct storage is counted once (a view of a saved tensor costs nothing
    more), parameters are left out, and the bytes are charged to the innermost
    module that was running ("(outside)" for the model's own code).
    """
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    running, seen, saved = ["(outside)"], set(), {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved[running[-1]] = saved.get(running[-1], 0) + storage.nbytes()
        return t

    hooks = []
    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: running.append(name)))
            hooks.append(module.register_forward_hook(lambda m, a, out: running.pop() and None))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return saved
