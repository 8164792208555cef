"""The README and the glossary stay true as chapters land."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
LESSONS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]*_*.py"))


def test_readme_lists_every_lesson():
    readme = (ROOT / "README.md").read_text()
    assert LESSONS
    missing = [name for name in LESSONS if f"notebooks/{name}" not in readme]
    assert not missing, f"README.md does not list {missing}"
    assert "(planned)" not in readme or len(LESSONS) < 11


def test_readme_states_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme


def test_glossary_links_point_at_existing_chapters_and_every_row_has_chinese():
    glossary = (ROOT / "GLOSSARY.md").read_text()
    links = re.findall(r"\]\((notebooks/[^)]+\.ipynb)\)", glossary)
    assert links
    assert [link for link in links if not (ROOT / link).exists()] == []
    rows = [line for line in glossary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= 40
    for row in rows:
        chinese = row.split("|")[2]
        assert re.search(r"[\u4e00-\u9fff]", chinese) or "torchrun" in row or "GPipe" in row, row
