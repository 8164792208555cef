"""The α–β model of chapter 01: its formulas, the fit, and the point-to-point measurement."""

import math

import pytest

from course_lib import alpha_beta
from course_lib.alpha_beta import AlphaBeta

MODEL = AlphaBeta(alpha=50e-6, beta=2e9)  # 50 µs, 2 GB/s


def test_one_message_is_alpha_plus_bytes_over_beta():
    assert MODEL.message(0) == pytest.approx(50e-6)
    assert MODEL.message(2e9) == pytest.approx(1 + 50e-6)
    assert MODEL.rounds(3, 1e6) == pytest.approx(3 * (50e-6 + 1e6 / 2e9))


@pytest.mark.parametrize("n", [2, 3, 4, 8, 64])
def test_collective_formulas(n):
    s = 16 * 2**20
    assert MODEL.ring_all_reduce(n, s) == pytest.approx(
        2 * (n - 1) * MODEL.alpha + 2 * (n - 1) / n * s / MODEL.beta
    )
    assert MODEL.ring_all_gather(n, s) == pytest.approx((n - 1) * MODEL.alpha + (n - 1) / n * s / MODEL.beta)
    assert MODEL.ring_reduce_scatter(n, s) == MODEL.ring_all_gather(n, s)
    assert MODEL.tree(n, s) == pytest.approx(math.ceil(math.log2(n)) * MODEL.message(s))
    assert MODEL.chain(n, s) == pytest.approx((n - 1) * MODEL.message(s))


def test_one_rank_costs_nothing():
    assert MODEL.ring_all_reduce(1, 1e6) == MODEL.tree(1, 1e6) == MODEL.chain(1, 1e6) == 0


def test_describe_names_both_numbers():
    assert MODEL.describe() == "α = 50 µs per message, β = 2 GB/s"


SIZES = [64, 1024, 4096, 65536, 1 << 20, 16 << 20]


def test_fit_recovers_exact_parameters():
    fitted = alpha_beta.fit(SIZES, [MODEL.message(s) for s in SIZES])
    # α is the median of the small messages, whose S/β is not quite zero: within 1 µs.
    assert fitted.alpha == pytest.approx(MODEL.alpha, abs=1e-6)
    assert fitted.beta == pytest.approx(MODEL.beta, rel=0.01)


def test_fit_shrugs_off_one_slow_measurement_at_each_end():
    seconds = [MODEL.message(s) for s in SIZES]
    seconds[0] *= 20  # a small message that waited for a core
    seconds[-2] *= 3  # a large one that did
    fitted = alpha_beta.fit(SIZES, seconds)
    assert fitted.alpha == pytest.approx(MODEL.alpha, rel=0.1)
    assert fitted.beta == pytest.approx(MODEL.beta, rel=0.1)  # the largest message dominates β's fit


def test_fit_refuses_what_it_cannot_separate():
    with pytest.raises(ValueError, match="at least two sizes"):
        alpha_beta.fit([4096], [1e-4])
    with pytest.raises(ValueError, match="measure larger sizes"):
        alpha_beta.fit([64, 1024], [1e-4, 1e-4])


@pytest.mark.parametrize("batch_scheduling", [False, True])
def test_measure_point_to_point_on_two_ranks(batch_scheduling):
    sizes = [64, 65536]
    pp = alpha_beta.measure_point_to_point(
        sizes, min_seconds=0.01, batches=3, batch_scheduling=batch_scheduling
    )
    assert pp.nbytes == sizes
    for lo, mid, hi in zip(pp.fastest, pp.seconds, pp.slowest):
        assert 0 < lo <= mid <= hi
    assert "median (µs)" in pp.table() and "64 KiB" in pp.table()


def test_measure_point_to_point_rounds_sizes_to_whole_floats_and_needs_two_ranks():
    assert alpha_beta.measure_point_to_point([6], min_seconds=0.001, batches=1).nbytes == [4]
    with pytest.raises(ValueError, match="at least 2 ranks"):
        alpha_beta.measure_point_to_point([64], world_size=1)
