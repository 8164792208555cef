"""Reference code earns nothing: an answer that calls the course's own implementation of what
its exercise asks fails with a message naming the call, however the answer reaches it."""

import functools

import pytest

from course_lib import collectives, data_parallel, ddp, mesh, pipeline_parallel, ring_allreduce, zero
from course_lib.checks import FAILED
from course_lib.checks import collectives as ch01
from course_lib.checks import data_parallel as ch02
from course_lib.checks import parallel_3d as ch09
from course_lib.checks import pipeline_parallel as ch06
from course_lib.checks import ring_allreduce as ch03
from course_lib.checks import zero as ch07

REFUSED = "asks you to write this yourself, not to call the course's own: you called"


def broadcast_by_name(tensor, src):
    collectives.flat_broadcast(tensor, src)


def reduce_scatter_by_default(tensor, _impl=ring_allreduce.ring_reduce_scatter):
    return _impl(tensor)


class _Holder:
    impl = staticmethod(data_parallel.average_gradients_allreduce)


def average_by_attribute(model):
    _Holder.impl(model)


CASES = [
    (ch01.broadcast, broadcast_by_name, "collectives.flat_broadcast"),
    (ch03.ring_reduce_scatter, reduce_scatter_by_default, "ring_allreduce.ring_reduce_scatter"),
    (ch02.average_gradients, average_by_attribute, "data_parallel.average_gradients_allreduce"),
    (ch03.assign_buckets, lambda sizes, cap: ddp.assign_buckets(sizes, cap), "ddp.assign_buckets"),
    (ch06.gpipe_schedule, functools.partial(pipeline_parallel.gpipe_schedule), "pipeline_parallel.gpipe_schedule"),
    (ch07.adamw_step_, lambda *a, **k: zero.adamw_(*a, **k), "zero.adamw_"),
    (ch09.coordinates, lambda r, d, t, p: tuple(vars(mesh.GridLayout(d, t, p).coordinates(r)).values())[:3],
     "mesh.GridLayout.coordinates"),
]  # fmt: skip


@pytest.mark.parametrize("check, answer, named", CASES, ids=[c[2] for c in CASES])
def test_the_course_own_implementation_is_refused(check, answer, named):
    result = check(answer)
    assert result.status == FAILED, result
    assert REFUSED in result.message and named in result.message, result.message
