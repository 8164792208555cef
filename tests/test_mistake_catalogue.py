"""The catalogue of wrong answers: every exercise has a test that hands its check a typical
mistake and asserts the failure names it.

Such a test carries ``@pytest.mark.mistake("3.1")`` (or a table row
``pytest.param(..., marks=pytest.mark.mistake("3.1"))``; several ids when one test covers
several exercises). This file reads tests/*.py with ``ast`` and runs none of them: it only
checks that the marks cover every registered exercise and name no other.
``pytest -m mistake tests`` runs the catalogue itself.
"""

import ast
import importlib
import pathlib

from course_lib.chapters import CHAPTERS, exercise_key
from course_lib.checks import registry

TESTS = pathlib.Path(__file__).resolve().parent


def _is_mistake_mark(func: ast.expr) -> bool:
    """``pytest.mark.mistake`` (the only spelling the catalogue counts)."""
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "mistake"
        and isinstance(func.value, ast.Attribute)
        and func.value.attr == "mark"
        and isinstance(func.value.value, ast.Name)
        and func.value.value.id == "pytest"
    )


def marked_exercises(tree: ast.AST, where: str) -> dict[str, list[str]]:
    """Exercise id -> ["file:line", …] of every ``pytest.mark.mistake(...)`` call in ``tree``."""
    found: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _is_mistake_mark(node.func):
            args = node.args
            assert args and not node.keywords, f"{where}:{node.lineno}: write pytest.mark.mistake('3.1', ...)"
            for arg in args:
                assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), (
                    f"{where}:{node.lineno}: exercise ids in pytest.mark.mistake must be string literals"
                )
                found.setdefault(arg.value, []).append(f"{where}:{node.lineno}")
    return found


def catalogue() -> dict[str, list[str]]:
    """Exercise id -> where its wrong-answer tests are, over every tests/*.py."""
    found: dict[str, list[str]] = {}
    for path in sorted(TESTS.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for ex_id, places in marked_exercises(tree, path.name).items():
            found.setdefault(ex_id, []).extend(places)
    return found


def registered() -> set[str]:
    for chapter in CHAPTERS:
        if chapter.number != "00":  # the setup chapter has no exercises
            importlib.import_module(f"course_lib.checks.{chapter.stem}")
    return set(registry.EXERCISES)


def test_every_exercise_has_a_catalogued_wrong_answer():
    exercises, found = registered(), catalogue()
    assert len(exercises) >= 61
    missing = sorted(exercises - set(found), key=exercise_key)
    assert not missing, (
        f"no test marked @pytest.mark.mistake(...) for exercise(s) {', '.join(missing)}: add one that "
        "hands the check a typical wrong answer and asserts the message names the mistake"
    )


def test_every_marked_id_is_a_registered_exercise():
    exercises, found = registered(), catalogue()
    unknown = {ex_id: places for ex_id, places in found.items() if ex_id not in exercises}
    assert not unknown, f"pytest.mark.mistake names no registered exercise: {unknown}"


def test_the_catalogue_reads_decorators_and_table_rows():
    source = """
import pytest

@pytest.mark.mistake("3.1", "3.2")
def test_a():
    pass

@pytest.mark.parametrize("x", [pytest.param(1, marks=pytest.mark.mistake("4b.2")), 2])
def test_b(x):
    pass

@pytest.mark.slow
def test_c():
    pass
"""
    assert marked_exercises(ast.parse(source), "t.py") == {
        "3.1": ["t.py:4"],
        "3.2": ["t.py:4"],
        "4b.2": ["t.py:8"],
    }
