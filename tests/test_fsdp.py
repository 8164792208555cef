"""Chapter 07b: fsdp.fully_shard against one process, torch's FSDP2 and its own formulas; the checks."""

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course_lib import fsdp, launch
from course_lib.models import make_mlp, make_stack, num_params, regression_data, shard
from course_lib.traffic import count_traffic

HYPER = dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
STEPS, BATCH = 3, 24  # 24 splits over N = 1 … 4 and into 3 micro-batches on 2 ranks
SMALL = dict(depth=3, d_model=5, d_hidden=7, seed=0)  # units of 42 + 40 parameters


def uneven():
    """Units of 42, 138 and 24 elements: unequal, none a multiple of 4, one not of 3."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.GELU(), make_mlp(7, 9, 1), nn.Linear(7, 3))


def batches():
    x, y = regression_data(STEPS * BATCH, 5)
    return list(zip(x.split(BATCH), y[:, :3].split(BATCH)))


def train(make, micro_batches=1, unsynced=(), group=None, frozen=None, **options):
    rank, n = dist.get_rank(), dist.get_world_size()  # HSDP too: the batch splits over every rank
    model = make()
    if frozen is not None:
        model[frozen].requires_grad_(False)
    fsdp.fully_shard(model, group, **options)
    opt = torch.optim.AdamW(model.parameters(), **HYPER)
    for x, y in batches():
        x, y = shard(x, rank, n), shard(y, rank, n)
        for i in range(micro_batches):
            with fsdp.no_sync(model) if i in unsynced else contextlib.nullcontext():
                out = model(shard(x, i, micro_batches)).float()
                (F.mse_loss(out, shard(y, i, micro_batches)) / micro_batches).backward()
        opt.step()
        opt.zero_grad()
    return fsdp.full_state_dict(model)


def single_process(make=uneven, frozen=None):
    model = make()
    if frozen is not None:
        model[frozen].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **HYPER)
    for x, y in batches():
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {name: p.detach() for name, p in model.named_parameters()}


def same_casts(n, make=uneven):
    """One process making FSDP's casts: bf16 copies of the fp32 master weights compute each of N
    shards of the batch; their bf16 gradients, cast to fp32, averaged; AdamW on the fp32 master."""
    master = make()
    opt = torch.optim.AdamW(master.parameters(), **HYPER)
    for x, y in batches():
        grads = []
        for r in range(n):
            low = make().to(torch.bfloat16)
            low.load_state_dict({k: v.to(torch.bfloat16) for k, v in master.state_dict().items()})
            F.mse_loss(low(shard(x, r, n).bfloat16()).float(), shard(y, r, n)).backward()
            grads.append([p.grad.float() for p in low.parameters()])
        for p, *per_rank in zip(master.parameters(), *grads):
            p.grad = torch.stack(per_rank).sum(0) / n
        opt.step()
        opt.zero_grad()
    return {name: p.detach() for name, p in master.named_parameters()}


def every_variant():
    n = dist.get_world_size()
    result = {}
    for prefetch in (True, False):
        for reshard in (True, False):
            result[prefetch, reshard] = train(uneven, prefetch=prefetch, reshard_after_forward=reshard)
    if n == 2:
        result["bf16"] = train(uneven, mixed_precision=fsdp.MixedPrecision())
        result["frozen"] = train(uneven, frozen=2)  # the middle unit: gathered for the backward
        for unsynced in ((), (0,), (0, 1)):
            result["accumulate", unsynced] = train(uneven, 3, unsynced)
    return result


def assert_equal(got, expected, what, rtol=1e-5, atol=1e-5):
    assert list(got) == list(expected), f"{what}: names as in model.named_parameters()"
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], rtol=rtol, atol=atol, msg=lambda m: f"{what}, {name}: {m}"
        )


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_equals_single_process_adamw(n):
    """Every prefetch/reshard setting, units of unequal sizes, none a multiple of N; on N = 2 also
    mixed precision (against one process with the same casts), a frozen unit, no_sync accumulation."""
    expected = single_process()
    for rank, result in enumerate(launch.run(every_variant, n)):
        for prefetch in (True, False):
            for reshard in (True, False):
                assert_equal(result[prefetch, reshard], expected, f"N={n} rank {rank} {prefetch=} {reshard=}")
        if n == 2:
            assert_equal(result["bf16"], same_casts(2), "bf16 vs one process with the same casts")
            assert_equal(result["frozen"], single_process(frozen=2), "a frozen unit")
            untouched = dict(uneven().named_parameters())
            for name in ("2.fc1.weight", "2.fc2.bias"):
                assert torch.equal(result["frozen"][name], untouched[name].detach()), "a frozen unit moved"
            for key in [k for k in result if k[0] == "accumulate"]:
                assert_equal(result[key], expected, f"3 micro-batches, no_sync on {key[1]}")


def with_fsdp2():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    rank, n = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (n,))
    result = {}
    for bf16 in (False, True):
        model = uneven()
        policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        opt = torch.optim.AdamW(model.parameters(), **HYPER)
        for x, y in batches():
            F.mse_loss(model(shard(x, rank, n)).float(), shard(y, rank, n)).backward()
            opt.step()
            opt.zero_grad()
        theirs = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
        ours = train(uneven, mixed_precision=fsdp.MixedPrecision() if bf16 else None)
        result[bf16] = ours, theirs
    return result


def test_equals_torch_fsdp2_in_fp32_and_bf16():
    for rank, result in enumerate(launch.run(with_fsdp2, 3)):  # 3 ranks: padding on both sides
        for bf16, (ours, theirs) in result.items():
            assert_equal(ours, theirs, f"rank {rank}, {'bf16' if bf16 else 'fp32'} vs FSDP2")


def hsdp():
    shard_group, replicate_group = fsdp.hsdp_groups(2)
    model = make_stack(**MEDIUM)
    fsdp.fully_shard(model, (shard_group, replicate_group))
    opt = torch.optim.AdamW(model.parameters())
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = regression_data(4 * n, MEDIUM["d_model"])
    with count_traffic() as traffic:
        F.mse_loss(model(shard(x, rank, n)), shard(y, rank, n)).backward()
        opt.step()
    return train(uneven, group=(shard_group, replicate_group)), traffic.received


def test_hsdp_on_four_ranks_equals_single_process_and_its_traffic():
    expected = single_process()
    psi = num_params(make_stack(**MEDIUM))
    want = fsdp.formula_traffic(psi, 2, replicas=2)
    for rank, (result, received) in enumerate(launch.run(hsdp, 4)):
        assert_equal(result, expected, f"HSDP rank {rank}")
        if received is not None:
            assert want <= received <= 1.05 * want, (rank, received / want)


# ----------------------------------------------------------------------------
# memory and traffic against the formulas

MEDIUM = dict(depth=4, d_model=64, d_hidden=256, seed=0)  # units of 33,088: padding-free up to N = 8


def measure():
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = regression_data(8 * n, MEDIUM["d_model"])
    x, y = shard(x, rank, n), shard(y, rank, n)
    result = {}
    for prefetch in (False, True):
        for reshard in (True, False):
            for bf16 in (False, True):
                model = make_stack(**MEDIUM)
                mp = fsdp.MixedPrecision() if bf16 else None
                fsdp.fully_shard(model, prefetch=prefetch, reshard_after_forward=reshard, mixed_precision=mp)
                opt = torch.optim.AdamW(model.parameters())
                F.mse_loss(model(x).float(), y).backward()  # a first step: Adam's states exist
                opt.step()
                opt.zero_grad()
                with fsdp.track_memory(model, opt) as tracker, count_traffic() as traffic:
                    F.mse_loss(model(x).float(), y).backward()
                    opt.step()
                result[prefetch, reshard, bf16] = tracker.samples, traffic.received
    return result


def test_memory_and_traffic_match_the_formulas():
    n = 4
    psi = num_params(make_stack(**MEDIUM))
    unit = psi // MEDIUM["depth"]
    for (prefetch, reshard, bf16), (samples, received) in launch.run(measure, n)[0].items():
        what = f"{prefetch=} {reshard=} {bf16=}"
        low = 2 if bf16 else 4
        gathered = max(s["gathered params"] for _, s in samples) / (low * unit)
        expected = (2 if prefetch else 1) if reshard else MEDIUM["depth"]
        assert gathered == expected, (what, gathered)
        end = samples[-1][1]
        assert end["sharded params"] == 4 * psi // n and end["sharded grads"] == 4 * psi // n, what
        assert end["optimizer"] == pytest.approx(8 * psi / n, abs=64 * MEDIUM["depth"]), (
            what
        )  # + step counters
        assert end["gathered params"] == 0 and end["unsharded grads"] == 0, what
        want = fsdp.formula_traffic(psi, n, gather_bytes=low, reshard_after_forward=reshard)
        if received is not None:
            assert want <= received <= 1.03 * want, (what, received / want)


def accumulation(m):
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = regression_data(4 * n * m, MEDIUM["d_model"])
    x, y = shard(x, rank, n), shard(y, rank, n)
    result = {}
    for unsharded in (False, True):
        model = make_stack(**MEDIUM)
        fsdp.fully_shard(model)
        with fsdp.track_memory(model) as tracker, count_traffic() as traffic:
            for i in range(m):
                with fsdp.no_sync(model) if unsharded and i < m - 1 else contextlib.nullcontext():
                    F.mse_loss(model(shard(x, i, m)), shard(y, i, m)).backward()
        between = [s for label, s in tracker.samples if label == "backward done"][0]
        result[unsharded] = traffic.received, between["unsharded grads"] + between["sharded grads"]
    return result


def test_accumulation_traffic_and_memory():
    m, n = 3, 2
    psi = num_params(make_stack(**MEDIUM))
    for unsharded, (received, grads) in launch.run(accumulation, n, m)[0].items():
        want = fsdp.formula_traffic(psi, n, micro_batches=m, accumulate_unsharded=unsharded)
        if received is not None:
            assert want <= received <= 1.03 * want, (unsharded, received / want)
        assert grads == 4 * psi // (1 if unsharded else n), unsharded  # held after the first backward


def test_formula_traffic():
    assert fsdp.formula_traffic(1, 2) == 3 * 4 / 2
    assert fsdp.formula_traffic(1, 2, reshard_after_forward=False) == 2 * 4 / 2
    assert fsdp.formula_traffic(1, 2, gather_bytes=2) == (2 * 2 + 4) / 2
    assert fsdp.formula_traffic(1, 2, micro_batches=4) == 12 * 4 / 2
    assert fsdp.formula_traffic(1, 2, micro_batches=4, accumulate_unsharded=True) == 9 * 4 / 2
    with pytest.raises(ValueError):
        fsdp.formula_traffic(1, 2, micro_batches=0)


# ----------------------------------------------------------------------------
# bad input: a clear error, never a hang


def test_bad_unit_lists_are_refused_by_name():
    model = make_stack(**SMALL)
    cases = [
        (dict(units=[model[0], model[1]]), "parameter '2.fc1.weight' is in no unit"),
        (dict(units=[*model, model[2].fc1]), "parameter '2.fc1.weight' is in two units, '2' and '2.fc1'"),
        (dict(units=[nn.Linear(2, 2)]), "unit Linear is not a submodule"),
        (dict(units=[]), "units is empty"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            fsdp.fully_shard(model, **kwargs)  # refused before any communication
    model[1].fc2.double()
    with pytest.raises(ValueError, match=r"unit '1' mixes dtypes \['torch.float32', 'torch.float64'\]"):
        fsdp.fully_shard(model)
    model = make_stack(**SMALL)
    model[1].fc2.requires_grad_(False)
    with pytest.raises(ValueError, match="unit '1' mixes frozen and trainable"):
        fsdp.fully_shard(model)
    with pytest.raises(ValueError, match="owns parameters directly"):
        fsdp.fully_shard(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="mixed_precision must be a fsdp.MixedPrecision"):
        fsdp.fully_shard(make_stack(**SMALL), mixed_precision=torch.bfloat16)


def alone():
    fsdp.WAIT_TIMEOUT = 2.0
    model = make_stack(**SMALL)
    fsdp.fully_shard(model)
    if dist.get_rank() == 1:
        model(torch.zeros(2, SMALL["d_model"]))


def test_a_rank_that_runs_the_model_alone_gets_a_clear_error():
    with pytest.raises(launch.RankError) as info:
        launch.run(alone, 2, timeout=20)
    assert info.value.rank == 1
    assert "rank 1 waited 2 s for the all-gather of unit '0' (forward)" in str(info.value)
    assert "every rank must run the model's forward and backward together" in str(info.value)


# ----------------------------------------------------------------------------
# the checks: reference solutions pass, wrong ones get a specific diagnostic, stubs read "not attempted"


def real_collective_order():
    """The all-gathers and reduce-scatters fsdp.fully_shard issues in one step, in issue order."""
    result = {}
    for prefetch in (False, True):
        for reshard in (True, False):
            model = fsdp.fully_shard(make_stack(**SMALL), prefetch=prefetch, reshard_after_forward=reshard)
            x, y = regression_data(4, SMALL["d_model"])
            with fsdp.record_timeline(model) as timeline:
                F.mse_loss(model(x), y).backward()
            result[prefetch, reshard] = [
                (e.kind, e.unit, e.phase) for e in timeline.events if e.kind != "compute"
            ]
    return result


def test_the_order_exercise_describes_the_library():
    from course_lib.checks import fsdp as check

    for (prefetch, reshard), order in launch.run(real_collective_order, 2)[0].items():
        assert order == check.reference_collective_order(["0", "1", "2"], prefetch, reshard)


@pytest.mark.mistake("7b.1", "7b.2", "7b.3", "7b.4")
def test_checks_pass_solutions_and_name_wrong_answers():
    import reference_answers

    from course_lib.checks import FAILED, NOT_ATTEMPTED, PASSED
    from course_lib.checks import fsdp as check
    from course_lib.zero import adamw_

    sol = reference_answers.load("07b_fsdp")
    assert check.shard_ranges(sol.shard_ranges).status == PASSED
    assert check.gather_unit(sol.gather).status == PASSED
    assert check.reduce_and_update(sol.reduce_and_update).status == PASSED
    assert check.collective_order(sol.collective_order).status == PASSED

    result = check.shard_ranges(lambda numels, rank, n: check._floor_ranges(numels, rank, n))
    assert result.status == FAILED and "pad the unit to a multiple of N first" in result.message

    def replaces(unit):
        full = torch.empty(unit.padded)
        dist.all_gather_single(full, unit.shard.clone())
        unit.full = full

    def no_resize(unit):
        dist.all_gather_single(unit.full, unit.shard.clone())

    result = check.gather_unit(replaces)
    assert result.status == FAILED and "you replaced unit.full; gather INTO its storage" in result.message
    result = check.gather_unit(no_resize)
    assert result.status == FAILED and "storage still 0 bytes: resize it back" in result.message

    def reduce_in_bf16(grad, master, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
        n = dist.get_world_size()
        mine = torch.empty(grad.numel() // n, dtype=torch.bfloat16)
        dist.reduce_scatter_single(mine, grad)
        adamw_(master, mine.float() / n, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)
        return master.bfloat16()

    update = sol.reduce_and_update

    def rounds_master(grad, master, *args, **kwargs):
        out = update(grad, master, *args, **kwargs)
        master.copy_(out)
        return out

    result = check.reduce_and_update(reduce_in_bf16)
    assert result.status == FAILED and "looks like a reduction in bf16" in result.message
    result = check.reduce_and_update(rounds_master)
    assert result.status == FAILED and "looks like a master rounded to bf16" in result.message

    result = check.collective_order(check._forward_order_backward)
    assert result.status == FAILED and "prefetch the unit BEFORE the current one" in result.message
    result = check.collective_order(lambda units, prefetch, reshard: fsdp.fully_shard(nn.Linear(1, 1)))
    assert result.status == FAILED and "you called fsdp.fully_shard" in result.message

    def stub(*args, **kwargs):
        raise NotImplementedError("exercise: replace this line with your code")

    for check_fn in (check.shard_ranges, check.gather_unit, check.reduce_and_update, check.collective_order):
        assert check_fn(stub).status == NOT_ATTEMPTED
