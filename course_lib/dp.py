"""``course_lib.dp`` is the short name of :mod:`course_lib.data_parallel`: the same module (chapter 02)."""

import sys

from course_lib import data_parallel

sys.modules[__name__] = data_parallel
