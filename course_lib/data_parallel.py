"""Chapter 02: data parallelism. Every rank holds the whole model; each sees a slice of the batch.

    losses = dp.train_single_process(model, batches)                     # the reference
    losses = dp.train_data_parallel(model, batches)                      # inside each of N ranks
    losses = dp.train_data_parallel(model, batches, sync="parameter-server")
    losses = dp.train_data_parallel(model, batches, sync="sharded-parameter-server", servers=2)
    losses = dp.train_data_parallel(model, batches, accumulation_steps=4)

Why it is exact: a batch's loss is the mean over its samples, so with equal
shards the full-batch gradient is the mean of the N ranks' shard gradients.
If every rank applies that same mean, the N replicas stay identical, and equal
to one process training on the whole batch.

Notation: N ranks, Ψ parameters (4Ψ bytes in fp32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from course_lib.models import make_mlp, regression_data, shard
from course_lib.traffic import Traffic, count_traffic

#: How the ranks agree on the gradient: ours three ways, and torch's DDP as the reference.
SYNCS = ("all-reduce", "parameter-server", "sharded-parameter-server", "ddp")
#: The parameter server's rank.
ROOT = 0
LR, MOMENTUM = 0.1, 0.9


class SGD:
    """SGD with momentum: the update of ``torch.optim.SGD(params, lr, momentum)``.

    Written out so its state is in plain sight (one momentum buffer per
    parameter, Ψ more numbers per rank), and because creating a torch
    optimizer in a fresh rank costs about a second (it imports torch._dynamo).
    """

    def __init__(self, params, lr: float = LR, momentum: float = MOMENTUM):
        self.params, self.lr, self.momentum = list(params), lr, momentum
        self.momentum_buffers = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if self.momentum_buffers[i] is None:
                self.momentum_buffers[i] = p.grad.clone()
            else:
                self.momentum_buffers[i].mul_(self.momentum).add_(p.grad)
            p.add_(self.momentum_buffers[i], alpha=-self.lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def make_batches(
    steps: int, batch_size: int, d_model: int = 16, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches ``(x, y)`` of ``batch_size`` samples each."""
    x, y = regression_data(steps * batch_size, d_model, seed)
    return list(zip(x.split(batch_size), y.split(batch_size)))


def parameters(model: nn.Module) -> dict:
    """A copy of every parameter by name, to compare runs with."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One contiguous vector: one message instead of one per tensor."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Iterable[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


# ----------------------------------------------------------------------------
# the single-process reference


def train_single_process(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    lr: float = LR,
    momentum: float = MOMENTUM,
    optimizer: SGD | torch.optim.Optimizer | None = None,
) -> list[float]:
    """Full-batch training, one step per batch; returns the loss of every step.

    The optimizer defaults to this module's momentum SGD; pass another to compare
    against, e.g., a sharded Adam.
    """
    optimizer = optimizer or SGD(model.parameters(), lr, momentum)
    losses = []
    for x, y in batches:
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------
# two ways to agree on the gradient


@torch.no_grad()
def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s weights: replicas must start identical."""
    for p in model.parameters():
        dist.broadcast(p, src)


@torch.no_grad()
def average_gradients_allreduce(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Every rank ends with the mean gradient: all-reduce (sum), then divide by N.

    One all-reduce per parameter keeps it simple; chapter 03 groups them into buckets.
    """
    n = dist.get_world_size(group)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad /= n


@torch.no_grad()
def parameter_server_step(
    model: nn.Module, optimizer: SGD | torch.optim.Optimizer | None, root: int = ROOT
) -> None:
    """One update through a parameter server on rank ``root``.

    Workers send their gradients up; the server averages them, runs the only
    optimizer (so only the server holds optimizer state) and sends the new
    parameters down. Parameters rather than gradients come down because the
    workers then need no optimizer at all; the bytes are the same, Ψ each way.
    ``optimizer`` is used on ``root`` only (None elsewhere is fine).
    """
    rank, n = dist.get_rank(), dist.get_world_size()
    params = list(model.parameters())
    grads = flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
    if rank == root:
        incoming = torch.empty_like(grads)
        for worker in range(n):
            if worker != root:  # one at a time: the server's link is the bottleneck
                dist.recv(incoming, worker)
                grads += incoming
        grads /= n
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        unflatten_into(grads, [p.grad for p in params])
        optimizer.step()
        new_params = flatten(params)
        for worker in range(n):
            if worker != root:
                dist.send(new_params, worker)
    else:
        dist.send(grads, root)
        new_params = torch.empty_like(grads)
        dist.recv(new_params, root)
        unflatten_into(new_params, params)


def server_ranges(numel: int, servers: int) -> list[tuple[int, int]]:
    """Server s of ``servers`` owns elements [start, end) of the flattened parameters."""
    bounds = [round(numel * s / servers) for s in range(servers + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class ShardSGD:
    """One server's momentum SGD on its range of the flat parameters: :class:`SGD`'s update."""

    def __init__(self, start: int, end: int, lr: float = LR, momentum: float = MOMENTUM):
        self.start, self.end, self.lr, self.momentum = start, end, lr, momentum
        self.momentum_buffer = None

    @torch.no_grad()
    def step(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        if self.momentum_buffer is None:
            self.momentum_buffer = grad.clone()
        else:
            self.momentum_buffer.mul_(self.momentum).add_(grad)
        param.add_(self.momentum_buffer, alpha=-self.lr)


@torch.no_grad()
def sharded_parameter_server_step(model: nn.Module, shard_optimizer: ShardSGD | None, servers: int) -> None:
    """One update through a parameter server sharded over ranks 0 … servers−1.

    Server s owns one range of the flattened parameters (:func:`server_ranges`) and its
    optimizer state (``shard_optimizer``, a :class:`ShardSGD` on servers, None elsewhere).
    Every rank pushes each server that server's range of its gradient; each server averages its
    range, steps it, and every rank pulls every server's updated range. With one server this is
    :func:`parameter_server_step`; with a server on every rank it moves exactly what a
    reduce-scatter followed by an all-gather moves.
    """
    rank, n = dist.get_rank(), dist.get_world_size()
    params = list(model.parameters())
    grads = flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
    flat = flatten(params)
    ranges = server_ranges(flat.numel(), servers)
    pushes = [dist.isend(grads[a:b], s) for s, (a, b) in enumerate(ranges) if s != rank]
    if rank < servers:  # sum every worker's gradient for my range, then step it
        a, b = ranges[rank]
        total, incoming = grads[a:b].clone(), torch.empty(b - a, dtype=grads.dtype)
        for worker in range(n):
            if worker != rank:
                dist.recv(incoming, worker)
                total += incoming
        shard_optimizer.step(flat[a:b], total / n)
    for request in pushes:
        request.wait()
    pulls = [dist.isend(flat[a:b], w) for w in range(n) if w != rank] if rank < servers else []
    for s, (a, b) in enumerate(ranges):
        if s != rank:
            dist.recv(flat[a:b], s)  # writes into the slice: one contiguous range of flat
    for request in pulls:
        request.wait()
    unflatten_into(flat, params)


# ----------------------------------------------------------------------------
# a data-parallel step, with gradient accumulation


def data_parallel_step(
    model: nn.Module,
    optimizer: SGD | ShardSGD | torch.optim.Optimizer | None,
    x: torch.Tensor,
    y: torch.Tensor,
    sync: str = "all-reduce",
    accumulation_steps: int = 1,
    sync_every_micro_batch: bool = False,
    servers: int | None = None,
) -> float:
    """One optimizer step on this rank's shard of the global batch ``(x, y)``.

    The shard is split into ``accumulation_steps`` micro-batches; their gradients
    add up locally (each loss divided by their number, so the sum is the
    shard's mean) and the ranks communicate once, after the last one: the
    ``no_sync`` idea. ``sync_every_micro_batch=True`` all-reduces after every
    micro-batch instead: the same result for M times the traffic.
    ``model`` is a DistributedDataParallel wrapper when ``sync="ddp"``; ``servers`` is the
    number of server ranks of ``sync="sharded-parameter-server"`` (default: every rank).
    Returns this rank's loss (the mean over its shard).
    """
    if sync.endswith("parameter-server") and sync_every_micro_batch:
        raise ValueError(
            "a parameter server updates once per step: sync_every_micro_batch needs "
            "sync='all-reduce' or 'ddp'"
        )
    rank, n, m = dist.get_rank(), dist.get_world_size(), accumulation_steps
    x, y = shard(x, rank, n), shard(y, rank, n)
    total = 0.0
    for i in range(m):
        communicate = i == m - 1 or sync_every_micro_batch
        skip = model.no_sync() if sync == "ddp" and not communicate else contextlib.nullcontext()
        with skip:  # DDP all-reduces inside backward unless told not to
            loss = F.mse_loss(model(shard(x, i, m)), shard(y, i, m)) / m
            loss.backward()
        if communicate and sync == "all-reduce":
            average_gradients_allreduce(model)
        total += loss.item()
    if sync == "parameter-server":
        parameter_server_step(model, optimizer)
    elif sync == "sharded-parameter-server":
        sharded_parameter_server_step(model, optimizer, servers or n)
    else:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return total


def train_data_parallel(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    sync: str = "all-reduce",
    accumulation_steps: int = 1,
    sync_every_micro_batch: bool = False,
    lr: float = LR,
    momentum: float = MOMENTUM,
    servers: int | None = None,
) -> list[float]:
    """Run inside every rank: one step per global batch; returns this rank's losses.

    ``model`` is trained in place. With equal shards, the mean of the ranks'
    losses is the full-batch loss of :func:`train_single_process`.
    """
    if sync not in SYNCS:
        raise ValueError(f"sync must be one of {', '.join(SYNCS)}; got {sync!r}")
    broadcast_parameters(model)
    wrapped = DistributedDataParallel(model) if sync == "ddp" else model
    optimizer = _optimizer(model, sync, servers, lr, momentum)
    losses = [
        data_parallel_step(
            wrapped, optimizer, x, y, sync, accumulation_steps, sync_every_micro_batch, servers
        )
        for x, y in batches
    ]
    del wrapped  # a live DDP wrapper at process-group teardown can hang
    return losses


# ----------------------------------------------------------------------------
# traffic: measured, and the formulas


def _optimizer(model, sync: str, servers: int | None, lr: float = LR, momentum: float = MOMENTUM):
    """This rank's optimizer for ``sync``: SGD everywhere, on the server only, or a server's shard."""
    rank = dist.get_rank()
    if sync == "parameter-server":
        return SGD(model.parameters(), lr, momentum) if rank == ROOT else None
    if sync == "sharded-parameter-server":
        servers = servers or dist.get_world_size()
        if not 1 <= servers <= dist.get_world_size():
            raise ValueError(f"servers must be 1 … N = {dist.get_world_size()}, got {servers}")
        numel = sum(p.numel() for p in model.parameters())
        return ShardSGD(*server_ranges(numel, servers)[rank], lr, momentum) if rank < servers else None
    return SGD(model.parameters(), lr, momentum)


def measure_sync_traffic(
    sync: str,
    d_model: int = 64,
    d_hidden: int = 256,
    accumulation_steps: int = 1,
    sync_every_micro_batch: bool = False,
    servers: int | None = None,
) -> tuple[Traffic, int]:
    """Inside a rank: count one training step's communication. Returns (Traffic, Ψ bytes)."""
    model = make_mlp(d_model, d_hidden)
    wrapped = DistributedDataParallel(model) if sync == "ddp" else model
    optimizer = _optimizer(model, sync, servers)
    ((x, y),) = make_batches(1, 4 * dist.get_world_size() * accumulation_steps, d_model)
    dist.barrier()  # nobody's earlier bytes may still be in flight
    with count_traffic() as traffic:
        data_parallel_step(
            wrapped, optimizer, x, y, sync, accumulation_steps, sync_every_micro_batch, servers
        )
    del wrapped
    psi_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return traffic, psi_bytes


def expected_traffic(
    sync: str, n: int, rank: int, psi_bytes: int, syncs: int = 1, servers: int | None = None
) -> tuple[float, float]:
    """(bytes sent, bytes received) by ``rank`` for ``syncs`` gradient syncs of a Ψ-byte model.

    ``servers`` (for ``sync="sharded-parameter-server"``, default N): a server rank handles
    (N−1) shards of Ψ/servers for its range and, as a worker, servers−1 more; a worker sends and
    receives Ψ. One server is the parameter server; N servers make 2(N−1)/N·Ψ, the all-reduce's.
    """
    if sync == "parameter-server":
        per_sync = ((n - 1) * psi_bytes,) * 2 if rank == ROOT else (psi_bytes, psi_bytes)
    elif sync == "sharded-parameter-server":
        servers = servers or n
        shard = psi_bytes / servers
        per_sync = ((n - 1 + servers - 1) * shard,) * 2 if rank < servers else (psi_bytes, psi_bytes)
    else:  # a ring all-reduce: reduce-scatter, then all-gather
        per_sync = (2 * (n - 1) / n * psi_bytes,) * 2
    return per_sync[0] * syncs, per_sync[1] * syncs
