"""Check cells: run a learner's code on N ranks and say, in one line, how it went.

Each chapter has a module here (``course_lib.checks.collectives`` for chapter
01, ...) whose check functions are declared with :func:`exercise`:

    @exercise("1.1", "broadcast from send/recv")
    def broadcast(learner_fn):
        ...raise Mismatch("rank 2: element [3] expected 7.0, got 0.0") on a wrong answer

Calling a check prints exactly one line:

    ✔ 1.1 broadcast from send/recv
    ✘ 1.1 broadcast from send/recv — rank 2: element [3] expected 7.0, got 0.0
    · 1.1 broadcast from send/recv — not attempted

and records the result: in :data:`RESULTS`, and as a JSON line appended to the
file named by ``$COURSE_RESULTS`` when that is set (the grader reads it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import pkgutil
import sys
import textwrap
import traceback
import types
from dataclasses import asdict, dataclass

import cloudpickle
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from course_lib import launch
from course_lib.chapters import chapter_of_exercise, exercise_key
from course_lib.launch import DeadlockError, LaunchTimeout, RankError

PASSED, FAILED, NOT_ATTEMPTED, ERROR = "passed", "failed", "not attempted", "error"
_MARKS = {PASSED: "✔", FAILED: "✘", NOT_ATTEMPTED: "·", ERROR: "✘"}


class Mismatch(AssertionError):
    """A learner's result differs from the reference; the message says where."""


@dataclass
class Result:
    id: str
    title: str
    status: str
    message: str = ""

    def _ipython_display_(self):
        """Show nothing: the check already printed its line (no second copy in a cell)."""

    def line(self) -> str:
        head = f"{_MARKS[self.status]} {self.id} {self.title}"
        if self.status == PASSED:
            return head
        if self.status == NOT_ATTEMPTED:
            return f"{head} — not attempted"
        return f"{head} — {self.message}"


#: Every exercise of every imported chapter module: id -> (title, check function).
EXERCISES: dict[str, tuple[str, callable]] = {}
#: Results of the checks run in this kernel, in order.
RESULTS: list[Result] = []


def exercise(ex_id: str, title: str):
    """Declare a check function for exercise ``ex_id``; see the module doc."""
    exercise_key(ex_id)  # a malformed id fails at import, not in a learner's table

    def decorate(check):
        @functools.wraps(check)
        def run_check(*args, **kwargs):
            result = Result(ex_id, title, PASSED)
            try:
                check(*args, **kwargs)
            except BaseException as exc:  # noqa: B902 - a check must never crash the notebook
                if isinstance(exc, KeyboardInterrupt):
                    raise
                result.status, result.message = classify(exc)
            _record(result)
            print(wrap(result.line()), flush=True)
            return result

        EXERCISES[ex_id] = (title, run_check)
        return run_check

    return decorate


#: Columns a printed line may take: JupyterLab breaks longer lines anywhere, even mid-word.
LINE_WIDTH = 96


def wrap(text: str, width: int = LINE_WIDTH) -> str:
    """Break each long line of ``text`` between words, continuing indented under its start."""
    out = []
    for line in text.splitlines() or [""]:
        indent = " " * (len(line) - len(line.lstrip()) + 2)
        out.append(
            textwrap.fill(
                line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
            )
            if len(line) > width
            else line
        )
    return "\n".join(out)


def classify(exc: BaseException) -> tuple[str, str]:
    """Map what a check raised to (status, one-line message)."""
    if isinstance(exc, NotImplementedError) or getattr(exc, "exc_type", "") == "NotImplementedError":
        return NOT_ATTEMPTED, ""
    if isinstance(exc, Mismatch):
        return FAILED, str(exc)
    if isinstance(exc, DeadlockError):
        return FAILED, "deadlock: " + str(exc).splitlines()[0]
    if isinstance(exc, LaunchTimeout):
        return FAILED, "timed out: " + str(exc).splitlines()[0]
    if isinstance(exc, RankError):
        return ERROR, f"rank {exc.rank} raised {_last_line(str(exc))}"
    return ERROR, "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]


def _last_line(text: str) -> str:
    """The exception line of a traceback text (its last line that names an error)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith(("(", " "))]
    return lines[-1] if lines else text.strip()[:200]


def _record(result: Result) -> None:
    RESULTS.append(result)
    path = os.environ.get("COURSE_RESULTS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(result)) + "\n")


def exercises_for_chapter(chapter: str | int) -> dict[str, str]:
    """All exercise ids -> titles of a chapter ("3", "4b"; an int for a plain number), in order.

    Imports every check module first, so every chapter's exercises are registered.
    """
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    ids = [i for i in EXERCISES if chapter_of_exercise(i) == str(chapter)]
    return {i: EXERCISES[i][0] for i in sorted(ids, key=exercise_key)}


# ----------------------------------------------------------------------------
# comparisons with a diagnostic a learner can act on


def compare(
    got,
    expected,
    what: str = "result",
    rank: int | None = None,
    exact: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> None:
    """Raise :class:`Mismatch` saying which rank/element differs, else return."""
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


def run_learner(
    n: int,
    rank_fn,
    learner_fn,
    *args,
    timeout: float = 20.0,
    refusals=(),
    deadlock_hint: str = "",
    label: str | None = None,
    **launch_options,
):
    """Run ``rank_fn(payload, *args)`` on n ranks, ``payload`` carrying the learner's function
    by value (:func:`learner_in_rank` unpacks it); a deadlock, an endless loop or a refused
    built-in becomes a one-line Mismatch that starts with ``label`` (default "N=n")."""
    label = f"N={n}" if label is None else label
    payload = launch.dumps_by_value((learner_fn,))
    refused = {cls.__name__ for cls in (BuiltinUsed, *refusals)}
    try:
        return launch.run(rank_fn, n, payload, *args, timeout=timeout, **launch_options)
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


def learner_in_rank(payload):
    """The learner's function or class that :func:`run_learner` packed, unpickled inside a rank."""
    (learner,) = cloudpickle.loads(payload)
    launch.count_calls_from_here()
    return learner


def summary() -> str:
    """One line: how many checks of this kernel passed."""
    passed = sum(r.status == PASSED for r in RESULTS)
    return f"{passed} of {len(RESULTS)} checks passed"


# ----------------------------------------------------------------------------
# switching built-ins off while a learner's code runs (inside the ranks)

#: Everything in torch.distributed that moves data between ranks except point-to-point.
COLLECTIVES = tuple(name for name in launch.COLLECTIVE_CALLS if hasattr(c10d, name))


class BuiltinUsed(RuntimeError):
    """A learner's function called a built-in that its exercise asks them to build."""


def learner_functions(fn) -> list:
    """``fn`` and the learner's functions it reaches through globals and closures (not libraries')."""
    module_dicts = {id(vars(m)) for m in list(sys.modules.values()) if m is not None}
    found, todo, seen = [], [fn], set()
    while todo:
        f = todo.pop()
        if not isinstance(f, types.FunctionType) or id(f) in seen:
            continue
        seen.add(id(f))
        if f is not fn and id(f.__globals__) in module_dicts:
            continue  # a library's function: its module namespace is patched separately
        found.append(f)
        todo += list(f.__globals__.values()) + [
            c.cell_contents for c in f.__closure__ or () if _cell_is_set(c)
        ]
    return found


def _cell_is_set(cell) -> bool:
    try:
        _ = cell.cell_contents
        return True
    except ValueError:  # a closure variable not assigned yet
        return False


def send_recv_only(ex_id: str, learner_fn):
    """Make every built-in collective raise while the learner's function runs."""
    return builtins_switched_off(
        learner_fn, COLLECTIVES, f"exercise {ex_id} must be built from send/recv only"
    )


@contextlib.contextmanager
def builtins_switched_off(learner_fn, names, why: str, namespaces=(dist, c10d), shown_as: str = "dist"):
    """Make ``dist.<name>`` for each of ``names`` raise :class:`BuiltinUsed` saying ``why``.

    Also where the learner imported one by name (``from torch.distributed import
    broadcast``): by now that is the original function in their globals or a
    closure, so it is swapped there too, and everything is restored afterwards.
    ``namespaces`` and ``shown_as`` switch off a library's functions instead (``moe.route``).
    """
    saved = [(ns, name, getattr(ns, name)) for ns in namespaces for name in names if hasattr(ns, name)]
    by_identity = {id(fn): name for _, name, fn in saved}
    functions = learner_functions(learner_fn)
    in_globals = {
        (id(f.__globals__), key): (f.__globals__, key, v)
        for f in functions
        for key, v in list(f.__globals__.items())
        if id(v) in by_identity
    }
    in_cells = [
        (c, c.cell_contents)
        for f in functions
        for c in f.__closure__ or ()
        if _cell_is_set(c) and id(c.cell_contents) in by_identity
    ]

    def refusing(name):
        def refuse(*args, **kwargs):
            raise BuiltinUsed(f"{why}: you called {shown_as}.{name}")

        return refuse

    try:
        for ns, name, _ in saved:
            setattr(ns, name, refusing(name))
        for g, key, v in in_globals.values():
            g[key] = refusing(by_identity[id(v)])
        for cell, v in in_cells:
            cell.cell_contents = refusing(by_identity[id(v)])
        yield
    finally:
        for ns, name, fn in saved:
            setattr(ns, name, fn)
        for g, key, v in in_globals.values():
            g[key] = v
        for cell, v in in_cells:
            cell.cell_contents = v
