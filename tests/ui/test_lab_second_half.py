"""The other half of the lessons in a real browser (see test_lab.py): a module of its own, so
pytest-xdist runs it on the other worker, beside its own JupyterLab and browser."""

import pytest
from test_lab import LESSONS, browser, lab, run_lesson  # noqa: F401 - the fixtures, for this module

SECOND_HALF = LESSONS[1::2]


@pytest.mark.parametrize("lesson", SECOND_HALF)
def test_lesson_runs_top_to_bottom_and_its_widget_answers(browser, lesson):  # noqa: F811
    run_lesson(browser, lesson)
