"""``course_lib.pp`` is the short name of :mod:`course_lib.pipeline_parallel` (chapter 06's library): the same module."""

import sys

from course_lib import pipeline_parallel

sys.modules[__name__] = pipeline_parallel
