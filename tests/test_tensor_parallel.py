"""Chapter 04: course_lib.tp against the dense layers, its communication, and the exercise checks."""

import pytest
import reference_answers
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import run_gloo as run

from course_lib import tp
from course_lib.checks import ERROR, FAILED, NOT_ATTEMPTED
from course_lib.checks import tensor_parallel as check
from course_lib.comm import count_traffic
from course_lib.models import make_block, make_mlp

D_MODEL, D_HIDDEN, N_HEADS = 8, 32, 4


def inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 5, D_MODEL, generator=g), torch.randn(2, 5, D_MODEL, generator=g)


def dense_run(module, x, upstream):
    x = x.clone().requires_grad_()
    out = module(x)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, {k: p.grad for k, p in module.named_parameters()}


def parallel_run(kind, x, upstream):
    if kind == "mlp":
        module = tp.TensorParallelMLP.from_dense(make_mlp(D_MODEL, D_HIDDEN, seed=1))
    else:
        module = tp.TensorParallelAttention.from_dense(make_block(D_MODEL, N_HEADS, D_HIDDEN, seed=1).attn)
    return dense_run(module, x, upstream)


def rows(size, n, r):
    return slice(r * size // n, (r + 1) * size // n)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_mlp_output_and_every_gradient_equal_dense(n):
    x, upstream = inputs()
    out, x_grad, grads = dense_run(make_mlp(D_MODEL, D_HIDDEN, seed=1), x, upstream)
    for r, (got_out, got_x, got) in enumerate(run(parallel_run, n, "mlp", x, upstream)):
        close = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_out, out, **close)
        torch.testing.assert_close(got_x, x_grad, **close)
        h = rows(D_HIDDEN, n, r)  # written out here, independently of course_lib.tp
        torch.testing.assert_close(got["fc1.weight"], grads["fc1.weight"][h], **close)
        torch.testing.assert_close(got["fc1.bias"], grads["fc1.bias"][h], **close)
        torch.testing.assert_close(got["fc2.weight"], grads["fc2.weight"][:, h], **close)
        torch.testing.assert_close(got["fc2.bias"], grads["fc2.bias"], **close)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_attention_with_heads_split_equals_dense(n):
    x, upstream = inputs()
    out, x_grad, grads = dense_run(make_block(D_MODEL, N_HEADS, D_HIDDEN, seed=1).attn, x, upstream)
    for r, (got_out, got_x, got) in enumerate(run(parallel_run, n, "attention", x, upstream)):
        close = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_out, out, **close)
        torch.testing.assert_close(got_x, x_grad, **close)
        mine = rows(D_MODEL, n, r)  # my heads' features, in each of q, k and v
        qkv_rows = torch.cat(
            [
                torch.arange(3 * D_MODEL)[part][mine]
                for part in (slice(0, D_MODEL), slice(D_MODEL, 2 * D_MODEL), slice(2 * D_MODEL, None))
            ]
        )
        torch.testing.assert_close(got["qkv.weight"], grads["qkv.weight"][qkv_rows], **close)
        torch.testing.assert_close(got["qkv.bias"], grads["qkv.bias"][qkv_rows], **close)
        torch.testing.assert_close(got["proj.weight"], grads["proj.weight"][:, mine], **close)
        torch.testing.assert_close(got["proj.bias"], grads["proj.bias"], **close)


def uneven_errors():
    messages = []
    for build in (
        lambda: tp.TensorParallelMLP.from_dense(make_mlp(D_MODEL, D_HIDDEN)),
        lambda: tp.TensorParallelAttention.from_dense(make_block(D_MODEL, N_HEADS).attn),
    ):
        try:
            build()
            messages.append(None)
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def test_sizes_that_do_not_split_raise_value_error():
    mlp_message, attention_message = run(uneven_errors, 3)[0]
    assert "H=32" in mlp_message and "N=3" in mlp_message
    assert "n_heads=4" in attention_message and "N=3" in attention_message


def traffic_and_bytes(kind):
    if kind == "mlp":
        dense = make_mlp(D_MODEL, D_HIDDEN)
        module, replicated = tp.TensorParallelMLP.from_dense(dense), dense.fc2.bias
    else:
        dense = make_block(D_MODEL, N_HEADS).attn
        module, replicated = tp.TensorParallelAttention.from_dense(dense), dense.proj.bias
    x = torch.randn(2, 256, D_MODEL, requires_grad=True)  # 16 KiB: large enough that headers are small
    with count_traffic() as forward:
        out = module(x)
    with count_traffic() as backward:
        out.sum().backward()
    nbytes = lambda params: sum(p.numel() * p.element_size() for p in params)  # noqa: E731
    return (
        [c.op for c in forward.calls],
        [c.op for c in backward.calls],
        forward.sent,
        nbytes(module.parameters()),
        nbytes(dense.parameters()),
        nbytes([replicated]),
    )


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_one_all_reduce_each_way_and_a_1_over_n_share_of_parameters(kind):
    n = 4
    for fwd, bwd, sent, rank_bytes, dense_bytes, bias_bytes in run(traffic_and_bytes, n, kind):
        assert fwd == ["all_reduce"] and bwd == ["all_reduce"]
        assert rank_bytes == (dense_bytes - bias_bytes) / n + bias_bytes
        if sent is None:
            pytest.skip("wire bytes cannot be read on this system")
        ring = 2 * (n - 1) / n * 4 * (2 * 256 * D_MODEL)  # a ring all-reduce of K floats...
        assert ring <= sent < 1.2 * ring  # ...plus gloo's small headers


def ours_and_torch():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    x, upstream = inputs()
    ours = parallel_run("mlp", x, upstream)
    theirs = parallelize_module(
        make_mlp(D_MODEL, D_HIDDEN, seed=1), mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
    )
    out, x_grad, grads = dense_run(theirs, x, upstream)
    local = {k: g.to_local() if hasattr(g, "to_local") else g for k, g in grads.items()}
    return ours, (out, x_grad, local)


def test_same_as_torch_parallelize_module():
    for ours, theirs in run(ours_and_torch, 2):
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
        for name, grad in ours[2].items():
            torch.testing.assert_close(grad, theirs[2][name], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# the exercise checks: references pass, wrong answers get specific diagnostics


@pytest.fixture(scope="module")
def solution():
    return reference_answers.load("04_tensor_parallel")


# That every reference answer passes its check is tested once, through the grader: tests/test_course.py.


@pytest.mark.mistake("4.1")
def test_column_parallel_that_returns_everything_is_told_to_keep_its_rows():
    result = check.column_parallel(lambda x, weight, bias: F.linear(x, weight, bias))
    assert result.status == FAILED
    assert result.message.startswith("N=2: rank 0: output has shape (2, 4, 16), expected (2, 4, 8)")
    assert "keep only rank r's rows" in result.message


@pytest.mark.mistake("4.2")
def test_f_without_all_reduce_names_the_gradient(solution):
    class FWithoutAllReduce(solution.CopyToTPRegion):
        @staticmethod
        def backward(ctx, grad):
            return grad

    result = check.copy_to_tp_region(FWithoutAllReduce)
    assert result.status == FAILED
    assert result.message.startswith("N=2: rank 0: x.grad[0, 0, 0] expected ")
    assert "backward must all-reduce it" in result.message


@pytest.mark.mistake("4.3")
def test_g_that_all_reduces_in_backward_is_n_times_too_large(solution):
    class GReducingTwice(solution.ReduceFromTPRegion):
        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            dist.all_reduce(grad)
            return grad

    result = check.reduce_from_tp_region(GReducingTwice)
    assert result.status == FAILED
    assert result.message.startswith("N=2: rank 0: x.grad[0, 0, 0] expected ")
    assert "N times too large" in result.message


@pytest.mark.mistake("4.4")
def test_bias_added_before_the_sum_is_counted_n_times(solution):
    g = solution.ReduceFromTPRegion  # closures carry the class, not the module

    def bias_on_every_rank(y, weight, bias):
        mine = rows(weight.shape[1], dist.get_world_size(), dist.get_rank())
        return g.apply(F.linear(y, weight[:, mine], bias))

    result = check.row_parallel(bias_on_every_rank)
    assert result.status == FAILED
    assert result.message.startswith("N=2: rank 0: output[") and "bias was added 2 times" in result.message


@pytest.mark.mistake("4.5")
def test_mlp_without_f_gets_a_partial_input_gradient(solution):
    column_parallel, row_parallel = solution.column_parallel, solution.row_parallel

    def without_f(x, mlp):
        hidden = F.gelu(column_parallel(x, mlp.fc1.weight, mlp.fc1.bias))
        return row_parallel(hidden, mlp.fc2.weight, mlp.fc2.bias)

    result = check.tensor_parallel_mlp(without_f)
    assert result.status == FAILED
    assert result.message.startswith("N=2: rank 0: x.grad[") and "apply f to x" in result.message


def test_not_implemented_reads_not_attempted_and_course_code_is_refused():
    def stub(x, mlp):
        raise NotImplementedError("exercise: replace this line with your code")

    assert check.tensor_parallel_mlp(stub).status == NOT_ATTEMPTED

    def borrowed(x, mlp):
        return tp.TensorParallelMLP.from_dense(mlp)(x)

    result = check.tensor_parallel_mlp(borrowed)
    assert result.status == FAILED and "you used course_lib.tp.TensorParallelMLP" in result.message


def test_a_crash_in_the_learner_code_is_an_error_naming_the_rank():
    result = check.column_parallel(lambda x, weight, bias: x @ weight)  # wrong shapes
    assert result.status == ERROR and result.message.startswith("rank 0 raised RuntimeError")


# ----------------------------------------------------------------------------
# who holds which weight (the lesson's picture)


def test_who_holds_what_follows_the_megatron_layout():
    n, d_model, d_hidden, n_heads = 4, 8, 32, 4
    owners = tp.who_holds_what(n, d_model, d_hidden, n_heads)
    block = d_hidden // n
    for r in range(n):
        assert (owners["mlp.fc1.weight"][r * block : (r + 1) * block] == r).all()  # rows of fc1.weight
        assert (owners["mlp.fc2.weight"][:, r * block : (r + 1) * block] == r).all()  # columns of fc2.weight
        heads = d_model // n  # each of q, k and v: rank r's heads' rows
        for part in range(3):
            rows_r = slice(part * d_model + r * heads, part * d_model + (r + 1) * heads)
            assert (owners["attn.qkv.weight"][rows_r] == r).all()
    assert (owners["mlp.fc2.bias"] == -1).all() and (owners["attn.proj.bias"] == -1).all()
    assert owners["mlp.fc1.bias"].shape == (d_hidden, 1)
    from course_lib import viz

    assert viz.plot_tp_layout(owners, n, d_model, d_hidden, n_heads)._repr_png_()[:4] == b"\x89PNG"
