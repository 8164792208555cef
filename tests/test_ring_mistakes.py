"""Chapter 03: wrong answers to 3.1 and 3.4 whose messages name the mistake.

The rest of chapter 03's catalogue of wrong answers is in tests/test_ring.py (marked
``pytest.mark.mistake``); these two stand here, next to it, so that file is not edited while
another change to it is under way. Move them into test_ring.py when convenient.
"""

import pytest
import reference_answers
import torch.distributed as dist

from course_lib.checks import FAILED
from course_lib.checks import ring_allreduce as check


@pytest.mark.mistake("3.1")
def test_a_reduce_scatter_one_step_short_adds_nothing_on_two_ranks():
    def one_step_short(tensor):  # N − 2 steps instead of N − 1
        r, n = dist.get_rank(), dist.get_world_size()
        chunks = tensor.view(-1).tensor_split(n)
        for step in range(n - 2):
            incoming = chunks[(r - step - 2) % n].clone()
            request = dist.isend(chunks[(r - step - 1) % n], (r + 1) % n)
            dist.recv(incoming, (r - 1) % n)
            request.wait()
            chunks[(r - step - 2) % n].add_(incoming)

    result = check.ring_reduce_scatter(one_step_short)
    assert result.status == FAILED, result
    assert result.message.startswith("N=2, K=10 int64, rank 0: chunk 0, element [0] expected "), (
        result.message
    )
    assert result.message.endswith("(rank 0's own value: nothing was added into chunk 0)"), result.message


@pytest.mark.mistake("3.4")
def test_buckets_filled_from_the_first_parameter_or_never_over_the_cap_are_named():
    solution = reference_answers.load("03_ring_allreduce")

    def from_the_first(sizes, cap):
        # The right rule on the reversed list, numbered back: the first parameter goes first.
        buckets = solution.assign_buckets(sizes[::-1], cap)
        return [[len(sizes) - 1 - i for i in bucket] for bucket in buckets]

    result = check.assign_buckets(from_the_first)
    assert result.status == FAILED, result
    assert result.message.startswith("sizes=[4, 4, 4, 4], cap=8: bucket 0 should be [3, 2], got [0, 1]")
    assert "you filled them from the first parameter: fill from the LAST one" in result.message

    def never_over_the_cap(sizes, cap):
        buckets, filled = [], 0
        for i in reversed(range(len(sizes))):
            if not buckets or filled + sizes[i] > cap:
                buckets.append([])
                filled = 0
            buckets[-1].append(i)
            filled += sizes[i]
        return buckets

    result = check.assign_buckets(never_over_the_cap)
    assert result.status == FAILED, result
    assert result.message.startswith("sizes=[16, 4, 4, 4], cap=10: bucket 0 should be [3, 2, 1], got [3, 2]")
    assert "a bucket closes only once it holds cap bytes or more" in result.message
