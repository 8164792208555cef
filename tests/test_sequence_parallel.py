"""Chapter 05: the sequence-parallel block against the dense one, its traffic and memory, and the checks."""

import pytest
import reference_answers
import torch
import torch.distributed as dist
from conftest import run_gloo as run

from course_lib import tp
from course_lib.checks import FAILED, NOT_ATTEMPTED
from course_lib.checks import sequence_parallel as check
from course_lib.comm import count_traffic
from course_lib.models import make_block

D_MODEL, N_HEADS, SEQ = 8, 4, 8


def inputs():
    g = torch.Generator().manual_seed(9)
    return torch.randn(2, SEQ, D_MODEL, generator=g), torch.randn(2, SEQ, D_MODEL, generator=g)


def mine(n, r, size=SEQ):
    return slice(r * size // n, (r + 1) * size // n)


def sp_run(x, upstream, recompute_gather):
    r, n = dist.get_rank(), dist.get_world_size()
    block = tp.SequenceParallelBlock.from_dense(
        make_block(D_MODEL, N_HEADS, seed=2), recompute_gather=recompute_gather
    )
    x_shard = x[:, mine(n, r)].clone().requires_grad_()
    out = block(x_shard)
    (out * upstream[:, mine(n, r)]).sum().backward()
    block.sync_replicated_grads()
    return out.detach(), x_shard.grad, {k: p.grad for k, p in block.named_parameters()}


@pytest.mark.parametrize("recompute_gather", [False, True])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_sequence_parallel_block_equals_dense(n, recompute_gather):
    x, upstream = inputs()
    dense = make_block(D_MODEL, N_HEADS, seed=2)
    x_dense = x.clone().requires_grad_()
    out = dense(x_dense)
    (out * upstream).sum().backward()
    grads = {k: p.grad for k, p in dense.named_parameters()}
    close = dict(rtol=1e-5, atol=1e-5)
    for r, (got_out, got_x, got) in enumerate(run(sp_run, n, x, upstream, recompute_gather)):
        torch.testing.assert_close(got_out, out.detach()[:, mine(n, r)], **close)
        torch.testing.assert_close(got_x, x_dense.grad[:, mine(n, r)], **close)
        h, hidden = mine(n, r, D_MODEL), mine(n, r, 4 * D_MODEL)
        qkv_rows = torch.cat([torch.arange(D_MODEL)[h] + k * D_MODEL for k in range(3)])
        expected = {
            "attn.qkv.weight": grads["attn.qkv.weight"][qkv_rows],
            "attn.qkv.bias": grads["attn.qkv.bias"][qkv_rows],
            "attn.proj.weight": grads["attn.proj.weight"][:, h],
            "mlp.fc1.weight": grads["mlp.fc1.weight"][hidden],
            "mlp.fc1.bias": grads["mlp.fc1.bias"][hidden],
            "mlp.fc2.weight": grads["mlp.fc2.weight"][:, hidden],
        }
        assert set(got) == set(grads)
        for name, grad in got.items():
            torch.testing.assert_close(grad, expected.get(name, grads[name]), **close, msg=name)


def sequence_functions(x, upstream):
    """gather/scatter/reduce-scatter on their own: outputs and input gradients."""
    r, n = dist.get_rank(), dist.get_world_size()
    results = {}
    shard = x[:, mine(n, r)].clone().requires_grad_()
    out = tp.gather_from_sequence_region(shard)
    (out * (r + 1) * upstream).sum().backward()
    results["gather"] = (out.detach(), shard.grad)
    whole = ((r + 1) * x).requires_grad_()
    out = tp.reduce_scatter_to_sequence_region(whole)
    (out * upstream[:, mine(n, r)]).sum().backward()
    results["reduce_scatter"] = (out.detach(), whole.grad)
    whole = x.clone().requires_grad_()
    out = tp.scatter_to_sequence_region(whole)
    (out * (r + 1) * upstream[:, mine(n, r)]).sum().backward()
    results["scatter"] = (out.detach(), whole.grad)
    return results


def test_gather_scatter_and_reduce_scatter_and_their_backwards():
    n = 4
    x, upstream = inputs()
    total = sum(range(1, n + 1))
    for r, got in enumerate(run(sequence_functions, n, x, upstream)):
        out, grad = got["gather"]  # all-gather forward; backward sums the ranks' gradients, keeps mine
        torch.testing.assert_close(out, x)
        torch.testing.assert_close(grad, total * upstream[:, mine(n, r)])
        out, grad = got["reduce_scatter"]  # sum then my block forward; all-gather backward
        torch.testing.assert_close(out, total * x[:, mine(n, r)])
        torch.testing.assert_close(grad, upstream)
        out, grad = got["scatter"]  # my block forward; backward all-gathers every rank's block
        torch.testing.assert_close(out, x[:, mine(n, r)])
        expected = torch.cat([(k + 1) * upstream[:, mine(n, k)] for k in range(n)], dim=1)
        torch.testing.assert_close(grad, expected)


def traffic(kind):
    r, n = dist.get_rank(), dist.get_world_size()
    dense = make_block(32, 4, seed=0)
    x = torch.randn(2, 64, 32)  # K = 4096 floats, 16 KiB
    if kind == "tp":
        block = tp.TensorParallelBlock.from_dense(dense)
    else:
        block, x = tp.SequenceParallelBlock.from_dense(dense), x[:, mine(n, r, 64)].clone()
    x.requires_grad_()
    with count_traffic() as forward:
        out = block(x)
    with count_traffic() as backward:
        out.sum().backward()
    return [c.op for c in forward.calls], [c.op for c in backward.calls], forward.sent, backward.sent


def test_sequence_parallel_sends_what_tensor_parallel_sends():
    n = 4
    tp_fwd, tp_bwd, tp_sent, tp_back = run(traffic, n, "tp")[0]
    sp_fwd, sp_bwd, sp_sent, sp_back = run(traffic, n, "sp")[0]
    assert tp_fwd == tp_bwd == ["all_reduce"] * 2
    # one all-gather before each column-parallel layer, one reduce-scatter (an all-to-all) after
    # each row-parallel one; backward mirrors it
    assert sp_fwd == sp_bwd == ["all_gather_single", "all_to_all_single"] * 2
    if tp_sent is None:
        pytest.skip("wire bytes cannot be read on this system")
    ideal = 2 * 2 * (n - 1) / n * 4 * 4096  # two all-reduces' worth on a ring
    for sent in (tp_sent, tp_back, sp_sent, sp_back):
        assert ideal <= sent < 1.25 * ideal  # gloo's headers and a little noise on top


def layer_norm_bytes():
    r, n = dist.get_rank(), dist.get_world_size()
    block = tp.SequenceParallelBlock.from_dense(make_block(D_MODEL, N_HEADS))
    x = torch.randn(2, 64, D_MODEL)[:, mine(n, r, 64)].clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        block.ln1(x)
    parameters = {p.data_ptr() for p in block.ln1.parameters()}
    return sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in parameters)


def test_layer_norm_activations_shrink_by_1_over_n():
    whole = run(layer_norm_bytes, 1)[0]
    assert run(layer_norm_bytes, 4)[0] * 4 == whole


def uneven_sequence():
    try:
        tp.reduce_scatter_to_sequence_region(torch.randn(1, 5, D_MODEL))
    except ValueError as exc:
        return str(exc)
    return None


def test_sequence_that_does_not_split_raises_value_error():
    message = run(uneven_sequence, 2)[0]
    assert message and "sequence length=5" in message and "N=2" in message


# ----------------------------------------------------------------------------
# the exercise checks


@pytest.fixture(scope="module")
def solution():
    return reference_answers.load("05_sequence_parallel")


# That every reference answer passes its check is tested once, through the grader: tests/test_course.py.


@pytest.mark.mistake("5.1")
def test_shard_of_the_features_instead_of_the_sequence_is_named():
    result = check.sequence_shard(lambda x: x.chunk(dist.get_world_size(), dim=-1)[dist.get_rank()])
    assert result.status == FAILED
    assert result.message.startswith("N=2: rank 0: output has shape (2, 4, 4), expected (2, 2, 8)")
    assert "that is a split of the features (last dim): split dim 1, the sequence" in result.message


@pytest.mark.mistake("5.2")
def test_gather_whose_backward_does_not_sum_is_diagnosed(solution):
    class GatherWithoutSum(solution.GatherFromSequenceRegion):
        @staticmethod
        def backward(ctx, grad):
            return grad.chunk(dist.get_world_size(), dim=1)[dist.get_rank()].contiguous()

    result = check.gather_from_sequence_region(GatherWithoutSum)
    assert result.status == FAILED
    assert result.message.startswith("N=2: rank 0: x.grad[0, 0, 0] expected ")
    assert "sum over the ranks" in result.message


@pytest.mark.mistake("5.3")
def test_reduce_scatter_that_keeps_its_own_block_without_summing_is_diagnosed(solution):
    class ScatterWithoutSum(solution.ReduceScatterToSequenceRegion):
        @staticmethod
        def forward(ctx, x):
            return x.chunk(dist.get_world_size(), dim=1)[dist.get_rank()].clone()

    result = check.reduce_scatter_to_sequence_region(ScatterWithoutSum)
    assert result.status == FAILED
    assert result.message.startswith("N=2: rank 0: output[0, 0, 0] expected ")
    assert "this is my block of my own input: sum over the ranks first" in result.message


@pytest.mark.mistake("5.4")
def test_sublayer_without_residual_is_diagnosed_and_a_stub_is_not_attempted(solution):
    sublayer = solution.sequence_parallel_mlp  # closures carry the function, not the module

    def no_residual(x_shard, norm, mlp):
        return sublayer(x_shard, norm, mlp) - x_shard

    result = check.sequence_parallel_mlp(no_residual)
    assert result.status == FAILED and "the residual is missing" in result.message

    def stub(x_shard, norm, mlp):
        raise NotImplementedError("exercise: replace this line with your code")

    assert check.sequence_parallel_mlp(stub).status == NOT_ATTEMPTED


def in_two_groups(x, upstream):
    """Ranks {0, 1} and {2, 3} each form their own tensor-parallel group."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[dist.get_rank() // 2]
    r = dist.get_rank(group)
    dense = make_block(D_MODEL, N_HEADS, seed=2)
    mlp = tp.TensorParallelMLP.from_dense(dense.mlp, group)
    block = tp.SequenceParallelBlock.from_dense(dense, group)
    out_mlp = mlp(x)
    shard = x[:, mine(2, r)].clone().requires_grad_()
    out = block(shard)
    (out * upstream[:, mine(2, r)]).sum().backward()
    return out_mlp.detach(), out.detach(), shard.grad


def test_group_argument_keeps_each_tensor_parallel_group_to_itself():
    x, upstream = inputs()
    dense = make_block(D_MODEL, N_HEADS, seed=2)
    x_dense = x.clone().requires_grad_()
    out = dense(x_dense)
    (out * upstream).sum().backward()
    for rank, (out_mlp, out_block, grad) in enumerate(run(in_two_groups, 4, x, upstream)):
        r = rank % 2
        torch.testing.assert_close(out_mlp, dense.mlp(x).detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_block, out.detach()[:, mine(2, r)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, x_dense.grad[:, mine(2, r)], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# saved activations against Korthikanti et al.'s count, and the chapter's pictures


def test_dense_block_in_bf16_with_dropout_saves_34_plus_5as_over_h_bytes_per_sbh():
    from course_lib import models

    b, s, h, a = 2, 16, 32, 4
    block = models.make_dropout_block(h, a, p=0.1).to(torch.bfloat16)
    x = torch.randn(b, s, h, dtype=torch.bfloat16, requires_grad=True)
    saved = tp.saved_activation_bytes(block, x)
    layer_norm_stats = 2 * 2 * s * b * 2  # mean and 1/std per token, two norms, bf16
    assert sum(saved.values()) == s * b * h * (34 + 5 * a * s / h) + layer_norm_stats
    assert saved["attn.dropout"] == a * s * s * b  # a 1-byte mask of the attention probabilities
    assert saved["mlp_out_dropout"] == s * b * h


def test_mask_dropout_keeps_a_byte_mask_and_is_the_identity_in_eval():
    from course_lib import models

    drop = models.MaskDropout(0.5)
    x = torch.randn(64, requires_grad=True)
    out = drop(x)
    assert out.grad_fn._saved_result1.dtype == torch.bool
    assert ((out == 0) | torch.isclose(out, 2 * x)).all()
    drop.eval()
    assert drop(x) is x


def test_fp32_block_saves_what_the_lesson_formula_says():
    b, s, h, a = 2, 16, 32, 4
    saved = tp.saved_activation_bytes(make_block(h, a), torch.randn(b, s, h, requires_grad=True))
    assert sum(saved.values()) == 4 * s * b * h * (16 + a * s / h) + 16 * s * b


def test_chapter_05_pictures_draw():
    from course_lib import viz

    assert viz.plot_sequence_parallel_holdings()._repr_png_()[:4] == b"\x89PNG"
    measured = {("dense", 1): {"a": 10, "b": 20}, ("TP", 2): {"a": 10, "b": 10}}
    fig = viz.plot_saved_activations(measured, {("dense", 1): 30, ("TP", 2): 20}, "title")
    assert fig._repr_png_()[:4] == b"\x89PNG"
