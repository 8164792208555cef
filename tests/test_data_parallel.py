"""Chapter 02: data parallel training equals single-process training; traffic; the exercise checks."""

import pytest
import reference_answers
import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_lib import dp, launch, models
from course_lib.checks import FAILED, NOT_ATTEMPTED
from course_lib.checks import data_parallel as check

STEPS, BATCH = 3, 8  # BATCH divides by N·M for N in 1, 2, 4 and M = 2


def test_sgd_is_torch_sgd_with_momentum():
    ours, theirs = models.make_mlp(), models.make_mlp()
    opt_ours = dp.SGD(ours.parameters())
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    for x, y in dp.make_batches(3, 8):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# every design equals one process training on the whole batch


def _train_every_way(batches, with_ddp):
    runs = [
        ("all-reduce", 1, False),
        ("parameter-server", 1, False),
        ("all-reduce", 2, False),
        ("all-reduce", 2, True),
        ("parameter-server", 2, False),
    ]
    if with_ddp:
        runs += [("ddp", 1, False), ("ddp", 2, False)]
    results = {}
    for sync, m, every in runs:
        model = models.make_mlp()
        losses = dp.train_data_parallel(model, batches, sync, m, every)
        results[sync, m, every] = (losses, dp.parameters(model))
    return results


@pytest.mark.parametrize("n", [1, 2, 4])
def test_data_parallel_equals_single_process(n):
    batches = dp.make_batches(STEPS, BATCH)
    baseline = models.make_mlp()
    baseline_losses = dp.train_single_process(baseline, batches)
    expected = dp.parameters(baseline)
    per_rank = launch.run(_train_every_way, n, batches, n > 1, timeout=60)
    assert len(per_rank[0]) == (7 if n > 1 else 5)
    for run in per_rank[0]:
        for rank in range(n):
            losses, params = per_rank[rank][run]
            for name, p in params.items():
                torch.testing.assert_close(
                    p, expected[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{run}, rank {rank}, {name}: {m}"
                )
        mean_losses = [sum(step) / n for step in zip(*(per_rank[r][run][0] for r in range(n)))]
        assert mean_losses == pytest.approx(baseline_losses, rel=1e-5, abs=1e-6), run


def test_bad_arguments_are_refused_before_any_communication():
    model, (x, y) = models.make_mlp(), dp.make_batches(1, 8)[0]
    with pytest.raises(ValueError, match="sync must be one of"):
        dp.train_data_parallel(model, [(x, y)], sync="allreduce")
    with pytest.raises(ValueError, match="parameter server updates once per step"):
        dp.data_parallel_step(model, None, x, y, "parameter-server", 2, sync_every_micro_batch=True)


# ----------------------------------------------------------------------------
# traffic: measured beside the formulas


@pytest.mark.parametrize(
    "n, rank, sent, received", [(4, 0, 3.0, 3.0), (4, 1, 1.0, 1.0), (2, 0, 1.0, 1.0), (1, 0, 0.0, 0.0)]
)
def test_parameter_server_formula(n, rank, sent, received):
    assert dp.expected_traffic("parameter-server", n, rank, 100) == (100 * sent, 100 * received)


def test_all_reduce_formula():
    assert dp.expected_traffic("all-reduce", 4, 2, 100) == (150.0, 150.0)
    assert dp.expected_traffic("all-reduce", 4, 2, 100, syncs=3) == (450.0, 450.0)


@pytest.mark.parametrize("n", [2, 4])
def test_measured_traffic_matches_formulas(n):
    for sync in ("parameter-server", "all-reduce"):
        for rank, (traffic, psi_bytes) in enumerate(launch.run(dp.measure_sync_traffic, n, sync)):
            exp_sent, exp_received = dp.expected_traffic(sync, n, rank, psi_bytes)
            if sync == "parameter-server":  # point-to-point: the payload is exact
                assert (traffic.payload_sent, traffic.payload_received) == (exp_sent, exp_received)
                tolerance = 0.01
            else:  # gloo's headers and per-call overhead: a few %
                tolerance = 0.05
            assert exp_received <= traffic.received <= (1 + tolerance) * exp_received, (sync, rank, traffic)
            # Bytes sent also count TCP retransmissions (seen when the server reads one
            # worker at a time and the others' bytes wait): only a lower bound is firm.
            assert exp_sent <= traffic.sent, (sync, rank, traffic)


@pytest.mark.parametrize(
    "n, servers, rank, received",
    [(4, 1, 0, 3.0), (4, 1, 1, 1.0), (4, 2, 0, 2.0), (4, 2, 3, 1.0), (4, 4, 2, 1.5), (2, 2, 0, 1.0)],
)
def test_sharded_parameter_server_formula(n, servers, rank, received):
    sent_got, received_got = dp.expected_traffic("sharded-parameter-server", n, rank, 100, servers=servers)
    assert sent_got == received_got == pytest.approx(100 * received)


def _train_sharded(batches, servers):
    model = models.make_mlp()
    dp.train_data_parallel(model, batches, "sharded-parameter-server", servers=servers)
    return dp.parameters(model)


@pytest.mark.parametrize("n, servers", [(2, 1), (3, 2), (4, 4)])
def test_sharded_parameter_server_equals_single_process_and_its_formula(n, servers):
    batches = dp.make_batches(STEPS, 12)
    baseline = models.make_mlp()
    dp.train_single_process(baseline, batches)
    for params in launch.run(_train_sharded, n, batches, servers):
        for name, p in params.items():
            torch.testing.assert_close(p, dp.parameters(baseline)[name], rtol=1e-5, atol=1e-5)
    for rank, (traffic, psi_bytes) in enumerate(
        launch.run(dp.measure_sync_traffic, n, "sharded-parameter-server", servers=servers)
    ):
        expected = dp.expected_traffic("sharded-parameter-server", n, rank, psi_bytes, servers=servers)
        assert (traffic.payload_sent, traffic.payload_received) == pytest.approx(expected, abs=n), rank


def test_server_ranges_cover_every_element_once():
    assert dp.server_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert dp.server_ranges(5, 1) == [(0, 5)]


def test_too_many_servers_are_refused():
    with pytest.raises(launch.RankError, match="servers must be 1 … N = 2"):
        launch.run(_train_sharded, 2, dp.make_batches(1, 4), 3)


def test_accumulation_syncs_once_per_step():
    m = 3
    once, psi_bytes = launch.run(dp.measure_sync_traffic, 2, "all-reduce", accumulation_steps=m)[0]
    every, _ = launch.run(
        dp.measure_sync_traffic, 2, "all-reduce", accumulation_steps=m, sync_every_micro_batch=True
    )[0]
    n_tensors = 4  # fc1.weight, fc1.bias, fc2.weight, fc2.bias
    assert once.count("all_reduce") == n_tensors and every.count("all_reduce") == m * n_tensors
    assert every.received == pytest.approx(m * once.received, rel=0.01)
    assert once.received == pytest.approx(dp.expected_traffic("all-reduce", 2, 0, psi_bytes)[1], rel=0.05)


# ----------------------------------------------------------------------------
# the exercise checks: the solutions pass, wrong answers get a specific diagnosis


@pytest.fixture(scope="module")
def solution():
    return reference_answers.load("02_data_parallel")


# That every reference answer passes its check is tested once, through the grader: tests/test_course.py.


def test_course_implementations_earn_nothing():
    def ps(model, optimizer):
        dp.parameter_server_step(model, optimizer)

    for result, called in (
        (
            check.average_gradients(dp.average_gradients_allreduce),
            "data_parallel.average_gradients_allreduce",
        ),
        (check.parameter_server_step(ps), "data_parallel.parameter_server_step"),
    ):
        assert result.status == FAILED and f"you called {called}" in result.message, result


def test_not_attempted():
    def shard_batch(batch):
        raise NotImplementedError("exercise")

    assert check.shard_batch(shard_batch).status == NOT_ATTEMPTED


def strided(batch):
    return batch[dist.get_rank() :: dist.get_world_size()]


def summed(model):
    for p in model.parameters():
        dist.all_reduce(p.grad)


def nothing(model):
    pass


def wraps_in_ddp(model):
    torch.nn.parallel.DistributedDataParallel(model)


def server_keeps_parameters(model, optimizer):
    rank, n = dist.get_rank(), dist.get_world_size()
    for p in model.parameters():
        if rank == 0:
            incoming = torch.empty_like(p.grad)
            for worker in range(1, n):
                dist.recv(incoming, worker)
                p.grad += incoming
            p.grad /= n
        else:
            dist.send(p.grad, 0)
    if rank == 0:
        optimizer.step()


def server_overwrites_its_gradient(model, optimizer):
    rank, n = dist.get_rank(), dist.get_world_size()
    with torch.no_grad():
        for p in model.parameters():
            if rank == 0:
                for worker in range(1, n):
                    dist.recv(p.grad, worker)  # replaces the server's own gradient
                p.grad /= n
            else:
                dist.send(p.grad, 0)
        if rank == 0:
            optimizer.step()
        for p in model.parameters():
            dist.broadcast(p, 0)


def server_all_reduces(model, optimizer):
    dp.average_gradients_allreduce(model)


def _average(model):
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def syncs_every_micro_batch(model, optimizer, micro_batches):
    for x, y in micro_batches:
        (F.mse_loss(model(x), y) / len(micro_batches)).backward()
        _average(model)
    optimizer.step()
    optimizer.zero_grad()


def forgets_to_scale(model, optimizer, micro_batches):
    for x, y in micro_batches:
        F.mse_loss(model(x), y).backward()
    _average(model)
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize(
    "name, wrong, words",
    [
        pytest.param(
            "shard_batch",
            strided,
            ["N=2", "rank 0 got rows [0, 2, 4", "expected rows 0–5", "contiguous"],
            marks=pytest.mark.mistake("2.1"),
        ),
        pytest.param(
            "average_gradients",
            summed,
            ["N=2, rank 0: that is the SUM over the 2 ranks", "; fc1.weight.grad[", "expected"],
            marks=pytest.mark.mistake("2.2"),
        ),
        pytest.param(
            "average_gradients", nothing, ["N=2, rank 0:", "own gradient"], marks=pytest.mark.mistake("2.2")
        ),
        ("average_gradients", wraps_in_ddp, ["DistributedDataParallel", "switched off"]),
        pytest.param(
            "parameter_server_step",
            server_keeps_parameters,
            ["N=2, step 1, rank 1:", "send the updated parameters back", "; fc1.weight["],
            marks=pytest.mark.mistake("2.3"),
        ),
        pytest.param(
            "parameter_server_step",
            server_overwrites_its_gradient,
            ["N=2, step 1, rank 0:", "server's own gradient is missing"],
            marks=pytest.mark.mistake("2.3"),
        ),
        ("parameter_server_step", server_all_reduces, ["parameter server", "you called dist.all_reduce"]),
        pytest.param(
            "accumulate_and_step",
            syncs_every_micro_batch,
            ["rank 0 communicated (dist.all_reduce) after micro-batch 1 of 3"],
            marks=pytest.mark.mistake("2.4"),
        ),
        pytest.param(
            "accumulate_and_step",
            forgets_to_scale,
            ["N=1, step 1, rank 0:", "3× too large"],
            marks=pytest.mark.mistake("2.4"),
        ),
    ],
)
def test_wrong_answers_get_a_specific_diagnosis(name, wrong, words):
    result = getattr(check, name)(wrong)
    assert result.status == FAILED, result
    for word in words:
        assert word in result.message, result.message
