"""The learner's own copies of the exercise notebooks, in ``my_exercises/``.

    python -m course_lib.workspace          # copy each exercise notebook not copied yet

``exercises/`` is regenerated whenever the course changes, so answers typed there would be lost
or would block an update. ``make lab`` therefore gives each learner a copy of every exercise
notebook in ``my_exercises/`` (ignored by git). A copy is never overwritten: a notebook added to
the course later is copied the next time, and deleting a copy gives a fresh one.
``python -m course_lib.grade`` with no paths grades these copies.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from course_lib.build import EXERCISE_DIR, ROOT

WORK_DIR = "my_exercises"


def learner_copies(root: Path = ROOT) -> list[Path]:
    """The learner's exercise notebooks, in chapter order."""
    return sorted((Path(root) / WORK_DIR).glob("[0-9][0-9]*_*.ipynb"))


def make_copies(root: Path = ROOT) -> list[Path]:
    """Copy every exercise notebook that has no copy yet; return the new copies."""
    root = Path(root)
    target = root / WORK_DIR
    target.mkdir(exist_ok=True)
    made = []
    for source in sorted((root / EXERCISE_DIR).glob("[0-9][0-9]*_*.ipynb")):
        copy = target / source.name
        if not copy.exists():
            shutil.copyfile(source, copy)
            made.append(copy)
    return made


def main() -> int:
    made = make_copies()
    if made:
        print(f"your exercise notebooks: {', '.join(p.relative_to(ROOT).as_posix() for p in made)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
