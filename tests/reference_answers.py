"""The reference answers in solutions/NN_name.py, for tests that need a correct learner answer.

    sol = reference_answers.load("03_ring_allreduce")
    check.ring_all_reduce(sol.ring_all_reduce)

Loading runs the notebook's import cells and its answer cells (those with a
``### BEGIN SOLUTION`` block), nothing else: no demo cell launches ranks, no
check cell runs. Tests use the solutions themselves, so a copy cannot drift.
"""

import ast
import types

from course_lib import build

SOLUTIONS = build.ROOT / "solutions"


def _code_cells(stem: str):
    """(source, its first line in the file minus one) of every code cell of solutions/<stem>.py."""
    path = SOLUTIONS / f"{stem}.py"
    text = path.read_text(encoding="utf-8")
    for cell in build.read_py(text, str(path)).cells:
        if cell.cell_type == "code":
            # Code cells stand in the .py verbatim, at the start of a line: with their line
            # numbers, tracebacks (also those from the ranks) point into the file.
            yield cell.source, text.count("\n", 0, text.index("\n" + cell.source) + 1)


def sources(stem: str) -> dict[str, str]:
    """Answer name (its cell's first def/class, as the grader names it) -> the answer cell's source."""
    return {
        build.defined_names(source)[0]: source
        for source, _ in _code_cells(stem)
        if build.has_solution(source)
    }


def load(stem: str) -> types.ModuleType:
    """A fresh module holding everything the import and answer cells of solutions/<stem>.py define.

    The module is kept out of ``sys.modules`` on purpose: cloudpickle then sends
    its functions and classes to the ranks by value, as it does a notebook's (a
    rank could not import them by name).
    """
    module = types.ModuleType(f"solutions_{stem}")
    path = str(SOLUTIONS / f"{stem}.py")
    for source, first_line in _code_cells(stem):
        body = ast.parse(source).body
        imports_only = bool(body) and all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in body)
        if imports_only or build.has_solution(source):
            exec(compile("\n" * first_line + source, path, "exec"), vars(module))
    return module
