"""Chapter 10: every strategy of the course as a script under ``torchrun``.

    torchrun --nproc_per_node 2 -m course_lib.demo dp            # one strategy
    torchrun --nproc_per_node 2 -m course_lib.demo dp ring zero  # several, one after another
    torchrun --nproc_per_node 8 -m course_lib.demo 3d            # DP=2 x TP=2 x PP=2
    torchrun --nproc_per_node 4 -m course_lib.demo 3d --grid 1,2,2

STRATEGY is one of dp, ring, tp, sp, pp, zero, moe, 3d. Every rank reads who
it is from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), runs a few steps with the course's own code, and compares what
it holds with single-process training that it recomputes itself (the models
are tiny). Rank 0 prints one summary line per strategy; on a difference above
the tolerance every rank exits with code 1 and rank 0 says which rank and
which tensor. ``--perturb`` corrupts the last rank's result on purpose, so you
can see (and tests can check) that a mismatch is caught. Exit code 2: an
unknown strategy or a world size it cannot use.

Backend: gloo on CPUs; ``cpu:gloo,cuda:nccl`` when every local rank has its own
GPU (``cuda:LOCAL_RANK``): the strategies' tensors live on that GPU and travel
over NCCL. ``--backend`` overrides.

Two machines (nodes), 2 ranks each. Run the same command on both; HOST is the
address of the machine hosting the rendezvous, as the other sees it:

    torchrun --nnodes 2 --nproc_per_node 2 --rdzv_backend c10d \\
             --rdzv_endpoint HOST:29500 --rdzv_id myjob -m course_lib.demo dp

With c10d the rendezvous numbers the nodes (GROUP_RANK); a ``--node_rank`` is
ignored. The static rendezvous (torchrun's default) takes ``--master_addr HOST
--master_port 29500 --node_rank i`` instead, node_rank 0 on HOST. Chapter 10
runs two such nodes on one machine. When it hangs or fails:

* the ports must be reachable between the nodes (the rendezvous port and those
  opened after it), and HOST must resolve on every node; use an IP address to
  rule names out;
* with several network cards, name the one to use: GLOO_SOCKET_IFNAME=eth0 for
  gloo, NCCL_SOCKET_IFNAME=eth0 for NCCL (a prefix; ``ip addr`` lists them);
* NCCL_DEBUG=INFO shows what NCCL chose; where the platform blocks GPU-to-GPU
  copies over PCIe (ACS, an IOMMU, some VMs), NCCL_P2P_DISABLE=1 is the stop-gap
  that routes them through host memory;
* every node needs the same code, Python and torch versions.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_lib import comm, dp, launch, moe, pp, tp, zero
from course_lib.mesh import RankGrid, build_3d_stage, tp_block
from course_lib.models import make_block, make_mlp, make_stack, shard

TOLERANCE = 1e-5  # fp32: the course's "equal to single-process" (rtol = atol = 1e-5, as in every chapter)
PERTURBATION = 1e-3
STEPS = 3
D, H = 8, 16  # model width and MLP hidden size: tp needs N | H
STRATEGIES = {}  # name -> (run, needs(n, options) -> error text or None, what it does)

# What a strategy returns ([(name, got, expected)] for this rank), a strategy, and its needs.
_Checks = list[tuple[str, torch.Tensor, torch.Tensor]]
_Demo = Callable[[int, int, torch.device, argparse.Namespace], _Checks]
_Needs = Callable[[int, argparse.Namespace], str | None]


class Unusable(ValueError):
    """This strategy cannot run on this world size (exit code 2)."""


def strategy(name: str, what: str, needs: _Needs = lambda n, o: None) -> Callable[[_Demo], _Demo]:
    def register(fn):
        STRATEGIES[name] = (fn, needs, what)
        return fn

    return register


def _divisors_from_2(size: int) -> str:
    return ", ".join(str(k) for k in range(2, size + 1) if size % k == 0)


def divides(size: int, what: str) -> _Needs:
    return lambda n, o: (
        None
        if size % n == 0
        else f"needs N dividing {what}={size} (N = 1, {_divisors_from_2(size)}), got N={n}"
    )


# ----------------------------------------------------------------------------
# the strategies: each returns [(name, got, expected)] for this rank


def _sgd_step(params, lr=dp.LR):
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None


def _data(n_samples, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_samples, D, generator=g), torch.randn(n_samples, D, generator=g)


@strategy("dp", "data parallel: average gradients with all-reduce, momentum SGD")
def demo_dp(rank: int, n: int, dev: torch.device, opts: argparse.Namespace) -> _Checks:
    batches = [(x.to(dev), y.to(dev)) for x, y in dp.make_batches(STEPS, 4 * n, D, seed=2)]
    model = make_mlp(D, H, seed=0).to(dev)
    dp.train_data_parallel(model, batches)
    ref = make_mlp(D, H, seed=0)
    dp.train_single_process(ref, [(x.cpu(), y.cpu()) for x, y in batches])
    expected = dp.parameters(ref)
    return [(k, v, expected[k]) for k, v in dp.parameters(model).items()]


@strategy("ring", "ring all-reduce from send/recv (reduce-scatter + all-gather)")
def demo_ring(rank: int, n: int, dev: torch.device, opts: argparse.Namespace) -> _Checks:
    def values(r):  # integers: the sum must be exact
        return torch.randint(-50, 50, (1001,), generator=torch.Generator().manual_seed(r)).float()

    got = comm.ring_all_reduce(values(rank).to(dev))
    return [("sum", got, sum(values(r) for r in range(n)))]


@strategy("tp", "tensor-parallel MLP (Megatron: fc1 by columns, fc2 by rows)", divides(H, "H"))
def demo_tp(rank: int, n: int, dev: torch.device, opts: argparse.Namespace) -> _Checks:
    dense = make_mlp(D, H, seed=0)
    mlp = tp.TensorParallelMLP.from_dense(copy.deepcopy(dense)).to(dev)
    mine = tp.block_of(H, n, rank)  # fc1's rows and fc2's columns
    x, y = _data(6)
    for _ in range(STEPS):  # both see the whole batch; rank r holds its block of H
        F.mse_loss(mlp(x.to(dev)), y.to(dev)).backward()
        _sgd_step(mlp.parameters())
        F.mse_loss(dense(x), y).backward()
        _sgd_step(dense.parameters())
    out = mlp(x.to(dev))
    return [
        ("output", out, dense(x)),
        ("fc1.weight", mlp.fc1.weight, dense.fc1.weight[mine]),
        ("fc1.bias", mlp.fc1.bias, dense.fc1.bias[mine]),
        ("fc2.weight", mlp.fc2.weight, dense.fc2.weight[:, mine]),
        ("fc2.bias", mlp.fc2.bias, dense.fc2.bias),
    ]


def _sp_needs(n, o):
    return None if 4 % n == 0 else f"needs N dividing n_heads=4 and seq=8 (N = 1, 2 or 4), got N={n}"


@strategy("sp", "sequence-parallel transformer block (TP + sharded LayerNorms)", _sp_needs)
def demo_sp(rank: int, n: int, dev: torch.device, opts: argparse.Namespace) -> _Checks:
    dense = make_block(16, 4, 32, seed=0)
    block = tp.SequenceParallelBlock.from_dense(copy.deepcopy(dense)).to(dev)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(3))
    mine = tp.block_of(8, n, rank, "seq")
    x_mine = x[:, mine].clone().to(dev).requires_grad_()
    out = block(x_mine)
    (out**2).sum().backward()  # a sum: the full loss is the sum of the ranks' parts
    block.sync_replicated_grads()
    x_ref = x.clone().requires_grad_()
    ref = dense(x_ref)
    (ref**2).sum().backward()
    return [
        ("output", out, ref[:, mine]),
        ("input grad", x_mine.grad, x_ref.grad[:, mine]),
        ("ln1.weight.grad", block.ln1.weight.grad, dense.ln1.weight.grad),
        ("mlp.fc2.bias.grad", block.mlp.fc2.bias.grad, dense.mlp.fc2.bias.grad),
        (
            "mlp.fc1.weight.grad",
            block.mlp.fc1.weight.grad,
            dense.mlp.fc1.weight.grad[tp.block_of(32, n, rank)],
        ),
    ]


@strategy(
    "pp",
    "pipeline parallel, 1F1B schedule, 4 micro-batches",
    lambda n, o: (
        None if n <= 4 else f"needs N <= 4: the model has 4 layers and every stage needs one, got N={n}"
    ),
)
def demo_pp(rank: int, n: int, dev: torch.device, opts: argparse.Namespace) -> _Checks:
    full = make_stack(4, D, H, seed=0)
    stage = pp.partition(copy.deepcopy(full), rank, n).to(dev)
    x, y = _data(8)
    for _ in range(STEPS):
        pp.train_step(stage, x.to(dev), y.to(dev), F.mse_loss, 4, schedule="1f1b")
        _sgd_step(stage.parameters())
        F.mse_loss(full(x), y).backward()
        _sgd_step(full.parameters())
    reference = dict(full.named_parameters())
    return [(k, v, reference[k]) for k, v in stage.named_parameters()]


@strategy("zero", "ZeRO stages 1, 2 and 3 with AdamW")
def demo_zero(rank: int, n: int, dev: torch.device, opts: argparse.Namespace) -> _Checks:
    x, y = _data(4 * n)
    checks = []
    ref = make_mlp(D, H, seed=0)
    state = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in ref.parameters()}
    for step in range(1, STEPS + 1):  # the reference: AdamW on the whole batch
        F.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            for p in ref.parameters():
                zero.adamw_(p, p.grad, *state[p], step, 1e-2, (0.9, 0.999), 1e-8, 0.01)
                p.grad = None
    for stage in (1, 2, 3):
        model = make_mlp(D, H, seed=0).to(dev)
        opt = zero.ZeroAdam(model, stage, lr=1e-2, weight_decay=0.01)
        for _ in range(STEPS):
            F.mse_loss(model(shard(x, rank, n).to(dev)), shard(y, rank, n).to(dev)).backward()
            opt.step()
            opt.zero_grad()
        expected = dict(ref.named_parameters())
        checks += [(f"stage {stage} {k}", v, expected[k]) for k, v in opt.full_parameters().items()]
    return checks


@strategy("moe", "expert-parallel MoE layer, top-2 routing, two all-to-alls", divides(4, "E"))
def demo_moe(rank: int, n: int, dev: torch.device, opts: argparse.Namespace) -> _Checks:
    gate, experts = moe.make_moe(D, 4, H, seed=0)
    layer = moe.MoELayer.from_dense(copy.deepcopy(gate), copy.deepcopy(experts), 2, 1.25).to(dev)
    xs = [_data(6, seed=10 + r)[0] for r in range(n)]  # every rank's own tokens
    out = layer(xs[rank].to(dev))
    (out**2).sum().backward()
    dense = [moe.dense_moe(x, gate, experts, 2, 1.25) for x in xs]
    sum((d**2).sum() for d in dense).backward()  # experts collect gradients from every rank's tokens
    per = 4 // n
    checks = [("output", out, dense[rank])]
    for i, e in enumerate(layer.experts):
        checks.append(
            (
                f"expert {rank * per + i} fc1.weight.grad",
                e.fc1.weight.grad,
                experts[rank * per + i].fc1.weight.grad,
            )
        )
    return checks


def _grid(n, opts):
    sizes = tuple(int(s) for s in opts.grid.split(",")) if opts.grid else (2, 2, 2)
    if len(sizes) != 3 or math.prod(sizes) != n or min(sizes) < 1:
        raise Unusable(
            f"needs DP·TP·PP ranks: 8 for the default DP=2 × TP=2 × PP=2 "
            f"(or --grid DP,TP,PP with a product of N={n}); got N={n}, grid {sizes}"
        )
    if H % sizes[1] or sizes[2] > 4:
        raise Unusable(f"TP must divide H={H} and PP be at most 4 layers; got grid {sizes}")
    return sizes


@strategy(
    "3d",
    "DP × TP × PP: a pipeline of tensor-parallel MLPs, replicated over DP",
    lambda n, o: _grid(n, o) and None,
)
def demo_3d(rank: int, n: int, dev: torch.device, opts: argparse.Namespace) -> _Checks:
    n_dp, n_tp, n_pp = _grid(n, opts)
    # Chapter 09's grid: rank = (pp · DP + dp) · TP + tp, one process group per axis.
    # TP neighbours are adjacent ranks: on a cluster, the GPUs of one node (fastest link).
    grid = RankGrid(dp=n_dp, tp=n_tp, pp=n_pp)
    full = make_stack(4, D, H, seed=0)
    stage = build_3d_stage(grid, copy.deepcopy(full)).to(dev)  # layers keep their global names
    x, y = _data(4 * n_dp)
    for _ in range(STEPS):
        xs, ys = shard(x, grid.dp_rank, n_dp).to(dev), shard(y, grid.dp_rank, n_dp).to(dev)
        pp.train_step(stage, xs, ys, F.mse_loss, 2, group=grid.pp_group)
        dp.average_gradients_allreduce(stage, group=grid.dp_group)
        _sgd_step(stage.parameters())
        F.mse_loss(full(x), y).backward()
        _sgd_step(full.parameters())
    dense = dict(full.named_parameters())
    return [
        (f"layer {name}", p, tp_block(name, dense[name], grid.tp_rank, n_tp))
        for name, p in stage.named_parameters()
    ]


# ----------------------------------------------------------------------------
# the driver


def pick_backend(choice: str) -> str:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if choice == "auto":
        # NCCL needs one GPU per rank: two ranks on one GPU are refused.
        one_each = local_rank < gpus and int(os.environ.get("LOCAL_WORLD_SIZE", 1)) <= gpus
        return launch.GPU_BACKEND if one_each else "gloo"
    return choice


def run_strategy(name: str, opts: argparse.Namespace, backend: str, dev: torch.device) -> bool:
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1234)
    dist.barrier()
    start = time.perf_counter()
    checks = STRATEGIES[name][0](rank, n, dev, opts)
    elapsed = time.perf_counter() - start
    worst, where = 0.0, ""
    for i, (what, got, expected) in enumerate(checks):
        got = got.detach().cpu()
        if opts.perturb and rank == n - 1 and i == 0:
            got = got + PERTURBATION  # on purpose: the check must notice
        diff = (got - expected.detach()).abs().max().item() if got.shape == expected.shape else math.inf
        if not diff <= worst:
            worst, where = diff, what
    reports = [None] * n
    dist.all_gather_object(reports, (worst, where))  # every rank learns the verdict
    bad_rank = max(range(n), key=lambda r: reports[r][0])
    worst_all = reports[bad_rank][0]
    ok = worst_all <= TOLERANCE
    if rank == 0:
        line = (
            f"demo {name}: {'OK' if ok else 'MISMATCH'}  world_size={n} backend={backend} "
            f"max|diff|={worst_all:.2e} (tolerance {TOLERANCE:g}) time={elapsed:.3f} s"
        )
        print(line, flush=True)
        if not ok:
            print(
                f"demo {name}: MISMATCH on rank {bad_rank}: {reports[bad_rank][1]} differs from "
                f"the single-process reference by {worst_all:.3g} (tolerance {TOLERANCE:g})",
                file=sys.stderr,
                flush=True,
            )
    return ok


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N -m course_lib.demo",
        description="Run a strategy of the course and compare it with single-process training.",
    )
    parser.add_argument("strategies", nargs="+", metavar="STRATEGY", help=", ".join(STRATEGIES))
    parser.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    parser.add_argument("--grid", help="3d only: DP,TP,PP sizes, e.g. 1,2,2 for 4 ranks")
    parser.add_argument(
        "--perturb", action="store_true", help="corrupt the last rank's result, to see a mismatch reported"
    )
    return parser.parse_intermixed_args(argv)  # options may come between strategies


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    unknown = [s for s in opts.strategies if s not in STRATEGIES]
    n = int(os.environ.get("WORLD_SIZE", 1))
    problems = [f"unknown strategy {s!r}: choose from {', '.join(STRATEGIES)}" for s in unknown]
    for s in opts.strategies:
        if s in STRATEGIES:
            try:
                why = STRATEGIES[s][1](n, opts)
            except Unusable as exc:
                why = str(exc)
            if why:
                problems.append(f"{s} cannot run on {n} rank(s): {why}")
    if problems:  # before any rendezvous: every rank can tell on its own
        # Every rank says it: torchrun stops the others as soon as one exits, so rank 0's words
        # alone could be lost when another rank is quicker.
        print("\n".join(f"course_lib.demo: {p}" for p in problems), file=sys.stderr, flush=True)
        return 2
    torch.set_num_threads(1)  # ranks share the machine's cores
    backend = pick_backend(opts.backend)
    dev = torch.device("cpu")
    if launch.uses_nccl(backend):
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if "RANK" in os.environ:
        dist.init_process_group(backend)  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    else:  # plain `python -m course_lib.demo`: a world of one, no port needed
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        results = [run_strategy(s, opts, backend, dev) for s in opts.strategies]
    finally:
        dist.destroy_process_group()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
