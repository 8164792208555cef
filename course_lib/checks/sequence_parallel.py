"""Checks for chapter 05: sequence parallelism.

Activations are (batch, seq, d_model) = (2, 4, 8); rank r's sequence shard is
its contiguous block of the 4 positions. Each check runs the learner's code on
N = 1, 2 and 4 ranks and compares the forward output and the gradients with
one process working on the whole sequence (rtol = atol = 1e-5). Upstream
gradients differ from rank to rank, so a missing sum in backward shows.
``course_lib.tp`` is switched off inside the ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from course_lib.checks import Mismatch, exercise, learner_in_rank
from course_lib.checks.tensor_parallel import (
    BATCH,
    D_HIDDEN,
    D_MODEL,
    SEED,
    SEQ,
    WORLD_SIZES,
    backprop,
    block,
    building_on,
    check_close,
    check_output,
    course_tp_switched_off,
    grad_of,
    only_block,
    rank_data,
    run_ranks,
)
from course_lib.models import make_mlp

if TYPE_CHECKING:
    from collections.abc import Callable

SHAPE = (BATCH, SEQ, D_MODEL)


def _norm_and_mlp():
    """A LayerNorm with non-trivial scale and shift (so forgetting them shows) and the MLP."""
    g = torch.Generator().manual_seed(SEED)
    norm = nn.LayerNorm(D_MODEL)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(D_MODEL, generator=g))
        norm.bias.copy_(0.2 * torch.randn(D_MODEL, generator=g))
    return norm, make_mlp(D_MODEL, D_HIDDEN, SEED)


def _shard(t: torch.Tensor, n: int, rank: int) -> torch.Tensor:
    return t[:, block(SEQ, n, rank)]


# ----------------------------------------------------------------------------
# inside the ranks


def _shard_rank(payload, x, upstream):
    learner = learner_in_rank(payload)
    x = x.clone().requires_grad_()
    rank, n = dist.get_rank(), dist.get_world_size()
    with course_tp_switched_off("5.1", learner):
        result = backprop(learner(x), _shard(upstream, n, rank))
    return result | {"x.grad": grad_of(x)}


def _gather_rank(payload, shards, upstreams):
    learner = learner_in_rank(payload)
    rank = dist.get_rank()
    x = shards[rank].clone().requires_grad_()
    with course_tp_switched_off("5.2", learner):
        result = backprop(learner.apply(x), upstreams[rank])
    return result | {"x": x.detach().clone(), "x.grad": grad_of(x)}


def _reduce_scatter_rank(payload, xs, upstreams):
    learner = learner_in_rank(payload)
    rank = dist.get_rank()
    x = xs[rank].clone().requires_grad_()
    with course_tp_switched_off("5.3", learner):
        result = backprop(learner.apply(x), upstreams[rank])
    return result | {"x": x.detach().clone(), "x.grad": grad_of(x)}


def _sublayer_rank(payload, x, upstream):
    learner = learner_in_rank(payload)
    rank, n = dist.get_rank(), dist.get_world_size()
    norm, mlp = _norm_and_mlp()
    x_shard = _shard(x, n, rank).clone().requires_grad_()
    with course_tp_switched_off("5.4", learner):
        result = backprop(learner(x_shard, norm, mlp), _shard(upstream, n, rank))
    grads = {f"norm.{k}": grad_of(p) for k, p in norm.named_parameters()}
    grads |= {f"mlp.{k}": grad_of(p) for k, p in mlp.named_parameters()}
    return result | {"x_shard.grad": grad_of(x_shard)} | grads


# ----------------------------------------------------------------------------
# the checks


@exercise("5.1", "my shard of the sequence")
def sequence_shard(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(x) -> x[:, block r]`` along the sequence dimension (dim 1)."""
    x, upstream = rank_data(1, SHAPE, 51)[0], rank_data(1, SHAPE, 52)[0]
    for n in WORLD_SIZES:
        got = run_ranks(n, _shard_rank, learner_fn, x, upstream)
        for r, res in enumerate(got):
            mine = block(SEQ, n, r)
            hints = (
                [(x.chunk(n, 0)[r], "that is a split along the batch (dim 0): split dim 1, the sequence")]
                if BATCH % n == 0
                else []
            )
            hints.append(
                (
                    x[..., block(D_MODEL, n, r)],
                    "that is a split of the features (last dim): split dim 1, the sequence",
                )
            )
            check_output(n, r, res, x[:, mine], hints=hints)
            check_close(n, r, res["x.grad"], only_block(upstream, 1, mine), "x.grad")


@exercise("5.2", "all-gather forward, reduce-scatter backward")
def gather_from_sequence_region(learner_cls: type) -> None:
    """Check ``G.apply(x_shard)``: every rank gets the whole sequence; backward sums and keeps my block."""
    for n in WORLD_SIZES:
        shards = rank_data(n, (BATCH, SEQ // n, D_MODEL), 53)
        upstreams = rank_data(n, SHAPE, 54)
        whole, total = torch.cat(shards, dim=1), torch.stack(upstreams).sum(0)
        got = run_ranks(n, _gather_rank, learner_cls, shards, upstreams)
        for r, res in enumerate(got):
            hints = (
                [
                    (
                        torch.cat(shards, dim=0),
                        "that is the shards stacked along the batch (dim 0): "
                        "concatenate along the sequence, dim 1",
                    )
                ]
                if n > 1
                else []
            )
            check_output(n, r, res, whole, hints=hints)
            check_close(n, r, res["x"], shards[r], "x")
            check_close(
                n,
                r,
                res["x.grad"],
                _shard(total, n, r),
                "x.grad",
                hints=[
                    (
                        _shard(upstreams[r], n, r),
                        "this is only this rank's own gradient: backward must sum "
                        "over the ranks (reduce-scatter), then keep my block",
                    )
                ],
            )


@exercise("5.3", "reduce-scatter forward, all-gather backward")
def reduce_scatter_to_sequence_region(learner_cls: type) -> None:
    """Check ``R.apply(x)``: the sum over ranks, my block of the sequence; backward all-gathers."""
    for n in WORLD_SIZES:
        xs = rank_data(n, SHAPE, 55)
        upstreams = rank_data(n, (BATCH, SEQ // n, D_MODEL), 56)
        total, whole = torch.stack(xs).sum(0), torch.cat(upstreams, dim=1)
        got = run_ranks(n, _reduce_scatter_rank, learner_cls, xs, upstreams)
        for r, res in enumerate(got):
            check_output(
                n,
                r,
                res,
                _shard(total, n, r),
                hints=[(_shard(xs[r], n, r), "this is my block of my own input: sum over the ranks first")],
            )
            check_close(
                n,
                r,
                res["x"],
                xs[r],
                "x",
                hints=[(total, "your forward summed its input in place: reduce into a new tensor")],
            )
            check_close(
                n,
                r,
                res["x.grad"],
                whole,
                "x.grad",
                hints=[
                    (
                        only_block(whole, 1, block(SEQ, n, r)),
                        "only my block of the gradient is filled: "
                        "backward must all-gather every rank's block",
                    )
                ],
            )


@exercise("5.4", "sequence-parallel LayerNorm + MLP sublayer", builds_on=("5.2", "5.3"))
def sequence_parallel_mlp(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(x_shard, norm, mlp) -> x_shard + mlp(norm(x))`` on my shard, and all gradients."""
    with building_on("5.2 and 5.3"):
        _check_sublayer(learner_fn)


def _check_sublayer(learner_fn: Callable[..., Any]) -> None:
    x, upstream = rank_data(1, SHAPE, 57)[0], rank_data(1, SHAPE, 58)[0]
    norm, mlp = _norm_and_mlp()
    dense_x = x.clone().requires_grad_()
    out = dense_x + mlp(norm(dense_x))
    (out * upstream).sum().backward()
    grads = {f"norm.{k}": p.grad for k, p in norm.named_parameters()}
    grads |= {f"mlp.{k}": p.grad for k, p in mlp.named_parameters()}
    sharded = {"mlp.fc1.weight": 0, "mlp.fc1.bias": 0, "mlp.fc2.weight": 1}  # name -> dim of the block
    for n in WORLD_SIZES:
        got = run_ranks(n, _sublayer_rank, learner_fn, x, upstream)
        for r, res in enumerate(got):
            mine = block(SEQ, n, r)
            check_output(
                n,
                r,
                res,
                out.detach()[:, mine],
                hints=[(mlp(norm(x)).detach()[:, mine], "the residual is missing: return x_shard + ...")],
            )
            check_close(n, r, res["x_shard.grad"], dense_x.grad[:, mine], "x_shard.grad")
            for name, dim in sharded.items():
                expected = only_block(grads[name], dim, block(D_HIDDEN, n, r))
                check_close(n, r, res[name], expected, f"{name}.grad")
        # Each rank saw only its tokens: its gradient of a replicated parameter is a part of the sum.
        for name in ("norm.weight", "norm.bias", "mlp.fc2.bias"):
            parts = [res[name] for res in got]
            if any(p is None for p in parts):
                raise Mismatch(f"N={n}: {name}.grad is None on some rank: no gradient reached it")
            try:
                check_close(n, None, torch.stack(parts).sum(0), grads[name], f"{name}.grad summed over ranks")
            except Mismatch as exc:
                raise Mismatch(f"{exc} (each rank's part covers only its own tokens)") from None
