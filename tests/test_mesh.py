"""Chapter 09: the rank grid, its process groups, 3D training against one process, and the checks."""

import functools

import pytest
import reference_answers
import torch
import torch.distributed as dist

from course_lib import dp, launch, mesh
from course_lib.checks import ERROR, FAILED, NOT_ATTEMPTED, PASSED
from course_lib.checks import parallel_3d as check
from course_lib.models import make_stack


def test_layout_order_is_tp_then_dp_then_pp():
    layout = mesh.GridLayout(dp=2, tp=2, pp=2)
    assert layout.coordinates(5) == mesh.Coord(dp=0, tp=1, pp=1)
    assert [layout.rank_at(**vars(layout.coordinates(r))) for r in range(8)] == list(range(8))
    assert layout.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 2, 2), (2, 4, 1), (1, 1, 5)])
def test_every_rank_in_exactly_one_group_per_axis(shape):
    layout = mesh.GridLayout(*shape)
    for axis in mesh.AXES:
        groups = layout.groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(layout.world_size))
        assert all(len(g) == layout.size(axis) for g in groups)


def test_invalid_sizes():
    with pytest.raises(ValueError, match="positive integer"):
        mesh.GridLayout(dp=0)
    with pytest.raises(ValueError, match="rank must be in"):
        mesh.GridLayout(2, 2, 1).coordinates(4)
    with pytest.raises(ValueError, match="tp index"):
        mesh.GridLayout(2, 2, 1).rank_at(tp=2)


def readable(fig, max_width=9.5, min_points=9):
    """Shown at full size in JupyterLab (at most 950 px wide), no text below ``min_points``."""
    from matplotlib.text import Text

    assert fig.get_size_inches()[0] <= max_width
    small = [
        (t.get_text(), t.get_fontsize())
        for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip() and t.get_fontsize() < min_points
    ]
    assert not small, small


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 1, 1), (4, 2, 4), (2, 8, 2), (1, 1, 8)])
def test_draw_returns_a_readable_figure(shape):
    fig = mesh.GridLayout(*shape).draw(highlight=5 if shape == (2, 2, 2) else None)
    assert len(fig.axes) == 3 and fig._repr_png_()[:4] == b"\x89PNG"
    readable(fig)


def test_step_messages_count_what_the_cost_model_counts():
    """Rank 0 of a 2 × 2 × 2 grid, 4 layers, m = 2: stage 0 holds 2 layers."""
    layout = mesh.GridLayout(2, 2, 2)
    sent = mesh.step_messages(
        layout, layout.coordinates(0), make_stack(2, 8, 16, 0), tokens=4, hidden=8, microbatches=2
    )
    assert sent.tp == [4 * 8 * 4] * (2 * 2 * 2 - 2)  # 2 per layer and micro-batch, less the first backward
    assert sent.pp == [4 * 8 * 4] * 4  # 2 sends forward, 2 receives back
    assert len(sent.dp) == 8  # one all-reduce per parameter tensor

    from course_lib.alpha_beta import AlphaBeta

    model = AlphaBeta(alpha=1e-4, beta=1e9)
    seconds = sent.seconds(model, dp=2, tp=2)
    assert seconds["pp"] == pytest.approx(4 * (1e-4 + 128 / 1e9))
    assert seconds["tp"] == pytest.approx(6 * 2 * (1e-4 + 64 / 1e9))  # ring on 2: 2 rounds of S/2
    assert seconds["dp"] == pytest.approx(sum(model.ring_all_reduce(2, b) for b in sent.dp))


def test_time_step_messages_replays_on_four_ranks():
    fn = functools.partial(make_stack, 2, 16, 32, 0)
    for r in launch.run(mesh.time_step_messages, 4, 1, 2, 2, fn, 8, 2, 2, backend="gloo"):
        assert set(r["seconds"]) == {"dp", "tp", "pp"} and r["seconds"]["dp"] == 0.0
        assert r["seconds"]["tp"] > 0 and r["seconds"]["pp"] > 0  # timings vary: only their presence
        assert len(r["messages"].tp) == 2 * 1 * 2 - (2 if r["coord"].pp == 0 else 0)


def _groups_in_rank(d, t, p):
    grid = mesh.RankGrid(d, t, p)
    return grid.coord, [dist.get_process_group_ranks(getattr(grid, f"{a}_group")) for a in ("tp", "dp", "pp")]


def _wrong_size():
    mesh.RankGrid(dp=2, tp=2, pp=2)


def test_rank_grid_groups_on_four_ranks():
    layout = mesh.GridLayout(2, 2, 1)
    results = launch.run(_groups_in_rank, 4, 2, 2, 1, backend="gloo")
    for rank, (coord, groups) in enumerate(results):
        assert coord == layout.coordinates(rank)
        for axis, ranks in zip(("tp", "dp", "pp"), groups):
            assert rank in ranks and ranks in layout.groups(axis)
    with pytest.raises(launch.RankError, match="must equal the world size"):
        launch.run(_wrong_size, 2, backend="gloo")


MODEL = functools.partial(make_stack, 2, 8, 16, 0)


def test_dp_x_tp_equals_single_process_on_four_ranks():
    batches = dp.make_batches(2, 8, d_model=8)
    reference = MODEL()
    reference_losses = mesh.train_dense(reference, batches)
    dense = {k: v.detach() for k, v in reference.named_parameters()}
    results = launch.run(mesh.train_3d, 4, 2, 2, 1, batches, MODEL, 2, backend="gloo")
    assert mesh.compare_with_dense(results, dense, tp_size=2) == 4 * 8
    torch.testing.assert_close(
        torch.tensor(results[0]["losses"]), torch.tensor(reference_losses), rtol=1e-5, atol=1e-5
    )


def test_tp_x_pp_with_zero1_equals_adamw_on_four_ranks():
    batches = dp.make_batches(2, 8, d_model=8)
    reference = MODEL()
    mesh.train_dense(reference, batches, zero_stage=1, lr=0.01)
    dense = {k: v.detach() for k, v in reference.named_parameters()}
    results = launch.run(mesh.train_3d, 4, 2, 1, 2, batches, MODEL, 2, 1, 0.01, backend="gloo")
    assert mesh.compare_with_dense(results, dense, tp_size=1) == 4 * 4  # every rank, every tensor
    assert results[0]["memory"]["optimizer"] < results[0]["memory"]["params"] * 2  # halved over dp=2


# ----------------------------------------------------------------------------
# the checks


@pytest.fixture(scope="module")
def solution():
    return reference_answers.load("09_parallel_3d")


def test_checks_pass_for_correct_answers(solution):
    assert check.coordinates(lambda r, d, t, p: (r // t % d, r % t, r // (t * d))).status == PASSED
    assert check.group_ranks(solution.group_ranks).status == PASSED
    refused = check.group_ranks(lambda axis, d, t, p: mesh.GridLayout(d, t, p).groups(axis))
    assert refused.status == FAILED and "you called mesh.GridLayout.groups" in refused.message


@pytest.mark.mistake("9.1", "9.2", "9.3")
def test_checks_diagnose_wrong_answers(solution):
    result = check.coordinates(lambda r, d, t, p: (r % d, r // d % t, r // (d * t)))
    assert result.status == FAILED and "dp varies fastest" in result.message
    swapped = {"tp": "dp", "dp": "tp", "pp": "pp"}
    result = check.group_ranks(lambda axis, d, t, p: solution.group_ranks(swapped[axis], d, t, p))
    assert result.status == FAILED and "those are the dp groups" in result.message
    result = check.model_state_bytes(lambda psi, zero, d, t, p: 16 * psi / (t * p) / (d if zero else 1))
    assert result.status == FAILED and "ZeRO-3's memory" in result.message  # shards all at every stage


def _world_average(model, dp_group):
    for p in model.parameters():  # over everyone: mixes the tp blocks
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


@pytest.mark.mistake("9.4")
def test_average_gradients_check_names_the_wrong_group(solution):
    assert check.average_gradients(solution.average_gradients).status == PASSED
    result = check.average_gradients(_world_average)
    assert result.status == FAILED and "dp_group only" in result.message


def _not_attempted(*args):
    raise NotImplementedError


@pytest.mark.parametrize("name", ["coordinates", "group_ranks", "model_state_bytes", "average_gradients"])
def test_not_attempted(name):
    assert getattr(check, name)(_not_attempted).status == NOT_ATTEMPTED


def test_crash_is_an_error_not_a_pass():
    assert check.coordinates(lambda *a: 1 / 0).status == ERROR
