"""Checks for chapter 07: ZeRO's pieces, one at a time.

7.1 and 7.2 are plain functions, checked in the notebook's own process on many
sizes. 7.3 and 7.4 run on N = 1, 2, 3 and 4 ranks with a small seeded MLP of
82 parameters (not a multiple of 3 or 4, so padding matters); every rank
trains on its shard of each batch, and what it ends with is compared with one
process on the whole batch, to rtol = atol = 1e-5. The reference optimizer is
``course_lib.zero.adamw_`` (the tests check it against ``torch.optim.AdamW``).

Adam hardly notices a gradient N times too large (m/√v does not change with
the gradient's scale), so the checks use a large eps, where it does.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from course_lib import zero
from course_lib.checks import Mismatch, builtins_switched_off, compare, exercise, learner_in_rank, run_learner
from course_lib.models import make_mlp, regression_data, shard

if TYPE_CHECKING:
    from collections.abc import Callable

WORLD_SIZES = (1, 2, 3, 4)
#: Seconds one launch may take; a learner's deadlock is reported after about this long.
TIMEOUT = 20.0
D_MODEL, D_HIDDEN, SEED = 5, 7, 3  # 82 parameters
BATCH, STEPS, MICRO_BATCHES = 24, 3, 2  # 24 splits into 2 micro-batches × N = 1 … 4 ranks
#: Non-default values, so that a hard-coded default is caught; eps large, see above.
HYPER = dict(lr=0.01, betas=(0.8, 0.9), eps=0.01, weight_decay=0.1)
ALL_REDUCE_OFF = ("all_reduce", "all_reduce_coalesced")


def _with_hint(where: str, hint: str, exc: Mismatch) -> str:
    """One line: where, what the numbers suggest (when they do), then the first differing element."""
    return f"{where}: {hint} — {exc}" if hint else f"{where}: {exc}"


# ----------------------------------------------------------------------------
# 7.1 and 7.2: in the notebook's process


def _padded_shard(flat: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    size = zero.padded_size(flat.numel(), n) // n
    padded = torch.zeros(size * n, dtype=flat.dtype)
    padded[: flat.numel()] = flat
    return padded[rank * size : (rank + 1) * size]


@exercise(
    "7.1",
    "a rank's shard of a flat buffer, zero-padded",
    refuses=(
        "course_lib.zero:padded_size",
        "course_lib.models:shard",
    ),
)
def shard_of(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(flat, rank, world_size)`` for K = 1 … 13 elements and N = 1 … 5."""
    for k in (1, 4, 7, 12, 13):
        for n in (1, 2, 3, 4, 5):
            for rank in range(n):
                flat = torch.arange(1.0, k + 1)
                got = learner_fn(flat, rank, n)
                where = f"K={k}, N={n}, rank {rank}"
                if not torch.equal(flat, torch.arange(1.0, k + 1)):
                    raise Mismatch(f"{where}: your function changed `flat`; return a new tensor instead")
                expected = _padded_shard(flat, rank, n)
                if isinstance(got, torch.Tensor) and got.shape != expected.shape:
                    padded = expected.numel() * n
                    raise Mismatch(
                        f"{where}: expected a shard of shape ({expected.numel()},) "
                        f"(K={k} padded with zeros to {padded}, cut into {n} equal shards), "
                        f"got shape {tuple(got.shape)}"
                    )
                try:
                    compare(got, expected, "shard", exact=True)
                except Mismatch as exc:
                    raise Mismatch(f"{where}: {exc}") from None


@exercise("7.2", "AdamW on one shard", refuses=("course_lib.zero:adamw_",))
def adamw_step_(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)``."""
    g = torch.Generator().manual_seed(7)
    hyper = dict(HYPER, eps=1e-8)  # the usual eps: here only the formula is checked
    mine = [torch.randn(10, generator=g), torch.zeros(10), torch.zeros(10)]
    ref = [t.clone() for t in mine]
    for step in range(1, 5):
        grad = torch.randn(10, generator=g) * 0.1
        before = [t.clone() for t in mine]
        returned = learner_fn(mine[0], grad.clone(), mine[1], mine[2], step, **hyper)
        zero.adamw_(ref[0], grad, ref[1], ref[2], step, **hyper)
        for name, got, want, old in zip(("param", "exp_avg", "exp_avg_sq"), mine, ref, before):
            try:
                compare(got, want, name)
            except Mismatch as exc:
                hint = _adam_hint(name, got, old, grad, before, step, hyper, returned)
                raise Mismatch(_with_hint(f"step {step}", hint, exc)) from None


def _adam_hint(name, got, old, grad, before, step, hyper, returned) -> str:
    if torch.equal(got, old):
        hint = f"{name} did not change: update it in place"
        if isinstance(returned, torch.Tensor):
            hint += " (your function returned a new tensor)"
        return hint
    variants = {
        "Adam without the bias corrections 1 − β^step": dict(bias_correction=False),
        "weight decay added to the gradient (Adam + L2 penalty); AdamW shrinks the parameter "
        "itself: param · (1 − lr·weight_decay)": dict(l2=True),
    }
    for what, kwargs in variants.items():
        p, m, v = (t.clone() for t in before)
        _adam_variant(p, grad, m, v, step, **hyper, **kwargs)
        if torch.allclose(got, dict(param=p, exp_avg=m, exp_avg_sq=v)[name], rtol=1e-5, atol=1e-6):
            return f"looks like {what}"
    return ""


def _adam_variant(p, grad, m, v, step, lr, betas, eps, weight_decay, bias_correction=True, l2=False):
    b1, b2 = betas
    if l2:
        grad = grad + weight_decay * p
    else:
        p.mul_(1 - lr * weight_decay)
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    c1, c2 = (1 - b1**step, 1 - b2**step) if bias_correction else (1.0, 1.0)
    p.sub_(lr * (m / c1) / ((v / c2).sqrt() + eps))


# ----------------------------------------------------------------------------
# 7.3 and 7.4: inside the ranks


def _batch(step: int):
    """Global batch ``step``: the same on every rank and in the reference."""
    x, y = regression_data(STEPS * BATCH, D_MODEL, SEED)
    return x[step * BATCH : (step + 1) * BATCH], y[step * BATCH : (step + 1) * BATCH]


def _local_gradient(model, step: int, micro: int | None = None) -> None:
    """Backward of the mean loss on this rank's shard of global batch ``step`` (or of one micro-batch)."""
    x, y = _batch(step)
    if micro is not None:
        x, y = shard(x, micro, MICRO_BATCHES), shard(y, micro, MICRO_BATCHES)
    rank, n = dist.get_rank(), dist.get_world_size()
    F.mse_loss(model(shard(x, rank, n)), shard(y, rank, n)).backward()


def _zero1_rank(payload):
    learner = learner_in_rank(payload)
    n = dist.get_world_size()
    model = make_mlp(D_MODEL, D_HIDDEN, SEED)
    k = sum(p.numel() for p in model.parameters())
    size = zero.padded_size(k, n) // n
    flat = torch.zeros(size * n)
    flat[:k] = parameters_to_vector(model.parameters()).detach()
    exp_avg, exp_avg_sq = torch.zeros(size), torch.zeros(size)
    history = []
    with builtins_switched_off(
        learner,
        ALL_REDUCE_OFF,
        "exercise 7.3 reduce-scatters the gradient: with an all-reduce every rank would receive all of it",
    ):
        for step in range(STEPS):
            with torch.no_grad():
                vector_to_parameters(flat[:k], model.parameters())
            model.zero_grad()
            _local_gradient(model, step)
            flat_grad = torch.zeros(size * n)
            flat_grad[:k] = parameters_to_vector(p.grad for p in model.parameters())
            learner(flat, flat_grad, exp_avg, exp_avg_sq, step + 1, **HYPER)
            history.append((flat.clone(), exp_avg.clone(), exp_avg_sq.clone()))
    return history


@functools.cache
def _zero1_reference(n: int, mode: str) -> list:
    """history[step][rank] -> (params, exp_avg, exp_avg_sq), all K elements, for gradient ``mode``:
    "mean" over ranks (right), "sum" over ranks, each rank's "local" one, or "unreduced": each
    shard updated with its owner's local gradient (the reduction forgotten)."""
    models = [make_mlp(D_MODEL, D_HIDDEN, SEED) for _ in range(n)]
    k = sum(p.numel() for p in models[0].parameters())
    states = [
        [parameters_to_vector(m.parameters()).detach().clone(), torch.zeros(k), torch.zeros(k)]
        for m in models
    ]
    history = []
    for step in range(STEPS):
        grads = []
        for r, (model, state) in enumerate(zip(models, states)):
            with torch.no_grad():
                vector_to_parameters(state[0], model.parameters())
            model.zero_grad()
            x, y = _batch(step)
            F.mse_loss(model(shard(x, r, n)), shard(y, r, n)).backward()
            grads.append(parameters_to_vector(p.grad for p in model.parameters()))
        total = torch.stack(grads).sum(0)
        size = zero.padded_size(k, n) // n
        unreduced = torch.cat([g[r * size : (r + 1) * size] for r, g in enumerate(grads)])
        for r, state in enumerate(states):
            grad = {"mean": total / n, "sum": total, "local": grads[r], "unreduced": unreduced}[mode]
            zero.adamw_(*state[:1], grad, *state[1:], step + 1, **HYPER)
        history.append([tuple(t.clone() for t in state) for state in states])
    return history


def _launch(n: int, rank_fn, learner_fn):
    return run_learner(n, rank_fn, learner_fn, timeout=TIMEOUT)


@exercise(
    "7.3",
    "the ZeRO-1 step: reduce-scatter, AdamW on a shard, all-gather",
    builds_on=("7.1", "7.2"),
    refuses=(
        "course_lib.zero:ZeroAdam",
        "course_lib.zero:adamw_",
        "course_lib.zero:reduce_scatter",
    ),
)
def zero1_step(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(flat_params, flat_grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)``."""
    for n in WORLD_SIZES:
        got = _launch(n, _zero1_rank, learner_fn)
        expected = _zero1_reference(n, "mean")
        k = expected[0][0][0].numel()
        for step in range(STEPS):
            for rank in range(n):
                params, exp_avg, exp_avg_sq = got[rank][step]
                size = exp_avg.numel()
                ref = [_pad(t, size * n) for t in expected[step][rank]]
                where = f"N={n}, rank {rank}, step {step + 1}"
                try:
                    compare(params[:k], ref[0][:k], "flat_params", rank=None)
                    compare(exp_avg, ref[1][rank * size : (rank + 1) * size], "exp_avg")
                    compare(exp_avg_sq, ref[2][rank * size : (rank + 1) * size], "exp_avg_sq")
                except Mismatch as exc:
                    hint = _zero1_hint(n, rank, step, params[:k], size, k)
                    raise Mismatch(_with_hint(where, hint, exc)) from None


def _pad(t: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(size)
    out[: t.numel()] = t
    return out


def _zero1_hint(n, rank, step, params, size, k) -> str:
    expected = _zero1_reference(n, "mean")[step][rank][0]
    before = (
        _zero1_reference(n, "mean")[step - 1][rank][0]
        if step
        else parameters_to_vector(make_mlp(D_MODEL, D_HIDDEN, SEED).parameters()).detach()
    )
    mine = torch.zeros(k, dtype=torch.bool)
    mine[rank * size : (rank + 1) * size] = True
    if torch.allclose(params[mine], expected[mine], rtol=1e-5, atol=1e-5) and torch.allclose(
        params[~mine], before[~mine], rtol=1e-5, atol=1e-5
    ):
        return (
            f"only this rank's shard [{rank * size}, {(rank + 1) * size}) was updated: "
            "all-gather the updated shards so every rank has all the new parameters"
        )
    for mode, what in (
        ("sum", "the SUM of the ranks' gradients: divide by N for the mean"),
        (
            "unreduced",
            "each rank's own gradient only: reduce-scatter first, so that "
            "every shard gets the sum over all ranks",
        ),
        ("local", "this rank's own gradient only: reduce-scatter sums the ranks' gradients"),
    ):
        if torch.allclose(params, _zero1_reference(n, mode)[step][rank][0], rtol=1e-5, atol=1e-5):
            return f"your parameters match an update with {what}"
    return ""


def _hook_rank(payload):
    learner = learner_in_rank(payload)
    model = make_mlp(D_MODEL, D_HIDDEN, SEED)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(learner)
    with builtins_switched_off(
        learner,
        ALL_REDUCE_OFF,
        "exercise 7.4 reduce-scatters the gradient: in ZeRO-2 no rank ever holds the whole summed gradient",
    ):
        for micro in range(MICRO_BATCHES):  # two backwards before a step: the shards must add up
            _local_gradient(model, 0, micro)
    return {
        name: (getattr(p, "grad_shard", None), p.grad is not None) for name, p in model.named_parameters()
    }


@functools.cache
def _full_gradients(micro_batches: int) -> dict:
    """Gradients of one process on the whole batch, summed over the first ``micro_batches``."""
    model = make_mlp(D_MODEL, D_HIDDEN, SEED)
    x, y = _batch(0)
    for micro in range(micro_batches):
        F.mse_loss(model(shard(x, micro, MICRO_BATCHES)), shard(y, micro, MICRO_BATCHES)).backward()
    return {name: p.grad.reshape(-1).clone() for name, p in model.named_parameters()}


@exercise(
    "7.4", "the ZeRO-2 gradient hook: keep only this rank's shard", refuses=("course_lib.zero:ZeroAdam",)
)
def shard_grad_hook(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(param)`` registered with ``register_post_accumulate_grad_hook``."""
    for n in WORLD_SIZES:
        got = _launch(n, _hook_rank, learner_fn)
        full = _full_gradients(MICRO_BATCHES)
        for rank in range(n):
            for name, (grad_shard, still_full) in got[rank].items():
                where = f"N={n}, rank {rank}, {name}"
                if grad_shard is None:
                    raise Mismatch(
                        f"{where}: no `param.grad_shard` after backward: store this rank's "
                        "shard of the averaged gradient there"
                    )
                if still_full:
                    raise Mismatch(
                        f"{where}: `param.grad` still holds the full gradient after backward: "
                        "set it to None once the shard is kept (that is ZeRO-2's saving)"
                    )
                expected = _padded_shard(full[name], rank, n)
                if isinstance(grad_shard, torch.Tensor) and grad_shard.shape != expected.shape:
                    raise Mismatch(
                        f"{where}: grad_shard has shape {tuple(grad_shard.shape)}, expected "
                        f"({expected.numel()},): {full[name].numel()} gradient elements padded "
                        f"to a multiple of {n}, one shard per rank"
                    )
                try:
                    compare(grad_shard, expected, "grad_shard")
                except Mismatch as exc:
                    raise Mismatch(_with_hint(where, _hook_hint(grad_shard, rank, n, name), exc)) from None


def _hook_hint(got, rank, n, name) -> str:
    full = _full_gradients(MICRO_BATCHES)[name]
    if torch.allclose(got, _padded_shard(full, rank, n) * n, rtol=1e-5, atol=1e-5):
        return "grad_shard is N× the expected: divide the sum over ranks by N (the mean)"
    if MICRO_BATCHES > 1:
        last = full - _full_gradients(MICRO_BATCHES - 1)[name]
        if torch.allclose(got, _padded_shard(last, rank, n), rtol=1e-5, atol=1e-5):
            return (
                "only the last backward's gradient is in grad_shard: with two backwards before a step, add the "
                "new shard to the `grad_shard` already there"
            )
    return ""
