"""``course_lib.tp_nd`` is the short name of :mod:`course_lib.tensor_parallel_nd`: the same module (chapter 04b)."""

import sys

from course_lib import tensor_parallel_nd

sys.modules[__name__] = tensor_parallel_nd
