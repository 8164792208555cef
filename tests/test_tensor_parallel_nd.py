"""Chapter 04b: course_lib.tp_nd against the dense MLP, its formulas, its errors, and the exercise checks.

One launch per rank count (4, 8) checks every mode there: ranks are processes on 2 cores.
"""

import pytest
import reference_answers
import torch
import torch.distributed as dist
from conftest import run_gloo as run

from course_lib import tp_nd
from course_lib.checks import FAILED, NOT_ATTEMPTED
from course_lib.checks import tensor_parallel_nd as check
from course_lib.models import make_mlp
from course_lib.traffic import count_traffic

H, HIDDEN, BATCH, SEQ = 24, 48, 2, 12  # splits over 2×2, 2×2×2 (h % 4, H % 4) and 1D on 4 and 8
M = BATCH * SEQ
CLOSE = dict(rtol=1e-5, atol=1e-5)


def inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(BATCH, SEQ, H, generator=g), torch.randn(BATCH, SEQ, H, generator=g)


def dense_reference():
    x, upstream = inputs()
    mlp = make_mlp(H, HIDDEN, seed=1)
    x = x.clone().requires_grad_()
    out = mlp(x)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, {k: p.grad for k, p in mlp.named_parameters()}


def every_mode(modes):
    """Per mode: output, x.grad, gathered grads, and the layer's measured bytes and calls."""
    x, upstream = inputs()
    results = {}
    for mode in modes:
        mlp = tp_nd.parallel_mlp(make_mlp(H, HIDDEN, seed=1), mode)
        xx = x.clone().requires_grad_()
        out = mlp(xx)
        (out * upstream).sum().backward()
        grads = mlp.gathered_grads()  # before the measurement below adds to them
        rows = x.reshape(M, H)
        mine = rows.clone() if mode == "1d" else rows[mlp.grid.activation_blocks(M, H)[mlp.grid.rank]].clone()
        mine.requires_grad_()
        with count_traffic() as forward:
            y = mlp.forward_sharded(mine)
        with count_traffic() as backward:
            y.backward(torch.ones_like(y))
        results[mode] = dict(
            out=out.detach(),
            x_grad=xx.grad,
            grads=grads,
            parameters=sum(p.numel() * p.element_size() for p in mlp.parameters()),
            activations=sum(mlp.held_activation_bytes.values()),
            forward=forward.received,
            backward=backward.received,
            calls=(len(forward.calls), len(backward.calls)),
            ops=sorted({c.op for c in forward.calls + backward.calls}),
        )
    return results


@pytest.mark.parametrize("n, modes", [(4, ("1d", "2d")), (8, ("1d", "2.5d", "3d"))])
def test_every_mode_equals_the_dense_mlp_and_its_formulas(n, modes):
    out, x_grad, grads = dense_reference()
    per_rank = run(every_mode, n, modes)
    for mode in modes:
        f = tp_nd.predicted(mode, n, M, H, HIDDEN)
        for rank, res in enumerate(r[mode] for r in per_rank):
            torch.testing.assert_close(res["out"], out, **CLOSE)
            torch.testing.assert_close(res["x_grad"], x_grad, **CLOSE)
            assert res["grads"].keys() == grads.keys()
            for name, grad in grads.items():
                torch.testing.assert_close(
                    res["grads"][name], grad, **CLOSE, msg=f"{mode} rank {rank} {name}"
                )
            assert res["parameters"] == f["parameters"] and res["activations"] == f["activations"]
            assert res["calls"] == (f["forward calls"], f["backward calls"]), (mode, res["calls"])
        expected_ops = {"1d": ["all_reduce"], "2d": ["all_reduce", "broadcast", "reduce"]}.get(mode)
        if expected_ops:
            assert per_rank[0][mode]["ops"] == expected_ops
        if per_rank[0][mode]["forward"] is None:
            continue  # wire bytes cannot be read here
        for kind in ("forward", "backward"):
            mean = sum(r[mode][kind] for r in per_rank) / n
            # the formula, plus gloo's headers: a few hundred bytes per message, at most 2(n−1) messages
            # per call (the lesson checks the bytes to 8 % on larger tensors)
            calls = per_rank[0][mode]["calls"][kind == "backward"]
            assert f[kind] <= mean <= f[kind] + 300 * 2 * (n - 1) * calls, (mode, kind, mean, f[kind])


def test_2d_moves_fewer_bytes_per_rank_as_n_grows_and_3d_fewer_still():
    big = dict(m=8192, h=4096, hidden=16384)
    one_d = tp_nd.predicted("1d", 64, **big)
    two_d = tp_nd.predicted("2d", 64, **big)
    three_d = tp_nd.predicted("3d", 64, **big)
    total = [p["forward"] + p["backward"] for p in (one_d, two_d, three_d)]
    assert total[2] < total[1] < total[0]
    assert tp_nd.predicted("2.5d", 32, **big)["forward"] < tp_nd.predicted("2d", 36, **big)["forward"]


def test_rank_counts_without_a_grid_name_the_ones_that_work():
    with pytest.raises(ValueError, match=r"square number of ranks.*N=8 is not one.*4 = 2·2, 9 = 3·3"):
        tp_nd.grid_shape(8, "2d")
    with pytest.raises(ValueError, match=r"cube number of ranks.*N=9 is not one.*8 = 2·2·2, 27 = 3·3·3"):
        tp_nd.grid_shape(9, "3d")
    with pytest.raises(ValueError, match=r"depth d dividing q; N=8 with depth=4 is not one.*8 = 2·2·2"):
        tp_nd.grid_shape(8, "2.5d", depth=4)
    with pytest.raises(ValueError, match="takes no depth"):
        tp_nd.grid_shape(4, "2d", depth=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        tp_nd.grid_shape(4, "4d")
    assert tp_nd.grid_shape(8, "2.5d") == (2, 2) and tp_nd.grid_shape(32, "2.5d") == (4, 2)


def test_sizes_that_do_not_split_over_the_grid_are_refused():
    with pytest.raises(ValueError, match=r"d_model h=6 does not split into 4 equal blocks on the 2×2×2 grid"):
        tp_nd.check_sizes("3d", 8, 6, 24)
    with pytest.raises(
        ValueError, match=r"hidden size H=10 does not split into 3 equal blocks on the 3×3 grid"
    ):
        tp_nd.check_sizes("2d", 9, 6, 10)
    tp_nd.check_sizes("2.5d", 8, 4, 8)  # fits


def test_every_element_has_exactly_one_owner():
    for mode, q in (("2d", 3), ("3d", 2)):
        owners = tp_nd.owner_maps(mode, q, m=q * q * 2, k=q * 2, f=q * q * 3)
        counts = torch.bincount(owners["x"].flatten(), minlength=q ** (3 if mode == "3d" else 2))
        assert (counts == counts[0]).all() and (owners["weight"] >= 0).all()


def rows_not_split(_):
    try:
        tp_nd.parallel_mlp(make_mlp(H, HIDDEN), "2d")(torch.randn(1, 3, H))
    except ValueError as exc:
        return str(exc)


def test_rows_that_do_not_split_are_refused_in_forward():
    assert (
        "the input's rows b·s=3 does not split into 2 equal blocks on the 2×2 grid"
        in run(rows_not_split, 4, None)[0]
    )


# ----------------------------------------------------------------------------
# the exercise checks


@pytest.fixture(scope="module")
def solution():
    return reference_answers.load("04b_tensor_parallel_nd")


# That every reference answer passes its check is tested once, through the grader: tests/test_course.py.


def test_an_untouched_exercise_reads_not_attempted():
    def stub(*args):
        raise NotImplementedError

    assert check.owned_blocks(stub).status == NOT_ATTEMPTED
    assert check.owned_chunks_3d(stub).status == NOT_ATTEMPTED


@pytest.mark.mistake("4b.1")
def test_owned_blocks_names_swapped_coordinates_and_transposed_blocks(solution):
    def swapped(x, weight, q, rank):
        return solution.owned_blocks(x, weight, q, (rank % q) * q + rank // q)

    def not_transposed(x, weight, q, rank):
        x_block, b_block = solution.owned_blocks(x, weight, q, rank)
        return x_block, b_block.T

    def weight_cut_at_ij(x, weight, q, rank):
        i, j = rank // q, rank % q
        rows, cols = weight.shape[0] // q, weight.shape[1] // q
        return solution.owned_blocks(x, weight, q, rank)[0], weight[
            i * rows : (i + 1) * rows, j * cols : (j + 1) * cols
        ]

    result = check.owned_blocks(swapped)
    assert result.status == FAILED and "i and j are swapped" in result.message
    result = check.owned_blocks(not_transposed)
    assert result.status == FAILED and "that is B_ij transposed" in result.message
    result = check.owned_blocks(weight_cut_at_ij)
    assert result.status == FAILED and "a transposed block: you cut weight (F, K) at (i, j)" in result.message
    result = check.owned_blocks(lambda x, weight, q, rank: tp_nd.owned_2d(x, weight, q, rank))
    assert result.status == FAILED and "you used course_lib.tp_nd.owned_2d" in result.message


@pytest.mark.mistake("4b.3")
def test_owned_3d_names_the_wrong_axis(solution):
    def reversed_order(x, weight, q, rank):
        a, b, c = rank % q, rank // q % q, rank // (q * q)
        return solution.owned_3d(x, weight, q, a * q * q + b * q + c)

    def rows_split_along_c(x, weight, q, rank):
        a, b, c = rank // (q * q), rank // q % q, rank % q
        return solution.owned_3d(x, weight, q, a * q * q + c * q + b)[0], solution.owned_3d(
            x, weight, q, rank
        )[1]

    result = check.owned_chunks_3d(reversed_order)
    assert result.status == FAILED and "the rank order is reversed" in result.message
    result = check.owned_chunks_3d(rows_split_along_c)
    assert result.status == FAILED and "X's rows are split along the wrong axis" in result.message


def summa_groups_swapped(x_block, b_block, grid):
    i, j = grid.coords
    out = torch.zeros(x_block.shape[0], b_block.shape[1])
    for k in range(grid.q):
        x_k = x_block.clone() if i == k else torch.empty_like(x_block)
        b_k = b_block.clone() if j == k else torch.empty_like(b_block)
        dist.broadcast(x_k, src=grid.ranks("col")[k], group=grid.group("col"))
        dist.broadcast(b_k, src=grid.ranks("row")[k], group=grid.group("row"))
        out += x_k @ b_k
    return out


def summa_before_the_broadcast_arrives(x_block, b_block, grid):
    out = torch.zeros(x_block.shape[0], b_block.shape[1])
    for k in range(grid.q):
        x_k, b_k = x_block.clone(), b_block.clone()
        works = [
            dist.broadcast(x_k, src=grid.ranks("row")[k], group=grid.group("row"), async_op=True),
            dist.broadcast(b_k, src=grid.ranks("col")[k], group=grid.group("col"), async_op=True),
        ]
        out += x_block @ b_block  # not x_k @ b_k, and before wait()
        for work in works:
            work.wait()
    return out


def summa_by_all_gather(x_block, b_block, grid):
    xs = [torch.empty_like(x_block) for _ in range(grid.q)]
    bs = [torch.empty_like(b_block) for _ in range(grid.q)]
    dist.all_gather(xs, x_block, group=grid.group("row"))
    dist.all_gather(bs, b_block, group=grid.group("col"))
    return sum(x @ b for x, b in zip(xs, bs))


@pytest.mark.parametrize(
    "wrong, words",
    [
        pytest.param(
            summa_groups_swapped, "row and column groups swapped", marks=pytest.mark.mistake("4b.2")
        ),
        pytest.param(
            summa_before_the_broadcast_arrives,
            "accumulating before the broadcast arrived?",
            marks=pytest.mark.mistake("4b.2"),
        ),
        pytest.param(
            summa_by_all_gather,
            "expected 4 broadcasts and nothing else, you made 0 broadcasts and called all_gather",
            marks=pytest.mark.mistake("4b.2"),
        ),
        (
            lambda x_block, b_block, grid: tp_nd.summa(x_block, b_block, grid),
            "you used course_lib.tp_nd.summa",
        ),
    ],
)
def test_summa_check_names_the_mistake(wrong, words):
    result = check.summa(wrong)
    assert result.status == FAILED and words in result.message, result.message
