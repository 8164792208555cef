"""course_lib.grade on the fake chapter 99 (tests/fixtures): real kernels, small time limits."""

import base64
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from course_lib import build, checks, grade, launch
from course_lib.checks import submission
from course_lib.grade import CellRun

FIXTURES = Path(__file__).parent / "fixtures"
LOOP_LIMIT = 8  # seconds: enough for the imports, small enough to keep the test short


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A built fixture course plus three learners' versions of exercises/99_demo."""
    root = tmp_path_factory.mktemp("course")
    shutil.copytree(FIXTURES / "solutions", root / "solutions")
    build.build(root)
    exercise = root / "exercises" / "99_demo.ipynb"

    # Check cells edited to claim success, answers still the stubs.
    nb = nbformat.read(exercise, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.startswith("check."):
            cell.source = 'print("✔ 99.1 add one")'
    (root / "edited").mkdir()
    nbformat.write(nb, root / "edited" / "99_demo.ipynb")

    # A jupytext .py whose first answer never returns and whose second is right;
    # the answer metadata is gone, so the grader must find them by their def.
    nb = nbformat.read(exercise, as_version=4)
    for cell in nb.cells:
        name = cell.metadata.pop("answer", None)
        if name == "add_one":
            cell.source = "def add_one(x):\n    while True:\n        pass"
        elif name == "double":
            cell.source = "def double(x):\n    return x * 2"
    (root / "loop").mkdir()
    jupytext.write(nb, root / "loop" / "99_demo.py", fmt="py:percent")
    return root


def grade_cli(course, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FIXTURES), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "course_lib.grade",
            *args,
            "--exercises",
            str(course / "exercises"),
            "--checks-module",
            "demo_checks",
            "--report",
            str(course / "report.json"),
        ],
        cwd=course,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert not re.search(r"\d+ passed, \d+ failed", result.stdout)  # CI parses that form
    report = json.loads((course / "report.json").read_text()) if result.returncode != 2 else None
    return result, report


def statuses(entry):
    return {e["id"]: (e["status"], e["message"]) for e in entry["exercises"]}


def test_solution_passes_everything(course):
    result, report = grade_cli(course, "solutions/99_demo.ipynb")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "99_demo: 2/2 exercises passed" in result.stdout
    assert report["all_passed"] is True
    assert report["totals"] == {
        "notebooks": 1,
        "exercises": 2,
        "passed": 2,
        "failed": 0,
        "not attempted": 0,
        "error": 0,
    }
    (entry,) = report["notebooks"]
    assert entry["chapter"] == "99" and entry["passed"] == 2 and entry["total"] == 2
    assert entry["cell_errors"] == []
    assert entry["exercises"] == [
        {"id": "99.1", "title": "add one", "status": "passed", "message": ""},
        {"id": "99.2", "title": "double", "status": "passed", "message": ""},
    ]


@pytest.fixture(scope="module")
def attempts(course):
    """Four learners graded in one run: untouched stubs, edited check cells, an endless loop,
    and an answer cell that deletes `check` (one grader start instead of one each)."""
    nb = nbformat.read(course / "exercises" / "99_demo.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.metadata.get("answer") == "add_one":
            cell.source = "def add_one(x):\n    return x + 1\n\ndel check"  # the check cells lose it
    (course / "deleter").mkdir()
    nbformat.write(nb, course / "deleter" / "99_demo.ipynb")
    return grade_cli(
        course,
        "exercises/99_demo.ipynb",
        "edited/99_demo.ipynb",
        "loop/99_demo.py",
        "deleter/99_demo.ipynb",
        "--time-limit",
        str(LOOP_LIMIT),
    )


def test_stubs_edited_checks_and_endless_loop(attempts):
    result, report = attempts
    assert result.returncode == 1, result.stdout + result.stderr
    untouched, edited, loop, _ = report["notebooks"]
    nothing = {"99.1": ("not attempted", ""), "99.2": ("not attempted", "")}
    assert statuses(untouched) == nothing
    assert statuses(edited) == nothing  # the printed "✔" of an edited check cell earns nothing
    assert statuses(loop) == {
        "99.1": ("failed", f"your function did not return within {LOOP_LIMIT} s (an endless loop?)"),
        "99.2": ("passed", ""),
    }
    assert sum(e["passed"] for e in (untouched, edited, loop)) == 1
    assert "99_demo: 1/2 exercises passed" in result.stdout
    assert "total: 1/8 exercises passed in 4 notebooks" in result.stdout


def test_lesson_cells_that_raise_are_listed(attempts):
    result, report = attempts
    entry = report["notebooks"][3]
    assert entry["passed"] == 0, entry
    assert len(entry["cell_errors"]) == 2, entry["cell_errors"]
    assert all("NameError: name 'check' is not defined" in e for e in entry["cell_errors"])


def test_handing_an_answer_over_imports_no_torch():
    """A grader's kernel of a chapter that needs no torch (the fake one) starts without it: the
    check cells only hand answers over (about 2 s of CPU saved per kernel)."""
    code = (
        "import os, sys\n"
        "os.environ['COURSE_SUBMIT'] = '1'\n"
        "import demo_checks\n"
        "demo_checks.add_one(lambda x: x + 1)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(FIXTURES), os.environ.get("PYTHONPATH")]))
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "handed to the grader" in done.stdout, done.stdout
    assert done.stdout.strip().splitlines()[-1] == "torch imported: False", done.stdout


def test_usage_errors_exit_2(course, capsys):
    assert grade.main([str(course / "nowhere" / "99_demo.ipynb")]) == 2
    assert "no such file" in capsys.readouterr().err
    (course / "97_other.ipynb").write_text("{}")
    assert grade.main([str(course / "97_other.ipynb"), "--exercises", str(course / "exercises")]) == 2
    assert "no exercise notebook" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# splicing and judging, without a kernel


def test_splice_takes_only_answer_cells(course):
    canonical = nbformat.read(course / "exercises" / "99_demo.ipynb", as_version=4)
    learner = nbformat.read(course / "edited" / "99_demo.ipynb", as_version=4)
    learner.cells[build.answer_cells(learner)["add_one"]].source = "def add_one(x):\n    return x + 1"
    del learner.cells[build.answer_cells(learner)["double"]]  # a deleted answer keeps the stub
    learner.cells.append(nbformat.v4.new_code_cell("def double(x):\n    return 2 * x"))  # found by def
    nb, spots, answered = grade.splice(canonical, learner)
    assert answered == {"add_one", "double"}
    assert nb.cells[spots["add_one"]].source.endswith("return x + 1")
    assert nb.cells[spots["double"]].source.endswith("return 2 * x")
    others = [c.source for i, c in enumerate(nb.cells) if i not in spots.values()]
    assert others == [c.source for i, c in enumerate(canonical.cells) if i not in spots.values()]


@pytest.fixture
def demo_checks(monkeypatch):
    """Register the fake chapter 99 in this process, and forget it afterwards."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.setattr(checks.registry, "EXERCISES", dict(checks.EXERCISES))
    monkeypatch.setattr(checks, "EXERCISES", checks.registry.EXERCISES)
    monkeypatch.delitem(sys.modules, "demo_checks", raising=False)
    importlib.import_module("demo_checks")
    yield
    sys.modules.pop("demo_checks", None)


def test_judge_explains_missing_results(course, demo_checks):
    nb = nbformat.read(course / "exercises" / "99_demo.ipynb", as_version=4)
    spots = build.answer_cells(nb)
    add_check = next(i for i, c in enumerate(nb.cells) if "check.add_one(" in c.source)
    double_check = next(i for i, c in enumerate(nb.cells) if "check.double(" in c.source)
    runs = [CellRun(i, state="ok") for i in range(len(nb.cells))]
    right = base64.b64encode(launch.dumps_by_value((lambda x: x + 1,))).decode()
    cheat = {"id": "99.1", "args": [right], "kwargs": {}}
    runs[spots["add_one"]].submissions = [cheat]  # handed over by the learner's own cell: ignored
    runs[add_check] = CellRun(add_check, "error", "NameError: name 'add_one' is not defined", "NameError")
    runs[spots["double"]] = CellRun(spots["double"], "error", "SyntaxError: invalid syntax", "SyntaxError")
    rows = grade.judge(nb, runs, {"99.1": "add one", "99.2": "double"}, spots)
    assert [(r["status"], r["message"]) for r in rows] == [
        ("error", "NameError: name 'add_one' is not defined"),
        ("error", "your answer cell raised SyntaxError: invalid syntax"),
    ]
    runs[double_check] = CellRun(
        double_check, "not run", reason="time limit of 5 s reached before this cell ran", out_of_time=True
    )
    runs[spots["double"]] = CellRun(spots["double"], "ok")
    assert grade.judge(nb, runs, {"99.2": "double"}, spots)[0]["status"] == "failed"


def _stub(x):
    """Docstring and comments do not count."""
    # YOUR CODE HERE
    raise NotImplementedError("exercise: replace this line with your code")


class _StubFunction:
    @staticmethod
    def forward(ctx, x):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError("exercise")


class _HalfDone(_StubFunction):
    @staticmethod
    def forward(ctx, x):
        return x


def _conditional(x):
    if x:
        raise NotImplementedError
    return x


def _prints_first(x):
    print(x)
    raise NotImplementedError


def test_untouched_stubs_are_told_from_attempts():
    assert submission.untouched(_stub) and submission.untouched(_StubFunction)
    for attempt in (_HalfDone, _conditional, _prints_first, lambda x: x + 1, 3, None):
        assert not submission.untouched(attempt), attempt


def test_an_untouched_claim_is_not_attempted_without_running_anything(course, demo_checks):
    # The kernel's claim only ever costs the learner, so the grader takes it as it is: even
    # beside a right answer it reads "not attempted", and no rank or worker is started.
    nb = nbformat.read(course / "exercises" / "99_demo.ipynb", as_version=4)
    spots = build.answer_cells(nb)
    add_check = next(i for i, c in enumerate(nb.cells) if "check.add_one(" in c.source)
    runs = [CellRun(i, state="ok") for i in range(len(nb.cells))]
    right = base64.b64encode(launch.dumps_by_value((lambda x: x + 1,))).decode()
    runs[add_check].submissions = [{"id": "99.1", "args": [right], "kwargs": {}, "untouched": True}]
    (row,) = grade.judge(nb, runs, {"99.1": "add one"}, spots)
    assert (row["status"], row["message"]) == ("not attempted", "")
    runs[add_check].submissions = [{"id": "99.1", "args": [right], "kwargs": {}, "untouched": "yes"}]
    assert grade.judge(nb, runs, {"99.1": "add one"}, spots)[0]["status"] == "passed"


def test_a_worker_that_exits_is_named_and_a_right_call_after_it_works():
    def leaves(x):
        import os

        os._exit(3)

    answer = submission.Submitted(launch.dumps_by_value((leaves,)))
    with pytest.raises(checks.Mismatch, match=r"ended its process \(exit code 3\) instead of returning"):
        answer(1)
    right = submission.Submitted(launch.dumps_by_value((lambda x: x + 1,)))
    assert right(1) == 2
    right.close()


def test_table_prints_the_whole_diagnosis_wrapped_between_words(capsys):
    hint = (
        "rank 2: element [3] expected 7.0, got 0.0 — the bias was added N times: add it on "
        "one rank only, after the all-reduce, as Megatron's row-parallel layer does " * 2
    ).strip()
    entry = {
        "path": "x.ipynb",
        "exercise_notebook": "exercises/x.ipynb",
        "seconds": 1.0,
        "error": "",
        "name": "x",
        "passed": 0,
        "total": 1,
        "exercises": [{"id": "4.4", "title": "row-parallel", "status": "failed", "message": hint}],
    }
    grade.print_table(entry)
    out = capsys.readouterr().out
    assert " ".join(out.split()).count("after the all-reduce, as Megatron's row-parallel layer does") == 2
    assert all(len(line) <= checks.LINE_WIDTH for line in out.splitlines() if "x.ipynb" not in line)
    words = set(hint.split())
    for line in out.splitlines():  # no word cut in two
        if line.startswith("      "):
            assert set(line.split()) <= words, line


def test_learner_copies_are_made_once_and_graded_by_default(course, tmp_path, monkeypatch, capsys):
    from course_lib import workspace

    made = workspace.make_copies(course)
    assert [p.name for p in made] == ["99_demo.ipynb"]
    copy = course / workspace.WORK_DIR / "99_demo.ipynb"
    copy.write_text(copy.read_text().replace("YOUR CODE HERE", "my work"))
    assert workspace.make_copies(course) == []  # never overwritten
    assert "my work" in copy.read_text()
    monkeypatch.setattr(workspace, "learner_copies", lambda root=None: [])
    assert grade.main([]) == 2
    assert "no notebooks in my_exercises/" in capsys.readouterr().err
