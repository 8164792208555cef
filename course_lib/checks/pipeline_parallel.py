"""Checks for chapter 06: pipeline schedules, one stage's send/recv loop, re-materialisation.

6.1 and 6.2 compare the learner's schedule with ``course_lib.pp``'s for every
p = 1..5 stages and m = 1..8 micro-batches: first that it is a schedule at all
(every stage runs each forward and backward once), then that it cannot
deadlock (the simulator), then action by action. 6.3 runs the learner's loop
on p = 1..4 real ranks for GPipe and 1F1B orders and compares every stage's
gradients and the loss with one process training on the whole batch
(rtol = atol = 1e-5). 6.4 runs in this process and compares with a plain
backward and with ``torch.utils.checkpoint``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

from course_lib import pp
from course_lib.checks import Mismatch, compare, exercise, learner_in_rank, run_learner
from course_lib.models import make_stack, regression_data

if TYPE_CHECKING:
    from collections.abc import Callable

STAGES = range(1, 6)
MICRO_BATCHES = range(1, 9)
WORLD_SIZES = (1, 2, 3, 4)
#: Seconds one launch may take; a learner's deadlock is reported after about this long.
TIMEOUT = 20.0
DEPTH, D_MODEL, D_HIDDEN, SEED, BATCH = 4, 8, 16, 6, 8
#: (schedule, m) run by exercise 6.3, in this order, in one launch per world size.
CASES = (("gpipe", 4), ("1f1b", 4), ("1f1b", 2))


def _describe(value) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


# ----------------------------------------------------------------------------
# 6.1 and 6.2: schedules


def _check_schedule(learner_fn, reference_fn, name: str) -> None:
    for p in STAGES:
        for m in MICRO_BATCHES:
            prefix = f"p={p}, m={m}"
            got, expected = learner_fn(p, m), reference_fn(p, m)
            if not isinstance(got, (list, tuple)) or len(got) != p:
                raise Mismatch(
                    f"{prefix}: expected a list with one list of actions per stage "
                    f"({p}), got {_describe(got)}"
                )
            for s, actions in enumerate(got):
                if not isinstance(actions, (list, tuple)) or len(actions) != 2 * m:
                    raise Mismatch(
                        f"{prefix}: stage {s} should have 2m = {2 * m} actions (a forward "
                        f"and a backward per micro-batch), got {_describe(actions)}"
                    )
            try:
                sim = pp.simulate(got)
            except ValueError as exc:
                raise Mismatch(f"{prefix}: {exc}") from None
            for s in range(p):
                for position, (g, e) in enumerate(zip(got[s], expected[s])):
                    if tuple(g) != e:
                        raise Mismatch(
                            f"{prefix}: stage {s}, position {position}: expected {e}, "
                            f"got {tuple(g)}{_hint(name, got[s], sim, s, p, m)}"
                        )


def _hint(name, got, sim, s, p, m) -> str:
    backwards = [("B", i) for i in range(m)]
    if name == "gpipe" and [tuple(a) for a in got] == [("F", i) for i in range(m)] + backwards[::-1]:
        return " — run the backwards in micro-batch order 0, 1, …, m−1"
    if name == "1f1b" and sim.peak_activations[s] > min(p - s, m):
        return (
            f" — stage {s} keeps {sim.peak_activations[s]} micro-batches alive at once; 1F1B "
            f"keeps at most min(p−s, m) = {min(p - s, m)}: start alternating after "
            f"min(p−s−1, m) = {min(p - s - 1, m)} forwards"
        )
    if name == "1f1b" and sim.peak_activations[s] < min(p - s, m):
        return (
            f" — stage {s} starts its backwards too early: it has to run min(p−s−1, m) = "
            f"{min(p - s - 1, m)} forwards before its first backward, or it idles"
        )
    return ""


@exercise("6.1", "the GPipe schedule", refuses=("course_lib.pipeline_parallel:gpipe_schedule",))
def gpipe_schedule(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(num_stages, num_microbatches)`` against ``pp.gpipe_schedule``."""
    _check_schedule(learner_fn, pp.gpipe_schedule, "gpipe")


@exercise(
    "6.2",
    "the 1F1B schedule",
    refuses=(
        "course_lib.pipeline_parallel:one_f_one_b_schedule",
        "course_lib.pipeline_parallel:gpipe_schedule",
    ),
)
def one_f_one_b_schedule(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(num_stages, num_microbatches)`` against ``pp.one_f_one_b_schedule``."""
    _check_schedule(learner_fn, pp.one_f_one_b_schedule, "1f1b")


# ----------------------------------------------------------------------------
# 6.3: one stage's send/recv loop, on real ranks


def _data(m: int):
    x, y = regression_data(BATCH, D_MODEL, seed=SEED)
    return list(x.split(BATCH // m)), list(y.split(BATCH // m))


class NothingToSend(RuntimeError):
    """The learner's loop sent None (usually x.grad of an input that did not require grad)."""


def _refusing_none(send):
    def checked(tensor, *args, **kwargs):
        if not isinstance(tensor, torch.Tensor):
            raise NothingToSend(
                f"rank {dist.get_rank()} tried to send {type(tensor).__name__} instead of a tensor"
                + (
                    " — x.grad is None unless the received input had .requires_grad_() before the forward"
                    if tensor is None
                    else ""
                )
            )
        return send(tensor, *args, **kwargs)

    return checked


def _stage_rank(payload):
    learner = learner_in_rank(payload)
    rank, p = dist.get_rank(), dist.get_world_size()
    dist.send, dist.isend = _refusing_none(dist.send), _refusing_none(dist.isend)
    results = []
    for name, m in CASES:
        stage = pp.partition(make_stack(DEPTH, D_MODEL, D_HIDDEN, SEED), rank, p)
        micro_x, micro_y = _data(m)
        actions = pp.SCHEDULES[name](p, m)[rank]
        loss = learner(stage, actions, micro_x, micro_y, F.mse_loss, (BATCH // m, D_MODEL))
        grads = {k: None if q.grad is None else q.grad.clone() for k, q in stage.named_parameters()}
        results.append((loss, grads))
        dist.barrier()  # keeps one case's stray messages out of the next, and a stuck rank visible
    return results


@functools.cache
def _full_batch():
    """Loss and gradients of one process on the whole batch (the answer for every p, m)."""
    model = make_stack(DEPTH, D_MODEL, D_HIDDEN, SEED)
    x, y = regression_data(BATCH, D_MODEL, seed=SEED)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    return loss.detach(), {k: q.grad.clone() for k, q in model.named_parameters()}


def _close(a, b) -> bool:
    return a is not None and a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def _launch_stages(p: int, learner_fn):
    cases = ", then ".join(f"{n} m={m}" for n, m in CASES)
    # gloo even on a GPU machine: the exercise's buffers are CPU tensors.
    return run_learner(
        p,
        _stage_rank,
        learner_fn,
        timeout=TIMEOUT,
        refusals=(NothingToSend,),
        label=f"p={p} ({cases})",
        backend="gloo",
    )


def _check_loss(prefix, loss, rank, p, m, expected):
    if rank < p - 1:
        if loss is not None:
            raise Mismatch(
                f"{prefix}: rank {rank} returned {_describe(loss)}; only the last stage "
                f"has a loss: return None on the others"
            )
        return
    if not isinstance(loss, (torch.Tensor, float)):
        raise Mismatch(f"{prefix}: the last rank returned {_describe(loss)}, expected the loss")
    got = torch.as_tensor(loss, dtype=expected.dtype).detach().reshape(())
    if not _close(got, expected):
        hint = (
            f" — that is the SUM of the {m} micro-batch losses: divide each by m"
            if m > 1 and _close(got, m * expected)
            else ""
        )
        raise Mismatch(
            f"{prefix}: rank {rank} returned loss {got.item():.6g}, expected "
            f"{expected.item():.6g} (the mean over the whole batch){hint}"
        )


def _check_grads(prefix, grads, rank, p, m, expected, last_stage_right):
    for name, g in grads.items():
        if g is None:
            raise Mismatch(
                f"{prefix}: stage {rank}: {name}.grad is None — this stage never ran a "
                f"backward that reached its parameters"
            )
        want = expected[name]
        if _close(g, want):
            continue
        scale = float((g * want).sum() / (want * want).sum()) if g.shape == want.shape else 0.0
        hint = ""
        if m > 1 and _close(g, m * want):
            hint = f" — {m}× too large: divide each micro-batch's loss by m = {m}"
        elif _close(g, scale * want):
            hint = f" — {scale:.3g}× the right gradient"
        elif rank < p - 1 and last_stage_right:
            hint = (
                f" — the last stage is right, so check what travels backward: stage {rank + 1} "
                f"must send x.grad, the gradient of its own input, to stage {rank}"
            )
        try:
            compare(g, want, f"{name}.grad")
        except Mismatch as exc:
            raise Mismatch(f"{prefix}: stage {rank}: {exc}{hint}") from None


@exercise("6.3", "one stage's send/recv loop", refuses=("course_lib.pipeline_parallel:train_step",))
def run_stage(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(stage, actions, micro_inputs, micro_targets, loss_fn, activation_shape)``
    on p = 1..4 ranks: every stage's gradients and the last stage's loss equal one process
    training on the whole batch."""
    loss, expected = _full_batch()
    for p in WORLD_SIZES:
        got = _launch_stages(p, learner_fn)
        for case, (name, m) in enumerate(CASES):
            prefix = f"p={p}, {name}, m={m}"
            last_grads = got[p - 1][case][1]
            last_right = all(_close(g, expected[k]) for k, g in last_grads.items())
            for rank in range(p):
                _check_loss(prefix, got[rank][case][0], rank, p, m, loss)
            for rank in reversed(range(p)):  # errors flow backward: report the first stage they reach
                _check_grads(prefix, got[rank][case][1], rank, p, m, expected, last_right)


# ----------------------------------------------------------------------------
# 6.4: re-materialisation, in this process


class _CountForwards:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1


def _recompute_rank(payload, depth, x, grad_output):
    """The learner's re-materialising backward on a stage whose forward ran under no_grad."""
    learner = learner_in_rank(payload)
    stage = make_stack(depth, D_MODEL, D_HIDDEN, SEED)
    with torch.no_grad():
        stage(x)  # the forward that kept nothing but x
    counter = _CountForwards(stage)
    try:
        grad_x = learner(stage, x.clone(), grad_output.clone())
    finally:
        counter.handle.remove()
    grad_x = grad_x if isinstance(grad_x, torch.Tensor) or grad_x is None else torch.tensor(float("nan"))
    return grad_x, counter.calls, [(name, q.grad) for name, q in stage.named_parameters()]


@exercise(
    "6.4",
    "re-materialise a stage in backward",
    refuses=(
        "course_lib.pipeline_parallel:checkpointed",
        "course_lib.pipeline_parallel:_Rematerialize",
        "torch.utils.checkpoint:checkpoint",
    ),
)
def recompute_backward(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(stage, x, grad_output) -> grad of x``: the stage's forward ran under
    ``torch.no_grad()``; afterwards its parameter gradients and the returned input gradient
    equal ``torch.utils.checkpoint``'s, with exactly one more forward."""
    for depth, rows in ((1, 3), (3, 5)):
        prefix = f"a stage of {depth} layer{'s' * (depth > 1)}, batch {rows}"
        g = torch.Generator().manual_seed(depth)
        x, grad_output = (torch.randn(rows, D_MODEL, generator=g) for _ in range(2))
        reference = make_stack(depth, D_MODEL, D_HIDDEN, SEED)
        x_ref = x.clone().requires_grad_()
        torch.utils.checkpoint.checkpoint(reference, x_ref, use_reentrant=False).backward(grad_output)

        # On one rank of its own, so the answer never runs in the checking process.
        ((grad_x, calls, grads),) = run_learner(
            1,
            _recompute_rank,
            learner_fn,
            depth,
            x,
            grad_output,
            timeout=TIMEOUT,
            label=prefix,
            backend="gloo",
        )
        if calls != 1:
            raise Mismatch(
                f"{prefix}: your function ran the stage's forward {calls} times; "
                f"re-materialising runs it exactly once more, in backward"
            )
        if grad_x is None:
            raise Mismatch(
                f"{prefix}: returned None — return the gradient of x (x.detach()."
                f"requires_grad_() before the second forward, then x.grad)"
            )
        compare(grad_x, x_ref.grad, "the returned gradient of x")
        for (name, q_grad), ref in zip(grads, reference.parameters()):
            if q_grad is None:
                raise Mismatch(
                    f"{prefix}: {name}.grad is None — backpropagate grad_output through the recomputed output"
                )
            hint = " — twice too large: backward ran twice" if _close(q_grad, 2 * ref.grad) else ""
            try:
                compare(q_grad, ref.grad, f"{name}.grad")
            except Mismatch as exc:
                raise Mismatch(f"{prefix}: {exc}{hint}") from None
