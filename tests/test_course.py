"""The real chapters, graded as CI and graders see them."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]*_*.ipynb"))
EXERCISES = [ROOT / "exercises" / p.name for p in SOLUTIONS]


def grade(paths, report, jobs=1):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "course_lib.grade",
            *map(str, paths),
            "--report",
            str(report),
            "--time-limit",
            "300",
            "--jobs",
            str(jobs),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Every solution and every untouched exercise, graded in one run, two kernels at a time
    (a kernel spends much of its time waiting on its ranks)."""
    report_path = tmp_path_factory.mktemp("grade") / "report.json"
    result = grade(SOLUTIONS + EXERCISES, report_path, jobs=2)
    report = json.loads(report_path.read_text())
    by_path = {pathlib.Path(nb["path"]): nb for nb in report["notebooks"]}
    return result, by_path


def test_there_are_chapters_with_exercises():
    assert SOLUTIONS, "no solutions/NN_*.ipynb found"
    assert all(p.exists() for p in EXERCISES)


def test_every_solution_passes_and_has_three_exercises(graded):
    result, by_path = graded
    assert result.returncode == 1, "the untouched exercises graded beside them must fail"
    for path in SOLUTIONS:
        notebook = by_path[path]
        assert len(notebook["exercises"]) >= 3, notebook["name"]
        assert all(e["status"] == "passed" for e in notebook["exercises"]), notebook
        assert notebook["cell_errors"] == [], notebook  # every cell runs, not only the checks


def test_untouched_exercises_pass_nothing(graded):
    result, by_path = graded
    for path in EXERCISES:
        statuses = {e["status"] for e in by_path[path]["exercises"]}
        assert statuses == {"not attempted"}, (path.name, result.stdout[-3000:])


def test_the_total_counts_exactly_the_solutions(graded):
    result, by_path = graded
    solved = sum(len(by_path[p]["exercises"]) for p in SOLUTIONS)
    total = solved + sum(len(by_path[p]["exercises"]) for p in EXERCISES)
    notebooks = len(SOLUTIONS) + len(EXERCISES)
    assert f"total: {solved}/{total} exercises passed in {notebooks} notebooks" in result.stdout
