"""The real chapters, graded as CI and graders see them."""
import json
import pathlib
import subprocess
import sys


ROOT = pathlib.Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
EXERCISES = [ROOT / "exercises" / p.name for p in SOLUTIONS]


def grade(paths, report):
    return subprocess.run([sys.executable, "-m", "course_lib.grade", *map(str, paths),
                           "--report", str(report), "--time-limit", "300"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_there_are_chapters_with_exercises():
    assert SOLUTIONS, "no solutions/NN_*.ipynb found"
    assert all(p.exists() for p in EXERCISES)


def test_every_solution_passes_and_has_three_exercises(tmp_path):
    result = grade(SOLUTIONS, tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["all_passed"]
    for notebook in report["notebooks"]:
        assert len(notebook["exercises"]) >= 3, notebook["name"]
        assert all(e["status"] == "passed" for e in notebook["exercises"]), notebook
        assert notebook["cell_errors"] == [], notebook  # every cell runs, not only the checks


def test_untouched_exercises_pass_nothing(tmp_path):
    result = grade(EXERCISES, tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert result.returncode == 1, result.stdout + result.stderr
    statuses = {e["status"] for nb in report["notebooks"] for e in nb["exercises"]}
    assert statuses == {"not attempted"}, result.stdout
