"""Property-based tests of the pure functions that partition work, each against a brute-force
reference: every element, layer, token or rank lands in exactly one place, as the docs say."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course_lib import dp, models, moe, pp, tp, zero
from course_lib.ddp import assign_buckets
from course_lib.mesh import GridLayout

FAST = settings(max_examples=100, deadline=None)
world_sizes = st.integers(1, 16)


@FAST
@given(numel=st.integers(0, 10_000), n=world_sizes)
def test_padded_size_is_the_smallest_multiple_of_n_that_holds_numel(numel, n):
    size = zero.padded_size(numel, n)
    brute = next(m for m in range(numel, numel + n) if m % n == 0)
    assert size == brute


@FAST
@given(k=st.integers(0, 200), n=world_sizes)
def test_ring_chunks_cover_the_tensor_and_differ_by_at_most_one(k, n):
    # ring_allreduce.py's chunk c is tensor.view(-1).tensor_split(N)[c]: the first K mod N hold one more
    chunks = torch.arange(k).tensor_split(n)
    sizes = [c.numel() for c in chunks]
    assert len(chunks) == n and sum(sizes) == k
    assert sizes == [k // n + (1 if c < k % n else 0) for c in range(n)]
    assert torch.equal(torch.cat(chunks), torch.arange(k))


@FAST
@given(numel=st.integers(0, 5000), servers=st.integers(1, 12))
def test_server_ranges_tile_the_parameters(numel, servers):
    ranges = dp.server_ranges(numel, servers)
    assert len(ranges) == servers and ranges[0][0] == 0 and ranges[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [end - start for start, end in ranges]
    assert max(sizes) - min(sizes) <= 1


@FAST
@given(world=st.integers(1, 8), per_rank=st.integers(0, 8))
def test_blocks_and_shards_tile_evenly(world, per_rank):
    total = world * per_rank
    owner = [None] * total
    for rank in range(world):
        for i in range(total)[tp.block_of(total, world, rank)]:
            assert owner[i] is None
            owner[i] = rank
    assert owner == [i // per_rank for i in range(total)] if per_rank else owner == []
    batch = torch.arange(total)
    assert torch.equal(torch.cat([models.shard(batch, r, world) for r in range(world)]), batch)


@FAST
@given(total=st.integers(1, 50), world=st.integers(2, 8))
def test_uneven_blocks_are_refused_not_rounded(total, world):
    if total % world:
        try:
            tp.block_of(total, world, 0)
        except ValueError as exc:
            assert f"{total} % {world}" in str(exc)
        else:
            raise AssertionError("block_of must refuse an uneven split")


@FAST
@given(sizes=st.lists(st.integers(1, 5000), min_size=0, max_size=40), cap=st.integers(1, 20_000))
def test_buckets_walk_backwards_and_close_at_the_cap(sizes, cap):
    buckets = assign_buckets(sizes, cap)
    flat = [i for b in buckets for i in b]
    assert flat == list(reversed(range(len(sizes))))  # every parameter once, last first
    for b in buckets[:-1]:  # a closed bucket reached the cap, and not before its last parameter
        assert sum(sizes[i] for i in b) >= cap
        assert sum(sizes[i] for i in b[:-1]) < cap
    if buckets:
        assert sum(sizes[i] for i in buckets[-1][:-1]) < cap


@FAST
@given(
    data=st.data(),
    tokens=st.integers(1, 40),
    experts=st.integers(1, 6),
    k=st.integers(1, 3),
    capacity=st.integers(0, 12),
)
def test_slots_follow_choice_then_token_priority(data, tokens, experts, k, capacity):
    k = min(k, experts)
    rows = [data.draw(st.permutations(range(experts)))[:k] for _ in range(tokens)]
    index = torch.tensor(rows, dtype=torch.long).reshape(tokens, k)
    slot = moe.assign_slots(index, experts, capacity)
    filled = [0] * experts  # brute force: choice by choice, token by token
    for choice in range(k):
        for t in range(tokens):
            e = rows[t][choice]
            expected = filled[e] if filled[e] < capacity else -1
            filled[e] += 1
            assert int(slot[t, choice]) == expected


@FAST
@given(
    tokens=st.integers(1, 5000),
    experts=st.integers(1, 64),
    k=st.integers(1, 8),
    cf=st.sampled_from([0.5, 1.0, 1.1, 1.25, 1.5, 2.0]),
)
def test_capacity_is_the_ceiling(tokens, experts, k, cf):
    c = moe.expert_capacity(tokens, experts, k, cf)
    exact = k * cf * tokens / experts
    assert c - 1 < exact + 1e-6 and c >= exact - 1e-6


@FAST
@given(costs=st.lists(st.integers(0, 100), min_size=1, max_size=30), data=st.data())
def test_partition_bounds_are_contiguous_nonempty_and_near_the_targets(costs, data):
    world = data.draw(st.integers(1, len(costs)))
    bounds = pp.partition_bounds(costs, world)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(costs) and len(bounds) == world
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(end > start for start, end in bounds)
    # each cut is the feasible one closest to its share of the total (brute force over cuts)
    weights = costs if sum(costs) > 0 else [1] * len(costs)
    prefix = [0] + [sum(weights[: i + 1]) for i in range(len(weights))]
    for k, (_, cut) in enumerate(bounds[:-1], start=1):
        target = k * prefix[-1] / world
        lowest, highest = bounds[k - 1][0] + 1, len(costs) - (world - k)
        best = min(abs(prefix[c] - target) for c in range(lowest, highest + 1))
        assert math.isclose(abs(prefix[cut] - target), best)


@FAST
@given(d=st.integers(1, 4), t=st.integers(1, 4), p=st.integers(1, 4))
def test_grid_coordinates_and_ranks_round_trip(d, t, p):
    grid = GridLayout(dp=d, tp=t, pp=p)
    seen = set()
    for rank in range(grid.world_size):
        c = grid.coordinates(rank)
        assert grid.rank_at(dp=c.dp, tp=c.tp, pp=c.pp) == rank
        seen.add((c.dp, c.tp, c.pp))
    assert len(seen) == d * t * p
    for axis, size in (("dp", d), ("tp", t), ("pp", p)):
        groups = grid.groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(grid.world_size))
        assert all(len(g) == size for g in groups)
        for g in groups:  # members differ only along this axis
            others = {
                tuple(getattr(grid.coordinates(r), a) for a in ("dp", "tp", "pp") if a != axis) for r in g
            }
            assert len(others) == 1
