"""Grade learners' exercise notebooks headless.

    python -m course_lib.grade exercises/01_collectives.ipynb [more notebooks...]
        [--report grade-report.json] [--time-limit 600] [--exercises exercises/]

For each notebook (``.ipynb``, or a jupytext ``.py``) the grader takes the
canonical ``exercises/<same name>.ipynb``, puts the learner's *answer cells*
into it in place of the stubs and runs it in a fresh ``python3`` kernel.
Answer cells are found by their ``answer`` metadata, or else by the top-level
``def``/``class`` they define; everything else, the check cells included,
comes from the canonical notebook, so editing or deleting a check earns
nothing.

Where the verdict is decided. The kernel runs in an empty temporary folder, importing a copy
of the library; its check cells judge nothing: each hands its answer over as a cell output
(``course_lib.checks.submission``). After the notebook ran, this process runs every check on
the answers handed over by canonical cells: the learner's code runs only in rank processes
and worker processes, whose results come back in a format that cannot carry code. Nothing
the notebook does to its kernel changes a verdict; processes it leaves behind are ended; a
change to the library's files during grading turns later verdicts into errors. A plain
function's call in the worker may take at most min(60 s, T) (``CALL_TIMEOUT``).

Time limit. A notebook gets T seconds (``--time-limit``, default 600), counted
from when its kernel is up. Each cell may run for whatever is left of T, but
never for less than G = min(60 s, T). A cell that runs out of time is
interrupted (the kernel survives, with its state) and its exercise fails with
"time limit of T s reached"; the cells after it still run, each with at least
G seconds, so one endless loop does not take the later exercises down with it.
A cell that starts after T is used up and runs out of its G seconds as well
ends the run: the cells after it are not run and their exercises fail with the
time limit. A kernel that does not answer within RECOVERY_TIME seconds of an
interrupt, or that dies, also ends the run; the exercises it had not checked
yet are reported as errors.

Prints a table per notebook and a score line; writes a JSON report. Exit
status: 0 when every exercise of every notebook passed, 1 otherwise, 2 for a
usage error (no such file, no canonical exercise notebook, ...).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import hashlib
import importlib
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import jupytext
import nbformat
import psutil
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

from course_lib import build, chapters, checks, launch
from course_lib.checks import submission

if TYPE_CHECKING:
    from typing import TextIO

TIME_LIMIT = 600.0
#: Least time any cell gets, even after the notebook's budget is used up.
MIN_CELL_TIME = 60.0
#: How long a kernel may take to become responsive again after an interrupt.
RECOVERY_TIME = 10
STATUSES = (checks.PASSED, checks.FAILED, checks.NOT_ATTEMPTED, checks.ERROR)
_TIMEOUT_ENAME = "GraderTimeLimit"


class UsageError(Exception):
    """Bad arguments: reported on stderr with exit status 2."""


@dataclass
class CellRun:
    """What happened to one cell of the graded notebook."""

    index: int
    state: str = "skipped"  # skipped | ok | error | timeout | died | not run
    error: str = ""  # "Name: value" of the cell's exception, first line
    ename: str = ""
    reason: str = ""  # why it timed out / was not run
    out_of_time: bool = False  # for "not run": stopped by the time limit
    submissions: list = field(default_factory=list)  # answers its check calls handed over


# ----------------------------------------------------------------------------
# preparing the notebook


def read_learner_notebook(path: Path) -> nbformat.NotebookNode:
    if path.suffix == ".py":
        return jupytext.read(path, fmt="py:percent")
    return nbformat.read(path, as_version=4)


def splice(
    canonical: nbformat.NotebookNode, learner: nbformat.NotebookNode
) -> tuple[nbformat.NotebookNode, dict[str, int], set[str]]:
    """A copy of ``canonical`` with the learner's answer cells in place of its stubs.

    Returns (notebook, {answer name: cell index}, set of names the learner answered).
    """
    nb = copy.deepcopy(canonical)
    spots = build.answer_cells(nb)
    by_metadata, by_definition = {}, {}
    for cell in learner.cells:
        if cell.cell_type != "code":
            continue
        name = cell.get("metadata", {}).get("answer")
        if isinstance(name, str):
            by_metadata.setdefault(name, cell.source)
        for defined in build.defined_names(cell.source):
            by_definition.setdefault(defined, cell.source)
    answered = set()
    for name, index in spots.items():
        source = by_metadata.get(name, by_definition.get(name))
        if source is not None:
            nb.cells[index].source = source
            answered.add(name)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb, spots, answered


# ----------------------------------------------------------------------------
# running it


def run_notebook(
    nb: nbformat.NotebookNode, cwd: Path, time_limit: float, log_path: Path, env: dict | None = None
) -> list[CellRun]:
    """Execute ``nb`` in place, cell by cell, under the time policy of the module doc.

    The kernel runs in ``cwd`` with ``env``; its check cells hand their answers over
    (``$COURSE_SUBMIT``) instead of judging them: see :func:`submissions`.
    """
    runs = [CellRun(i) for i in range(len(nb.cells))]
    floor = min(MIN_CELL_TIME, time_limit)
    replies = {}
    client = NotebookClient(
        nb,
        kernel_name="python3",
        allow_errors=True,
        interrupt_on_timeout=True,
        error_on_timeout={"ename": _TIMEOUT_ENAME, "evalue": "time limit", "traceback": []},
        resources={"metadata": {"path": str(cwd)}},
        shell_timeout_interval=1,
        on_cell_executed=lambda cell_index, execute_reply, **_: replies.__setitem__(
            cell_index, execute_reply
        ),
    )
    token = uuid.uuid4().hex  # marks every process this kernel starts, to end them all after
    env = dict(os.environ if env is None else env, **{submission.SUBMIT_ENV: "1", _RUN_TOKEN: token})
    # The kernel process's own stdout/stderr (not the cells' output) go to a log:
    # startup chatter stays off the table, a crash message is kept for the report.
    stop = None  # (reason, out_of_time) once the run has ended early
    pending = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()]
    try:
        with open(log_path, "wb") as log, client.setup_kernel(env=env, stdout=log, stderr=subprocess.STDOUT):
            deadline = time.monotonic() + time_limit
            for index in pending:
                run = runs[index]
                if stop:
                    run.state, run.reason, run.out_of_time = "not run", stop[0], stop[1]
                    continue
                left = deadline - time.monotonic()
                client.timeout = max(1, math.ceil(max(left, floor)))
                try:
                    client.execute_cell(nb.cells[index], index)
                except DeadKernelError:
                    run.state, run.reason = "died", _died_reason(log_path)
                    stop = (f"the kernel died in cell {index + 1} before this cell ran", False)
                    continue
                content = replies.get(index, {}).get("content", {})
                if content.get("ename") == _TIMEOUT_ENAME:
                    run.state = "timeout"
                    if left > 0:
                        run.reason = f"time limit of {time_limit:g} s reached"
                    else:
                        run.reason = (
                            f"time limit reached: this cell ran {floor:g} s after the "
                            f"notebook's {time_limit:g} s were used up"
                        )
                        stop = (f"time limit of {time_limit:g} s reached before this cell ran", True)
                    if not stop and not _responsive(client):
                        stop = (
                            f"the kernel did not recover from the time-limit interrupt in cell {index + 1}",
                            False,
                        )
                    if stop:  # a busy kernel would only stall a polite shutdown
                        client.shutdown_kernel = "immediate"
                elif content.get("status") == "error":
                    run.state, run.ename = "error", content.get("ename", "")
                    run.error = _first_line(f"{run.ename}: {content.get('evalue', '')}")
                else:
                    run.state = "ok"
                run.submissions = submissions(nb.cells[index])
    except Exception as exc:  # kernel would not start, or nbclient itself failed
        reason = f"the grader could not run the notebook: {_first_line(str(exc)) or type(exc).__name__}"
        for index in pending:
            if runs[index].state == "skipped":
                runs[index].state, runs[index].reason = "not run", reason
    finally:
        _end_processes_of(token)
    return runs


#: An environment variable set, with a fresh value, in each graded kernel.
_RUN_TOKEN = "COURSE_GRADE_RUN"


def _end_processes_of(token: str) -> list[int]:
    """Kill every process that still carries this kernel's token: anything the notebook
    started and left behind (a forked child that would write files later, a stuck rank)."""
    killed = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(_RUN_TOKEN) == token:
                proc.kill()
                killed.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return killed


def submissions(cell: nbformat.NotebookNode) -> list:
    """The answers a cell's check calls handed to the grader (outputs of type submission.MIME)."""
    found = []
    for output in cell.get("outputs", []):
        record = output.get("data", {}).get(submission.MIME) if isinstance(output, dict) else None
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            found.append(record)
    return found


def _died_reason(log_path: Path) -> str:
    """'the kernel died ...' plus the kernel's last words, if it left any."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    lines = [ln for ln in lines if "WARNING" not in ln]
    return "the kernel died while this cell ran" + (f" ({lines[-1][:200]})" if lines else "")


def _responsive(client) -> bool:
    """Whether the kernel answers a trivial request within RECOVERY_TIME seconds."""
    client.timeout = RECOVERY_TIME
    try:
        msg_id = client.kc.execute("pass", store_history=False)
        return client.wait_for_reply(msg_id) is not None
    except DeadKernelError:
        return False


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


# ----------------------------------------------------------------------------
# judging


def judge(
    nb: nbformat.NotebookNode, runs: list[CellRun], expected: dict[str, str], spots: dict[str, int]
) -> list[dict]:
    """One {id, title, status, message} per expected exercise, judged here.

    The answers the check cells handed over are checked in this process (the learner's
    code runs only in ranks and worker processes, see course_lib.checks.submission);
    answers handed over by a learner's own cell are ignored.
    """
    answer_indices = set(spots.values())
    handed = {}
    for run in runs:
        if run.index in answer_indices:
            continue  # an answer cell's output proves nothing
        for record in run.submissions:
            handed.setdefault(record["id"], []).append(record)
    rows = []
    for ex_id, title in expected.items():
        if ex_id in handed:
            status, message = _verdict(ex_id, handed[ex_id])
        else:
            status, message = _explain_missing(ex_id, nb, runs, spots)
        rows.append({"id": ex_id, "title": title, "status": status, "message": message})
    return _point_at_causes(rows)


def _verdict(ex_id: str, records: list) -> tuple[str, str]:
    """Every check call of an exercise must pass; the first that did not is the verdict."""
    if ex_id not in checks.EXERCISES:
        return checks.ERROR, "no check function is registered for this exercise"
    for record in records:
        if isinstance(record, dict) and record.get("untouched") is True:
            return checks.NOT_ATTEMPTED, ""
        answer = submission.read_submission(record)
        if isinstance(answer, str):
            return checks.ERROR, answer
        try:
            _library_unchanged()
        except LibraryChanged as exc:
            return checks.ERROR, str(exc)
        status, message = checks.verdict(ex_id, *answer)
        if status != checks.PASSED:
            return status, message
    return checks.PASSED, ""


def _point_at_causes(rows: list[dict]) -> list[dict]:
    """An exercise that builds on earlier ones which do not pass says to fix those first."""
    status_of = {r["id"]: r["status"] for r in rows}
    for row in rows:
        if row["status"] in (checks.FAILED, checks.ERROR):
            before = [
                e
                for e in checks.BUILDS_ON.get(row["id"], ())
                if status_of.get(e, checks.PASSED) != checks.PASSED
            ]
            if before:
                row["message"] = (
                    f"fix {' and '.join(before)} first (this exercise builds on it) — {row['message']}"
                )
    return rows


#: Digests of the course library's files when the grader started.
_LIBRARY_DIGESTS: dict[str, str] = {}


#: Files of the extra check modules (--checks-module) the grader imported.
_EXTRA_FILES: list[str] = []


def _library_files() -> dict[str, str]:
    root = Path(checks.__file__).resolve().parents[1]
    files = [*sorted(root.rglob("*.py")), *map(Path, _EXTRA_FILES)]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def _snapshot_library() -> None:
    if not _LIBRARY_DIGESTS:
        _LIBRARY_DIGESTS.update(_library_files())


def _library_unchanged() -> None:
    """Raise if a notebook's code changed the course library (the ranks would import it)."""
    _snapshot_library()
    if _library_files() != _LIBRARY_DIGESTS:
        raise LibraryChanged("the course library's files changed while notebooks ran: no verdict is given")


class LibraryChanged(RuntimeError):
    """Something rewrote course_lib during grading: every later verdict is refused."""


def _working_copy(tmp: Path) -> tuple[Path, dict]:
    """Where a graded kernel runs: an empty folder beside a copy of the library, and the
    environment that imports that copy. The course's folders (solutions/ among them) are on
    no path the notebook is given; the checks and ranks of the verdict use the original."""
    work, lib = tmp / "exercises", tmp / "lib"
    work.mkdir()
    package = Path(checks.__file__).resolve().parents[1]
    # Compiled files travel too (copytree keeps the dates they are checked against): the
    # kernel need not compile the library again.
    shutil.copytree(package, lib / package.name)
    paths = [str(lib), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return work, dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def _explain_missing(ex_id: str, nb, runs: list[CellRun], spots: dict[str, int]) -> tuple[str, str]:
    """Status and message for an exercise whose check recorded nothing."""
    entry = checks.EXERCISES.get(ex_id)
    if entry is None:
        return checks.ERROR, "no check function is registered for this exercise"
    name = entry[1].__name__
    answer_indices = set(spots.values())
    code = [
        (i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "code" and i not in answer_indices
    ]
    check_cells = [i for i, src in code if re.search(rf"\.{re.escape(name)}\s*\(", src)] or [
        i for i, src in code if re.search(rf"\b{re.escape(name)}\s*\(", src)
    ]
    if not check_cells:
        return checks.ERROR, f"no cell of the exercise notebook calls the check {name}()"
    answers = set()
    for c in check_cells:
        named = {i for n, i in spots.items() if re.search(rf"\b{re.escape(n)}\b", nb.cells[c].source)}
        above = [i for i in answer_indices if i < c]
        answers |= named or ({max(above)} if above else set())
    related = sorted(answers | set(check_cells))
    for i in related:
        if runs[i].state == "timeout":
            return checks.FAILED, runs[i].reason
    for i in sorted(answers):
        if runs[i].state == "error":
            if runs[i].ename == "NotImplementedError":
                return checks.NOT_ATTEMPTED, ""
            return checks.ERROR, f"your answer cell raised {runs[i].error}"
    for i in check_cells:
        if runs[i].state == "error":
            return checks.ERROR, runs[i].error
    for i in related:
        if runs[i].state in ("died", "not run"):
            return (checks.FAILED if runs[i].out_of_time else checks.ERROR), runs[i].reason
    return checks.ERROR, f"the check {name}() recorded no result"


# ----------------------------------------------------------------------------
# one notebook, many notebooks


def chapter_of(stem: str) -> str:
    """The chapter id of an exercise notebook's name: "03_ring_allreduce" -> "3", "04b_x" -> "4b"."""
    try:
        return chapters.chapter_id(stem)
    except ValueError:
        raise UsageError(
            f"cannot tell the chapter of {stem!r}: exercise notebooks are named NN_name (or NNx_name)"
        ) from None


def locate(path: Path, exercises_dir: Path) -> Path:
    """The canonical exercise notebook for a learner's notebook; UsageError if there is none."""
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    if path.suffix not in (".ipynb", ".py"):
        raise UsageError(f"{path}: expected a .ipynb notebook or a jupytext .py file")
    chapter_of(path.stem)
    canonical = exercises_dir / f"{path.stem}.ipynb"
    if not canonical.is_file():
        raise UsageError(
            f"{path}: there is no exercise notebook {canonical} to grade it against "
            "(the file name must match an exercise; run python -m course_lib.build?)"
        )
    return canonical


def grade_notebook(
    path: Path, canonical_path: Path, time_limit: float = TIME_LIMIT, save_dir: Path | None = None
) -> dict:
    """Grade one learner notebook; return its entry of the JSON report."""
    started = time.monotonic()
    chapter = chapter_of(path.stem)
    expected = checks.exercises_for_chapter(chapter)
    entry = {
        "name": path.stem,
        "path": str(path),
        "exercise_notebook": str(canonical_path),
        "chapter": chapter,
        "error": None,
        "cell_errors": [],
    }
    try:
        learner = read_learner_notebook(path)
    except Exception as exc:  # unreadable JSON, not a notebook, ...
        learner, entry["error"] = None, f"could not read {path}: {_first_line(str(exc))}"
    if learner is not None:
        canonical = nbformat.read(canonical_path, as_version=4)
        nb, spots, answered = splice(canonical, learner)
        entry["answers_found"] = sorted(answered)
        entry["answers_missing"] = sorted(set(spots) - answered)
        _snapshot_library()
        submission.CALL_TIMEOUT = min(submission.CALL_TIMEOUT, time_limit)
        with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
            work, env = _working_copy(Path(tmp))
            runs = run_notebook(nb, work, time_limit, Path(tmp) / "kernel.log", env)
        if not expected:  # a chapter without registered checks: go by what was recorded
            for run in runs:
                for record in run.results:
                    expected.setdefault(record["id"], record.get("title", ""))
        entry["exercises"] = judge(nb, runs, expected, spots)
        # Lesson cells that failed: informative for a learner's notebook (a demo may use an
        # unfinished answer); a solution notebook must have none.
        entry["cell_errors"] = [
            f"cell {r.index + 1}: {r.error or r.reason}"
            for r in runs
            if r.state in ("error", "timeout", "died") and r.index not in spots.values()
        ]
        if not expected:
            entry["error"] = f"no exercises are registered for chapter {chapter}"
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, save_dir / f"{path.stem}.ipynb")
    else:
        entry["exercises"] = [
            {"id": i, "title": t, "status": checks.ERROR, "message": entry["error"]}
            for i, t in expected.items()
        ]
    entry["passed"] = sum(e["status"] == checks.PASSED for e in entry["exercises"])
    entry["total"] = len(entry["exercises"])
    entry["seconds"] = round(time.monotonic() - started, 1)
    return entry


def print_table(entry: dict, out: TextIO | None = None) -> None:
    """One row per exercise; the detail is printed whole (the hint is the point), wrapped between
    words on lines of its own under the row."""
    out = sys.stdout if out is None else out
    rows = [(e["id"], e["title"], e["status"], " ".join(e["message"].split())) for e in entry["exercises"]]
    head = ("id", "title", "status")
    widths = [max(len(r[k]) for r in rows + [head]) for k in range(3)]
    print(
        f"\n{entry['path']}  (graded against {entry['exercise_notebook']}, {entry['seconds']:g} s)", file=out
    )
    if entry["error"]:
        print(checks.wrap(f"  {entry['error']}"), file=out)
    for row in [head] + rows:
        print("  " + "  ".join(row[k].ljust(widths[k]) for k in range(3)).rstrip(), file=out)
        if len(row) > 3 and row[3]:
            print(
                textwrap.fill(
                    row[3],
                    checks.LINE_WIDTH,
                    initial_indent="      ",
                    subsequent_indent="      ",
                    break_long_words=False,
                    break_on_hyphens=False,
                ),
                file=out,
            )
    print(f"{entry['name']}: {entry['passed']}/{entry['total']} exercises passed", file=out)


def make_report(entries: list[dict], time_limit: float) -> dict:
    totals = {"notebooks": len(entries), "exercises": sum(e["total"] for e in entries)}
    for status in STATUSES:
        totals[status] = sum(x["status"] == status for e in entries for x in e["exercises"])
    all_passed = bool(entries) and all(e["passed"] == e["total"] and not e["error"] for e in entries)
    return {"time_limit_s": time_limit, "all_passed": all_passed, "totals": totals, "notebooks": entries}


def _start_worker(modules, digests, extra_files) -> None:
    for name in modules:
        importlib.import_module(name)
    _EXTRA_FILES[:] = extra_files
    _LIBRARY_DIGESTS.update(digests)
    launch.start_forkserver()  # as in main(): before this worker reads any notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.grade",
        description="Grade exercise notebooks headless (see the module doc).",
    )
    parser.add_argument(
        "paths",
        nargs="*",
        type=Path,
        metavar="PATH",
        help="a learner's exercise notebook (.ipynb or jupytext .py); "
        "default: every notebook in my_exercises/",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=Path("grade-report.json"),
        metavar="FILE",
        help="where to write the JSON report (default: %(default)s)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=TIME_LIMIT,
        metavar="SECONDS",
        help="seconds each notebook may run (default: %(default)g)",
    )
    parser.add_argument(
        "--exercises",
        type=Path,
        default=build.ROOT / build.EXERCISE_DIR,
        metavar="DIR",
        help="folder of the canonical exercise notebooks (default: %(default)s)",
    )
    parser.add_argument(
        "--save-executed",
        type=Path,
        metavar="DIR",
        help="also write each executed notebook, with its outputs, to DIR",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="grade N notebooks at once, each with its own kernel (default: 1)",
    )
    parser.add_argument(
        "--checks-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this extra module of @exercise checks first (tests, add-on chapters)",
    )
    args = parser.parse_args(argv)
    if not args.paths:
        from course_lib import workspace

        args.paths = workspace.learner_copies()
        if not args.paths:
            print(
                f"grade: no notebooks in {workspace.WORK_DIR}/ (`make lab` makes them); "
                "name the notebooks to grade",
                file=sys.stderr,
            )
            return 2
    try:
        if not (args.time_limit > 0 and math.isfinite(args.time_limit)):
            raise UsageError(f"--time-limit must be a positive number of seconds, got {args.time_limit:g}")
        for name in args.checks_module:
            try:
                module = importlib.import_module(name)
            except ImportError as exc:
                raise UsageError(f"--checks-module {name}: {exc}") from None
            _EXTRA_FILES.append(str(Path(module.__file__).resolve()))
        canonicals = [locate(p, args.exercises) for p in args.paths]
    except UsageError as exc:
        print(f"grade: {exc}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"grade: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    entries = []
    _snapshot_library()  # before any notebook runs
    if args.jobs == 1:
        # The judging happens here (else in each worker, see _start_worker): every rank and
        # worker is a copy of the forkserver, so it starts before any notebook is read.
        launch.start_forkserver()
        for path, canonical in zip(args.paths, canonicals):
            print(f"grading {path} ...", flush=True)
            entry = grade_notebook(path, canonical, args.time_limit, args.save_executed)
            print_table(entry)
            entries.append(entry)
    else:
        # Kernels wait on ranks and timers much of the time: a few at once use the cores better.
        # Each worker imports the same --checks-module list as this process.
        print(f"grading {len(args.paths)} notebooks, {args.jobs} at a time ...", flush=True)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            args.jobs,
            mp_context=context,
            initializer=_start_worker,
            initargs=(args.checks_module, _LIBRARY_DIGESTS, _EXTRA_FILES),
        ) as pool:
            futures = [
                pool.submit(grade_notebook, path, canonical, args.time_limit, args.save_executed)
                for path, canonical in zip(args.paths, canonicals)
            ]
            for future in futures:  # tables in the order the notebooks were named
                entry = future.result()
                print_table(entry)
                entries.append(entry)
    report = make_report(entries, args.time_limit)
    if len(entries) > 1:
        t = report["totals"]
        print(f"\ntotal: {t['passed']}/{t['exercises']} exercises passed in {t['notebooks']} notebooks")
    args.report.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"report written to {args.report}")
    return 0 if report["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
