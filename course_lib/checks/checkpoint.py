"""Checks for chapter 09c: where a box a rank needs overlaps a box on disk.

9c.1 ``overlap(want_offsets, want_sizes, have_offsets, have_sizes)``: the overlap of two boxes of
one tensor, as ``(start, stop)`` per dimension in each box's own coordinates, or None. No processes: the check calls the
learner's function on many pairs of boxes (1-D and 2-D, nested, crossing, touching, apart),
copies with the answer, and compares with the block the two boxes share; a wrong answer that
matches a common mistake gets that mistake named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from course_lib import checkpoint
from course_lib.checks import Mismatch, exercise

if TYPE_CHECKING:
    from collections.abc import Callable

#: (want offsets, want sizes, have offsets, have sizes) on a 12 × 10 tensor, and 1-D ones.
CASES = [
    ((0, 0), (6, 10), (3, 0), (6, 10)),  # rows crossing
    ((2, 3), (4, 4), (0, 0), (12, 10)),  # want inside have
    ((0, 0), (12, 10), (5, 2), (2, 3)),  # have inside want
    ((0, 0), (12, 5), (0, 5), (12, 5)),  # side by side: touching, no overlap
    ((0, 0), (6, 10), (6, 0), (6, 10)),  # one above the other: touching
    ((1, 1), (3, 3), (8, 7), (2, 2)),  # apart
    ((4, 6), (5, 4), (2, 2), (6, 6)),  # corner crossing
    ((0,), (7,), (4,), (8,)),  # 1-D crossing
    ((3,), (2,), (0,), (12,)),  # 1-D inside
    ((0,), (4,), (4,), (4,)),  # 1-D touching
]


def _copy(fn, want_o, want_s, have_o, have_s) -> torch.Tensor | None | str:
    """Fill the ``want`` block of a tensor holding 1..N from the ``have`` block with ``fn``'s slices."""
    shape = (12, 10) if len(want_o) == 2 else (12,)
    full = torch.arange(1, torch.Size(shape).numel() + 1, dtype=torch.float32).view(shape)

    def block(o, s):
        return full[tuple(slice(a, a + b) for a, b in zip(o, s))]

    want, have = torch.zeros(want_s), block(have_o, have_s)
    answer = fn(want_o, want_s, have_o, have_s)
    if answer is None:
        return None
    try:
        want_ranges, have_ranges = answer
        want[checkpoint.as_slices(want_ranges)] = have[checkpoint.as_slices(have_ranges)]
    except (TypeError, ValueError, IndexError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return want


def _expected(want_o, want_s, have_o, have_s):
    return _copy(checkpoint.overlap, want_o, want_s, have_o, have_s)


@exercise("9c.1", "where a wanted box overlaps a saved box", refuses=("course_lib.checkpoint:overlap",))
def overlap(learner_fn: Callable[..., Any]) -> None:
    for case in CASES:
        expected, got = _expected(*case), _copy(learner_fn, *case)
        if expected is None and got is None:
            continue
        if (
            isinstance(expected, torch.Tensor)
            and isinstance(got, torch.Tensor)
            and torch.equal(expected, got)
        ):
            continue
        want_o, want_s, have_o, have_s = case
        where = f"want offsets {want_o} sizes {want_s}, have offsets {have_o} sizes {have_s}"
        if expected is None:
            raise Mismatch(
                f"{where}: the boxes share no element (they only touch or lie apart), expected None, "
                f"got {_short(learner_fn(*case))}{_hint_touching(case)}"
            )
        if got is None:
            raise Mismatch(f"{where}: the boxes overlap, expected a pair of (start, stop) lists, got None")
        if isinstance(got, str):
            raise Mismatch(f"{where}: copying with your ranges failed ({got}){_hint(learner_fn, case)}")
        raise Mismatch(
            f"{where}: copying with your ranges gave other numbers than the shared block{_hint(learner_fn, case)}"
        )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."


def _hint_touching(case) -> str:
    want_o, want_s, have_o, have_s = case
    touching = any(w + ws == h or h + hs == w for w, ws, h, hs in zip(want_o, want_s, have_o, have_s))
    return (
        " — boxes that only touch share nothing: the end of a box is exclusive (use <, not <=)"
        if touching
        else ""
    )


def _hint(fn, case) -> str:
    answer = fn(*case)
    want_o, want_s, have_o, have_s = case
    lo = [max(w, h) for w, h in zip(want_o, have_o)]
    hi = [min(w + ws, h + hs) for w, ws, h, hs in zip(want_o, want_s, have_o, have_s)]
    global_ranges = [(a, z) for a, z in zip(lo, hi)]
    try:
        pair = tuple(answer)
    except TypeError:
        return ""
    expected = checkpoint.overlap(*case)
    if (
        expected is not None
        and len(pair) == 2
        and _ranges(pair[0]) == expected[1]
        and _ranges(pair[1]) == expected[0]
    ):
        return " — the pair is the other way round: (ranges in the wanted box, ranges in the saved box)"
    if len(pair) == 2 and any(_ranges(p) == global_ranges for p in pair):
        return (
            " — these are the overlap's global coordinates: each box's ranges are relative to its own "
            "offsets (subtract want_offsets, resp. have_offsets)"
        )
    return ""


def _ranges(value) -> list | None:
    """``value`` as a list of (start, stop) pairs, or None when it is not one."""
    try:
        return [(int(a), int(z)) for a, z in value]
    except (TypeError, ValueError):
        return None
