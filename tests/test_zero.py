"""Chapter 07: ZeroAdam against one process, torch's built-ins and its own formulas; the checks."""

import contextlib

import pytest
import reference_answers
import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_lib import launch, zero
from course_lib.checks import FAILED, NOT_ATTEMPTED
from course_lib.checks import zero as check
from course_lib.comm import count_traffic
from course_lib.models import make_stack, num_params, regression_data, shard

# Layers of 5·7 + 7 = 42 and 7·5 + 5 = 40 parameters: N = 4 pads the first, N = 3 the second.
SMALL = dict(depth=2, d_model=5, d_hidden=7, seed=0)
HYPER = dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
STEPS, BATCH = 3, 12  # 12 splits over N = 1 … 4


def batches():
    x, y = regression_data(STEPS * BATCH, SMALL["d_model"])
    return list(zip(x.split(BATCH), y.split(BATCH)))


def train_every_stage(stages, micro_batches=1, unsynced=()):
    """``unsynced``: indices of the micro-batches whose backward runs under ``opt.no_sync()``."""
    rank, n = dist.get_rank(), dist.get_world_size()
    result = {}
    for stage in stages:
        model = make_stack(**SMALL)
        opt = zero.ZeroAdam(model, stage, **HYPER)
        for x, y in batches():
            x, y = shard(x, rank, n), shard(y, rank, n)
            for i in range(micro_batches):  # gradients add up over backwards until step()
                loss = F.mse_loss(model(shard(x, i, micro_batches)), shard(y, i, micro_batches))
                with opt.no_sync() if i in unsynced else contextlib.nullcontext():
                    (loss / micro_batches).backward()
            opt.step()
            opt.zero_grad()
        result[stage] = opt.full_parameters()
    return result


@pytest.fixture(scope="module")
def single_process():
    model = make_stack(**SMALL)
    opt = torch.optim.AdamW(model.parameters(), **HYPER)
    for x, y in batches():
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_stage_equals_single_process_adamw(n, single_process):
    per_rank = launch.run(train_every_stage, n, zero.STAGES)
    for rank, result in enumerate(per_rank):
        for stage in zero.STAGES:
            assert list(result[stage]) == list(single_process), "names as in model.named_parameters()"
            for name, p in result[stage].items():
                torch.testing.assert_close(
                    p,
                    single_process[name],
                    rtol=1e-5,
                    atol=1e-5,
                    msg=lambda m: f"N={n}, rank {rank}, stage {stage}, {name}: {m}",
                )


def test_gradient_accumulation_over_two_backwards(single_process):
    for result in launch.run(train_every_stage, 2, zero.STAGES, 2):  # 2 micro-batches of 3 per rank
        for stage in zero.STAGES:
            for name, p in result[stage].items():
                torch.testing.assert_close(p, single_process[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unsynced", [(0,), (1,), (0, 1)], ids=["first", "last", "both"])
def test_no_sync_accumulation_equals_single_process(unsynced, single_process):
    """Any backward may skip its communication: step() reduces what is left, on every stage."""
    for result in launch.run(train_every_stage, 2, zero.STAGES, 2, unsynced):
        for stage in zero.STAGES:
            for name, p in result[stage].items():
                torch.testing.assert_close(
                    p,
                    single_process[name],
                    rtol=1e-5,
                    atol=1e-5,
                    msg=lambda m: f"stage {stage}, no_sync on {unsynced}: {m}",
                )


def accumulation_traffic(m):
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = regression_data(4 * n * m, MEDIUM["d_model"])
    x, y = shard(x, rank, n), shard(y, rank, n)
    result = {}
    for stage in zero.STAGES:
        for unsharded in (False, True):
            model = make_stack(**MEDIUM)
            opt = zero.ZeroAdam(model, stage)
            with count_traffic() as traffic:
                for i in range(m):
                    with opt.no_sync() if unsharded and i < m - 1 else contextlib.nullcontext():
                        F.mse_loss(model(shard(x, i, m)), shard(y, i, m)).backward()
                    if i == m - 2:
                        grads = opt.memory_report()["grads"]
                opt.step()
            result[stage, unsharded] = traffic.received, grads
    return result


def test_accumulation_traffic_and_memory_match_the_formulas():
    """M = 3 micro-batches on 2 ranks: ZeRO-2/3 reduce-scatter each one unless no_sync() keeps the
    full gradient; stage 0 and stage 1 under no_sync() send one step's worth."""
    m, n = 3, 2
    psi = num_params(make_stack(**MEDIUM))
    for (stage, unsharded), (received, grads) in launch.run(accumulation_traffic, n, m)[0].items():
        expected = zero.formula_traffic(stage, psi, n, micro_batches=m, accumulate_unsharded=unsharded)
        if received is not None:
            assert expected <= received <= 1.03 * expected, (stage, unsharded, received / expected)
        sharded = stage >= 2 and not unsharded
        assert grads == pytest.approx(4 * psi / (n if sharded else 1), rel=0.01), (stage, unsharded)


def test_formula_traffic_with_micro_batches():
    def halves(stage, m, unsharded=False):
        return zero.formula_traffic(stage, 1, 2, 1, micro_batches=m, accumulate_unsharded=unsharded) * 2

    assert [halves(s, 1) for s in zero.STAGES] == [2, 2, 2, 3]
    assert [halves(s, 4) for s in zero.STAGES] == [2, 5, 5, 12]
    assert [halves(s, 4, True) for s in zero.STAGES] == [2, 2, 2, 9]
    with pytest.raises(ValueError):
        zero.formula_traffic(2, 1, 2, micro_batches=0)


def train_with_builtins():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer

    rank, n = dist.get_rank(), dist.get_world_size()
    model = make_stack(**SMALL)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **HYPER)
    for x, y in batches():
        F.mse_loss(model(shard(x, rank, n)), shard(y, rank, n)).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= n
        opt.step()
        opt.zero_grad()
    zro = {name: p.detach().clone() for name, p in model.named_parameters()}
    model = make_stack(**SMALL)
    mesh = init_device_mesh("cpu", (n,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), **HYPER)
    for x, y in batches():
        F.mse_loss(model(shard(x, rank, n)), shard(y, rank, n)).backward()
        opt.step()
        opt.zero_grad()
    fsdp = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    return zro, fsdp, train_every_stage((1, 3))


def test_equals_zero_redundancy_optimizer_and_fsdp2():
    for zro, fsdp, ours in launch.run(train_with_builtins, 3):  # 3 ranks: padding on both sides
        for name in zro:
            torch.testing.assert_close(ours[1][name], zro[name], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours[3][name], fsdp[name], rtol=1e-5, atol=1e-5)


def test_adamw_update_is_torchs():
    g = torch.Generator().manual_seed(0)
    ours = torch.randn(9, generator=g)
    theirs = torch.nn.Parameter(ours.clone())
    opt = torch.optim.AdamW([theirs], **HYPER, eps=1e-3)
    m, v = torch.zeros(9), torch.zeros(9)
    for step in range(1, 5):
        grad = torch.randn(9, generator=g)
        theirs.grad = grad.clone()
        opt.step()
        zero.adamw_(ours, grad, m, v, step, **HYPER, eps=1e-3)
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# memory and traffic against the formulas

MEDIUM = dict(depth=2, d_model=64, d_hidden=256, seed=0)  # 66,112 parameters: padding < 0.01 %


def measure_every_stage():
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = regression_data(4 * n, MEDIUM["d_model"])
    result = {}
    for stage in zero.STAGES:
        model = make_stack(**MEDIUM)
        opt = zero.ZeroAdam(model, stage)
        with count_traffic() as traffic:
            F.mse_loss(model(shard(x, rank, n)), shard(y, rank, n)).backward()
            opt.step()
        held_after_step = opt.memory_report()
        opt.zero_grad()
        result[stage] = held_after_step, traffic.received, opt.memory_report()["grads"]
    return result


@pytest.mark.parametrize("n", [2, 4])
def test_memory_and_traffic_match_the_formulas(n):
    psi = num_params(make_stack(**MEDIUM))
    for rank, result in enumerate(launch.run(measure_every_stage, n)):
        for stage, (held, received, grads_after_zero_grad) in result.items():
            formula = zero.formula_bytes(stage, psi, n)
            for kind in ("params", "grads", "optimizer"):
                assert held[kind] == pytest.approx(formula[kind], rel=0.02), (n, rank, stage, kind)
            expected = zero.formula_traffic(stage, psi, n)
            assert expected <= received <= 1.03 * expected, (n, rank, stage, received / expected)  # + headers
            assert grads_after_zero_grad == 0
    # The totals by name, fp32: 16Ψ, 8Ψ + 8Ψ/N, 4Ψ + 12Ψ/N, 16Ψ/N.
    totals = [sum(zero.formula_bytes(s, psi, n).values()) / psi for s in zero.STAGES]
    assert totals == pytest.approx([16, 8 + 8 / n, 4 + 12 / n, 16 / n])
    mixed = [sum(zero.formula_bytes(s, psi, n, "mixed").values()) / psi for s in zero.STAGES]
    assert mixed == pytest.approx([16, 4 + 12 / n, 2 + 14 / n, 16 / n])


def stage3_holds_layers_only_while_they_run():
    rank, n = dist.get_rank(), dist.get_world_size()
    model = make_stack(**SMALL)
    opt = zero.ZeroAdam(model, 3)
    seen_in_forward = []
    for unit in opt.units:  # registered after ZeroAdam's own hooks: runs after the gather
        unit.module.register_forward_pre_hook(
            lambda m, a: seen_in_forward.append([u.full.untyped_storage().nbytes() > 0 for u in opt.units])
        )
    x, y = batches()[0]
    loss = F.mse_loss(model(shard(x, rank, n)), shard(y, rank, n))
    after_forward = sum(u.full.untyped_storage().nbytes() for u in opt.units)
    loss.backward()
    after_backward = sum(u.full.untyped_storage().nbytes() for u in opt.units)
    full_grads = [p.grad for p in model.parameters() if p.grad is not None]
    return seen_in_forward, after_forward, after_backward, len(full_grads)


def test_stage3_gathers_one_layer_at_a_time_and_frees_it():
    seen, after_forward, after_backward, full_grads = launch.run(stage3_holds_layers_only_while_they_run, 2)[
        0
    ]
    assert seen == [[i == j for j in range(len(seen))] for i in range(len(seen))]  # only the running layer
    assert after_forward == after_backward == 0 and full_grads == 0


def construct(stage, perturb_rank):
    model = make_stack(**SMALL)
    if dist.get_rank() == perturb_rank:
        with torch.no_grad():
            model[1].fc2.bias[0] += 1e-3
    zero.ZeroAdam(model, stage)


def test_unknown_stage_is_a_value_error():
    with pytest.raises(ValueError, match="ZeRO stage must be one of"):
        zero.ZeroAdam(make_stack(**SMALL), 4)  # refused before any communication
    with pytest.raises(ValueError, match="ZeRO stage must be one of"):
        zero.ZeroAdam(make_stack(**SMALL), "2")


def test_parameters_that_differ_across_ranks_are_refused_by_name():
    with pytest.raises(launch.RankError) as info:
        launch.run(construct, 3, 1, 2)
    assert info.value.exc_type == "ValueError"
    assert "parameter '1.fc2.bias' differs across ranks" in str(info.value)
    assert "rank 2" in str(info.value)


# ----------------------------------------------------------------------------
# the checks: reference solutions pass, wrong ones get a specific diagnostic


@pytest.fixture(scope="module")
def solution():
    return reference_answers.load("07_zero")


# That every reference answer passes its check is tested once, through the grader: tests/test_course.py.


def test_the_course_s_own_adamw_earns_nothing():
    refused = check.adamw_step_(zero.adamw_)
    assert refused.status == FAILED and "you called zero.adamw_" in refused.message


@pytest.mark.mistake("7.1")
def test_unpadded_shard_names_k_n_and_rank():
    result = check.shard_of(lambda flat, rank, n: flat.tensor_split(n)[rank].clone())
    assert result.status == FAILED
    assert result.message.startswith("K=1, N=2, rank 1: expected a shard of shape (1,)")
    assert "(K=1 padded with zeros to 2, cut into 2 equal shards), got shape (0,)" in result.message


@pytest.mark.mistake("7.2")
def test_adam_without_bias_correction_is_named(solution):
    def no_bias_correction(param, grad, m, v, step, lr, betas, eps, weight_decay):
        solution.adamw_step_(param, grad, m, v, 10**6, lr, betas, eps, weight_decay)  # β^step ≈ 0

    result = check.adamw_step_(no_bias_correction)
    assert result.status == FAILED
    assert result.message.startswith("step 1: looks like Adam without the bias corrections")
    assert "— param[0] expected " in result.message


@pytest.mark.mistake("7.3")
def test_zero1_without_all_gather_is_told_so(solution):
    adamw = solution.adamw_step_

    def no_gather(flat_params, flat_grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
        rank, n = dist.get_rank(), dist.get_world_size()
        size = flat_params.numel() // n
        grad = torch.empty(size)
        dist.reduce_scatter_single(grad, flat_grad)
        adamw(
            flat_params[rank * size : (rank + 1) * size],
            grad / n,
            exp_avg,
            exp_avg_sq,
            step,
            lr,
            betas,
            eps,
            weight_decay,
        )

    result = check.zero1_step(no_gather)
    assert result.status == FAILED
    assert result.message.startswith("N=2, rank 0, step 1: only this rank's shard [0, 41) was updated")
    assert "all the new parameters — flat_params[41] expected " in result.message


def test_zero1_with_all_reduce_is_refused(solution):
    zero1_step = solution.zero1_step  # closures carry the function, not the module

    def all_reduces(flat_params, flat_grad, *args, **kwargs):
        dist.all_reduce(flat_grad)
        zero1_step(flat_params, flat_grad / dist.get_world_size(), *args, **kwargs)

    result = check.zero1_step(all_reduces)
    assert result.status == FAILED and "you called dist.all_reduce" in result.message


@pytest.mark.mistake("7.4")
def test_hook_that_keeps_the_full_gradient_or_sums_is_diagnosed(solution):
    hook = solution.shard_grad_hook

    def keeps_grad(param):
        grad = param.grad
        hook(param)
        param.grad = grad

    result = check.shard_grad_hook(keeps_grad)
    assert result.status == FAILED and "`param.grad` still holds the full gradient" in result.message

    def sums(param):
        param.grad *= dist.get_world_size()
        hook(param)

    result = check.shard_grad_hook(sums)
    assert result.status == FAILED
    assert result.message.startswith("N=2, rank 0, fc1.weight: grad_shard is N× the expected")
    assert "— grad_shard[0] expected " in result.message


def test_not_implemented_reads_not_attempted():
    def stub(*args, **kwargs):
        raise NotImplementedError("exercise: replace this line with your code")

    for check_fn in (check.shard_of, check.adamw_step_, check.zero1_step, check.shard_grad_hook):
        assert check_fn(stub).status == NOT_ATTEMPTED


def test_pictures_are_readable_and_the_calculator_redraws(capsys):
    from test_mesh import readable

    from course_lib import viz

    readable(viz.plot_zero_holdings(4, "fp32"))
    readable(viz.plot_zero_calculator(70, 1024, 3, "mixed", 141))
    psi = 100
    fake = {n: {s: zero.formula_bytes(s, psi, n) for s in zero.STAGES} for n in (1, 2, 4, 8)}
    readable(viz.plot_zero_memory(fake, psi))
    readable(
        viz.plot_zero_traffic(
            {n: {s: zero.formula_traffic(s, psi, n) for s in zero.STAGES} for n in (2, 4)}, psi
        )
    )
    widget = viz.zero_memory_calculator()
    capsys.readouterr()
    widget.children[1].value = 3  # the stage buttons
    assert "Figure" in capsys.readouterr().out  # redrawn, without an error
