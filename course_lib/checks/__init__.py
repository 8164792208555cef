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

and records the result in :data:`RESULTS`. In the grader's kernel (``$COURSE_SUBMIT`` set)
a check cell judges nothing: it hands the answer to the grader, which runs the same check in
its own process (:mod:`course_lib.checks.submission`).

The pieces: :mod:`~course_lib.checks.registry` (exercises, results, one-line verdicts),
:mod:`~course_lib.checks.compare`, :mod:`~course_lib.checks.running` (answers on ranks),
:mod:`~course_lib.checks.refusal` (built-ins and the course's own code switched off) and
:mod:`~course_lib.checks.submission`.
"""

from __future__ import annotations

from course_lib.checks.compare import compare, compare_ranks
from course_lib.checks.registry import (
    _MARKS,
    BUILDS_ON,
    ERROR,
    EXERCISES,
    FAILED,
    LINE_WIDTH,
    NOT_ATTEMPTED,
    PASSED,
    RESULTS,
    Mismatch,
    Result,
    _last_line,
    _record,
    classify,
    exercise,
    exercises_for_chapter,
    summary,
    verdict,
    wrap,
)

#: Names from the modules that import torch, loaded when first used: a grader's kernel of a chapter
#: without torch (the tests' fake chapter) then starts without it (~2 s of CPU), as it only hands
#: answers over.
_LAZY = {
    "COLLECTIVES": "refusal",
    "BuiltinUsed": "refusal",
    "builtins_switched_off": "refusal",
    "learner_functions": "refusal",
    "send_recv_only": "refusal",
    "learner_in_rank": "running",
    "run_learner": "running",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "COLLECTIVES",
    "ERROR",
    "BUILDS_ON",
    "EXERCISES",
    "FAILED",
    "LINE_WIDTH",
    "NOT_ATTEMPTED",
    "PASSED",
    "RESULTS",
    "BuiltinUsed",
    "Mismatch",
    "Result",
    "builtins_switched_off",
    "classify",
    "compare",
    "compare_ranks",
    "exercise",
    "exercises_for_chapter",
    "learner_functions",
    "learner_in_rank",
    "run_learner",
    "send_recv_only",
    "summary",
    "verdict",
    "wrap",
    "_MARKS",
    "_last_line",
    "_record",
]
