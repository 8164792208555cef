"""Checks for chapter 04: tensor parallelism (Megatron's column/row split, f and g).

Each check runs the learner's code on N = 1, 2 and 4 ranks with a small seeded
MLP (d_model 8, hidden 16) and compares the forward output *and* the gradients
with the dense layer computed in one process, to rtol = atol = 1e-5. Upstream
gradients differ from rank to rank where that exposes a missing or doubled
all-reduce. ``course_lib.tp`` is switched off inside the ranks: it is the
answer. Chapter 05's checks reuse the machinery here.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_lib.checks import Mismatch, compare, exercise, learner_in_rank, run_learner
from course_lib.checks.refusal import CourseCodeUsed, module_names_switched_off
from course_lib.models import make_mlp
from course_lib.tp import block_of

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

WORLD_SIZES = (1, 2, 4)
#: Seconds one launch may take; a learner's deadlock is reported after about this long.
TIMEOUT = 20.0
D_MODEL, D_HIDDEN, SEED = 8, 16, 4
BATCH, SEQ = 2, 4  # activations are (batch, seq, features); SEQ splits over every N above


# ----------------------------------------------------------------------------
# machinery shared with chapter 05


@contextlib.contextmanager
def course_tp_switched_off(ex_id: str, learner: Callable[..., Any] | type) -> Iterator[None]:
    """Every public function and class of course_lib.tp raises while the learner's code runs."""
    from course_lib import tp

    with module_names_switched_off(ex_id, learner, tp, "course_lib.tp"):
        yield


def run_ranks(n: int, rank_fn: Callable[..., Any], learner: Callable[..., Any] | type, *args) -> list[Any]:
    """Run ``rank_fn(payload, *args)`` on n ranks; turn a hang or a refusal into a one-line Mismatch."""
    # gloo on the CPU even where GPUs exist: the checks' tensors are tiny and built on the CPU.
    return run_learner(
        n, rank_fn, learner, *args, timeout=TIMEOUT, refusals=(CourseCodeUsed,), backend="gloo"
    )


def backprop(out: Any, upstream: torch.Tensor) -> dict:
    """Backpropagate ``(out * upstream).sum()`` when ``out`` can be; say why not otherwise."""
    result = {"out": out}
    if isinstance(out, torch.Tensor) and out.shape == upstream.shape:
        if out.requires_grad:
            (out * upstream).sum().backward()
        else:
            result["no_grad"] = True
    return result


def grad_of(t: torch.Tensor) -> torch.Tensor | None:
    return None if t.grad is None else t.grad.clone()


def check_close(
    n: int,
    rank: int | None,
    got: Any,
    expected: torch.Tensor,
    what: str,
    hints: Sequence[tuple[torch.Tensor, str]] = (),
) -> None:
    """compare(), prefixed with N, plus a hint when ``got`` equals a known wrong answer."""
    if got is None and isinstance(expected, torch.Tensor):
        where = "" if rank is None else f"rank {rank}: "
        raise Mismatch(
            f"N={n}: {where}{what} is None: no gradient reached it (a .detach(), "
            "torch.no_grad(), or a new tensor built from its values?)"
        )
    try:
        compare(got, expected, what, rank=rank)
    except Mismatch as exc:
        hint = next(
            (
                h
                for wrong, h in hints
                if isinstance(got, torch.Tensor)
                and got.shape == wrong.shape
                and torch.allclose(got, wrong, rtol=1e-5, atol=1e-5)
            ),
            "",
        )
        raise Mismatch(f"N={n}: {exc}" + (f" — {hint}" if hint else "")) from None


def check_output(
    n: int,
    rank: int,
    result: dict,
    expected: torch.Tensor,
    what: str = "output",
    hints: Sequence[tuple[torch.Tensor, str]] = (),
) -> None:
    check_close(n, rank, result["out"], expected, what, hints)
    if result.get("no_grad"):
        raise Mismatch(
            f"N={n}: rank {rank}: the {what} does not require grad, so no gradient can flow "
            "back (no .detach(), torch.no_grad() or .data on the way)"
        )


def rank_data(n: int, shape: tuple[int, ...], salt: int) -> list:
    """One seeded tensor per rank."""
    g = torch.Generator().manual_seed(1000 * salt + n)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def block(size: int, n: int, rank: int) -> slice:
    """Rank ``rank``'s block of ``range(size)``: :func:`course_lib.tp.block_of` (refuses uneven splits)."""
    return block_of(size, n, rank)


def only_block(grad: torch.Tensor, dim: int, rows: slice) -> torch.Tensor:
    """``grad`` with everything outside ``rows`` along ``dim`` set to zero."""
    out = torch.zeros_like(grad)
    index = (slice(None),) * dim + (rows,)
    out[index] = grad[index]
    return out


def dense_mlp_grads(
    x: torch.Tensor, upstream: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The dense MLP's output and gradients: out, x.grad, {name: grad}, gelu output, fc1 output's grad."""
    mlp = make_mlp(D_MODEL, D_HIDDEN, SEED)
    x = x.clone().requires_grad_()
    pre = mlp.fc1(x)
    pre.retain_grad()
    hidden = F.gelu(pre)
    out = mlp.fc2(hidden)
    (out * upstream).sum().backward()
    grads = {k: p.grad for k, p in mlp.named_parameters()}
    return out.detach(), x.grad, grads, hidden.detach(), pre.grad


def _params(layer) -> tuple:
    return tuple(p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))


# ----------------------------------------------------------------------------
# inside the ranks


def _column_rank(payload, x, upstream_blocks):
    learner = learner_in_rank(payload)
    weight, bias = _params(make_mlp(D_MODEL, D_HIDDEN, SEED).fc1)
    with course_tp_switched_off("4.1", learner):
        result = backprop(learner(x, weight, bias), upstream_blocks[dist.get_rank()])
    return result | {"weight": grad_of(weight), "bias": grad_of(bias)}


def _f_rank(payload, x, upstreams):
    learner = learner_in_rank(payload)
    x = x.clone().requires_grad_()
    with course_tp_switched_off("4.2", learner):
        result = backprop(learner.apply(x), upstreams[dist.get_rank()])
    return result | {"x": x.detach().clone(), "x.grad": grad_of(x)}


def _g_rank(payload, xs, upstream):
    learner = learner_in_rank(payload)
    x = xs[dist.get_rank()].clone().requires_grad_()
    with course_tp_switched_off("4.3", learner):
        result = backprop(learner.apply(x), upstream)
    return result | {"x": x.detach().clone(), "x.grad": grad_of(x)}


def _row_rank(payload, hidden, upstream):
    learner = learner_in_rank(payload)
    rank, n = dist.get_rank(), dist.get_world_size()
    mine = hidden[..., block(D_HIDDEN, n, rank)].clone().requires_grad_()
    weight, bias = _params(make_mlp(D_MODEL, D_HIDDEN, SEED).fc2)
    with course_tp_switched_off("4.4", learner):
        result = backprop(learner(mine, weight, bias), upstream)
    return result | {"input": grad_of(mine), "weight": grad_of(weight), "bias": grad_of(bias)}


def _mlp_rank(payload, x, upstream):
    learner = learner_in_rank(payload)
    mlp = make_mlp(D_MODEL, D_HIDDEN, SEED)
    x = x.clone().requires_grad_()
    with course_tp_switched_off("4.5", learner):
        result = backprop(learner(x, mlp), upstream)
    return result | {"x": grad_of(x)} | {k: grad_of(p) for k, p in mlp.named_parameters()}


# ----------------------------------------------------------------------------
# the checks


def _inputs(salt: int):
    """A replicated input and upstream gradient for the MLP."""
    return rank_data(1, (BATCH, SEQ, D_MODEL), salt)[0], rank_data(1, (BATCH, SEQ, D_MODEL), salt + 1)[0]


@exercise("4.1", "column-parallel linear: my block of output features")
def column_parallel(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(x, weight, bias) -> x @ W_r.T + b_r`` (rank r's block of outputs)."""
    x = rank_data(1, (BATCH, SEQ, D_MODEL), 41)[0]
    mlp = make_mlp(D_MODEL, D_HIDDEN, SEED)
    weight, bias = _params(mlp.fc1)
    out = F.linear(x, weight, bias)
    upstream = rank_data(1, out.shape, 42)[0]
    (out * upstream).sum().backward()
    for n in WORLD_SIZES:
        blocks = [upstream[..., block(D_HIDDEN, n, r)] for r in range(n)]
        got = run_ranks(n, _column_rank, learner_fn, x, blocks)
        for r, res in enumerate(got):
            rows = block(D_HIDDEN, n, r)
            check_output(
                n,
                r,
                res,
                out.detach()[..., rows],
                hints=[
                    (
                        out.detach(),
                        "that is the whole output: keep only rank r's rows r·out/N … (r+1)·out/N "
                        "of weight (and of bias)",
                    )
                ],
            )
            check_close(n, r, res["weight"], only_block(weight.grad, 0, rows), "weight.grad")
            check_close(n, r, res["bias"], only_block(bias.grad, 0, rows), "bias.grad")


@exercise("4.2", "f: identity forward, all-reduce backward")
def copy_to_tp_region(learner_cls: type) -> None:
    """Check the autograd Function f: ``f.apply(x)`` is x; the gradient is summed over ranks."""
    x = rank_data(1, (BATCH, SEQ, D_MODEL), 43)[0]
    for n in WORLD_SIZES:
        upstreams = rank_data(n, x.shape, 44)
        total = torch.stack(upstreams).sum(0)
        got = run_ranks(n, _f_rank, learner_cls, x, upstreams)
        for r, res in enumerate(got):
            check_output(
                n,
                r,
                res,
                x,
                hints=[(n * x, "f's forward is the identity: the all-reduce belongs in backward")],
            )
            check_close(n, r, res["x"], x, "x", hints=[(n * x, "your forward changed its input in place")])
            check_close(
                n,
                r,
                res["x.grad"],
                total,
                "x.grad",
                hints=[
                    (
                        upstreams[r],
                        "this is only this rank's gradient: backward must all-reduce it (sum over the ranks)",
                    )
                ],
            )


@exercise("4.3", "g: all-reduce forward, identity backward")
def reduce_from_tp_region(learner_cls: type) -> None:
    """Check the autograd Function g: ``g.apply(x_r)`` sums over ranks; the gradient passes unchanged."""
    for n in WORLD_SIZES:
        xs = rank_data(n, (BATCH, SEQ, D_MODEL), 45)
        upstream = rank_data(1, (BATCH, SEQ, D_MODEL), 46)[0]
        total = torch.stack(xs).sum(0)
        got = run_ranks(n, _g_rank, learner_cls, xs, upstream)
        for r, res in enumerate(got):
            check_output(
                n,
                r,
                res,
                total,
                hints=[
                    (xs[r], "that is this rank's own input: forward must all-reduce (sum over the ranks)")
                ],
            )
            check_close(
                n,
                r,
                res["x"],
                xs[r],
                "x",
                hints=[
                    (
                        total,
                        "your forward all-reduced its input in place: all-reduce a copy "
                        "(x.clone()), autograd may still need the input",
                    )
                ],
            )
            check_close(
                n,
                r,
                res["x.grad"],
                upstream,
                "x.grad",
                hints=[
                    (
                        n * upstream,
                        "the gradient is N times too large: every rank already holds the whole "
                        "gradient of the sum, so g's backward is the identity",
                    )
                ],
            )


@exercise("4.4", "row-parallel linear: partial products, one all-reduce, bias once")
def row_parallel(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(y_r, weight, bias)``: every rank returns the dense ``y @ W.T + b``."""
    x, upstream = _inputs(47)
    out, _, grads, hidden, _ = dense_mlp_grads(x, upstream)
    fc2 = make_mlp(D_MODEL, D_HIDDEN, SEED).fc2
    weight, bias = fc2.weight.detach(), fc2.bias.detach()
    for n in WORLD_SIZES:
        got = run_ranks(n, _row_rank, learner_fn, hidden, upstream)
        for r, res in enumerate(got):
            cols = block(D_HIDDEN, n, r)
            partial = F.linear(hidden[..., cols], weight[:, cols])
            check_output(
                n,
                r,
                res,
                out,
                hints=[
                    (
                        out + (n - 1) * bias,
                        f"the bias was added {n} times: add it once, after the all-reduce",
                    ),
                    (partial + bias, "this is only this rank's partial product: all-reduce it (g)"),
                    (partial, "this is only this rank's partial product: all-reduce it, then add the bias"),
                ],
            )
            check_close(
                n,
                r,
                res["input"],
                upstream @ weight[:, cols],
                "y_r.grad",
                hints=[
                    (
                        n * upstream @ weight[:, cols],
                        "y_r.grad is N times too large: the backward of the "
                        "forward all-reduce is the identity (g)",
                    )
                ],
            )
            check_close(n, r, res["weight"], only_block(grads["fc2.weight"], 1, cols), "weight.grad")
            check_close(
                n,
                r,
                res["bias"],
                grads["fc2.bias"],
                "bias.grad",
                hints=[
                    (
                        n * grads["fc2.bias"],
                        "bias.grad is N times too large: add the bias once, after the sum",
                    )
                ],
            )


@exercise("4.5", "tensor-parallel MLP: f, column, GELU, row, g", builds_on=("4.1", "4.2", "4.3", "4.4"))
def tensor_parallel_mlp(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(x, mlp)``: the dense MLP's output on every rank, and every gradient."""
    with building_on("4.1–4.4"):
        _check_mlp(learner_fn)


@contextlib.contextmanager
def building_on(earlier: str) -> Iterator[None]:
    """Point at the earlier exercises when a composite one fails without a specific hint."""
    try:
        yield
    except Mismatch as exc:
        if " — " in str(exc):
            raise
        raise Mismatch(f"{exc} — this builds on your {earlier}: make those pass first") from None


def _check_mlp(learner_fn: Callable[..., Any]) -> None:
    x, upstream = _inputs(48)
    out, x_grad, grads, _, pre_grad = dense_mlp_grads(x, upstream)
    mlp = make_mlp(D_MODEL, D_HIDDEN, SEED)
    fc1_weight, fc2_bias = mlp.fc1.weight.detach(), mlp.fc2.bias.detach()
    for n in WORLD_SIZES:
        got = run_ranks(n, _mlp_rank, learner_fn, x, upstream)
        for r, res in enumerate(got):
            rows = block(D_HIDDEN, n, r)
            # What x.grad is without f: only the part that flows through this rank's columns.
            mine_only = pre_grad[..., rows] @ fc1_weight[rows]
            check_output(
                n,
                r,
                res,
                out,
                hints=[
                    (out + (n - 1) * fc2_bias, f"fc2's bias was added {n} times: add it once, after the sum")
                ],
            )
            check_close(
                n,
                r,
                res["x"],
                x_grad,
                "x.grad",
                hints=[
                    (
                        mine_only,
                        "this is only the gradient through this rank's columns of fc1: "
                        "apply f to x first, so backward sums the ranks' parts",
                    )
                ],
            )
            check_close(n, r, res["fc1.weight"], only_block(grads["fc1.weight"], 0, rows), "fc1.weight.grad")
            check_close(n, r, res["fc1.bias"], only_block(grads["fc1.bias"], 0, rows), "fc1.bias.grad")
            check_close(n, r, res["fc2.weight"], only_block(grads["fc2.weight"], 1, rows), "fc2.weight.grad")
            check_close(
                n,
                r,
                res["fc2.bias"],
                grads["fc2.bias"],
                "fc2.bias.grad",
                hints=[
                    (
                        n * grads["fc2.bias"],
                        "fc2.bias.grad is N times too large: add the bias once, after the sum",
                    )
                ],
            )
