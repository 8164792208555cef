"""Chapter 01: the collectives library, its pictures, and the exercise checks."""

import math
import re

import pytest
import reference_answers
import torch
import torch.distributed as dist
from matplotlib.figure import Figure

from course_lib import collectives, launch, viz
from course_lib.checks import FAILED, NOT_ATTEMPTED, PASSED
from course_lib.checks import collectives as check

# ----------------------------------------------------------------------------
# sizes and bus bandwidth


@pytest.mark.parametrize(
    "name, n, factor",
    [
        ("all-reduce", 2, 1.0),
        ("all-reduce", 4, 1.5),
        ("all-reduce", 8, 1.75),
        ("all-reduce", 1, 0.0),
        ("all-gather", 4, 0.75),
        ("reduce-scatter", 4, 0.75),
        ("all-to-all", 8, 0.875),
        ("broadcast", 4, 1.0),
        ("reduce", 4, 1.0),
        ("send/recv", 4, 1.0),
    ],
)
def test_bus_factor_follows_nccl_tests(name, n, factor):
    assert collectives.bus_factor(name, n) == pytest.approx(factor)


def test_bandwidth_is_bytes_over_time_times_factor():
    algbw, busbw = collectives.bandwidth("all-reduce", 4 * 2**20, 0.002, 4)
    assert algbw == pytest.approx(4 * 2**20 / 0.002)
    assert busbw == pytest.approx(algbw * 1.5)


def test_sizes_count_the_full_array():
    assert collectives.numels("all-gather", 12, 4) == (3, 12)
    assert collectives.numels("reduce-scatter", 12, 4) == (12, 3)
    assert collectives.numels("all-to-all", 12, 4) == (12, 12)
    assert collectives.numels("broadcast", 7, 4) == (7, 7)
    with pytest.raises(ValueError, match="not a multiple"):
        collectives.numels("all-gather", 10, 4)
    with pytest.raises(ValueError, match="unknown collective"):
        collectives.numels("allreduce", 8, 2)


# ----------------------------------------------------------------------------
# the demo: every rank's data before and after, against plain tensor math


def expected_after(name, before, root):
    n = len(before)
    total = torch.stack(before).sum(0) if name in ("reduce", "all-reduce", "reduce-scatter") else None
    if name == "send/recv":
        return [before[(r - 1) % n] for r in range(n)]
    if name == "broadcast":
        return [before[root]] * n
    if name == "reduce":
        return [total if r == root else None for r in range(n)]
    if name == "all-reduce":
        return [total] * n
    if name == "all-gather":
        return [torch.cat(before)] * n
    if name == "reduce-scatter":
        return list(total.chunk(n))
    if name == "all-to-all":
        return [torch.cat([before[j].chunk(n)[r] for j in range(n)]) for r in range(n)]


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("name", collectives.COLLECTIVES)
def test_demo_before_and_after(name, n):
    root = n - 1
    demo = collectives.run_collective(name, n, root=root)
    assert demo.world_size == n and len(demo.before) == n and len(demo.after) == n
    for r, b in enumerate(demo.before):
        assert torch.equal(b, 10.0 * r + torch.arange(len(b), dtype=b.dtype))
        assert torch.equal(demo.before_sources[r], torch.full_like(demo.before_sources[r], 2**r))
    for r, (got, want) in enumerate(zip(demo.after, expected_after(name, demo.before, root))):
        if want is None:
            assert got is None and demo.after_sources[r] is None
        else:
            assert torch.equal(got, want), (name, n, r, got, want)


def test_demo_sources_say_where_each_value_came_from():
    demo = collectives.run_collective("all-to-all", 3)
    # Rank r's chunk j came from rank j.
    for mask in demo.after_sources:
        assert [collectives.sources(int(m)) for m in mask] == [[0], [0], [1], [1], [2], [2]]
    demo = collectives.run_collective("reduce-scatter", 3)
    assert all(collectives.sources(int(m)) == [0, 1, 2] for mask in demo.after_sources for m in mask)


def test_time_collective_returns_one_time_per_size():
    timing = collectives.time_collective("all-reduce", 2, [4096, 65536], min_seconds=0.01)
    assert timing.nbytes == [4096, 65536] and timing.backend == launch.choose_backend("auto", 2)
    assert all(t > 0 for t in timing.seconds)
    assert timing.busbw[1] == pytest.approx(timing.algbw[1])  # factor 1 at N = 2
    assert "busbw" in timing.table()


def test_timing_keeps_the_spread_of_its_batches():
    timing = collectives.time_collective("all-gather", 2, [4096, 65536], min_seconds=0.01, batches=3)
    for lo, mid, hi in zip(timing.fastest, timing.seconds, timing.slowest):
        assert 0 < lo <= mid <= hi
    assert "best–worst batch" in timing.table()
    # Without a spread (as chapter 03 builds them) a Timing still works.
    assert "best–worst" not in collectives.Timing("all-reduce", 2, "gloo", [4096], [1e-3]).table()


def test_time_collectives_times_every_collective():
    timings = collectives.time_collectives(collectives.COLLECTIVES, 3, [3072], min_seconds=0.005, batches=3)
    assert list(timings) == list(collectives.COLLECTIVES)
    for name, t in timings.items():
        assert t.name == name and t.world_size == 3 and t.nbytes == [3072] and t.seconds[0] > 0


def test_predictions_follow_the_alpha_beta_formulas():
    from course_lib.alpha_beta import AlphaBeta

    model = AlphaBeta(1e-4, 1e9)
    timing = collectives.Timing("all-reduce", 4, "gloo", [4096, 1 << 20], [1e-3, 2e-3])
    assert collectives.predict(model, timing) == [model.ring_all_reduce(4, s) for s in timing.nbytes]
    timing.name = "broadcast"
    assert collectives.predict(model, timing) == [model.tree(4, s) for s in timing.nbytes]
    timing.name = "reduce"  # gloo's reduce is not one of the modelled algorithms
    assert collectives.predict(model, timing) is None


def test_wire_bytes_reach_the_bus_factor_bound():
    wire = collectives.wire_bytes(collectives.COLLECTIVES, 4, 1 << 18)
    if wire is None:
        pytest.skip("TCP bytes cannot be read here")
    s = 1 << 18
    for name, w in wire.items():
        assert w.nbytes == s and len(w.sent) == len(w.received) == 4
        assert max(w.received) >= 0.99 * collectives.bus_factor(name, 4) * s, name
    for name in ("all-reduce", "all-gather", "all-to-all"):  # gloo reaches the bound
        assert wire[name].busiest <= 1.03 * collectives.bus_factor(name, 4), name
    assert 1.99 <= wire["broadcast"].sent[0] / s < 2.5  # a binomial tree: the root sends ⌈log₂4⌉·S


# ----------------------------------------------------------------------------
# rounds: traced send/recv, replayed the α–β way


def test_rounds_of_simple_programs():
    ring_step = [[("isend", (r + 1) % 4, 8), ("recv", (r - 1) % 4, 8)] for r in range(4)]
    assert collectives.count_rounds(ring_step) == 1
    assert collectives.count_rounds([step * 3 for step in ring_step]) == 3  # three ring steps
    flat = [[("send", d, 8) for d in (1, 2, 3)]] + [[("recv", 0, 8)] for _ in range(3)]
    assert collectives.count_rounds(flat) == 3
    # A root receiving from three ranks at once takes a round per message: one port each way.
    gather = [[("recv", s, 8) for s in (1, 2, 3)]] + [[("send", 0, 8)] for _ in range(3)]
    assert collectives.count_rounds(gather) == 3
    assert collectives.count_rounds([[], []]) == 0


def test_rounds_refuse_a_receive_nobody_sends():
    with pytest.raises(ValueError, match="rank 1 waits for a message nobody sends"):
        collectives.count_rounds([[], [("recv", 0, 8)]])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_traced_broadcasts_take_log_n_and_n_minus_1_rounds(n):
    traces = collectives.trace_broadcast(("tree", "flat"), n, src=n - 1)
    assert collectives.count_rounds(traces["tree"]) == (math.ceil(math.log2(n)) if n > 1 else 0)
    assert collectives.count_rounds(traces["flat"]) == n - 1
    for name in ("tree", "flat"):  # N−1 messages each, every one of them the whole array
        messages = collectives.message_rounds(traces[name])
        assert len(messages) == n - 1 and {m[2] for m in messages} <= {16}
        assert sorted(dst for _, dst, _, _ in messages) == [r for r in range(n) if r != n - 1]


def test_trace_broadcast_refuses_gloo_own():
    with pytest.raises(ValueError, match="only the send/recv broadcasts"):
        collectives.trace_broadcast("dist.broadcast", 2)


def test_time_broadcasts_returns_one_timing_per_algorithm():
    timings = collectives.time_broadcasts(3, [4096], min_seconds=0.005, batches=3)
    assert set(timings) == {"tree", "flat", "dist.broadcast"}
    assert all(t.name == "broadcast" and t.seconds[0] > 0 for t in timings.values())


# ----------------------------------------------------------------------------
# pictures


def test_plot_collective_has_before_and_after_axes():
    demo = collectives.run_collective("reduce", 3, root=1)
    fig = viz.plot_collective(demo)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["before", "after"]
    assert len(fig.axes[0].get_yticklabels()) == 3
    assert fig._repr_png_().startswith(b"\x89PNG")


def test_plot_timing_has_time_and_bandwidth_axes():
    sizes = [4096, 16384]
    timings = [collectives.Timing("all-reduce", n, "gloo", sizes, [1e-3, 2e-3]) for n in (2, 4)]
    fig = viz.plot_timing(timings)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert len(fig.axes[1].get_lines()) == 2


def test_plot_timing_draws_bands_and_predictions_after_the_measured_lines():
    from course_lib.alpha_beta import AlphaBeta

    sizes = [4096, 16384]
    timings = [
        collectives.Timing("all-reduce", n, "gloo", sizes, [1e-3, 2e-3], [5e-4, 1e-3], [3e-3, 4e-3])
        for n in (2, 4)
    ]
    fig = viz.plot_timing(timings, predict=lambda t: collectives.predict(AlphaBeta(1e-4, 1e9), t))
    time_axis = fig.axes[0]
    assert len(time_axis.collections) == 2  # one band per timing
    lines = time_axis.get_lines()
    assert [line.get_linestyle() for line in lines] == ["-", "-", "--", "--"]


def test_plot_alpha_beta_and_rounds():
    from course_lib.alpha_beta import AlphaBeta, PointToPoint

    pp = PointToPoint([64, 1 << 20], [1.2e-4, 6e-4], [1e-4, 5e-4], [3e-4, 9e-4])
    fig = viz.plot_alpha_beta(pp, AlphaBeta(1e-4, 2.5e9))
    assert fig._repr_png_().startswith(b"\x89PNG")
    traces = collectives.trace_broadcast(("tree", "flat"), 4)
    fig = viz.plot_rounds({"tree": traces["tree"], "flat": traces["flat"]})
    assert [ax.get_title() for ax in fig.axes] == ["tree: 2 rounds, 3 messages", "flat: 3 rounds, 3 messages"]


def _children(widget):
    controls, picture = widget.children
    return (*controls.children, picture)


def test_collective_explorer_root_follows_n_and_hides_without_a_root():
    explorer = viz.collective_explorer("broadcast", 4)
    picker, ranks, root, picture = _children(explorer)
    assert (root.max, root.layout.display, root.disabled) == (3, None, False)
    assert len(picture.outputs) == 1
    root.value = 3
    ranks.value = 2  # root 3 no longer exists: the slider clamps it
    assert (root.max, root.value) == (1, 1)
    picker.value = "all-gather"
    assert root.layout.display == "none" and root.disabled
    assert len(picture.outputs) == 1  # redrawn in place, not appended


# ----------------------------------------------------------------------------
# checks: reference solutions pass, wrong ones get a specific diagnostic


@pytest.fixture(scope="module")
def solution():
    return reference_answers.load("01_collectives")


# That every reference answer passes its check is tested once, through the grader: tests/test_course.py.


def test_wrong_broadcast_names_world_size_rank_and_element():
    def adds_instead_of_copying(tensor, src):
        if dist.get_rank() == src:
            for dst in range(dist.get_world_size()):
                if dst != src:
                    dist.send(tensor, dst)
        else:
            incoming = torch.empty_like(tensor)
            dist.recv(incoming, src)
            tensor += incoming

    result = check.broadcast(adds_instead_of_copying)
    assert result.status == FAILED
    assert result.message.startswith("N=2, src=0: rank 1: tensor[0, 0] expected ")


@pytest.mark.mistake("1.1")
def test_broadcast_that_returns_a_new_tensor_is_told_to_work_in_place(solution):
    broadcast = solution.broadcast  # closures carry the function, not the module

    def returns_copy(tensor, src):
        out = tensor.clone()
        broadcast(out, src)
        return out

    result = check.broadcast(returns_copy)
    assert result.status == FAILED and "in place" in result.message


def test_off_by_one_all_gather_is_located(solution):
    all_gather = solution.all_gather

    def off_by_one(tensor):
        gathered = all_gather(tensor)
        return gathered[1:] + gathered[:1]  # rank order shifted by one

    result = check.all_gather(off_by_one)
    assert result.status == FAILED
    assert result.message.startswith("N=2: rank 0: gathered[0][0, 0] expected ")


def test_reduce_that_ignores_dst_fails_on_dst_1(solution):
    reduce = solution.reduce
    result = check.reduce(lambda tensor, dst: reduce(tensor, 0))
    assert result.status == FAILED
    assert result.message.startswith("N=2, dst=1: rank 1: tensor[")


@pytest.mark.mistake("1.4")
def test_all_reduce_without_broadcast_fails_on_rank_1(solution):
    reduce = solution.reduce
    result = check.all_reduce(lambda tensor: reduce(tensor, 0))
    assert result.status == FAILED
    assert result.message.startswith("N=2: rank 1: tensor[")
    assert "rank 0 holds the sum, rank 1 does not: broadcast it" in result.message


def test_not_implemented_reads_not_attempted():
    def stub(tensor, src):
        raise NotImplementedError("replace this line with your code")

    result = check.broadcast(stub)
    assert result.status == NOT_ATTEMPTED
    assert result.line().endswith("not attempted")


def test_built_in_collectives_are_refused():
    def uses_built_in(tensor, src):
        dist.broadcast(tensor, src)

    result = check.broadcast(uses_built_in)
    assert result.status == FAILED
    assert "exercise 1.1 must be built from send/recv only: you called dist.broadcast" in result.message


def test_refusal_is_named_when_another_rank_fails_after_it():
    def root_sends_others_use_built_in(tensor, src):
        if dist.get_rank() == src:  # its sends fail once the refused rank has left
            for dst in range(dist.get_world_size()):
                if dst != src:
                    dist.send(tensor, dst)
        else:
            dist.broadcast(tensor, src)

    result = check.broadcast(root_sends_others_use_built_in)
    assert result.status == FAILED
    assert re.fullmatch(
        r"exercise 1\.1 must be built from send/recv only: you called "
        r"dist\.broadcast \(rank \d, N=2\)",
        result.message,
    ), result.message


def test_built_in_imported_by_name_is_refused_too():
    from torch.distributed import all_gather as imported_all_gather

    def uses_imported(tensor):
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        imported_all_gather(out, tensor)
        return out

    result = check.all_gather(uses_imported)
    assert result.status == FAILED and "you called dist.all_gather" in result.message


def test_deadlock_is_reported_quickly(monkeypatch):
    monkeypatch.setattr(check, "TIMEOUT", 3.0)

    def forgets_rank_0(tensor, src):
        if dist.get_rank() == src:
            for dst in range(1, dist.get_world_size()):
                if dst != src:
                    dist.send(tensor, dst)
        else:
            dist.recv(tensor, src)  # rank 0 waits forever when src != 0

    result = check.broadcast(forgets_rank_0)
    assert result.status == FAILED
    assert result.message.startswith("N=2: deadlock")
    assert "rank 0: waiting in dist.recv" in result.message


def chain_reduce(tensor, dst):
    """Right sum, wrong shape: every partial sum travels one rank further, N−1 rounds."""
    rank, n = dist.get_rank(), dist.get_world_size()
    me = (rank - dst) % n  # dst is me = 0; the chain runs n−1 → n−2 → … → 0
    if me < n - 1:
        incoming = torch.empty_like(tensor)
        dist.recv(incoming, (me + 1 + dst) % n)
        tensor += incoming
    if me > 0:
        dist.send(tensor, (me - 1 + dst) % n)


@pytest.mark.mistake("1.3")
def test_a_chain_reduce_is_right_but_not_a_tree(solution):
    assert check.reduce(solution.reduce).status == PASSED
    result = check.reduce(chain_reduce)
    assert result.status == FAILED, result
    assert "N=4, dst=0: the sum is right, but its messages take 3 rounds" in result.message
    assert "a chain" in result.message and "⌈log₂N⌉ = 2" in result.message


def everyone_to_everyone(tensor):
    """Right result, not a ring: every rank sends its tensor straight to every other rank."""
    rank, n = dist.get_rank(), dist.get_world_size()
    gathered = [torch.empty_like(tensor) for _ in range(n)]
    gathered[rank] = tensor.clone()
    requests = [dist.isend(tensor, peer) for peer in range(n) if peer != rank]
    for peer in range(n):
        if peer != rank:
            dist.recv(gathered[peer], peer)
    for request in requests:
        request.wait()
    return gathered


@pytest.mark.mistake("1.2")
def test_an_all_gather_that_is_not_a_ring_is_named(solution):
    assert check.all_gather(solution.all_gather).status == PASSED
    result = check.all_gather(everyone_to_everyone)
    assert result.status == FAILED, result
    assert "N=3: the result is right, but it is not a ring: rank 0 sent to ranks [1, 2]" in result.message
