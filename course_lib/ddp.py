"""Chapter 03: bucketed data parallelism, the way torch's DDP overlaps communication with backward.

    model = ddp.BucketedDDP(make_mlp(), bucket_cap_mb=1.0)   # inside each rank
    F.mse_loss(model(x), y).backward()     # gradients are averaged when this returns
    model.timeline                         # when each bucket was ready, launched, done

Backward produces gradients from the last layer to the first. Instead of one
all-reduce after backward, DDP groups parameters into buckets of about
bucket_cap_mb, last parameter first, and all-reduces each bucket in the
background as soon as its gradients exist, while backward computes the rest.

What torch's DDP (2.13, default options) does differently, and
``torch_ddp_buckets`` shows: its first backward pass uses *one* bucket for
everything, while it records the order in which gradients become ready; at the
next forward it rebuilds the buckets by walking that order with the same
"close at >= cap" rule. Left at its default cap (25 MiB), the first rebuilt
bucket closes at 1 MiB (``dist._DEFAULT_FIRST_BUCKET_BYTES``) so that the first
all-reduce starts early. ``BucketedDDP`` fixes its buckets once, from the
reverse registration order, with one cap for all.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_leaves

from course_lib import launch
from course_lib.p2p import global_rank


def assign_buckets(sizes: Sequence[float], cap_bytes: float) -> list[list[int]]:
    """Group parameters into buckets, last parameter first; returns their indices per bucket.

    ``sizes[i]`` is parameter i's gradient size in bytes, in registration order.
    Walking from the last parameter to the first, each one joins the open
    bucket; the bucket closes as soon as it holds ``cap_bytes`` or more (so a
    bucket can exceed the cap by its last parameter, as in torch's DDP).
    """
    if not cap_bytes > 0:
        raise ValueError(f"the bucket size cap must be positive, got {cap_bytes!r}")
    buckets, current, filled = [], [], 0
    for i in reversed(range(len(sizes))):
        current.append(i)
        filled += sizes[i]
        if filled >= cap_bytes:
            buckets.append(current)
            current, filled = [], 0
    if current:
        buckets.append(current)
    return buckets


@dataclass
class BucketTiming:
    """One bucket in one backward pass; times in seconds since backward started."""

    index: int
    nbytes: int
    params: list  # names
    ready: float = math.nan  # its last gradient was computed
    launched: float = math.nan  # its all-reduce started
    finished: float = math.nan  # its all-reduce completed


@dataclass
class Timeline:
    """What happened during the last backward pass of a :class:`BucketedDDP`."""

    buckets: list = field(default_factory=list)
    grads: list = field(default_factory=list)  # (parameter name, seconds) as each gradient appeared
    backward_done: float = math.nan  # autograd finished computing
    synced: float = math.nan  # every bucket averaged and copied back: backward() returns


class _Bucket:
    def __init__(self, index, params, names):
        self.index, self.params, self.names = index, params, names
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.buffer = torch.zeros(self.offsets[-1], dtype=params[0].dtype, device=params[0].device)
        self.start_pass()

    def start_pass(self):
        self.filled = [False] * len(self.params)
        self.pending, self.work, self.done = len(self.params), None, None
        self.timing = BucketTiming(
            self.index, self.buffer.numel() * self.buffer.element_size(), list(self.names)
        )

    def view(self, i):
        return self.buffer[self.offsets[i] : self.offsets[i + 1]].view_as(self.params[i])


class BucketedDDP(nn.Module):
    """Data parallelism like torch's DistributedDataParallel: buckets all-reduced during backward.

    Called like ``module``. At construction every rank takes rank 0's
    parameters and buffers. During ``loss.backward()`` a hook on each parameter
    copies its gradient into its bucket; a bucket whose gradients are all in
    starts an asynchronous all-reduce (buckets start in order, the same on
    every rank). When autograd is done, the wrapper waits for the buckets and
    writes the averaged gradients back, so ``p.grad`` is final when
    ``backward()`` returns. A parameter that got no gradient in a pass
    contributes zeros. ``timeline`` describes the last backward pass.
    """

    def __init__(self, module: nn.Module, bucket_cap_mb: float = 25.0, group=None):
        super().__init__()
        if (
            isinstance(bucket_cap_mb, bool)
            or not isinstance(bucket_cap_mb, (int, float))
            or not bucket_cap_mb > 0
        ):
            raise ValueError(f"bucket_cap_mb must be a positive number of MiB, got {bucket_cap_mb!r}")
        self.module, self.group = module, group
        self.world_size = dist.get_world_size(group)
        self._broadcast_state()
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.buckets = []
        for run in _same_dtype_runs(named):  # a bucket is one flat buffer: one dtype
            sizes = [p.numel() * p.element_size() for _, p in run]
            for indices in assign_buckets(sizes, bucket_cap_mb * 2**20):
                self.buckets.append(
                    _Bucket(len(self.buckets), [run[i][1] for i in indices], [run[i][0] for i in indices])
                )
        self._slot = {p: (bucket, i) for bucket in self.buckets for i, p in enumerate(bucket.params)}
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self._slot]
        self.timeline = Timeline()
        self._in_backward, self._start = False, None
        self._start_pass()

    @torch.no_grad()
    def _broadcast_state(self):
        src = global_rank(self.group, 0)
        for t in [*self.module.parameters(), *self.module.buffers()]:
            dist.broadcast(t.data, src, group=self.group)

    def _start_pass(self):
        """Forget the last pass (one that raised midway too), after its all-reduces are done."""
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.start_pass()
        self._next_launch, self._grads = 0, []

    def forward(self, *args, **kwargs) -> Any:
        if self._in_backward:  # the last backward pass never finished (it raised)
            self._start_pass()
            self._in_backward = False
        self._start = None
        output = self.module(*args, **kwargs)
        for leaf in tree_leaves(output):  # their gradients are the first thing backward computes
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                leaf.register_hook(self._backward_started)
        return output

    def _backward_started(self, grad=None):
        if self._start is None:
            self._start = time.perf_counter()

    def _now(self) -> float:
        return time.perf_counter() - self._start

    @torch.no_grad()
    def _grad_ready(self, param):
        if not self._in_backward:
            self._start_pass()
            self._in_backward = True
            self._backward_started()
            # Runs when autograd has finished this pass, before backward() returns.
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        bucket, i = self._slot[param]
        bucket.view(i).copy_(param.grad)
        bucket.filled[i] = True
        bucket.pending -= 1
        self._grads.append((bucket.names[i], self._now()))
        if bucket.pending == 0:
            bucket.timing.ready = self._now()
            self._launch_ready()

    def _launch_ready(self, everything: bool = False):
        # In bucket order, so every rank starts the same all-reduces in the same order.
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.pending and not everything:
                return
            bucket.timing.launched = self._now()
            bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
            # Called by the communication thread the moment this all-reduce completes.
            bucket.done = bucket.work.get_future().then(
                lambda _, timing=bucket.timing, start=self._start: setattr(
                    timing, "finished", time.perf_counter() - start
                )
            )
            self._next_launch += 1

    @torch.no_grad()
    def _finish(self):
        backward_done = self._now()
        for bucket in self.buckets:
            if bucket.pending:  # it waited for gradients that never came: they contribute zeros
                bucket.timing.ready = backward_done
                for i, filled in enumerate(bucket.filled):
                    if not filled:
                        bucket.view(i).zero_()
        self._launch_ready(everything=True)
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.done.wait()
            for i, p in enumerate(bucket.params):  # the sum, divided on its way back: one pass
                if p.grad is None:
                    p.grad = bucket.view(i) / self.world_size
                else:
                    torch.div(bucket.view(i), self.world_size, out=p.grad)
        self.timeline = Timeline([b.timing for b in self.buckets], self._grads, backward_done, self._now())
        for bucket in self.buckets:
            bucket.work = None
        self._in_backward, self._start = False, None


def _same_dtype_runs(named):
    """(name, parameter) pairs in runs of one dtype: a bucket's flat buffer has a single dtype."""
    return [list(run) for _, run in itertools.groupby(named, key=lambda item: item[1].dtype)]


# ----------------------------------------------------------------------------
# watching it work (chapter 03): timelines, and torch's own buckets


def _timelines_rank(caps, depth, d_model, d_hidden, steps):
    import torch.nn.functional as F

    from course_lib import models

    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = models.regression_data(64 * n, d_model=d_model)
    x, y = models.shard(x, rank, n), models.shard(y, rank, n)
    result = {}
    for cap in caps:
        model = BucketedDDP(
            models.make_stack(depth=depth, d_model=d_model, d_hidden=d_hidden), bucket_cap_mb=cap
        )
        for _ in range(steps):  # the first passes warm up; keep the last one's timeline
            dist.barrier()
            F.mse_loss(model(x), y).backward()
            model.zero_grad(set_to_none=True)
        result[cap] = model.timeline
    return result


def record_timelines(
    caps: Iterable[float],
    world_size: int = 2,
    depth: int = 8,
    d_model: int = 256,
    d_hidden: int = 1024,
    steps: int = 4,
    **run_kwargs,
) -> list:
    """Per rank, ``{cap: Timeline}``: one backward pass of a :class:`BucketedDDP` MLP stack per cap.

    ``depth`` MLP layers of (d_model → d_hidden → d_model) on ``world_size`` ranks;
    the timeline is the last of ``steps`` passes (the first ones warm up).
    """
    return launch.run(_timelines_rank, world_size, list(caps), depth, d_model, d_hidden, steps, **run_kwargs)


def _torch_buckets_rank(bucket_cap_mb, depth, d_model, d_hidden, steps):
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from course_lib import models

    model = models.make_stack(depth=depth, d_model=d_model, d_hidden=d_hidden)
    names = {id(p): name for name, p in model.named_parameters()}
    seen = []

    def hook(state, bucket):  # called once per bucket, in the order DDP all-reduces them
        seen[-1].append([names[id(p)] for p in bucket.parameters()])
        work = dist.all_reduce(bucket.buffer(), async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0] / dist.get_world_size())

    options = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    wrapped = DistributedDataParallel(model, **options)
    wrapped.register_comm_hook(None, hook)
    x, y = models.regression_data(8, d_model=d_model)
    for _ in range(steps):
        seen.append([])
        F.mse_loss(wrapped(x), y).backward()
    del wrapped  # a live DDP wrapper at process-group teardown can hang
    named = list(model.named_parameters())
    cap = (25.0 if bucket_cap_mb is None else bucket_cap_mb) * 2**20
    ours = [
        [named[i][0] for i in bucket]
        for bucket in assign_buckets([p.numel() * p.element_size() for _, p in named], cap)
    ]
    return seen, ours


def torch_ddp_buckets(
    bucket_cap_mb: float | None = None,
    depth: int = 8,
    d_model: int = 256,
    d_hidden: int = 1024,
    steps: int = 2,
    world_size: int = 2,
    **run_kwargs,
) -> tuple[list[list[list[str]]], list[list[str]]]:
    """The buckets torch's ``DistributedDataParallel`` all-reduces, seen from a communication hook.

    Returns ``(torch_steps, ours)``: ``torch_steps[i]`` lists, for backward pass
    i, each bucket's parameter names in the order DDP reduced them; ``ours`` is
    :func:`assign_buckets` on the same model and cap (25 MiB when
    ``bucket_cap_mb`` is None, DDP's default). Runs an MLP stack like
    :func:`record_timelines`'s on ``world_size`` ranks, over gloo.
    """
    return launch.run(
        _torch_buckets_rank,
        world_size,
        bucket_cap_mb,
        depth,
        d_model,
        d_hidden,
        steps,
        backend="gloo",
        **run_kwargs,
    )[0]
