"""The checks' registry: exercises, their one-line results, and where results are recorded."""

from __future__ import annotations

import functools
import importlib
import pkgutil
import textwrap
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from course_lib.chapters import chapter_of_exercise, exercise_key

# submission imports no torch; refusal and the launcher do, and are imported where a check
# judges: a grader's kernel only hands answers over, and one whose chapter needs no torch then
# starts without it.
from course_lib.checks import submission

if TYPE_CHECKING:
    from collections.abc import Callable

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
#: Exercise id -> the course's own implementations its checks refuse ("module:qualname").
REFUSES: dict[str, tuple[str, ...]] = {}
#: Exercise id -> the earlier exercises it builds on.
BUILDS_ON: dict[str, tuple[str, ...]] = {}
#: Results of the checks run in this kernel, in order.
RESULTS: list[Result] = []


def exercise(
    ex_id: str, title: str, builds_on: tuple[str, ...] = (), refuses: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Result | None]]:
    """Declare a check function for exercise ``ex_id``; see the module doc.

    ``builds_on``: the earlier exercises whose answers this one's answer uses; when one of
    them does not pass, a failure here says to fix that one first.
    ``refuses``: the course's own implementations of what the exercise asks
    ("module:qualname"); whenever the learner's function runs (here, in a rank or in the
    grader's worker) they raise, however the function reaches them.
    """
    exercise_key(ex_id)  # a malformed id fails at import, not in a learner's table
    for earlier in builds_on:
        exercise_key(earlier)
    if builds_on:
        BUILDS_ON[ex_id] = tuple(builds_on)
    if refuses:
        REFUSES[ex_id] = tuple(refuses)

    def decorate(check):
        @functools.wraps(check)
        def run_check(*args, **kwargs):
            if submission.grading():  # the grader's kernel: hand the answer over, judge nothing here
                submission.submit(ex_id, title, args, kwargs)
                return None
            result = Result(ex_id, title, PASSED)
            if refuses:
                from course_lib.checks.refusal import Refusing

                args = tuple(Refusing(a, ex_id, refuses) if _is_function(a) else a for a in args)
            try:
                check(*args, **kwargs)
            except BaseException as exc:  # noqa: B902 - a check must never crash the notebook
                if isinstance(exc, KeyboardInterrupt):
                    raise
                result.status, result.message = classify(exc)
                result.message = _after_earlier(ex_id, result)
            _record(result)
            print(wrap(result.line()), flush=True)
            return result

        EXERCISES[ex_id] = (title, run_check)
        return run_check

    return decorate


#: Columns a printed line may take: JupyterLab breaks longer lines anywhere, even mid-word.
LINE_WIDTH = 96


def _is_function(answer) -> bool:
    """A function-like answer (a def, a lambda, a partial), not a class."""
    return callable(answer) and not isinstance(answer, type)


def _after_earlier(ex_id: str, result: Result) -> str:
    """The message, led by "fix 3.1 first" when an earlier exercise this builds on did not pass."""
    if result.status not in (FAILED, ERROR):
        return result.message
    latest = {r.id: r.status for r in RESULTS}
    before = [e for e in BUILDS_ON.get(ex_id, ()) if latest.get(e) not in (None, PASSED)]
    if not before:
        return result.message
    return f"fix {' and '.join(before)} first (this exercise builds on it) — {result.message}"


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
    from course_lib.checks.refusal import BuiltinUsed
    from course_lib.launch import DeadlockError, LaunchTimeout, RankError

    if isinstance(exc, NotImplementedError) or getattr(exc, "exc_type", "") == "NotImplementedError":
        return NOT_ATTEMPTED, ""
    if isinstance(exc, (Mismatch, BuiltinUsed)):  # a wrong answer, or the course's own code called
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


def exercises_for_chapter(chapter: str | int) -> dict[str, str]:
    """All exercise ids -> titles of a chapter ("3", "4b"; an int for a plain number), in order.

    Imports every check module first, so every chapter's exercises are registered.
    """
    package = importlib.import_module("course_lib.checks")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"course_lib.checks.{info.name}")
    ids = [i for i in EXERCISES if chapter_of_exercise(i) == str(chapter)]
    return {i: EXERCISES[i][0] for i in sorted(ids, key=exercise_key)}


def summary() -> str:
    """One line: how many checks of this kernel passed."""
    passed = sum(r.status == PASSED for r in RESULTS)
    return f"{passed} of {len(RESULTS)} checks passed"


def verdict(ex_id: str, args: list, kwargs: dict) -> tuple[str, str]:
    """(status, message) of exercise ``ex_id`` for a submitted answer, judged in this process.

    ``args``/``kwargs`` are :class:`~course_lib.checks.submission.Submitted` answers; the
    check runs here, the answer only in ranks and worker processes.
    """
    check = EXERCISES[ex_id][1].__wrapped__
    for answer in (*args, *kwargs.values()):
        answer.course_refusals = (ex_id, REFUSES.get(ex_id, ()))
    try:
        check(*args, **kwargs)
        return PASSED, ""
    except BaseException as exc:  # noqa: B902 - a learner's answer must not stop the grader
        if isinstance(exc, KeyboardInterrupt):
            raise
        return classify(exc)
    finally:
        for answer in (*args, *kwargs.values()):
            answer.close()
