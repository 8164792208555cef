"""Checks for chapter 04b: tensor parallelism on a grid (2D SUMMA, 3D).

4b.1 and 4b.3 are arithmetic on the grid: the learner's function is called for every rank
of several grids, in this process, and compared with the course's answer
(``course_lib.tensor_parallel_nd.owned_2d`` / ``owned_3d``). 4b.2 runs the learner's SUMMA
on a real 2×2 grid of 4 ranks, compares every rank's block of the product, and checks that
the algorithm is SUMMA's: 2q broadcasts and nothing else. Inside every check the course's
own module (``course_lib.tp_nd``) is switched off: it is the answer.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from course_lib.checks import Mismatch, compare, exercise, learner_in_rank, run_learner
from course_lib.checks.refusal import CourseCodeUsed, module_names_switched_off

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: Seconds one launch may take; a learner's deadlock is reported after about this long.
TIMEOUT = 20.0
GRIDS_2D = (2, 3, 1)  # q = 1 last: there every mistake of orientation gives the same block
GRIDS_3D = (2, 3, 1)


@contextlib.contextmanager
def course_nd_switched_off(ex_id: str, learner: Callable[..., Any]) -> Iterator[None]:
    """Every public function and class of course_lib.tp_nd raises while the learner's code runs
    (also where the learner imported one by name). A Grid made before keeps working."""
    from course_lib import tensor_parallel_nd as nd

    with module_names_switched_off(ex_id, learner, nd, "course_lib.tp_nd"):
        yield


def _numbered(rows: int, cols: int, start: int = 0) -> torch.Tensor:
    """A matrix whose every element is different: a wrong block cannot look right by chance."""
    return torch.arange(start, start + rows * cols, dtype=torch.float32).view(rows, cols)


def _call(ex_id: str, learner, *args):
    try:
        with course_nd_switched_off(ex_id, learner):
            return learner(*args)
    except CourseCodeUsed as exc:
        raise Mismatch(str(exc)) from None


def _pair(got, what: str, where: str):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise Mismatch(f"{where}: return two tensors ({what}), got {type(got).__name__}")
    return got


def _same(got, expected) -> bool:
    return isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got, expected)


# ----------------------------------------------------------------------------
# 4b.1 the blocks a rank owns on the 2D grid


def _blk(size, parts, index):
    step = size // parts
    return slice(index * step, (index + 1) * step)


def _blocks_2d(x, weight, q, i, j):
    b = weight.T
    return x[_blk(x.shape[0], q, i), _blk(x.shape[1], q, j)], b[
        _blk(b.shape[0], q, i), _blk(b.shape[1], q, j)
    ]


@exercise("4b.1", "the blocks rank (i, j) owns on the q×q grid")
def owned_blocks(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(x, weight, q, rank) -> (X_ij, B_ij)`` with B = weight.T, rank = i·q + j."""
    for q in GRIDS_2D:
        x, weight = _numbered(4 * q, 2 * q), _numbered(6 * q, 2 * q, start=1000)  # X (M, K), weight (F, K)
        for rank in range(q * q):
            i, j = rank // q, rank % q
            where = f"q={q}, rank {rank} = (i={i}, j={j})"
            got_x, got_b = _pair(_call("4b.1", learner_fn, x, weight, q, rank), "X_ij and B_ij", where)
            want_x, want_b = _blocks_2d(x, weight, q, i, j)
            swapped_x, swapped_b = _blocks_2d(x, weight, q, j, i)
            if not _same(got_x, want_x):
                hint = ""
                if _same(got_x, swapped_x):
                    hint = " — i and j are swapped: rank = i·q + j, so i = rank // q (the grid row), j = rank % q"
                raise Mismatch(f"{where}: X's block: {_why(got_x, want_x)}{hint}")
            if not _same(got_b, want_b):
                hint = next(
                    (
                        f" — {why}"
                        for why, wrong in _WRONG_B.items()
                        if all(
                            _same(_b_of(learner_fn, x, weight, q, r), wrong(weight, q, r))
                            for r in range(q * q)
                        )
                    ),
                    "",
                )
                raise Mismatch(f"{where}: B's block: {_why(got_b, want_b)}{hint}")


def _b_of(learner_fn, x, weight, q, rank):
    got = _call("4b.1", learner_fn, x, weight, q, rank)
    return got[1] if isinstance(got, (tuple, list)) and len(got) == 2 else None


def _cut(t, q, i, j):
    return t[_blk(t.shape[0], q, i), _blk(t.shape[1], q, j)]


#: B's block as learners often get it wrong, checked on every rank of the grid: hint -> block(weight, q, rank).
_WRONG_B = {
    "i and j are swapped: rank = i·q + j, so i = rank // q (the grid row), j = rank % q": (
        lambda w, q, r: _cut(w.T, q, r % q, r // q)
    ),
    "a transposed block: you cut weight (F, K) at (i, j); B = weight.T is (K, F), so B_ij is weight's "
    "block (j, i), transposed": lambda w, q, r: _cut(w, q, r // q, r % q),
    "that is B_ij transposed (the block as weight stores it, (F/q, K/q)): return the block of B = "
    "weight.T, shape (K/q, F/q)": lambda w, q, r: _cut(w, q, r % q, r // q),
}


def _why(got, expected) -> str:
    if not isinstance(got, torch.Tensor):
        return f"expected a tensor, got {type(got).__name__}"
    if got.shape != expected.shape:
        return f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    index = tuple(int(k) for k in (got != expected).nonzero()[0])
    return f"element {list(index)} is {got[index].item():g}, expected {expected[index].item():g}"


# ----------------------------------------------------------------------------
# 4b.2 SUMMA on a real 2×2 grid


SUMMA_Q = 2
SUMMA_M, SUMMA_K, SUMMA_F = 8, 12, 20  # blocks 4×6 and 6×10: a transposed block has the wrong shape


def _summa_rank(payload, x, b):
    from course_lib import tensor_parallel_nd as nd
    from course_lib.traffic import count_traffic

    learner = learner_in_rank(payload)
    grid = nd.make_grid("2d")  # made before the course's module is switched off
    i, j = grid.coords
    x_block, b_block = nd.block(x, grid.q, i, j).clone(), nd.block(b, grid.q, i, j).clone()
    x_before, b_before = x_block.clone(), b_block.clone()
    with course_nd_switched_off("4b.2", learner), count_traffic() as traffic:
        out = learner(x_block, b_block, grid)
    return {
        "out": out.detach().clone() if isinstance(out, torch.Tensor) else out,
        "calls": [c.op for c in traffic.calls],
        "x changed": not torch.equal(x_block, x_before),
        "b changed": not torch.equal(b_block, b_before),
    }


def _summa_hints(x, b, q, i, j) -> list:
    """What typical wrong SUMMAs compute on rank (i, j), with the mistake's name."""

    def xb(r, c):
        return x[_blk(x.shape[0], q, r), _blk(x.shape[1], q, c)]

    def bb(r, c):
        return b[_blk(b.shape[0], q, r), _blk(b.shape[1], q, c)]

    swapped = sum(xb(k, j) @ bb(i, k) for k in range(q)) if xb(0, j).shape[1] == bb(i, 0).shape[0] else None
    own = q * (xb(i, j) @ bb(i, j))
    zeros = (xb(i, i) @ bb(i, i)) if i == j else torch.zeros_like(own)
    hints = [
        (
            own,
            "you multiplied your own blocks X_ij·B_ij at every step (accumulating before the broadcast "
            "arrived?): step k must multiply the blocks its broadcasts bring, X_ik from rank (i, k) and "
            "B_kj from rank (k, j); with async_op=True, wait() for both before multiplying",
        ),
        (
            zeros,
            "only the steps where this rank sent its own blocks count: the other steps multiplied buffers "
            "before the broadcast filled them (wait for each broadcast, then multiply)",
        ),
        (xb(i, 0) @ bb(0, j), "that is only step k = 0: SUMMA adds X_ik·B_kj over all q steps"),
    ]
    if swapped is not None:
        hints.insert(
            0,
            (
                swapped,
                "row and column groups swapped: X_ik travels along grid row i (grid.group('row'), "
                "source grid.ranks('row')[k]) and B_kj along grid column j (grid.group('col'))",
            ),
        )
    return hints


@exercise("4b.2", "SUMMA: q steps of row and column broadcasts")
def summa(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(x_block, b_block, grid) -> C_ij`` on a real 2×2 grid (4 ranks)."""
    q = SUMMA_Q
    g = torch.Generator().manual_seed(42)
    x, b = torch.randn(SUMMA_M, SUMMA_K, generator=g), torch.randn(SUMMA_K, SUMMA_F, generator=g)
    c = x @ b
    results = run_learner(
        q * q,
        _summa_rank,
        learner_fn,
        x,
        b,
        timeout=TIMEOUT,
        refusals=(CourseCodeUsed,),
        label=f"{q}×{q} grid",
        deadlock_hint=" (every rank must make the same broadcasts in the same order: two per step)",
        backend="gloo",
    )
    for rank, res in enumerate(results):  # first: did a rank write into its own blocks?
        if res["x changed"] or res["b changed"]:
            name = "x_block" if res["x changed"] else "b_block"
            raise Mismatch(
                f"{q}×{q} grid, rank {rank}: your {name} was overwritten: broadcast into a fresh buffer "
                "(a copy of your block on the source rank, torch.empty_like on the others), not into "
                "your own block, which the source still needs to send"
            )
    for rank, res in enumerate(results):
        i, j = rank // q, rank % q
        where = f"{q}×{q} grid, rank {rank} = (i={i}, j={j})"
        expected = c[_blk(SUMMA_M, q, i), _blk(SUMMA_F, q, j)]
        out = res["out"]
        if not isinstance(out, torch.Tensor):
            raise Mismatch(f"{where}: return C_ij as a tensor, got {type(out).__name__}")
        try:
            compare(out, expected, "C_ij", rank=rank, rtol=1e-4, atol=1e-4)
        except Mismatch as exc:
            hint = next(
                (
                    h
                    for wrong, h in _summa_hints(x, b, q, i, j)
                    if out.shape == wrong.shape and torch.allclose(out, wrong, atol=1e-4)
                ),
                "",
            )
            raise Mismatch(f"{q}×{q} grid: {exc}" + (f" — {hint}" if hint else "")) from None
        calls = res["calls"]
        if calls.count("broadcast") != 2 * q or len(calls) != 2 * q:
            others = sorted({op for op in calls if op != "broadcast"})
            raise Mismatch(
                f"{where}: the product is right, but SUMMA moves exactly one block of X along the row and "
                f"one of B along the column per step: expected {2 * q} broadcasts and nothing else, you made "
                f"{calls.count('broadcast')} broadcasts"
                + (f" and called {', '.join(others)}" if others else "")
            )


# ----------------------------------------------------------------------------
# 4b.3 the 3D index mapping


def _owned_3d(x, weight, q, a, b, c):
    def chunk(t, row_block, sub, col_block):
        return t[_blk(t.shape[0], q * q, row_block * q + sub), _blk(t.shape[1], q, col_block)]

    return chunk(x, a, b, c), chunk(weight, b, a, c)


#: Wrong answers learners often write: name -> (x chunk, weight chunk) as a function of (x, weight, q, rank).
def _wrong_3d(x, weight, q, rank):
    a, b, c = rank // (q * q), rank // q % q, rank % q
    r_a, r_b, r_c = rank % q, rank // q % q, rank // (q * q)

    def chunk(t, row_block, sub, col_block):
        return t[_blk(t.shape[0], q * q, row_block * q + sub), _blk(t.shape[1], q, col_block)]

    return {
        "the rank order is reversed: rank = a·q² + b·q + c, so a = rank // q², b = rank // q % q, c = rank % q": (
            chunk(x, r_a, r_b, r_c),
            chunk(weight, r_b, r_a, r_c),
        ),
        "X's rows are split along the wrong axis: X's block is (a, c) — row block a, input block c — and "
        "its rows are cut into q pieces along b": (chunk(x, a, c, b), None),
        "the weight's block is (b, c) — output block b, input block c — and its rows are cut into q pieces "
        "along a: you swapped the roles of a and b": (None, chunk(weight, a, b, c)),
    }


@exercise("4b.3", "the 3D index mapping: which chunks rank (a, b, c) holds")
def owned_chunks_3d(learner_fn: Callable[..., Any]) -> None:
    """Check ``learner_fn(x, weight, q, rank) -> (x chunk, weight chunk)`` on q×q×q cubes."""
    for q in GRIDS_3D:
        x, weight = (
            _numbered(2 * q * q, 2 * q),
            _numbered(3 * q * q, 2 * q, start=5000),
        )  # X (M, K), weight (F, K)
        for rank in range(q**3):
            a, b, c = rank // (q * q), rank // q % q, rank % q
            where = f"q={q}, rank {rank} = (a={a}, b={b}, c={c})"
            got = _pair(_call("4b.3", learner_fn, x, weight, q, rank), "x's chunk and weight's chunk", where)
            want = _owned_3d(x, weight, q, a, b, c)
            for k, what in enumerate(("x's chunk", "weight's chunk")):
                if _same(got[k], want[k]):
                    continue
                hint = next(
                    (
                        name
                        for name, wrong in _wrong_3d(x, weight, q, rank).items()
                        if wrong[k] is not None and _same(got[k], wrong[k])
                    ),
                    "",
                )
                if (
                    not hint
                    and isinstance(got[k], torch.Tensor)
                    and got[k].shape == want[k].T.shape != want[k].shape
                ):
                    hint = (
                        "a transposed block: keep the tensor's own orientation (the weight is stored (out, in): "
                        "its rows are output features, block b, its columns input features, block c)"
                    )
                raise Mismatch(f"{where}: {what}: {_why(got[k], want[k])}" + (f" — {hint}" if hint else ""))
