"""Generate the course's derived notebooks from their jupytext sources.

    python -m course_lib.build            # write every generated file
    python -m course_lib.build --check    # only compare; exit 1 if anything is out of date

The percent-format ``.py`` files are the source of truth. This writes

* ``notebooks/X.ipynb`` and ``solutions/X.ipynb`` from the ``.py`` next to them
  (no outputs, deterministic cell ids, so a rebuild changes nothing);
* ``exercises/NN_name.py`` and ``.ipynb`` from ``solutions/NN_name.py``: every
  ``### BEGIN SOLUTION`` / ``### END SOLUTION`` block becomes a stub at the
  same indentation, every ``### BEGIN HIDDEN CHECKS`` / ``### END HIDDEN
  CHECKS`` block disappears, and each code cell that held a solution is marked
  as an *answer cell* (metadata ``answer: <name>`` and tag ``answer``) so the
  grader can find the learner's version of it.

Exercise files without a solution are deleted by a build and reported by
``--check``. ``--root DIR`` runs against another tree (the tests use this).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("notebooks", "solutions")
EXERCISE_DIR = "exercises"

#: The header every notebook .py starts with.
HEADER = """\
# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---
"""

# Writing with these options reproduces HEADER exactly: no text_representation
# block, no jupytext version (which would change with every jupytext upgrade).
PY_FORMAT = {
    "extension": ".py",
    "format_name": "percent",
    "notebook_metadata_filter": "kernelspec,jupytext,-jupytext.text_representation,"
    "-jupytext.notebook_metadata_filter,-jupytext.cell_metadata_filter",
    "cell_metadata_filter": "tags,answer,-all",
}

STUB = ["# YOUR CODE HERE", 'raise NotImplementedError("exercise: replace this line with your code")']
MARKDOWN_STUB = "YOUR ANSWER HERE"

# A marker inside a cell's source: alone on its line, any indentation.
MARKER = re.compile(r"^(?P<indent>[ \t]*)### (?P<kind>BEGIN|END) (?P<what>SOLUTION|HIDDEN CHECKS)[ \t]*$")
# The same marker as it appears in the .py file, where markdown lines start with "# ".
RAW_MARKER = re.compile(r"^[ \t]*(?:#[ \t]*)?### (?P<kind>BEGIN|END) (?P<what>SOLUTION|HIDDEN CHECKS)[ \t]*$")
# Something that was meant to be a marker; left alone it would leak a solution.
NEAR_MISS = re.compile(r"^[ \t]*#[# \t]*(BEGIN|END)[ \t_]*(SOLUTIONS?|HIDDEN[ \t_]*CHECKS?)\b", re.IGNORECASE)
DEFINITION = re.compile(r"^(?:async[ \t]+def|def|class)[ \t]+([A-Za-z_]\w*)", re.MULTILINE)
# exercises/NN_name: only names like these are ever deleted as stale.
GENERATED_NAME = re.compile(r"^\d+[a-z]?_\w+$")  # 04_tensor_parallel, and an inserted 04b_tensor_parallel_nd


class BuildError(Exception):
    """A source file cannot be turned into its generated files; the message says where."""


# ----------------------------------------------------------------------------
# solutions -> exercises


def check_markers(text: str, path: str = "<solution>") -> None:
    """Raise :class:`BuildError` (with file and line) unless every marker block is balanced.

    Blocks must not nest, must close with the same kind they opened with, and
    must end inside the cell they started in.
    """
    opened = None  # (what, line number)
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("# %%"):
            if opened:
                raise BuildError(
                    f"{path}:{opened[1]}: '### BEGIN {opened[0]}' is not closed before "
                    f"the next cell starts at line {number}"
                )
            continue
        match = RAW_MARKER.match(line)
        if match is None:
            if NEAR_MISS.search(line):
                raise BuildError(
                    f"{path}:{number}: malformed marker {line.strip()!r}; write exactly "
                    "'### BEGIN SOLUTION', '### END SOLUTION', '### BEGIN HIDDEN CHECKS' "
                    "or '### END HIDDEN CHECKS' on a line of its own"
                )
            continue
        kind, what = match["kind"], match["what"]
        if kind == "BEGIN":
            if opened:
                raise BuildError(
                    f"{path}:{number}: '### BEGIN {what}' inside the '### BEGIN {opened[0]}' "
                    f"block opened at line {opened[1]}; blocks cannot nest"
                )
            opened = (what, number)
        elif opened is None:
            raise BuildError(f"{path}:{number}: '### END {what}' without a '### BEGIN {what}' before it")
        elif opened[0] != what:
            raise BuildError(
                f"{path}:{number}: '### END {what}' closes the '### BEGIN {opened[0]}' "
                f"block opened at line {opened[1]}"
            )
        else:
            opened = None
    if opened:
        raise BuildError(f"{path}:{opened[1]}: '### BEGIN {opened[0]}' is never closed")


def strip_solutions(source: str, markdown: bool = False) -> str:
    """One cell's source with solution blocks stubbed and hidden checks removed.

    The blocks are balanced: :func:`check_markers` judged the whole file first (the only place
    that validates them, with file and line in its message).
    """
    out, inside = [], False
    for line in source.split("\n"):
        match = MARKER.match(line)
        if match is None:
            if not inside:
                out.append(line)
        elif match["kind"] == "BEGIN":
            inside = True
            if match["what"] == "SOLUTION":
                indent = match["indent"]
                out += [indent + MARKDOWN_STUB] if markdown else [indent + s for s in STUB]
        else:
            inside = False
    result = "\n".join(out)
    # A block removed at the end of a cell would leave its blank lines behind.
    return result.rstrip() if result != source else result


def has_solution(source: str) -> bool:
    return any((m := MARKER.match(line)) and m["what"] == "SOLUTION" for line in source.split("\n"))


def _top_level_solution(source: str) -> bool:
    return any(
        (m := MARKER.match(line)) and m["what"] == "SOLUTION" and not m["indent"]
        for line in source.split("\n")
    )


def defined_names(source: str) -> list[str]:
    """Names of the top-level (unindented) ``def``/``class`` statements in a cell, in order."""
    return DEFINITION.findall(source)


def answer_cells(nb: nbformat.NotebookNode) -> dict[str, int]:
    """Answer name -> index of the cell carrying that ``answer`` metadata."""
    found = {}
    for index, cell in enumerate(nb.cells):
        name = cell.get("metadata", {}).get("answer")
        if cell.cell_type == "code" and isinstance(name, str) and name not in found:
            found[name] = index
    return found


def intro_cell_text(name: str) -> str:
    """The first cell of an exercise notebook: words for the learner only."""
    return (
        f"> **Where to work.** Do these exercises in your own copy, `my_exercises/{name}.ipynb` "
        "(`make lab` makes it; delete it and run `make lab` again for a fresh one). "
        "Answers typed into `exercises/` would be overwritten when the course is updated.\n"
        ">\n"
        "> Replace every `# YOUR CODE HERE` with your code and run the check cell below it: "
        "it prints ✔, or what is wrong. To grade all your notebooks from a terminal, run "
        "`make grade`."
    )


def exercise_notebook(text: str, path: str = "solutions/exercise.py") -> nbformat.NotebookNode:
    """The exercise notebook (a NotebookNode) made from a solution's .py text."""
    check_markers(text, path)
    nb = read_py(text, path)
    cells, names = [], {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type not in ("code", "markdown"):
            cells.append(cell)
            continue
        stripped = strip_solutions(cell.source, markdown=cell.cell_type == "markdown")
        if cell.cell_type == "markdown" or not has_solution(cell.source):
            # A cell that held nothing but hidden checks is dropped, not left empty.
            if stripped.strip() or not cell.source.strip():
                cell.source = stripped
                cells.append(cell)
            continue
        found = defined_names(cell.source)
        name = found[0] if found else f"answer-{len(names) + 1}"
        if name in names:
            lines = [
                n
                for n, line in enumerate(text.splitlines(), 1)
                if DEFINITION.match(line) and DEFINITION.match(line)[1] == name
            ]
            where = f"{path}:{lines[1]}" if len(lines) > 1 else path
            raise BuildError(
                f"{where}: a second answer cell starts with {name!r}; the first "
                "def/class of each answer cell names it and must be unique"
            )
        names[name] = index
        cell.metadata["answer"] = name
        tags = list(cell.metadata.get("tags", []))
        extra = ["answer"]
        if _top_level_solution(cell.source):
            # The stub raises as soon as the cell runs; nbval (make test) must accept that.
            extra.append("raises-exception")
        cell.metadata["tags"] = tags + [t for t in extra if t not in tags]
        cell.source = stripped
        cells.append(cell)
    cells.insert(0, nbformat.v4.new_markdown_cell(intro_cell_text(Path(path).stem)))
    nb.cells = cells
    return nb


def make_exercise(text: str, path: str = "solutions/exercise.py") -> str:
    """The exercise .py text made from a solution's .py text (see the module doc)."""
    result = write_py(exercise_notebook(text, path))
    leaked = [line for line in result.splitlines() if RAW_MARKER.match(line) or NEAR_MISS.search(line)]
    if leaked:  # cannot happen after check_markers; a last guard against leaking a solution
        raise BuildError(f"{path}: markers left in the exercise: {leaked[0]!r}")
    return result


# ----------------------------------------------------------------------------
# .py <-> .ipynb


def read_py(text: str, path: str = "<notebook>") -> nbformat.NotebookNode:
    """Parse a percent-format .py notebook, insisting on the course's header."""
    try:
        nb = jupytext.reads(text, fmt="py:percent")
    except Exception as exc:  # e.g. a broken YAML header
        raise BuildError(f"{path}: jupytext cannot read it: {exc}") from None
    kernelspec = nb.metadata.get("kernelspec", {})
    formats = nb.metadata.get("jupytext", {}).get("formats")
    if kernelspec.get("name") != "python3" or formats != "ipynb,py:percent":
        raise BuildError(
            f"{path}: the jupytext header is missing or incomplete (it needs formats "
            f"and the python3 kernelspec); start the file with:\n{HEADER}"
        )
    return nb


def write_py(nb: nbformat.NotebookNode) -> str:
    return jupytext.writes(nb, fmt=PY_FORMAT)


def assign_cell_ids(nb: nbformat.NotebookNode) -> None:
    """Give every cell an id derived from its content, so rebuilds are byte-stable.

    Hashing the content (not the position) keeps the ids of untouched cells
    when a cell is inserted, which keeps diffs of the .ipynb small.
    """
    seen = {}
    for cell in nb.cells:
        digest = hashlib.sha1(f"{cell.cell_type}\0{cell.source}".encode()).hexdigest()[:8]
        seen[digest] = seen.get(digest, 0) + 1
        cell["id"] = digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"


def to_ipynb(py_text: str, path: str = "<notebook>") -> str:
    """The .ipynb text (no outputs, stable ids) that pairs with a .py notebook."""
    nb = read_py(py_text, path)
    assign_cell_ids(nb)
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as exc:
        raise BuildError(f"{path}: the notebook would not be valid: {exc.message}") from None
    text = jupytext.writes(nb, fmt="ipynb")
    return text if text.endswith("\n") else text + "\n"


def without_outputs(ipynb_text: str, path: str = "<notebook>") -> str:
    """The .ipynb text as the build would write it for the same cells: outputs, execution counts
    and the metadata JupyterLab adds when a learner runs and saves a notebook are dropped.

    A notebook whose cells a learner only ran comes back byte for byte as committed, so
    ``--check`` and ``git status`` (through the filter ``make setup`` installs) see no change.
    """
    try:
        nb = jupytext.reads(ipynb_text, fmt="ipynb")
    except Exception as exc:
        raise BuildError(f"{path}: not a readable notebook: {exc}") from None
    return to_ipynb(write_py(nb), path)


# ----------------------------------------------------------------------------
# the whole tree


def plan(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file (absolute path) -> the text it should have."""
    root = Path(root)
    files = {}
    for folder in SOURCE_DIRS:
        for source in sorted((root / folder).glob("*.py")):
            text = _read(source)
            files[source.with_suffix(".ipynb")] = to_ipynb(text, _rel(source, root))
            if folder == "solutions" and GENERATED_NAME.match(source.stem):
                exercise_py = make_exercise(text, _rel(source, root))
                target = root / EXERCISE_DIR / source.name
                files[target] = exercise_py
                files[target.with_suffix(".ipynb")] = to_ipynb(exercise_py, _rel(target, root))
    return files


def stale_exercises(root: Path = ROOT) -> list[Path]:
    """Generated-looking exercise files whose solution no longer exists."""
    root = Path(root)
    found = []
    for path in sorted((root / EXERCISE_DIR).glob("*")):
        if (
            path.suffix in (".py", ".ipynb")
            and GENERATED_NAME.match(path.stem)
            and not (root / "solutions" / f"{path.stem}.py").exists()
        ):
            found.append(path)
    return found


def orphan_notebooks(root: Path = ROOT) -> list[Path]:
    """.ipynb files in notebooks/ or solutions/ with no .py source (never deleted: may be real work)."""
    root = Path(root)
    return [
        p
        for folder in SOURCE_DIRS
        for p in sorted((root / folder).glob("*.ipynb"))
        if not p.with_suffix(".py").exists()
    ]


def build(root: Path = ROOT) -> tuple[list[Path], list[Path]]:
    """Write what changed and delete stale exercises; return (written, removed)."""
    files = plan(root)  # everything is generated before anything is written
    written = []
    for path, text in files.items():
        if not path.exists() or _read(path) != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8", newline="\n")
            written.append(path)
    removed = stale_exercises(root)
    for path in removed:
        path.unlink()
    return written, removed


def check(root: Path = ROOT, files: dict[Path, str] | None = None) -> list[str]:
    """Problems in the tree (one line each); empty when everything is up to date."""
    root = Path(root)
    problems = []
    for path, text in (plan(root) if files is None else files).items():
        if not path.exists():
            problems.append(f"missing: {_rel(path, root)}")
        elif _read(path) != text and not (path.suffix == ".ipynb" and _same_cells(path, text)):
            problems.append(f"out of date: {_rel(path, root)}")
    for path in stale_exercises(root):
        problems.append(f"stale: {_rel(path, root)} (no solutions/{path.stem}.py)")
    return problems


def _same_cells(path: Path, expected: str) -> bool:
    """An .ipynb that differs only by a learner's outputs is up to date."""
    try:
        return without_outputs(_read(path), str(path)) == expected
    except BuildError:
        return False


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_lib.build", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a generated file is missing, out of date or stale",
    )
    parser.add_argument(
        "--strip-outputs",
        action="store_true",
        help="read a notebook on stdin, write it without outputs to stdout "
        "(the git filter that `make setup` installs)",
    )
    parser.add_argument(
        "--root", type=Path, default=ROOT, metavar="DIR", help="the course tree (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.strip_outputs:
        text = sys.stdin.read()
        try:
            sys.stdout.write(without_outputs(text, "<stdin>"))
        except BuildError:
            sys.stdout.write(text)  # not a course notebook: leave it as it is
        return 0
    try:
        if args.check:
            files = plan(root)
            problems = check(root, files)
            for path in orphan_notebooks(root):
                print(f"warning: {_rel(path, root)} has no .py source next to it")
            if problems:
                print("generated files are not up to date:")
                for line in problems:
                    print(f"  {line}")
                print("run: python -m course_lib.build")
                return 1
            print(f"build --check: all {len(files)} generated files are up to date")
            return 0
        written, removed = build(root)
    except BuildError as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {_rel(path, root)}")
    for path in removed:
        print(f"removed stale {_rel(path, root)}")
    for path in orphan_notebooks(root):
        print(f"warning: {_rel(path, root)} has no .py source next to it")
    if not written and not removed:
        print("build: everything up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
