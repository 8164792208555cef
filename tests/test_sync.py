"""Every notebook .py and its .ipynb hold the same cells, and nothing generated is stale."""

import shutil
from pathlib import Path

import jupytext
import nbformat
import pytest

from course_lib import build

FOLDERS = ("notebooks", "solutions", "exercises")
FIXTURES = Path(__file__).parent / "fixtures"


def pair_problems(root: Path) -> tuple[int, list[str]]:
    """(number of .py/.ipynb pairs, what is wrong with them) under root's course folders."""
    pairs, problems = 0, []
    for folder in FOLDERS:
        for py in sorted((root / folder).glob("*.py")):
            ipynb = py.with_suffix(".ipynb")
            name = py.relative_to(root).as_posix()
            if not ipynb.exists():
                problems.append(f"{name} has no .ipynb")
                continue
            pairs += 1
            text_cells = jupytext.read(py, fmt="py:percent").cells
            json_cells = nbformat.read(ipynb, as_version=4).cells
            if [(c.cell_type, c.source) for c in text_cells] != [(c.cell_type, c.source) for c in json_cells]:
                problems.append(f"{name} and its .ipynb have different cells")
    return pairs, problems


@pytest.fixture(scope="module")
def fixture_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    for folder in ("notebooks", "solutions"):
        shutil.copytree(FIXTURES / folder, root / folder)
    build.build(root)
    return root


def test_fixture_tree_pairs_match(fixture_tree):
    pairs, problems = pair_problems(fixture_tree)
    assert pairs == 3 and not problems


def test_repository_pairs_match():
    has_sources = any(any((build.ROOT / f).glob("*.py")) for f in ("notebooks", "solutions"))
    if not has_sources:
        pytest.skip("no notebooks in the repository yet (the fixture tree is tested instead)")
    pairs, problems = pair_problems(build.ROOT)
    assert not problems, "\n".join(problems) + "\nrun: python -m course_lib.build"
    assert pairs >= 1
    if any((build.ROOT / "solutions").glob("[0-9]*_*.py")):
        assert any((build.ROOT / "exercises").glob("*.ipynb")), "solutions exist but no exercises"


def test_repository_generated_files_are_up_to_date():
    problems = build.check(build.ROOT)
    assert not problems, "\n".join(problems) + "\nrun: python -m course_lib.build"
