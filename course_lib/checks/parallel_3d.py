"""Checks for chapter 09: 3D parallelism and the cost model.

9.1 and 9.2 are arithmetic on the rank grid (no processes); 9.3 is a cost-model
formula; 9.4 runs the learner's gradient averaging inside a real DP×TP training
step on 4 ranks and compares every parameter with single-process training.
The references are ``course_lib.mesh.GridLayout`` and ``course_lib.cost``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from course_lib import cost, dp, mesh
from course_lib.checks import Mismatch, exercise, learner_in_rank
from course_lib.checks.tensor_parallel import run_ranks
from course_lib.models import make_stack

if TYPE_CHECKING:
    from collections.abc import Callable

SHAPES = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2), (2, 4, 1), (3, 2, 2), (2, 2, 3)]
#: Wrong rank orders learners often write, as (name, coordinates function).
WRONG_ORDERS = {
    "dp varies fastest (rank % dp) instead of tp": lambda r, d, t, p: (r % d, r // d % t, r // (d * t)),
    "pp varies fastest instead of tp": lambda r, d, t, p: (r // p % d, r // (p * d), r % p),
}


def _shape(d, t, p):
    return f"dp={d}, tp={t}, pp={p}"


# The ranks of 9.4 return their grid coordinates: let them through the safe results format.
torch.serialization.add_safe_globals([mesh.Coord])


@exercise("9.1", "rank → (dp, tp, pp) coordinates", refuses=("course_lib.mesh:GridLayout.coordinates",))
def coordinates(learner_fn: Callable[..., Any]) -> None:
    for d, t, p in SHAPES:
        layout = mesh.GridLayout(d, t, p)
        for rank in range(layout.world_size):
            c = layout.coordinates(rank)
            expected = (c.dp, c.tp, c.pp)
            got = learner_fn(rank, d, t, p)
            if got is None or tuple(got) != expected:
                hint = next(
                    (
                        f" — looks like {why}"
                        for why, wrong in WRONG_ORDERS.items()
                        if all(
                            tuple(learner_fn(r, d, t, p) or ()) == wrong(r, d, t, p)
                            for r in range(layout.world_size)
                        )
                    ),
                    "",
                )
                raise Mismatch(
                    f"{_shape(d, t, p)}: rank {rank} expected (dp, tp, pp) = {expected}, got {got}{hint}"
                )


@exercise("9.2", "the ranks of every group along one axis", refuses=("course_lib.mesh:GridLayout.groups",))
def group_ranks(learner_fn: Callable[..., Any]) -> None:
    for d, t, p in SHAPES:
        layout = mesh.GridLayout(d, t, p)
        for axis in ("tp", "dp", "pp"):
            expected = layout.groups(axis)
            got = learner_fn(axis, d, t, p)
            try:
                got_sorted = sorted(sorted(int(r) for r in g) for g in got)
            except TypeError:
                raise Mismatch(
                    f"{_shape(d, t, p)}, axis {axis!r}: return a list of lists of ranks, got {got!r}"
                ) from None
            if got_sorted != expected:
                other = next(
                    (
                        a
                        for a in ("tp", "dp", "pp")
                        if a != axis and layout.groups(a) == got_sorted and layout.groups(a) != expected
                    ),
                    None,
                )
                hint = f" — those are the {other} groups" if other else ""
                raise Mismatch(
                    f"{_shape(d, t, p)}, axis {axis!r}: expected {expected}, got {got_sorted}{hint}"
                )


@exercise(
    "9.3",
    "model-state memory per GPU (ZeRO × TP × PP)",
    refuses=(
        "course_lib.cost:model_state_bytes",
        "course_lib.cost:estimate",
    ),
)
def model_state_bytes(learner_fn: Callable[..., Any]) -> None:
    cases = [
        (1e9, zero, d, t, p)
        for zero in (0, 1, 2, 3)
        for d, t, p in ((1, 1, 1), (8, 1, 1), (4, 2, 1), (2, 2, 4), (16, 8, 4))
    ]
    for psi, zero, d, t, p in cases:
        expected = sum(cost.model_state_bytes(psi, zero, d, t, p).values())
        got = learner_fn(psi, zero, d, t, p)
        if got is None or abs(got - expected) > 1e-6 * expected:
            hints = {
                sum(cost.model_state_bytes(psi, zero, d, 1, 1).values()): "forgot that TP and PP cut "
                "the parameters each rank holds by tp·pp",
                sum(cost.model_state_bytes(psi * t * p, zero, d * t * p, 1, 1).values()): "ZeRO shards "
                "over the dp group only, not over all dp·tp·pp GPUs",
                16 * psi / (t * p): "ZeRO's sharding over dp is missing",
            }
            hints.update(
                {
                    sum(cost.model_state_bytes(psi, z, d, t, p).values()): f"that is ZeRO-{z}'s memory"
                    for z in (0, 1, 2, 3)
                    if z != zero
                }
            )
            hint = next(
                (
                    f" — {h}"
                    for value, h in hints.items()
                    if got is not None and abs(got - value) <= 1e-6 * value and value != expected
                ),
                "",
            )
            raise Mismatch(
                f"Ψ=1e9, ZeRO-{zero}, {_shape(d, t, p)}: expected {expected:.4g} bytes, "
                f"got {got if got is None else format(got, '.4g')}{hint}"
            )


STEPS, BATCH, D_MODEL, D_HIDDEN, DEPTH = 2, 8, 8, 16, 2


def _average_in_rank(payload, d, t, batches):
    """One DP×TP training run whose dp gradient sync is the learner's."""
    learner = learner_in_rank(payload)
    used_world = []
    original = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        group = kwargs.get("group", args[1] if len(args) > 1 else None)
        if dist.get_world_size(group) == dist.get_world_size() and dist.get_world_size() > d:
            used_world.append(True)
        return original(tensor, *args, **kwargs)

    def sync(model, dp_group):
        dist.all_reduce = recording
        try:
            learner(model, dp_group)
        finally:
            dist.all_reduce = original

    result = mesh.train_3d(
        d, t, 1, batches, functools.partial(make_stack, DEPTH, D_MODEL, D_HIDDEN, 3), 1, None, 0.1, sync
    )
    result["used_world"] = bool(used_world)
    return result


@exercise(
    "9.4",
    "a DP×TP step: average gradients over the dp group only",
    refuses=("course_lib.data_parallel:average_gradients_allreduce",),
)
def average_gradients(learner_fn: Callable[..., Any]) -> None:
    batches = dp.make_batches(STEPS, BATCH, d_model=D_MODEL, seed=5)
    reference = make_stack(DEPTH, D_MODEL, D_HIDDEN, 3)
    mesh.train_dense(reference, batches)
    dense = {k: v.detach() for k, v in reference.named_parameters()}
    for d, t in ((2, 1), (2, 2)):
        results = run_ranks(d * t, _average_in_rank, learner_fn, d, t, batches)
        try:
            mesh.compare_with_dense(results, dense, t)
        except AssertionError as exc:
            first = str(exc).splitlines()[0]
            hint = (
                (
                    " — you all-reduced over all ranks: tp ranks hold different blocks, average over "
                    "dp_group only"
                )
                if any(r["used_world"] for r in results)
                else ""
            )
            raise Mismatch(f"dp={d}, tp={t}: after {STEPS} steps {first}{hint}") from None
