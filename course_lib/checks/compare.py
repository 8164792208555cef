"""Comparing a learner's tensors with the reference, with a diagnostic a learner can act on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from course_lib.checks.registry import Mismatch

if TYPE_CHECKING:
    import torch


def compare(
    got: Any,
    expected: torch.Tensor | list | tuple,
    what: str = "result",
    rank: int | None = None,
    exact: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> None:
    """Raise :class:`Mismatch` saying which rank/element differs, else return."""
    import torch  # here, not at the top: a kernel that only hands answers over never needs it

    where = f"rank {rank}: " if rank is not None else ""
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            n = len(got) if isinstance(got, (list, tuple)) else type(got).__name__
            raise Mismatch(f"{where}{what} should be a list of {len(expected)} items, got {n}")
        for i, (g, e) in enumerate(zip(got, expected)):
            compare(g, e, f"{what}[{i}]", rank, exact, rtol, atol)
        return
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"{where}{what} should be a tensor, got {type(got).__name__}")
    if got.shape != expected.shape:
        raise Mismatch(f"{where}{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if got.dtype != expected.dtype:
        raise Mismatch(f"{where}{what} has dtype {got.dtype}, expected {expected.dtype}")
    if exact or not expected.is_floating_point():
        bad = got != expected
    else:
        bad = ~torch.isclose(got, expected, rtol=rtol, atol=atol)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        count = int(bad.sum())
        raise Mismatch(
            f"{where}{what}{list(index)} expected {expected[index].item():g}, "
            f"got {got[index].item():g} ({count} of {got.numel()} elements differ)"
        )


def compare_ranks(got: list, expected: list, what: str = "result", **kwargs) -> None:
    """Compare per-rank results (as returned by ``launch.run``) rank by rank."""
    for rank, (g, e) in enumerate(zip(got, expected)):
        compare(g, e, what, rank, **kwargs)
