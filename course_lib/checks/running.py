"""Running a learner's code on ranks for a check: by value, out of the checking process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import cloudpickle

from course_lib import launch
from course_lib.checks.refusal import BuiltinUsed
from course_lib.checks.registry import Mismatch, _last_line
from course_lib.checks.submission import Submitted
from course_lib.launch import DeadlockError, LaunchTimeout, RankError

if TYPE_CHECKING:
    from collections.abc import Callable


def run_learner(
    n: int,
    rank_fn: Callable[..., Any],
    learner_fn: Callable[..., Any] | type | Submitted,
    *args,
    timeout: float = 20.0,
    refusals: tuple[type[BaseException], ...] = (),
    deadlock_hint: str = "",
    label: str | None = None,
    **launch_options,
) -> list[Any]:
    """Run ``rank_fn(payload, *args)`` on n ranks, ``payload`` carrying the learner's function
    by value (:func:`learner_in_rank` unpacks it); a deadlock, an endless loop or a refused
    built-in becomes a one-line Mismatch that starts with ``label`` (default "N=n")."""
    label = f"N={n}" if label is None else label
    # A submitted answer (the grader) is already the bytes the ranks unpickle.
    payload = (
        learner_fn.in_ranks() if isinstance(learner_fn, Submitted) else launch.dumps_by_value((learner_fn,))
    )
    refused = {cls.__name__ for cls in (BuiltinUsed, *refusals)}
    try:
        return launch.run(rank_fn, n, payload, *args, timeout=timeout, safe_results=True, **launch_options)
    except LaunchTimeout as exc:
        summary, where = str(exc).splitlines()[0], "; ".join(exc.rank_states)
        if isinstance(exc, DeadlockError):
            raise Mismatch(f"{label}: deadlock — {summary} ({where}){deadlock_hint}") from None
        raise Mismatch(f"{label}: timed out (an endless loop?) — {summary} ({where})") from None
    except RankError as exc:
        if exc.exc_type in refused:
            # the exception line: ranks that failed after this one add a note below it
            message = _last_line(str(exc)).split(": ", 1)[-1]
            raise Mismatch(f"{message} (rank {exc.rank}, {label})") from None
        if exc.lost_connection:
            raise Mismatch(
                f"{label}: deadlock — rank {exc.rank} lost its connection while its peers "
                f"waited: is there a recv with no matching send, or do the ranks make "
                f"different calls?{deadlock_hint}"
            ) from None
        raise


def learner_in_rank(payload: bytes) -> Any:
    """The learner's function or class that :func:`run_learner` packed, unpickled inside a rank."""
    (learner,) = cloudpickle.loads(payload)
    launch.count_calls_from_here()
    return learner
