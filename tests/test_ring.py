"""Chapter 03: all-reduce from send/recv, traffic against the formulas, BucketedDDP, and the checks."""

import math
import os
import re
import time

import pytest
import reference_answers
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from course_lib import comm, ddp, launch, models
from course_lib.checks import FAILED, NOT_ATTEMPTED, PASSED
from course_lib.checks import ring_allreduce as check


def chunk_sizes(k, n):
    return [len(c) for c in torch.arange(k).tensor_split(n)]


# ----------------------------------------------------------------------------
# results equal dist.all_reduce


def compare_everything(cases):
    """Inside a rank: every from-scratch op against the built-in; returns what differed."""
    rank, n = dist.get_rank(), dist.get_world_size()
    failures = []
    for case, (shape, dtype) in enumerate(cases):
        g = torch.Generator().manual_seed(97 * rank + case)
        x = (torch.randn(shape, generator=g) * 100).to(dtype)
        expected = x.clone()
        dist.all_reduce(expected)

        def same(a, b):  # integers exactly; floats up to the order of the additions
            return (
                torch.equal(a, b)
                if not dtype.is_floating_point
                else torch.allclose(a, b, rtol=1e-5, atol=1e-4)
            )

        for name in ("ring", "unchunked ring", "naive", "tree"):
            if not same(comm.ALL_REDUCES[name](x.clone()), expected):
                failures.append(f"{name} {shape} {dtype} rank {rank}")
        own = comm.ring_reduce_scatter(x.clone())
        if not same(own, expected.view(-1).tensor_split(n)[rank]):
            failures.append(f"reduce-scatter {shape} {dtype} rank {rank}")
        mine = torch.full_like(x, -1)
        mine.view(-1).tensor_split(n)[rank].copy_(x.view(-1).tensor_split(n)[rank])
        gathered = comm.ring_all_gather(mine)
        everyone = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(everyone, x)
        want = torch.cat([everyone[c].view(-1).tensor_split(n)[c] for c in range(n)]).view_as(x)
        if not torch.equal(gathered, want):
            failures.append(f"all-gather {shape} {dtype} rank {rank}")
    return failures


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_every_op_equals_the_builtin(n):
    cases = [
        ((1,), torch.int64),
        ((7,), torch.int32),
        ((3, 5), torch.int64),
        ((13,), torch.float32),
        ((2, 3), torch.float64),
        ((n + 1,), torch.float32),
    ]
    results = launch.run(compare_everything, n, cases, timeout=60)
    assert results == [[]] * n


def _policies_while_our_all_reduces_send():
    """Every scheduling policy any thread of this rank had whenever one of our all-reduces
    sent or received, and the policies after the calls."""

    def policies():
        return {os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/self/task")}

    seen, originals = set(), {name: getattr(dist, name) for name in ("send", "recv", "isend", "irecv")}

    def noting(call):
        def noted(*args, **kwargs):
            seen.update(policies())
            return call(*args, **kwargs)

        return noted

    for name, call in originals.items():
        setattr(dist, name, noting(call))
    try:
        for name in ("ring", "unchunked ring", "naive", "tree"):
            comm.ALL_REDUCES[name](torch.ones(6))
        comm.ring_reduce_scatter(torch.ones(6))
        comm.ring_all_gather(torch.ones(6))
    finally:
        for name, call in originals.items():
            setattr(dist, name, call)
    return seen, policies()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_our_all_reduces_wait_as_batch_and_leave_the_policy_as_it_was(monkeypatch):
    monkeypatch.delenv(launch.SCHED_BATCH_ENV, raising=False)
    for during, after in launch.run(_policies_while_our_all_reduces_send, 3):
        assert during == {os.SCHED_BATCH} and after == {os.SCHED_OTHER}


def subgroup_all_reduce():
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    odd_three = dist.new_group([1, 2, 3])
    mine = pairs[rank % 2]
    x = torch.arange(5) + 10 * rank
    expected = x.clone()
    dist.all_reduce(expected, group=mine)
    ring = comm.ring_all_reduce(x.clone(), group=mine)
    naive = comm.naive_all_reduce(x.clone(), group=mine, root=1)
    three = None
    if rank:
        three = comm.ring_all_reduce(x.clone(), group=odd_three)
    else:
        with pytest.raises(ValueError, match="not a member"):
            comm.ring_all_reduce(x.clone(), group=odd_three)
    return torch.equal(ring, expected), torch.equal(naive, expected), three


def test_subgroups():
    results = launch.run(subgroup_all_reduce, 4)
    assert all(r[0] and r[1] for r in results)
    total = sum(torch.arange(5) + 10 * r for r in (1, 2, 3))
    assert results[0][2] is None and all(torch.equal(r[2], total) for r in results[1:])


# ----------------------------------------------------------------------------
# bytes: count_traffic's payload against the formulas, exactly


def payload_of_each_op(k):
    result = {}
    for name in ("ring", "unchunked ring", "naive", "tree", "reduce-scatter", "all-gather"):
        fn = {"reduce-scatter": comm.ring_reduce_scatter, "all-gather": comm.ring_all_gather}.get(
            name, comm.ALL_REDUCES.get(name)
        )
        x = torch.ones(k, dtype=torch.int64)
        with comm.count_traffic() as traffic:
            fn(x)
        result[name] = (traffic.payload_sent, traffic.payload_received)
    return result


@pytest.mark.parametrize("n, k", [(3, 10), (4, 12)])
def test_bytes_per_rank_equal_the_formulas(n, k):
    b, h = 8, comm.HEADER_BYTES
    sizes = chunk_sizes(k, n)
    for rank, got in enumerate(launch.run(payload_of_each_op, n, k)):
        mine, right, left = sizes[rank], sizes[(rank + 1) % n], sizes[(rank - 1) % n]
        # Reduce-scatter sends every chunk but its own and receives every chunk but its left
        # neighbour's own; all-gather sends every chunk but the one it gets last (r+1), and
        # receives every chunk but its own.
        assert got["reduce-scatter"] == ((k - mine) * b + h, (k - left) * b + h)
        assert got["all-gather"] == ((k - right) * b + h, (k - mine) * b + h)
        assert got["ring"] == ((2 * k - mine - right) * b + h, (2 * k - left - mine) * b + h)
        assert got["unchunked ring"] == ((n - 1) * k * b + h,) * 2
        assert got["naive"] == (((n - 1) * k * b + h,) * 2 if rank == 0 else (k * b + h,) * 2)
        if rank == 0:  # the tree's root receives and sends the whole array once per level
            assert got["tree"] == ((math.ceil(math.log2(n)) * k * b + h,) * 2)
        if k % n == 0:  # the textbook figure
            assert got["ring"][0] - h == 2 * (n - 1) / n * k * b


# ----------------------------------------------------------------------------
# bad input


def test_non_contiguous_tensor_is_refused_before_any_communication():
    with pytest.raises(ValueError, match="contiguous"):
        comm.ring_all_reduce(torch.zeros(4, 3).t())
    with pytest.raises(TypeError, match="needs a tensor"):
        comm.naive_all_reduce([1.0, 2.0])


def ring_with_rank_1_different(kind):
    x = torch.zeros(6)
    if dist.get_rank() == 1:
        x = {"numel": torch.zeros(8), "dtype": torch.zeros(6, dtype=torch.int64), "shape": torch.zeros(2, 3)}[
            kind
        ]
    comm.ring_all_reduce(x)


@pytest.mark.parametrize(
    "kind, theirs",
    [("numel", "shape (8,) float32"), ("dtype", "shape (6,) int64"), ("shape", "shape (2, 3) float32")],
)
def test_ranks_holding_different_tensors_get_a_clear_error_fast(kind, theirs, no_orphans):
    start = time.monotonic()
    with pytest.raises(launch.RankError) as info:
        launch.run(ring_with_rank_1_different, 3, kind, timeout=20)
    assert time.monotonic() - start < 10
    assert info.value.exc_type == "ValueError"
    message = str(info.value)
    assert "every rank must pass the same shape and dtype" in message
    assert theirs in message  # the different tensor is named, by rank 1 or by its right neighbour


# ----------------------------------------------------------------------------
# buckets and BucketedDDP


def test_assign_buckets_fills_from_the_last_parameter():
    assert ddp.assign_buckets([4, 4, 4], 8) == [[2, 1], [0]]
    assert ddp.assign_buckets([16, 4, 4, 4], 10) == [[3, 2, 1], [0]]
    assert ddp.assign_buckets([4, 100, 4], 10) == [[2, 1], [0]]
    assert ddp.assign_buckets([4, 4], 1e9) == [[1, 0]]
    assert ddp.assign_buckets([], 8) == []
    with pytest.raises(ValueError):
        ddp.assign_buckets([4], 0)


@pytest.mark.parametrize("cap", [0, -1.0, math.nan, True, "25"])
def test_bucket_cap_must_be_positive(cap):
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        ddp.BucketedDDP(models.make_mlp(), bucket_cap_mb=cap)


def gradients_ours_and_torch(caps, steps):
    """Two steps (SGD between them) with each wrapper; gradients of every step, ours per cap and torch's."""
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = models.regression_data(8 * n)
    x, y = models.shard(x, rank, n), models.shard(y, rank, n)
    runs = {cap: ddp.BucketedDDP(models.make_mlp(seed=rank), bucket_cap_mb=cap) for cap in caps}
    runs["torch"] = DistributedDataParallel(models.make_mlp(seed=0))
    grads, timelines = {}, {}
    for key, model in runs.items():
        grads[key] = []
        for step in range(steps):
            F.mse_loss(model(x), y).backward()
            if step == steps - 1:  # the last step accumulates a second backward, as DDP allows
                F.mse_loss(model(x * 0.5), y).backward()
            grads[key].append([p.grad.clone() for p in model.parameters()])
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            if step < steps - 1:
                model.zero_grad(set_to_none=True)
        if key != "torch":
            timelines[key] = (len(model.buckets), model.timeline)
    del runs["torch"]  # a live DDP wrapper at process-group teardown can hang
    return grads, timelines


def single_process_gradients(n, steps):
    model = models.make_mlp(seed=0)
    x, y = models.regression_data(8 * n)
    grads = []
    for step in range(steps):
        F.mse_loss(model(x), y).backward()
        if step == steps - 1:
            # Each rank's second loss is the mean over its shard: over the whole batch, the same mean.
            F.mse_loss(model(x * 0.5), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("n", [2, 3])
def test_bucketed_ddp_equals_torch_ddp_and_one_process(n):
    caps, steps = (1e-6, 0.004, 25.0), 2
    single = single_process_gradients(n, steps)
    for grads, timelines in launch.run(gradients_ours_and_torch, n, caps, steps, timeout=90):
        for cap in caps:
            for ours, theirs, alone in zip(grads[cap], grads["torch"], single):
                for a, b, c in zip(ours, theirs, alone):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
        assert [timelines[cap][0] for cap in caps] == [4, 2, 1]
        for buckets, t in timelines.values():
            assert len(t.buckets) == buckets and len(t.grads) == 4
            for b in t.buckets:
                assert 0 <= b.ready <= b.launched <= b.finished <= t.synced
            assert t.backward_done <= t.synced


def bucketed_ddp_on_a_subgroup():
    rank = dist.get_rank()
    group = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    model = ddp.BucketedDDP(models.make_mlp(seed=rank), bucket_cap_mb=0.004, group=group)
    x, y = models.regression_data(8, seed=rank)
    F.mse_loss(model(x), y).backward()
    return [p.detach().clone() for p in model.parameters()], [p.grad for p in model.parameters()]


def test_bucketed_ddp_on_subgroups_averages_within_each_group():
    results = launch.run(bucketed_ddp_on_a_subgroup, 4)
    for first in (0, 2):
        (params_a, grads_a), (params_b, grads_b) = results[first], results[first + 1]
        reference = models.make_mlp(seed=first)  # the group's rank 0 broadcasts its parameters
        for a, b, p in zip(params_a, params_b, reference.parameters()):
            assert torch.equal(a, p.detach()) and torch.equal(b, p.detach())
        local = []
        for r in (first, first + 1):
            model = models.make_mlp(seed=first)
            x, y = models.regression_data(8, seed=r)
            F.mse_loss(model(x), y).backward()
            local.append([p.grad for p in model.parameters()])
        for a, b, g0, g1 in zip(grads_a, grads_b, *local):
            torch.testing.assert_close(a, (g0 + g1) / 2, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b, a, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# the exercise checks: references pass, wrong answers get a specific diagnostic


@pytest.fixture(scope="module")
def solution():
    return reference_answers.load("03_ring_allreduce")


# That every reference answer passes its check is tested once, through the grader: tests/test_course.py.


def test_the_course_s_own_bucket_rule_earns_nothing():
    refused = check.assign_buckets(ddp.assign_buckets)  # the course's own rule earns nothing
    assert refused.status == FAILED and "you called ddp.assign_buckets" in refused.message


def test_a_ring_that_imports_isend_and_recv_by_name_passes():
    # The traffic counter sits below the Python names: a learner who writes
    # `from torch.distributed import isend, recv` is counted like one who writes dist.isend.
    from torch.distributed import isend as send_async
    from torch.distributed import recv as receive

    def by_name(tensor):
        r, n = dist.get_rank(), dist.get_world_size()
        chunks = tensor.view(-1).tensor_split(n)
        for step in range(n - 1):
            incoming = torch.empty_like(chunks[(r - step - 2) % n])
            request = send_async(chunks[(r - step - 1) % n], (r + 1) % n)
            receive(incoming, (r - 1) % n)
            request.wait()
            chunks[(r - step - 2) % n].add_(incoming)
        return chunks[r]

    result = check.ring_reduce_scatter(by_name)
    assert result.status == PASSED, result.message


def test_reduce_scatter_that_copies_instead_of_adding_names_rank_chunk_and_element():
    def copies(tensor):
        r, n = dist.get_rank(), dist.get_world_size()
        chunks = tensor.view(-1).tensor_split(n)
        for step in range(n - 1):
            request = dist.isend(chunks[(r - step - 1) % n], (r + 1) % n)
            dist.recv(chunks[(r - step - 2) % n], (r - 1) % n)
            request.wait()

    result = check.ring_reduce_scatter(copies)
    assert result.status == FAILED
    assert result.message.startswith("N=2, K=10 int64, rank 0: chunk 0, element [0] expected ")


@pytest.mark.mistake("3.2")
def test_all_gather_one_step_short_says_which_chunk_never_arrived():
    def one_step_short(tensor):
        r, n = dist.get_rank(), dist.get_world_size()
        chunks = tensor.view(-1).tensor_split(n)
        for step in range(n - 2):
            request = dist.isend(chunks[(r - step) % n], (r + 1) % n)
            dist.recv(chunks[(r - step - 1) % n], (r - 1) % n)
            request.wait()

    result = check.ring_all_gather(one_step_short)
    assert result.status == FAILED
    assert result.message.startswith("N=2, K=10 int64, rank 0: chunk 1, element [5] expected ")
    assert result.message.endswith("got -99 (5 of 10 elements differ) (chunk 1 never arrived)")


@pytest.mark.mistake("3.2")
def test_receiving_into_a_chunk_of_another_size_is_explained():
    def wrong_chunk(tensor):
        r, n = dist.get_rank(), dist.get_world_size()
        chunks = tensor.view(-1).tensor_split(n)
        for step in range(n - 1):
            request = dist.isend(chunks[(r - step) % n], (r + 1) % n)
            dist.recv(chunks[(r - step + 1) % n], (r - 1) % n)  # should be r - step - 1
            request.wait()

    result = check.ring_all_gather(wrong_chunk)  # N = 2 passes by luck: r + 1 = r - 1 (mod 2)
    assert result.status == FAILED
    assert re.fullmatch(
        r"N=3, rank \d: a message of 32 B arrived in a recv of 24 B — sender and receiver "
        r"disagree on which chunk moves at some step \(.*\)",
        result.message,
    ), result.message


@pytest.mark.mistake("3.3")
def test_unchunked_all_reduce_is_correct_but_sends_too_much():
    def unchunked(tensor):
        r, n = dist.get_rank(), dist.get_world_size()
        passing, incoming, total = tensor.clone(), torch.empty_like(tensor), tensor.clone()
        for _ in range(n - 1):
            request = dist.isend(passing, (r + 1) % n)
            dist.recv(incoming, (r - 1) % n)
            request.wait()
            total += incoming
            passing, incoming = incoming, passing
        tensor.copy_(total)

    result = check.ring_all_reduce(unchunked)
    assert result.status == FAILED
    # At N = 2 both send K; at N = 3 the unchunked version sends 2K, the ring 4/3·K.
    assert result.message == (
        "N=3, K=10 int64, rank 0: right result, but it sent 160 B; a ring "
        "all-reduce sends 104 B (each chunk once per phase)"
    )


@pytest.mark.mistake("3.3")
def test_returning_a_new_tensor_is_told_to_work_in_place(solution):
    ring_all_reduce = solution.ring_all_reduce  # the closure then carries the function, not the module

    def returns_copy(tensor):
        out = tensor.clone()
        ring_all_reduce(out)
        return out

    result = check.ring_all_reduce(returns_copy)
    assert result.status == FAILED and result.message.endswith("your function returned a new one")


def test_built_in_collectives_are_refused():
    result = check.ring_all_reduce(lambda tensor: dist.all_reduce(tensor))
    assert result.status == FAILED
    assert result.message.startswith(
        "exercise 3.3 must be built from send/recv only: you called dist.all_reduce"
    )


def test_the_course_s_ring_step_is_refused_inside_a_learner_s_ring():
    def all_gather_by_the_course_s_steps(tensor):
        r, n = dist.get_rank(), dist.get_world_size()
        parts = tensor.view(-1).tensor_split(n)
        for step in range(n - 1):
            parts[(r - step - 1) % n].copy_(comm.ring_step(parts[(r - step) % n]))
        return tensor

    result = check.ring_all_gather(all_gather_by_the_course_s_steps)
    assert result.status == FAILED and "you called ring_allreduce.ring_step" in result.message, result.message


def test_not_implemented_reads_not_attempted():
    def stub(tensor):
        raise NotImplementedError("exercise: replace this line with your code")

    assert check.ring_reduce_scatter(stub).status == NOT_ATTEMPTED
    assert check.assign_buckets(lambda sizes, cap: stub(sizes)).status == NOT_ATTEMPTED


def test_buckets_in_forward_order_are_diagnosed(solution):
    def forward_order(sizes, cap):
        return [sorted(b) for b in solution.assign_buckets(sizes, cap)]

    result = check.assign_buckets(forward_order)
    assert result.status == FAILED
    assert result.message == (
        "sizes=[4, 4, 4, 4], cap=8: bucket 0 should be [3, 2], got [2, 3] "
        "(expected [[3, 2], [1, 0]], got [[2, 3], [0, 1]])"
    )


def test_deadlock_is_reported_quickly(monkeypatch):
    # Not much shorter: on a busy machine starting the ranks alone can take seconds, which
    # would read as "timed out", not "deadlock".
    monkeypatch.setattr(check, "TIMEOUT", 6.0)

    def both_receive_first(tensor):
        r, n = dist.get_rank(), dist.get_world_size()
        chunks = tensor.view(-1).tensor_split(n)
        for _step in range(n - 1):
            incoming = torch.empty_like(chunks[0])
            dist.recv(incoming, (r - 1) % n)  # everyone waits for a send nobody makes
            dist.send(chunks[r], (r + 1) % n)

    start = time.monotonic()
    result = check.ring_reduce_scatter(both_receive_first)
    assert time.monotonic() - start < 20
    assert result.status == FAILED
    assert result.message.startswith("N=2: deadlock"), result.message
    assert "waiting in dist.recv" in result.message


# ----------------------------------------------------------------------------
# chapter 03's instruments: rounds, recorded steps, timings with their spread, torch's buckets


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_rounds_are_counted_exactly(n):
    got = comm.count_rounds(n, names=("ring", "tree", "unchunked ring", "naive"))
    header = 1 if n > 1 else 0
    assert got["ring"] == 2 * (n - 1) + header
    assert got["tree"] == (2 * math.ceil(math.log2(n)) if n > 1 else 0) + header
    assert got["unchunked ring"] == (n - 1) + header
    assert got["naive"] == 2 * (n - 1) + header  # the root receives, then sends, one at a time


def stamped_messages_still_arrive():
    x = torch.arange(6) + 10 * dist.get_rank()
    with comm.count_message_rounds() as rounds:
        comm.ring_all_reduce(x)
    return x, rounds.deepest


def test_stamps_do_not_change_the_result():
    results = launch.run(stamped_messages_still_arrive, 3)
    total = sum(torch.arange(6) + 10 * r for r in range(3))
    assert all(torch.equal(x, total) for x, _ in results) and max(d for _, d in results) == 5


def test_recorded_ring_steps_follow_the_algorithm():
    n = 4
    steps = comm.record_ring_steps(n)
    assert steps.world_size == n and all(len(v) == 2 * (n - 1) + 1 for v in steps.values)
    total = sum(10.0 * r + torch.arange(n) for r in range(n))
    for r in range(n):
        assert torch.equal(steps.values[r][0], 10.0 * r + torch.arange(n))
        assert torch.equal(steps.values[r][-1], total)
        assert steps.masks[r][-1].tolist() == [2**n - 1] * n  # every rank's number in every chunk
        # reduce-scatter sends chunk r−s−1, all-gather chunk r−s (its own first)
        assert steps.sent[r] == [(r - s - 1) % n for s in range(n - 1)] + [(r - s) % n for s in range(n - 1)]
        assert steps.masks[r][n - 1][r] == 2**n - 1  # after the reduce-scatter: chunk r is complete


def test_timings_keep_their_spread():
    times = comm.time_all_reduce(2, [4096, 65536], names=("ring", "tree"), min_seconds=0.01, batches=3)
    for t in times.values():
        assert isinstance(t, comm.SpreadTiming) and len(t.seconds) == len(t.fastest) == len(t.slowest) == 2
        assert all(lo <= mid <= hi for lo, mid, hi in zip(t.fastest, t.seconds, t.slowest))
        assert len(t.busbw) == 2


def test_torch_ddp_buckets_one_pass_then_rebuilt_in_gradient_order():
    # fc1.weight and fc2.weight are 1 MiB each (256 × 1024 floats)
    per_step, ours = ddp.torch_ddp_buckets(2.0, depth=2, d_model=256, d_hidden=1024, steps=2)
    assert len(per_step[0]) == 1 and len(per_step[0][0]) == 8  # first pass: one bucket
    assert (
        per_step[1]
        == ours
        == [
            ["1.fc2.bias", "1.fc2.weight", "1.fc1.bias", "1.fc1.weight"],
            ["0.fc2.bias", "0.fc2.weight", "0.fc1.bias", "0.fc1.weight"],
        ]
    )
    per_step, _ = ddp.torch_ddp_buckets(None, depth=2, d_model=256, d_hidden=1024, steps=2)
    assert per_step[1][0] == ["1.fc2.bias", "1.fc2.weight"]  # the default cap's 1 MiB first bucket


def test_backward_timelines_overlap_with_small_buckets_only():
    timelines = ddp.record_timelines((0.5, 100.0), depth=3, d_model=128, d_hidden=512, steps=2)
    for per_cap in timelines:
        small, whole = per_cap[0.5], per_cap[100.0]
        assert len(small.buckets) == 3 and len(whole.buckets) == 1
        # the first small bucket starts while gradients are still being computed; one big one cannot
        assert small.buckets[0].launched < small.grads[-1][1]
        assert whole.buckets[0].launched >= whole.grads[-1][1]


def test_chapter_03_pictures_draw():
    from course_lib import viz
    from course_lib.collectives import Timing

    steps = comm.record_ring_steps(3)
    for fig in (viz.plot_ring_steps(steps), viz.plot_ring_step(steps, 2), viz.plot_ring_step(steps, 99)):
        assert fig._repr_png_()[:4] == b"\x89PNG"
    sizes = [4096, 65536]
    timing = comm.SpreadTiming("all-reduce", 2, "gloo", sizes, [1e-3, 2e-3], [5e-4, 1e-3], [2e-3, 4e-3])
    plain = Timing("all-reduce", 2, "gloo", sizes, [1e-3, 2e-3])
    fig = viz.plot_all_reduce_times(
        {2: {"ring": timing, "dist.all_reduce": plain}, 8: {"ring": timing}},
        lambda name, n, s: 1e-3 if name == "ring" else None,
    )
    assert fig._repr_png_()[:4] == b"\x89PNG"
    series = {("ring", "every rank"): dict(formula=[1.0, 1.5], payload=[1.0, 1.5], wire=None)}
    assert viz.plot_bytes_per_rank([2, 4], 1.0, series)._repr_png_()[:4] == b"\x89PNG"
    explorer = viz.ring_explorer(world_size=2, max_ranks=3)
    n_slider, _, step_slider = explorer.children[0].children
    n_slider.value = 3
    assert step_slider.max == 4
