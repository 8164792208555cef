"""Checks for chapter 09b: the arithmetic of one configuration of the capstone GPT.

9b.1 the ranks of a group on a five-axis grid (tp, cp, ep, dp, pp); 9b.2 the rows of the global
batch a rank computes, micro-batch by micro-batch; 9b.3 the bytes of model states one rank holds
for one sequence-parallel block under ZeRO/FSDP. No processes: each check calls the learner's
function on many cases and compares with ``course_lib.mesh.GridLayout`` and ``course_lib.train``;
a wrong answer that matches a common mistake gets that mistake named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from course_lib import train
from course_lib.checks import Mismatch, exercise
from course_lib.mesh import GridLayout

if TYPE_CHECKING:
    from collections.abc import Callable

#: Grid sizes the checks try: every axis alone, and several together (at most 32 ranks).
GRIDS = [
    dict(tp=1, cp=1, ep=1, dp=1, pp=1),
    dict(tp=2, cp=1, ep=1, dp=2, pp=2),
    dict(tp=2, cp=2, ep=1, dp=1, pp=2),
    dict(tp=1, cp=1, ep=2, dp=2, pp=1),
    dict(tp=2, cp=2, ep=2, dp=2, pp=1),
    dict(tp=1, cp=2, ep=2, dp=3, pp=2),
    dict(tp=2, cp=1, ep=2, dp=2, pp=2),
]
#: The course's order (fastest first) and orders learners often use instead.
ORDER = ("tp", "cp", "ep", "dp", "pp")
WRONG_ORDERS = {
    "ep varies slower than dp (Megatron puts ep between cp and dp)": ("tp", "cp", "dp", "ep", "pp"),
    "cp varies faster than tp (tp is the fastest axis)": ("cp", "tp", "ep", "dp", "pp"),
    "dp varies fastest instead of tp": ("dp", "tp", "cp", "ep", "pp"),
    "the axes in the order of the function's arguments, not Megatron's": ("dp", "tp", "pp", "cp", "ep"),
}


def _coords(rank: int, sizes: dict, order=ORDER) -> dict:
    out = {}
    for axis in order:
        rank, out[axis] = divmod(rank, sizes[axis])
    return out


def _world(sizes: dict) -> int:
    n = 1
    for v in sizes.values():
        n *= v
    return n


def _group(rank: int, axis: str, sizes: dict, order=ORDER) -> list:
    mine = _coords(rank, sizes, order)
    return [
        r
        for r in range(_world(sizes))
        if all(c == mine[a] for a, c in _coords(r, sizes, order).items() if a != axis)
    ]


def _describe(sizes: dict) -> str:
    return " × ".join(f"{a}{sizes[a]}" for a in ORDER)


@exercise(
    "9b.1",
    "the ranks of one group on a 5-axis grid",
    refuses=("course_lib.mesh:GridLayout.groups", "course_lib.mesh:GridLayout.coordinates"),
)
def group_of(learner_fn: Callable[..., Any]) -> None:
    for sizes in GRIDS:
        layout = GridLayout(**sizes)
        for axis in ORDER:
            for rank in range(layout.world_size):
                expected = next(g for g in layout.groups(axis) if rank in g)
                got = learner_fn(rank, axis, dict(sizes))
                try:
                    got_sorted = sorted(int(r) for r in got)
                except TypeError:
                    raise Mismatch(
                        f"{_describe(sizes)}, rank {rank}, axis {axis!r}: return a list of ranks, got {got!r}"
                    ) from None
                if got_sorted == expected:
                    continue
                hint = ""
                for why, order in WRONG_ORDERS.items():
                    if got_sorted == _group(rank, axis, sizes, order):
                        hint = f" — looks like {why}"
                        break
                if not hint and got_sorted == [rank]:
                    hint = (
                        " — only the rank itself: the group holds every rank that differs in this axis alone"
                    )
                if not hint and len(got_sorted) != sizes[axis]:
                    hint = f" — a group along {axis} has {sizes[axis]} ranks, one per {axis} index"
                raise Mismatch(
                    f"{_describe(sizes)}, rank {rank}, axis {axis!r}: expected {expected}, got {got_sorted}{hint}"
                )


@exercise(
    "9b.2",
    "a rank's rows of the global batch, micro-batch by micro-batch",
    refuses=("course_lib.train:micro_batch_rows", "course_lib.mesh:GridLayout.coordinates"),
)
def micro_batch_rows(learner_fn: Callable[..., Any]) -> None:
    for sizes in GRIDS:
        world = _world(sizes)
        for m in (1, 2):
            batch = 2 * m * world  # so that even a split over all ranks is a whole number
            for rank in range(world):
                expected = train.micro_batch_rows(rank, sizes, batch, m)
                got = learner_fn(rank, dict(sizes), batch, m)
                try:
                    got = [(int(a), int(b)) for a, b in got]
                except (TypeError, ValueError):
                    raise Mismatch(
                        f"{_describe(sizes)}, rank {rank}: return a list of (start, stop) pairs, got {got!r}"
                    ) from None
                if got == expected:
                    continue
                raise Mismatch(
                    f"{_describe(sizes)}, global batch {batch}, m = {m}: rank {rank} expected {expected}, "
                    f"got {got}{_rows_hint(rank, sizes, batch, m, got)}"
                )


def _rows_hint(rank: int, sizes: dict, batch: int, m: int, got: list) -> str:
    c = _coords(rank, sizes)

    def pieces(data_rank, data_ranks, parts):
        size = batch // (data_ranks * parts) if batch % (data_ranks * parts) == 0 else None
        if size is None:
            return None
        start = data_rank * size * parts
        return [(start + i * size, start + (i + 1) * size) for i in range(parts)]

    dp, ep = sizes["dp"], sizes["ep"]
    if got == pieces(rank, _world(sizes), m):
        return (
            " — you split the batch over all ranks; the tp, cp and pp ranks of one replica work on "
            "the same rows: only the dp·ep data ranks split the batch"
        )
    if ep > 1 and got == pieces(c["dp"], dp, m):
        return " — the ep ranks are data ranks too: each takes its own rows (dp·ep shares, not dp)"
    if ep > 1 and dp > 1 and got == pieces(c["ep"] * dp + c["dp"], dp * ep, m):
        return " — data rank is dp_index·ep + ep_index (ep varies faster), not ep_index·dp + dp_index"
    if m > 1 and got == pieces(c["dp"] * ep + c["ep"], dp * ep, 1):
        return f" — one piece: cut your share into m = {m} micro-batches (global = micro × m × dp·ep)"
    return ""


@exercise(
    "9b.3",
    "model-state bytes of one block on one rank",
    refuses=("course_lib.train:block_state_bytes", "course_lib.zero:formula_bytes"),
)
def block_state_bytes(learner_fn: Callable[..., Any]) -> None:
    cases = [
        (d, h, tp, dp, sharding)
        for d, h in ((64, 256), (32, 96))
        for tp, dp in ((1, 1), (2, 1), (1, 4), (2, 2), (4, 2))
        for sharding in train.SHARDINGS
    ]
    for d, h, tp, dp, sharding in cases:
        expected = train.block_state_bytes(d, h, tp, dp, sharding)
        got = learner_fn(d, h, tp, dp, sharding)
        if got is not None and abs(got - expected) <= 1e-9 * expected:
            continue
        raise Mismatch(
            f"d_model={d}, d_hidden={h}, tp={tp}, dp={dp}, sharding={sharding!r}: expected {expected:,} bytes, "
            f"got {got if got is None else f'{got:,.0f}'}{_bytes_hint(d, h, tp, dp, sharding, got)}"
        )


def _bytes_hint(d, h, tp, dp, sharding, got) -> str:
    if got is None:
        return " — return the number of bytes"
    split = 3 * d * d + 3 * d + d * d + h * d + h + d * h
    whole = 2 * 2 * d + 2 * d
    stage = train.ZERO_STAGE.get(sharding, 3)

    def total(psi, shard_over=dp, stage=stage, per=(4, 4, 8)):
        p, g, o = per
        return (
            p * psi / (shard_over if stage >= 3 else 1)
            + g * psi / (shard_over if stage >= 2 else 1)
            + o * psi / (shard_over if stage >= 1 else 1)
        )

    psi = split / tp + whole
    wrong = [
        (
            total((split + whole) / tp),
            "the LayerNorms and the row-parallel biases are not split over tp: "
            "every tp rank holds them whole",
        ),
        (total(psi, shard_over=dp * tp), "ZeRO shards over the dp ranks only, not over dp·tp"),
        (
            total(psi, per=(4, 4, 4)),
            "Adam keeps two moments per parameter: 8 bytes of optimizer state in fp32",
        ),
        (total(split / tp), "the replicated parameters (LayerNorms, row-parallel biases) count too"),
        (total(psi - 3 * d / tp - h / tp - 2 * d), "the biases count too"),
    ]
    wrong += [
        (
            total(psi, stage=s),
            f"that is stage {s}'s memory; {sharding} shards "
            + {0: "nothing", 1: "the optimizer states", 2: "optimizer states and gradients", 3: "all three"}[
                stage
            ],
        )
        for s in (0, 1, 2, 3)
        if s != stage
    ]
    for value, why in wrong:
        if (
            abs(got - value) <= 1e-9 * max(value, 1)
            and abs(value - train.block_state_bytes(d, h, tp, dp, sharding)) > 0.5
        ):
            return f" — {why}"
    return ""
