"""``course_lib.tp`` is the short name of :mod:`course_lib.tensor_parallel`: the same module (chapter 04)."""

import sys

from course_lib import tensor_parallel

sys.modules[__name__] = tensor_parallel
