"""The chapter table agrees with the files: one stem from lesson to checks to library."""

import importlib
import pathlib

import pytest

from course_lib import chapters, checks
from course_lib.chapters import CHAPTERS, chapter_id, exercise_key

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_lessons_are_the_table_in_reading_order():
    lessons = sorted(p.stem for p in (ROOT / "notebooks").glob("*.py"))
    assert lessons == [c.name for c in CHAPTERS]  # sorted by name == the table's order


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.name)
def test_a_chapter_shares_its_stem(chapter):
    if chapter.number != "00":
        assert (ROOT / "solutions" / f"{chapter.name}.py").is_file()
        assert (ROOT / "course_lib" / "checks" / f"{chapter.stem}.py").is_file()
        ids = checks.exercises_for_chapter(chapter.id)
        assert ids and all(i.startswith(f"{chapter.id}.") for i in ids)
    for module in chapter.library:
        importlib.import_module(f"course_lib.{module}")
    stem_module = ROOT / "course_lib" / f"{chapter.stem}.py"
    if stem_module.is_file():
        assert chapter.library[0] == chapter.stem


def test_ids_of_inserted_chapters_sort_after_their_number():
    assert chapter_id("04b_tensor_parallel_nd") == "4b" and chapter_id("00_setup") == "0"
    ids = ["5.1", "4b.2", "10.1", "4.3", "4b.10", "4b.1"]
    assert sorted(ids, key=exercise_key) == ["4.3", "4b.1", "4b.2", "4b.10", "5.1", "10.1"]
    for bad in ("4b", "4.b", "b4.1", "04b_Tensor", "4_x"):
        with pytest.raises(ValueError):
            exercise_key(bad) if "_" not in bad else chapter_id(bad)
    with pytest.raises(KeyError, match="no chapter"):
        chapters.by_id("99z")
