"""course_lib.build: the solution -> exercise transform and the whole-tree build."""

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

from course_lib import build

FIXTURES = Path(__file__).parent / "fixtures"


def notebook_text(*cells: str) -> str:
    """A solution .py: the course header followed by the given cells."""
    return build.HEADER + "".join(f"\n{cell.strip()}\n" for cell in cells)


@pytest.fixture
def tree(tmp_path):
    """A copy of the fixture course (one lesson, one solution), built."""
    for folder in ("notebooks", "solutions"):
        shutil.copytree(FIXTURES / folder, tmp_path / folder)
    build.build(tmp_path)
    return tmp_path


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "course_lib.build", *args], capture_output=True, text=True, timeout=60
    )


# ----------------------------------------------------------------------------
# the transform


def test_solution_block_becomes_stub_at_its_indentation():
    source = (
        "class Box:\n"
        "    def get(self):\n"
        '        """docstring stays"""\n'
        "        ### BEGIN SOLUTION\n"
        "        return 1\n"
        "        ### END SOLUTION\n"
        "\n"
        "    def other(self):\n"
        "        return 2"
    )
    assert build.strip_solutions(source).splitlines() == [
        "class Box:",
        "    def get(self):",
        '        """docstring stays"""',
        "        # YOUR CODE HERE",
        '        raise NotImplementedError("exercise: replace this line with your code")',
        "",
        "    def other(self):",
        "        return 2",
    ]


def test_hidden_checks_vanish_and_markdown_gets_answer_placeholder():
    code = "f()\n### BEGIN HIDDEN CHECKS\nassert f() == 1\n### END HIDDEN CHECKS\n"
    assert build.strip_solutions(code) == "f()"
    markdown = "Why?\n\n  ### BEGIN SOLUTION\n  Because.\n  ### END SOLUTION"
    assert build.strip_solutions(markdown, markdown=True) == "Why?\n\n  YOUR ANSWER HERE"


def test_exercise_marks_answer_cells_and_keeps_the_header():
    text = notebook_text(
        "# %%\nimport math",
        "# %%\ndef helper():\n    pass\n\ndef second():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION",
        "# %%\nclass Model:\n    ### BEGIN SOLUTION\n    pass\n    ### END SOLUTION",
        "# %%\n### BEGIN SOLUTION\nworld = 4\n### END SOLUTION",
        "# %%\n### BEGIN HIDDEN CHECKS\nassert world == 4\n### END HIDDEN CHECKS",
        "# %% [markdown]\n# Explain.\n#\n# ### BEGIN SOLUTION\n# Like this.\n# ### END SOLUTION",
    )
    exercise = build.make_exercise(text, "solutions/07_demo.py")
    assert exercise.startswith(build.HEADER)
    assert "SOLUTION" not in exercise and "HIDDEN" not in exercise and "world = 4" not in exercise
    nb = jupytext.reads(exercise, fmt="py:percent")
    intro = nb.cells[0].source  # words for the learner: where to work, how to check
    assert "my_exercises/07_demo.ipynb" in intro and "make grade" in intro
    assert "solutions/" not in intro and "by hand" not in intro  # no author-only words
    assert build.answer_cells(nb) == {"helper": 2, "Model": 3, "answer-3": 4}
    for index in (2, 3, 4):
        assert "answer" in nb.cells[index].metadata["tags"]
    assert "raises-exception" in nb.cells[4].metadata["tags"]  # its stub raises at top level
    assert "raises-exception" not in nb.cells[2].metadata["tags"]
    # the hidden-checks-only cell is gone; the markdown answer is a placeholder
    assert nb.cells[5].cell_type == "markdown" and nb.cells[5].source.endswith("YOUR ANSWER HERE")
    assert len(nb.cells) == 6


def test_exercise_round_trips_through_jupytext():
    text = (FIXTURES / "solutions" / "99_demo.py").read_text()
    made = build.exercise_notebook(text, "solutions/99_demo.py")
    exercise = build.make_exercise(text, "solutions/99_demo.py")
    reread = jupytext.reads(exercise, fmt="py:percent")
    assert [c.source for c in reread.cells] == [c.source for c in made.cells]
    assert [c.metadata.get("answer") for c in reread.cells] == [c.metadata.get("answer") for c in made.cells]


@pytest.mark.parametrize(
    "cells, line, words",
    [
        (
            ["# %%\ndef f():\n    ### BEGIN SOLUTION\n    ### BEGIN SOLUTION\n    ### END SOLUTION"],
            14,
            "nest",
        ),
        (["# %%\ndef f():\n    return 1\n    ### END SOLUTION"], 14, "without"),
        (["# %%\ndef f():\n    ### BEGIN SOLUTION\n    return 1", "# %%\nf()"], 13, "not closed"),
        (["# %%\ndef f():\n    ### BEGIN SOLUTION\n    return 1"], 13, "never closed"),
        (["# %%\ndef f():\n    ### BEGIN SOLUTION\n    ### END HIDDEN CHECKS"], 14, "closes"),
        (["# %%\ndef f():\n    ## BEGIN SOLUTION\n    return 1\n    ## END SOLUTION"], 13, "malformed"),
    ],
)
def test_bad_markers_name_file_and_line(cells, line, words):
    with pytest.raises(build.BuildError) as info:
        build.make_exercise(notebook_text(*cells), "solutions/05_bad.py")
    message = str(info.value)
    assert message.startswith(f"solutions/05_bad.py:{line}:"), message
    assert words in message


def test_duplicate_answer_names_are_an_error():
    cell = "# %%\ndef f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION"
    with pytest.raises(build.BuildError, match=r"solutions/05_dup.py:\d+: .*'f'"):
        build.make_exercise(notebook_text(cell, cell), "solutions/05_dup.py")


def test_missing_header_is_an_error():
    with pytest.raises(build.BuildError, match="header"):
        build.make_exercise("# %%\nx = 1\n", "solutions/05_nohead.py")


# ----------------------------------------------------------------------------
# the tree


def test_build_writes_every_file_and_is_idempotent(tree):
    expected = [
        "exercises/99_demo.ipynb",
        "exercises/99_demo.py",
        "notebooks/99_demo_lesson.ipynb",
        "solutions/99_demo.ipynb",
    ]
    files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.ipynb")) + sorted(
        p.relative_to(tree).as_posix() for p in (tree / "exercises").glob("*.py")
    )
    assert sorted(files) == expected
    before = {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()}
    assert build.build(tree) == ([], [])
    assert {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()} == before
    for path in tree.rglob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata["kernelspec"]["name"] == "python3"
        assert nb.metadata["jupytext"] == {"formats": "ipynb,py:percent"}
        assert all(not c.get("outputs") for c in nb.cells)


def test_check_cli_passes_then_names_drifted_missing_and_stale_files(tree):
    ok = run_cli("--root", str(tree), "--check")
    assert ok.returncode == 0, ok.stdout + ok.stderr

    exercise = tree / "exercises" / "99_demo.py"
    exercise.write_text(exercise.read_text().replace("YOUR CODE HERE", "my edit"))
    (tree / "solutions" / "99_demo.ipynb").unlink()
    stale = tree / "exercises" / "98_gone.ipynb"
    stale.write_text("{}")
    bad = run_cli("--root", str(tree), "--check")
    assert bad.returncode == 1
    assert "out of date: exercises/99_demo.py" in bad.stdout
    assert "missing: solutions/99_demo.ipynb" in bad.stdout
    assert "stale: exercises/98_gone.ipynb" in bad.stdout
    assert "run: python -m course_lib.build" in bad.stdout

    fixed = run_cli("--root", str(tree))
    assert fixed.returncode == 0 and "removed stale exercises/98_gone.ipynb" in fixed.stdout
    assert not stale.exists()
    assert run_cli("--root", str(tree), "--check").returncode == 0


def test_build_error_exits_nonzero_and_writes_nothing(tree):
    (tree / "solutions" / "98_broken.py").write_text(
        notebook_text("# %%\ndef f():\n    ### BEGIN SOLUTION\n    return 1")
    )
    result = run_cli("--root", str(tree))
    assert result.returncode == 1
    assert "solutions/98_broken.py:13" in result.stderr
    assert not (tree / "solutions" / "98_broken.ipynb").exists()


# ----------------------------------------------------------------------------
# a learner's JupyterLab must not break the checks


def test_pyproject_jupytext_filters_are_the_builds():
    section = (build.ROOT / "pyproject.toml").read_text().split("[tool.jupytext]")[1].split("\n[")[0]
    config = dict(re.findall(r'^(\w+) = "(.*)"$', section, re.M))  # no tomllib before 3.11
    assert config["formats"] == "ipynb,py:percent"
    assert config["notebook_metadata_filter"] == build.PY_FORMAT["notebook_metadata_filter"]
    assert config["cell_metadata_filter"] == build.PY_FORMAT["cell_metadata_filter"]


def _save_as_jupyterlab_does(root: Path, path: str) -> None:
    """Open, "run" (outputs, counts, Lab's cell metadata) and save through jupytext's contents
    manager, the one JupyterLab uses: it rewrites the paired .py too."""
    from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
    from jupytext.async_contentsmanager import build_async_jupytext_contents_manager_class

    manager = build_async_jupytext_contents_manager_class(AsyncLargeFileManager)(root_dir=str(root))

    async def run_and_save():
        nb = (await manager.get(path, content=True))["content"]
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs = [nbformat.v4.new_output("stream", text="ran\n")]
                cell.execution_count = 1
                cell.metadata["execution"] = {"iopub.status.idle": "2026-12-01T00:00:00Z"}
        nb.metadata["language_info"] = {"name": "python", "version": "3.11"}
        await manager.save({"type": "notebook", "content": nb, "format": "json"}, path)

    asyncio.run(run_and_save())


def test_running_and_saving_in_jupyterlab_keeps_the_tree_up_to_date(tree):
    shutil.copy(build.ROOT / "pyproject.toml", tree / "pyproject.toml")  # jupytext's config
    lesson = tree / "notebooks" / "99_demo_lesson.py"
    before = lesson.read_text()
    _save_as_jupyterlab_does(tree, "notebooks/99_demo_lesson.ipynb")
    saved = nbformat.read(tree / "notebooks" / "99_demo_lesson.ipynb", as_version=4)
    assert any(c.get("outputs") for c in saved.cells), "the save should have kept the outputs"
    assert lesson.read_text() == before  # the .py header is the build's, not jupytext's longer one
    assert build.check(tree) == []
    # the git filter gives back the committed bytes
    stripped = run_cli_input(["--strip-outputs"], (tree / "notebooks" / "99_demo_lesson.ipynb").read_text())
    assert stripped == build.to_ipynb(before)


def test_an_edited_cell_is_still_out_of_date(tree):
    path = tree / "notebooks" / "99_demo_lesson.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[-1].source += "\nx = 1"
    nbformat.write(nb, path)
    assert build.check(tree) == ["out of date: notebooks/99_demo_lesson.ipynb"]


def run_cli_input(args, text):
    done = subprocess.run(
        [sys.executable, "-m", "course_lib.build", *args],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
