"""Checks for chapter 06b: the interleaved order of one rank, a linear layer's split backward,
and ZB-H1's order. All run in this process (schedules are plain lists; the split backward runs
on a small MLP stack), so they take well under a second.

6b.1 compares the learner's order with Megatron's for p = 2..4, m = p..3p, v = 2..3, after
checking that the orders of all ranks together are a valid schedule. 6b.2 plugs the learner's
two functions into ``pipeline_schedules.SplitBackward`` and compares input and weight gradients
with a plain backward (rtol = atol = 1e-5). 6b.3 judges structure, not one exact list: the
orders must form a valid schedule whose simulated idle time is ZB-H1's (p−1)(F+B−2W) and whose
peak memory is 1F1B's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from course_lib import pipeline_schedules as ps
from course_lib.checks import Mismatch, compare, exercise

if TYPE_CHECKING:
    from collections.abc import Callable

_PS = "course_lib.pipeline_schedules:"
_SCHEDULES = (
    _PS + "schedule",
    _PS + "interleaved_1f1b_schedule",
    _PS + "zb_h1_schedule",
    _PS + "dualpipe_v_schedule",
)


def _orders(learner_fn, p, *args):
    rows = []
    for r in range(p):
        got = learner_fn(r, p, *args)
        if not isinstance(got, (list, tuple)):
            raise Mismatch(f"p={p}: rank {r} returned {type(got).__name__}, expected a list of actions")
        rows.append([tuple(a) if isinstance(a, (list, tuple)) else a for a in got])
    return rows


# ----------------------------------------------------------------------------
# 6b.1: the interleaved order of one rank


@exercise("6b.1", "the interleaved 1F1B order of one rank", refuses=_SCHEDULES)
def interleaved_order(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(rank, p, m, v)`` against Megatron's interleaved 1F1B order."""
    for p in (2, 3, 4):
        for m in (p, 2 * p, 3 * p):
            for v in (2, 3):
                _check_interleaved(learner_fn, p, m, v)
    try:
        _orders(learner_fn, 4, 6, 2)
    except ValueError:
        pass
    else:
        raise Mismatch(
            "p=4, m=6, v=2: expected a ValueError — interleaved 1F1B runs micro-batches in rounds "
            "of p, so m must be a multiple of p"
        )


def _check_interleaved(learner_fn, p, m, v):
    prefix = f"p={p}, m={m}, v={v}"
    got, expected = _orders(learner_fn, p, m, v), ps.interleaved_1f1b_schedule(p, m, v)
    for r in range(p):
        if got[r] == expected[r]:
            continue
        warmup = min((p - r - 1) * 2 + (v - 1) * p, m * v)
        leading = next((k for k, a in enumerate(got[r]) if a[0] != "F"), len(got[r]))
        if leading != warmup:
            raise Mismatch(
                f"{prefix}: rank {r} warms up with {leading} forwards; interleaved 1F1B warms up with "
                f"(p−r−1)·2 + (v−1)·p = {warmup} (at most m·v), then alternates F and B"
            )
        forwards = [a for a in got[r] if a[0] == "F"]
        wanted = [a for a in expected[r] if a[0] == "F"]
        if forwards != wanted:
            k = next(k for k, (a, b) in enumerate(zip(forwards, wanted)) if a != b)
            raise Mismatch(
                f"{prefix}: rank {r}'s forward no. {k} is {forwards[k]}, expected {wanted[k]} — forwards go "
                f"in rounds of p = {p} micro-batches: the round through stage {r}, then through stage "
                f"{r + p}, …, then the next round"
            )
        backwards = [a for a in got[r] if a[0] == "B"]
        wanted = [a for a in expected[r] if a[0] == "B"]
        if backwards != wanted:
            k = next(k for k, (a, b) in enumerate(zip(backwards, wanted)) if a != b)
            raise Mismatch(
                f"{prefix}: rank {r}'s backward no. {k} is {backwards[k]}, expected {wanted[k]} — backwards "
                f"take the same rounds with the stages in reverse: the last stage {r + (v - 1) * p} first"
            )
        try:
            ps.validate(got)
        except ValueError as exc:
            raise Mismatch(f"{prefix}: {exc}") from None
        k = next(
            (k for k, (a, b) in enumerate(zip(got[r], expected[r])) if a != b),
            min(len(got[r]), len(expected[r])),
        )
        raise Mismatch(
            f"{prefix}: rank {r}, position {k}: expected {expected[r][k]}, got {got[r][k]} — after the "
            f"warm-up, alternate one forward and one backward"
        )


# ----------------------------------------------------------------------------
# 6b.2: a linear layer's split backward


def _split_run(fns, x, seed):
    """(input gradient after I, weight .grad after I, input gradient and weight .grad after W)."""
    model = nn.Sequential(nn.Linear(x.shape[-1], 6), nn.GELU(), nn.Linear(6, 5))
    torch.manual_seed(seed)
    for q in model.parameters():
        nn.init.normal_(q)
    reference = nn.Sequential(nn.Linear(x.shape[-1], 6), nn.GELU(), nn.Linear(6, 5))
    reference.load_state_dict(model.state_dict())
    grad_output = torch.randn(*x.shape[:-1], 5, generator=torch.Generator().manual_seed(seed))
    x_ref = x.clone().requires_grad_()
    reference(x_ref).backward(grad_output)
    x_split, store = x.clone().requires_grad_(), ps.WeightGradients()
    with ps.SplitBackward(fns):
        out = model(x_split)
    with store.deferring("I"):
        out.backward(grad_output)
    early = [q.grad for q in model.parameters()]
    store.run("I")
    return x_split.grad, x_ref.grad, early, list(model.named_parameters()), list(reference.parameters())


def _shape_checked(weight_gradient, prefix):
    """The learner's weight_gradient, with a clear word when its results have the wrong shape."""

    def checked(grad_output, x):
        result = weight_gradient(grad_output, x)
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise Mismatch(
                f"{prefix}: weight_gradient returned {type(result).__name__}; return (grad_weight, grad_bias)"
            )
        grad_w, grad_b = result
        out, inp = grad_output.shape[-1], x.shape[-1]
        if tuple(grad_w.shape) == (inp, out) and inp != out:
            raise Mismatch(
                f"{prefix}: grad_weight has shape {tuple(grad_w.shape)} — transposed: ∂L/∂W = ∂L/∂yᵀ · x "
                f"has W's shape (out, in) = {(out, inp)}"
            )
        if tuple(grad_w.shape) != (out, inp):
            raise Mismatch(
                f"{prefix}: grad_weight has shape {tuple(grad_w.shape)}, expected {(out, inp)} — flatten the leading "
                f"dimensions of ∂L/∂y and x into rows first, then ∂L/∂W = ∂L/∂yᵀ · x"
            )
        if tuple(grad_b.shape) != (out,):
            raise Mismatch(
                f"{prefix}: grad_bias has shape {tuple(grad_b.shape)}, expected {(out,)} — ∂L/∂b sums ∂L/∂y over "
                f"every row (every leading dimension)"
            )
        return grad_w, grad_b

    return checked


@exercise(
    "6b.2",
    "a linear layer's split backward",
    refuses=(_PS + "input_gradient", _PS + "weight_gradient", _PS + "SplitBackward"),
)
def split_backward(input_gradient: Callable[..., Any], weight_gradient: Callable[..., Any]) -> None:
    """Check ``input_gradient(grad_output, weight)`` and ``weight_gradient(grad_output, x) ->
    (grad_weight, grad_bias)`` inside a split backward: input gradients in the I, weight
    gradients in the W, both equal to a plain backward."""
    for shape in ((4, 3), (2, 3, 3)):
        prefix = f"input of shape {shape}"
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))
        try:
            fns = (input_gradient, _shape_checked(weight_gradient, prefix))
            got_x, want_x, early, params, reference = _split_run(fns, x, len(shape))
        except (NotImplementedError, Mismatch):
            raise
        except RuntimeError as exc:
            hint = (
                " — flatten the leading dimensions: rows are every (batch, position) pair"
                if len(shape) > 2
                else " — ∂L/∂x = ∂L/∂y · W for y = x·Wᵀ + b (W has shape (out, in))"
            )
            raise Mismatch(f"{prefix}: {str(exc).splitlines()[0]}{hint}") from None
        if got_x is None or got_x.shape != want_x.shape:
            what = "None" if got_x is None else f"shape {tuple(got_x.shape)}"
            raise Mismatch(
                f"{prefix}: the input gradient has {what}, expected {tuple(want_x.shape)} — "
                f"∂L/∂x = ∂L/∂y · W (not Wᵀ): y = x·Wᵀ + b"
            )
        try:
            compare(got_x, want_x, "the input gradient")
        except Mismatch as exc:
            raise Mismatch(f"{prefix}: {exc} — ∂L/∂x = ∂L/∂y · W") from None
        if any(g is not None for g in early):
            raise Mismatch(f"{prefix}: weight gradients appeared during the I pass: they belong to the W")
        for (name, q), ref in zip(params, reference):
            if q.grad is None:
                raise Mismatch(f"{prefix}: {name}.grad is None after the W — return (grad_weight, grad_bias)")
            hint = ""
            if q.grad.shape != ref.grad.shape and q.grad.shape == ref.grad.t().shape:
                hint = " — transposed: ∂L/∂W = ∂L/∂yᵀ · x has W's shape (out, in)"
            elif name.endswith("bias") and q.grad.shape != ref.grad.shape:
                hint = " — ∂L/∂b sums ∂L/∂y over every row (every leading dimension)"
            elif q.grad.shape != ref.grad.shape and len(shape) > 2:
                hint = " — flatten the leading dimensions of ∂L/∂y and x into rows first"
            try:
                compare(q.grad, ref.grad, f"{name}.grad")
            except Mismatch as exc:
                raise Mismatch(f"{prefix}: {exc}{hint}") from None


# ----------------------------------------------------------------------------
# 6b.3: ZB-H1's order


@exercise("6b.3", "the ZB-H1 order", refuses=_SCHEDULES)
def zb_h1_order(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(rank, p, m)``: together the ranks' orders are a valid schedule of F, I
    and W actions whose idle time is (p−1)(F+B−2W) with 1F1B's peak memory."""
    for p in range(1, 6):
        for m in range(1, 9):
            _check_zb(learner_fn, p, m)


def _check_zb(learner_fn, p, m):
    prefix = f"p={p}, m={m}"
    got = _orders(learner_fn, p, m)
    if any(a[0] == "B" for row in got for a in row if isinstance(a, tuple) and a):
        raise Mismatch(f"{prefix}: use I and W for every backward, not B: ZB-H1 splits all of them")
    try:
        ps.validate(got)
    except ValueError as exc:
        hint = " — a W needs its I (its B's input-gradient part) first" if "('W'" in str(exc) else ""
        raise Mismatch(f"{prefix}: {exc}{hint}") from None
    sim = ps.simulate(got, 1.0, 2.0, 1.0)
    base = ps.simulate(ps.schedule("1f1b", p, m), 1.0, 2.0, 1.0)
    worst = max(sim.peak_activations)
    if worst > max(base.peak_activations):
        r = sim.peak_activations.index(worst)
        raise Mismatch(
            f"{prefix}: rank {r} holds {worst} micro-batches at once (a micro-batch lives until its W); "
            f"ZB-H1 keeps 1F1B's peak, min(p, m) = {max(base.peak_activations)}: start rank r's W's "
            f"after its first r I's, not later"
        )
    formula = ps.bubble_formula("zb-h1", p, 1.0, 2.0, 1.0)
    if abs(sim.bubble_time - formula) > 1e-9 and m >= p:
        hint = ""
        right_after = all(
            k + 1 < len(row) and row[k + 1] == ("W", a[1], a[2])
            for row in got
            for k, a in enumerate(row)
            if a[0] == "I"
        )
        if right_after:
            hint = (
                " — every W runs right after its I, so the cool-down's holes stay empty: rank r "
                "should carry its first r W's into the cool-down"
            )
        raise Mismatch(
            f"{prefix}: with t_f = 1, t_b = 2, t_w = 1 your schedule idles {sim.bubble_time:g} per rank; "
            f"ZB-H1 idles (p−1)(F+B−2W) = {formula:g}{hint}"
        )
