"""``course_lib.pp`` is the short name of :mod:`course_lib.pipeline_parallel`: the same module (chapter 06)."""

import sys

from course_lib import pipeline_parallel

sys.modules[__name__] = pipeline_parallel
