"""The real chapters, graded as CI and graders see them."""

import ast
import json
import pathlib
import subprocess
import sys

import nbformat
import pytest

from course_lib import build, chapters, checks

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
    """Every solution graded in one run, two kernels at a time (a kernel spends much of its time
    waiting on its ranks)."""
    report_path = tmp_path_factory.mktemp("grade") / "report.json"
    result = grade(SOLUTIONS, report_path, jobs=2)
    report = json.loads(report_path.read_text())
    by_path = {pathlib.Path(nb["path"]): nb for nb in report["notebooks"]}
    return result, by_path


def test_there_are_chapters_with_exercises():
    assert SOLUTIONS, "no solutions/NN_*.ipynb found"
    assert all(p.exists() for p in EXERCISES)


#: A chapter's issue asks at least three graded exercises, except these (issue 20 asked none;
#: each has a small one so the chapter is graded too).
FEWER_EXERCISES = {"09c_checkpoint": 1, "09d_step_time": 2}


def test_every_solution_passes_and_has_three_exercises(graded):
    result, by_path = graded
    assert result.returncode == 0, result.stdout[-3000:]
    for path in SOLUTIONS:
        notebook = by_path[path]
        assert len(notebook["exercises"]) >= FEWER_EXERCISES.get(path.stem, 3), notebook["name"]
        assert all(e["status"] == "passed" for e in notebook["exercises"]), notebook
        assert notebook["cell_errors"] == [], notebook  # every cell runs, not only the checks


def test_the_total_counts_exactly_the_solutions(graded):
    result, by_path = graded
    solved = sum(len(by_path[p]["exercises"]) for p in SOLUTIONS)
    assert f"total: {solved}/{solved} exercises passed in {len(SOLUTIONS)} notebooks" in result.stdout


def _only_imports_and_definitions(source: str) -> bool:
    """A cell that runs nothing: imports, defs and classes only."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False
    kinds = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)
    return bool(body) and all(isinstance(node, kinds) for node in body)


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.stem)
def test_untouched_exercises_read_not_attempted(path, capsys):
    """Each stub, as the exercise notebook gives it, through its notebook's own check cells:
    every exercise of the chapter reads "not attempted". (The notebook's other cells are the
    solutions' cells, which the grader runs above; the grader's path for stubs is tested on
    the fake chapter in test_grade.py.)"""
    nb = nbformat.read(path, as_version=4)
    spots = set(build.answer_cells(nb).values())
    code = [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    namespace = {"__name__": "__main__"}
    for i, source in code:
        if i in spots or _only_imports_and_definitions(source):
            exec(compile(source, f"{path.name}:cell {i + 1}", "exec"), namespace)
    for i, source in code:
        if i not in spots and "check." in source:
            exec(compile(source, f"{path.name}:cell {i + 1}", "exec"), namespace)
    statuses = {r.id: r.status for r in checks.registry.RESULTS}
    expected = checks.exercises_for_chapter(chapters.chapter_id(path.stem))
    assert set(statuses) == set(expected), (statuses, capsys.readouterr().out[-2000:])
    assert set(statuses.values()) == {checks.NOT_ATTEMPTED}, (statuses, capsys.readouterr().out[-2000:])
