"""Chapter 09d: predict how long one training step of the capstone takes, before timing it.

    machine = measure_machine()                   # cores, a core's matmul FLOP/s, all cores' peak,
                                                  # element-wise bytes/s, one op's cost, α–β
    runs = measure_configs({"tp2": dict(tp=2)}, steps=4, **MODEL)   # trace one step, time the rest
    p = predict(runs["tp2"], machine)            # p.compute, .memory, .overhead, .comm, .bubble, .total
    runs["tp2"].measured                          # the fastest timed step, seconds
    mfu(model_flops(vocab, **MODEL)["total"], runs["tp2"].measured, machine, runs["tp2"].world)

The model, per rank r, from one traced step (counted, not timed: the FLOPs and shapes of its
matrix products, the bytes its other ops read and write, the ops it dispatches, every collective
and send with its group size and bytes):

    work_r = its products timed alone on one core  +  bytes_r / B  +  ops_r · t_op  +  Σ α–β(call)

B is the rate of an element-wise op, t_op the cost of one nearly empty op (dispatch and autograd
bookkeeping), α and β chapter 01's ping-pong fit — measured with as many ranks exchanging at once
as the layout has, each doing a few small ops between messages, so that with more ranks than
cores the wait for a core is in it. CPU work is slowed by max(1, ranks sharing the cores / cores).
A step takes the larger of two bounds (the usual pair for more workers than processors):

* the path: the pipeline played by :func:`course_lib.pipeline_schedules.simulate`, each stage's
  busiest rank's work cut into m forwards (⅓) and m backwards (⅔); without a pipeline, the
  busiest rank's work;
* the machine: every rank's CPU work over all cores, plus the busiest rank's messages. When it is
  the larger, a stage waiting in the pipeline's bubble lends its core to the other stage, and the
  bubble costs nothing.

The whole model's FLOPs are 6·Ψ·T + 12·L·s·d·T (T tokens, Ψ the weights of the matrix products,
L layers, s the sequence, d the width; Kaplan et al. 2020, and the PaLM paper's appendix B,
Chowdhery et al. 2022): :func:`model_flops`. For GPUs, :func:`cluster_step` prices a plan of
chapter 09's cost model (:mod:`course_lib.cost`) with datasheet peaks and link bandwidths
(:data:`GPUS`, :data:`LINKS`, each with its source).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from course_lib import alpha_beta, cost, dist_calls, launch, train
from course_lib import pipeline_schedules as schedules
from course_lib.alpha_beta import AlphaBeta

if TYPE_CHECKING:
    from collections.abc import Sequence

# ----------------------------------------------------------------------------
# FLOPs of one step


def model_flops(
    vocab_size: int,
    seq_len: int,
    d_model: int,
    n_layers: int,
    batch_size: int = 8,
    d_hidden: int | None = None,
    moe: bool = False,
    num_experts: int = 4,
    k: int = 2,
    recompute: bool = False,
    **_ignored,
) -> dict:
    """FLOPs of one training step (forward and backward) of :func:`course_lib.gpt.make_gpt`'s
    dense model on ``batch_size`` sequences: {"psi", "tokens", "matmul", "attention", "total"}.

    Ψ counts the weights of the matrix products: per block qkv (3d²), proj (d²), fc1 and fc2
    (2·d·h), and the head (d·V). Each weight does 2 FLOPs per token forward and 4 backward:
    6·Ψ·T. Attention's two batched products (q·kᵀ, scores·v) do 2·s·d each per token forward,
    ×3 with the backward: 12·L·s·d·T (the whole s × s square: this model materialises it).
    With ``moe=True`` each block's MLP is ``num_experts`` expert MLPs and a gate (d·E) of which a
    token visits ``k``: Ψ counts the gate and k experts' weights (the FLOPs a token costs).
    ``recompute=True`` adds a second forward (2Ψ·T + 4·L·s·d·T): hardware FLOPs, not model FLOPs.
    Embedding look-ups, biases, LayerNorms and softmax do no matrix products and are not counted.
    """
    for name, value in (("seq_len", seq_len), ("d_model", d_model), ("n_layers", n_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    h = d_hidden or 4 * d_model
    mlp = (k * 2 * d_model * h + d_model * num_experts) if moe else 2 * d_model * h
    psi = n_layers * (4 * d_model * d_model + mlp) + d_model * vocab_size
    tokens = batch_size * seq_len
    matmul = 6 * psi * tokens
    attention = 12 * n_layers * seq_len * d_model * tokens
    total = matmul + attention
    if recompute:
        total += (matmul + attention) / 3
    return {"psi": psi, "tokens": tokens, "matmul": matmul, "attention": attention, "total": total}


# ----------------------------------------------------------------------------
# the machine: cores, a core's matmul rate, all cores' peak, one op's cost, α–β


@dataclass(frozen=True)
class Machine:
    """What the time model knows about this computer, every figure measured on it."""

    cores: int  # CPU cores this process may run on
    core_flops: float  # matmul FLOP/s of one core (one thread, the others idle)
    peak_flops: float  # matmul FLOP/s of all cores at once (one rank per core): MFU's peak
    op_seconds: float  # one nearly empty op, forward and backward: dispatch and autograd
    memory_bandwidth: float  # bytes/s an element-wise op reads and writes on one core
    links: dict  # {N: AlphaBeta}: chapter 01's ping-pong fit with N ranks exchanging at once

    def link(self, ranks: int) -> AlphaBeta:
        """The α–β fit measured with the most ranks at once not above ``ranks``."""
        fits = [n for n in self.links if n <= max(ranks, min(self.links))]
        return self.links[max(fits)]

    def describe(self) -> str:
        lines = [
            f"{self.cores} cores; one core {self.core_flops / 1e9:.1f} GFLOP/s (fp32 matmul), "
            f"all {self.cores} at once {self.peak_flops / 1e9:.1f} GFLOP/s; one op {self.op_seconds * 1e6:.1f} µs; "
            f"element-wise {self.memory_bandwidth / 1e9:.1f} GB/s"
        ]
        lines += [f"{n} ranks exchanging at once: {ab.describe()}" for n, ab in sorted(self.links.items())]
        return "\n".join(lines)


def available_cores() -> int:
    """The cores this process may use (its CPU affinity; all of them where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _best_seconds(fn, batches: int) -> float:
    """The fastest of ``batches`` calls of ``fn``: a busy moment of a shared machine only ever
    makes a call slower, so the fastest is the least disturbed."""
    best = math.inf
    for _ in range(batches):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


#: The chapter's model: 09b's GPT, four times wider, its sequence four times longer, so that
#: arithmetic shows up beside everything else (the lesson and benchmarks/bench_step_time.py).
CAPSTONE_MODEL = dict(n_layers=2, d_model=128, n_heads=4, seq_len=64)
#: 09b's layouts in fp32, each axis (dp, tp, pp, cp, ep) and sharding (ZeRO-1/2/3, FSDP) at least once.
CAPSTONE_LAYOUTS = {
    "1 rank": {},
    "dp2·tp2·pp2 zero1": dict(dp=2, tp=2, pp=2, sharding="zero1"),
    "fsdp2·tp2": dict(dp=2, tp=2, sharding="fsdp"),
    "dp2·pp2 zero3": dict(dp=2, pp=2, sharding="zero3"),
    "fsdp2·cp2": dict(dp=2, cp=2, sharding="fsdp"),
    "1 rank (moe)": dict(moe=True),
    "dp2·ep2 (moe) zero2": dict(dp=2, ep=2, sharding="zero2"),
}


def matmul_flops(n: int = 256, batches: int = 20, repeats: int = 4) -> float:
    """FLOP/s of n × n fp32 matmuls on this process's threads: the fastest of ``batches``
    batches of ``repeats`` products, each into a new output as in training."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # the first call allocates and chooses a kernel
    return 2 * n**3 * repeats / _best_seconds(lambda: [a @ b for _ in range(repeats)], batches)


#: The ops whose time is their FLOPs (counted by FlopCounterMode), not the bytes they touch.
MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm")


def _nbytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(t) for t in tree)
    return 0


def _matmul_shape(name: str, args) -> tuple:
    """(batch, m, k, n) of a matrix product's operands: (m × k)·(k × n), ``batch`` of them."""
    a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
    if a.dim() == 3:
        return (a.shape[0], a.shape[1], a.shape[2], b.shape[2])
    return (1, a.shape[0], a.shape[1], b.shape[1])


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched inside it (forward and backward alike), the bytes the ops
    other than matrix products read and write (their tensors in and out; a view moves no data
    and counts none), and the shapes of the matrix products: {(batch, m, k, n): count}."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.bytes = 0
        self.matmuls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in MATMUL_OPS:
            shape = _matmul_shape(name, args)
            self.matmuls[shape] = self.matmuls.get(shape, 0) + 1
        elif not getattr(func, "is_view", False):
            self.bytes += _nbytes(args) + _nbytes(list((kwargs or {}).values())) + _nbytes(out)
        return out


def matmul_seconds(shapes: dict, batches: int = 5, _cache: dict = {}) -> float:  # noqa: B006
    """Seconds of the matrix products ``shapes`` ({(batch, m, k, n): count}) on one core: each
    shape timed alone, fp32, one thread, the fastest of ``batches`` (remembered per shape)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        total = 0.0
        for shape, count in shapes.items():
            if shape not in _cache:
                batch, m, k, n = shape
                a, b = torch.randn(batch, m, k), torch.randn(batch, k, n)
                torch.bmm(a, b)
                _cache[shape] = _best_seconds(lambda a=a, b=b: torch.bmm(a, b), batches)
            total += count * _cache[shape]
        return total
    finally:
        torch.set_num_threads(threads)


def op_seconds(chain: int = 64, batches: int = 30) -> float:
    """Seconds per op of a chain of ``chain`` multiplications of a 4-element tensor, forward and
    backward: what an op costs when it does (almost) no arithmetic. The fastest of ``batches``."""
    x = torch.ones(4, requires_grad=True)

    def run():
        y = x
        for _ in range(chain):
            y = y * 1.0001
        y.sum().backward()

    run()
    with OpCounter() as counter:
        run()
    return _best_seconds(run, batches) / counter.ops


def memory_bandwidth(numel: int = 1 << 20, batches: int = 20) -> float:
    """Bytes per second of an element-wise multiplication of ``numel`` fp32 values (read once,
    written once): the rate at which ops without matrix products move data. The fastest batch."""
    x, out = torch.ones(numel), torch.empty(numel)
    torch.mul(x, 1.0001, out=out)
    return 2 * 4 * numel / _best_seconds(lambda: torch.mul(x, 1.0001, out=out), batches)


def _burst(ops: int) -> None:
    """``ops`` multiplications of a small tensor: a rank's work between two messages."""
    y = torch.ones(64)
    for _ in range(ops):
        y = y * 1.0001


def _pairs_ping_pong(sizes, batches: int, active: int, burst_ops: int, burst_s: float) -> list:
    """Ranks 0 … active−1 bounce messages in pairs (0↔1, 2↔3, …) all at once, each doing
    ``burst_ops`` small ops before every message (as ranks of a training step compute between
    their calls); the rest wait. Returns rank 0's one-way seconds per size: the fastest batch,
    less the burst at this many ranks' share of the cores."""
    rank = dist.get_rank()
    peer = rank ^ 1
    share = max(1.0, active / available_cores())
    best = []
    for nbytes in sizes:
        buf = torch.zeros(max(1, nbytes // 4))
        iters = max(2, min(8, (4 << 20) // max(nbytes, 1)))
        fastest = math.inf
        for _ in range(batches):
            dist.barrier()
            if rank < active:
                start = time.perf_counter()
                for _ in range(iters):
                    _burst(burst_ops)
                    if rank % 2 == 0:
                        dist.send(buf, peer)
                        dist.recv(buf, peer)
                    else:
                        dist.recv(buf, peer)
                        dist.send(buf, peer)
                    _burst(burst_ops)
                fastest = min(fastest, (time.perf_counter() - start) / iters)
        best.append(max((fastest - 2 * share * burst_s) / 2, 1e-7))
    return best


def _measure_in_rank(sizes, worlds, matmul_n, batches, burst_ops):
    torch.set_num_threads(1)
    rank, cores = dist.get_rank(), available_cores()
    alone = op_time = bandwidth = None
    if rank == 0:  # one core, the other ranks waiting in the barrier below
        alone, op_time, bandwidth = matmul_flops(matmul_n), op_seconds(), memory_bandwidth()
    burst_s = torch.tensor(_best_seconds(lambda: _burst(burst_ops), 20) if rank == 0 else 0.0)
    dist.broadcast(burst_s, 0)
    together = matmul_flops(matmul_n) if rank < cores else 0.0  # one rank per core, all at once
    dist.barrier()
    seconds = {n: _pairs_ping_pong(sizes, batches, n, burst_ops, float(burst_s)) for n in worlds}
    return alone, op_time, bandwidth, together, seconds


def _fit(sizes: list, seconds: list) -> AlphaBeta:
    """:func:`course_lib.alpha_beta.fit`; where waiting for a core drowned the bandwidth (the
    largest message was no slower than the smallest), α alone: the median time, β infinite."""
    try:
        return alpha_beta.fit(sizes, seconds)
    except ValueError:
        return AlphaBeta(statistics.median(seconds), math.inf)


def measure_machine(
    worlds: Sequence[int] = (2, 4, 8),
    sizes: Sequence[int] = (4, 4096, 1 << 18, 1 << 22),
    matmul_n: int = 256,
    batches: int = 3,
    burst_ops: int = 32,
) -> Machine:
    """Measure this machine in one launch of max(``worlds``) ranks: one core's matmul rate (the
    others idle), every core's at once, one op's cost, and for each N in ``worlds`` chapter
    01's ping-pong with N ranks bouncing messages in pairs at once, each doing ``burst_ops``
    small ops between messages, fitted by :func:`course_lib.alpha_beta.fit` on the fastest
    batches (with N ≤ cores that is chapter 01's α and β; with more ranks than cores a message
    also waits until its receiver gets a core back from the others' work)."""
    worlds = sorted({int(n) for n in worlds})
    if not worlds or worlds[0] < 2 or any(n % 2 for n in worlds):
        raise ValueError(f"worlds must be even numbers of ranks >= 2 (pairs exchange), got {worlds!r}")
    cores = available_cores()
    out = launch.run(
        _measure_in_rank,
        max(worlds[-1], cores),
        list(sizes),
        worlds,
        matmul_n,
        batches,
        burst_ops,
        backend="gloo",
    )
    alone, op_time, bandwidth, _, seconds = out[0]
    together = sum(r[3] for r in out)
    links = {n: _fit(list(sizes), seconds[n]) for n in worlds}
    return Machine(cores, alone, together, op_time, bandwidth, links)


# ----------------------------------------------------------------------------
# one step traced: the rank's FLOPs, ops and messages


@dataclass(frozen=True)
class Call:
    op: str
    group: int  # ranks in the call's group (2 for a send or receive)
    nbytes: int  # the largest tensor the call passed: the whole array of a collective


POINT_TO_POINT = ("send", "recv", "isend", "irecv")


@dataclass
class StepTrace:
    """What one rank did in one training step: counted, not timed."""

    flops: int = 0
    ops: int = 0
    bytes: int = 0  # read and written by the ops other than matrix products
    matmuls: dict = field(default_factory=dict)  # {(batch, m, k, n): count} of the matrix products
    matmul_seconds: float | None = None  # those products timed alone on one core (matmul_seconds)
    calls: list = field(default_factory=list)


def _group_size(name: str, kwargs: dict) -> int:
    if name in POINT_TO_POINT:
        return 2
    return dist.get_world_size(kwargs.get("group"))


@functools.lru_cache(maxsize=1)
def _traced_names() -> tuple:
    return tuple(n for n in (*POINT_TO_POINT, *dist_calls.COLLECTIVE_CALLS, "barrier") if hasattr(dist, n))


class _Trace:
    def __init__(self):
        self.trace = StepTrace()
        self._flops = FlopCounterMode(display=False)
        self._ops = OpCounter()
        self._undo = None

    def _wrap(self, name, original):
        depth = self._depth

        @functools.wraps(original)
        def traced(*args, **kwargs):
            if depth[0]:  # recv calls irecv: one message
                return original(*args, **kwargs)
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            nbytes = max((t.numel() * t.element_size() for t in tensors), default=0)
            self.trace.calls.append(Call(name, _group_size(name, kwargs), nbytes))
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        return traced

    def __enter__(self) -> StepTrace:
        self._depth = [0]
        self._undo = dist_calls.replace_dist_functions(
            {n: self._wrap(n, getattr(dist, n)) for n in _traced_names()}
        )
        self._flops.__enter__()
        self._ops.__enter__()
        return self.trace

    def __exit__(self, *exc):
        self._ops.__exit__(*exc)
        self._flops.__exit__(*exc)
        self._undo()
        self.trace.flops = self._flops.get_total_flops()
        self.trace.ops = self._ops.ops
        self.trace.bytes = self._ops.bytes
        self.trace.matmuls = dict(self._ops.matmuls)
        return False


def trace_step() -> _Trace:
    """``with trace_step() as t:`` inside a rank: ``t.flops`` (matrix products, forward and
    backward), ``t.ops`` (every op dispatched), ``t.calls`` (each collective and send)."""
    return _Trace()


# ----------------------------------------------------------------------------
# the capstone's configurations: trace one step, time a few


@dataclass
class ConfigRun:
    """One configuration of :func:`course_lib.train.train_gpt`: every rank's traced step and
    step times."""

    config: dict
    world: int
    traces: list  # StepTrace per rank
    step_s: list  # per rank: the wall seconds of every timed step
    model_kw: dict

    @property
    def pp(self) -> int:
        return self.config.get("pp", 1)

    @property
    def microbatches(self) -> int:
        return self.config.get("microbatches") or self.pp

    @property
    def measured(self) -> float:
        """The fastest timed step after the first (a warm-up): a step ends for all ranks
        together (their loss all-reduce), so each step's time is the slowest rank's."""
        per_step = [max(s[i] for s in self.step_s) for i in range(len(self.step_s[0]))]
        return min(per_step[1:]) if len(per_step) > 1 else per_step[0]

    @property
    def spread(self) -> float:
        """Median over fastest timed step: how much a loaded machine stretched the steps."""
        per_step = [max(s[i] for s in self.step_s) for i in range(len(self.step_s[0]))][1:]
        return statistics.median(per_step) / min(per_step) if per_step else 1.0


def _trace_and_time(kwargs: dict, steps: int):
    torch.set_num_threads(1)
    with trace_step() as trace:
        train.train_gpt(**{**kwargs, "steps": 1, "progress": False})
    result = train.train_gpt(**{**kwargs, "steps": steps, "progress": False})
    return trace, result["step_s"]


def measure_configs(configs: dict, steps: int = 4, timeout: float = 300.0, **model_kw) -> dict:
    """{name: :class:`ConfigRun`}: each configuration on its own launch of dp·tp·pp·cp·ep ranks,
    every rank tracing one step of :func:`course_lib.train.train_gpt` and then timing ``steps``
    steps (the first of them a warm-up). Then, here on one core, each rank's matrix products are
    timed alone, shape by shape (:func:`matmul_seconds`): the rank's measured matmul rate."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2 (the first is a warm-up), got {steps!r}")
    runs = {}
    for name, config in configs.items():
        world = math.prod(config.get(a, 1) for a in ("dp", "tp", "pp", "cp", "ep"))
        kwargs = {**model_kw, **config}
        out = launch.run(_trace_and_time, world, kwargs, steps, backend="gloo", timeout=timeout)
        traces = [t for t, _ in out]
        for t in traces:
            t.matmul_seconds = matmul_seconds(t.matmuls)
        runs[name] = ConfigRun(config, world, traces, [s for _, s in out], dict(model_kw))
    return runs


# ----------------------------------------------------------------------------
# the prediction


def call_seconds(call: Call, link: AlphaBeta) -> float:
    """α–β time of one traced call: a message α + S/β; an all-reduce over n ranks a ring's
    2(n−1)(α + S/(nβ)); all-gather, reduce-scatter and all-to-all (n−1)(α + S/(nβ)) with S
    the whole array; broadcast and barrier a tree's ⌈log₂n⌉ messages."""
    n, s = call.group, call.nbytes
    if call.op in POINT_TO_POINT:
        return link.message(s)
    if n <= 1:
        return 0.0
    if call.op in ("all_reduce", "all_reduce_coalesced"):
        return link.ring_all_reduce(n, s)
    if call.op in ("broadcast", "reduce", "barrier"):
        return link.tree(n, s)
    return link.ring_all_gather(n, s)  # gathers, scatters, all-to-all: (n−1) rounds of S/n


@dataclass(frozen=True)
class Prediction:
    """Seconds of one step, split the way the lesson's table shows them."""

    compute: float  # FLOPs / a core's matmul rate, at the rank's share of a core
    memory: float  # bytes of the other ops / a core's element-wise rate, at the same share
    overhead: float  # ops × one op's time, at the same share
    comm: float  # every call's α–β time (measured with as many ranks exchanging)
    bubble: float  # the pipeline's idle time on the path (0 when the machine bound wins)
    bound: str  # "path" or "machine": which bound set the total

    @property
    def total(self) -> float:
        return self.compute + self.memory + self.overhead + self.comm + self.bubble


def rank_work(trace: StepTrace, machine: Machine, ranks: int) -> tuple[float, float, float, float]:
    """(compute, memory, overhead, comm) seconds of one rank's traced step: the first three at a
    whole core's speed (compute: its matrix products timed alone where the trace has that,
    else its FLOPs at the machine's rate R), the messages at the α–β measured with ``ranks``
    ranks exchanging."""
    link = machine.link(ranks)
    return (
        trace.matmul_seconds if trace.matmul_seconds is not None else trace.flops / machine.core_flops,
        trace.bytes / machine.memory_bandwidth,
        trace.ops * machine.op_seconds,
        sum(call_seconds(c, link) for c in trace.calls),
    )


def stage_of(rank: int, config: dict) -> int:
    """The pipeline stage of ``rank``: pp is the slowest axis of the course's rank grid."""
    per_stage = math.prod(config.get(a, 1) for a in ("dp", "tp", "cp", "ep"))
    return rank // per_stage


def predict(run: ConfigRun, machine: Machine, schedule: str = "1f1b") -> Prediction:
    """The step time the model predicts for ``run``'s traced step on ``machine``.

    A rank's compute and overhead are CPU work, slowed by max(1, ranks sharing the cores /
    cores); its messages are priced with the α–β fitted with as many ranks exchanging at once
    (their wait for a core is in that fit already). Two bounds, the larger wins: the path (each
    stage's busiest rank, played through the pipeline schedule) and the machine (every rank's
    CPU work over all the cores, plus the busiest rank's messages)."""
    works = [rank_work(t, machine, run.world) for t in run.traces]
    n, c, p, m = run.world, machine.cores, run.pp, run.microbatches
    slow = max(1.0, (n // p) / c)  # the ranks of one stage share the cores

    def on_path(r):
        *cpu, comm = works[r]
        return (*(x * slow for x in cpu), comm)

    stages = [
        max((r for r in range(n) if stage_of(r, run.config) == s), key=lambda r: sum(on_path(r)))
        for s in range(p)
    ]
    stage_work = [sum(on_path(r)) for r in stages]
    if p > 1:
        third = [w / (3 * m) for w in stage_work]
        path = schedules.simulate(
            schedules.schedule(schedule, p, m), third, [2 * t for t in third]
        ).total_time
    else:
        path = stage_work[0]
    busiest = on_path(max(stages, key=lambda r: sum(on_path(r))))
    machine_parts = (*(sum(w[i] for w in works) / c for i in range(3)), max(w[3] for w in works))
    if path >= sum(machine_parts):
        return Prediction(*busiest, bubble=max(0.0, path - sum(busiest)), bound="path")
    return Prediction(*machine_parts, bubble=0.0, bound="machine")


def mfu(flops_per_step: float, step_seconds: float, machine: Machine, ranks: int) -> float:
    """Model FLOPs utilisation: the model's FLOPs per second over the peak of the cores the run
    could use (min(ranks, cores) of them, at the measured all-cores peak per core)."""
    if step_seconds <= 0:
        raise ValueError(f"step_seconds must be > 0, got {step_seconds!r}")
    used = min(ranks, machine.cores)
    return flops_per_step / step_seconds / (machine.peak_flops * used / machine.cores)


# ----------------------------------------------------------------------------
# GPUs: datasheet peaks, link bandwidths, and chapter 09's cost model priced in seconds


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense (no 2:4 sparsity) bf16 tensor-core peak, FP32 accumulate
    memory: float  # bytes
    source: str


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes per second, one direction
    source: str


GPUS = {
    "H100 SXM": GPU(
        "H100 SXM",
        989e12,
        80e9,
        "NVIDIA H100 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity, "
        "half of it dense; 80 GB",
    ),
    "A100 SXM 80GB": GPU(
        "A100 SXM 80GB",
        312e12,
        80e9,
        "NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS; 80 GB",
    ),
    "RTX 4090": GPU(
        "RTX 4090",
        165.2e12,
        24e9,
        "NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090: peak BF16 Tensor TFLOPS with "
        "FP32 accumulate 165.2 (330.4 with sparsity); 24 GB GDDR6X",
    ),
}

LINKS = {
    "NVLink 4": Link("NVLink 4", 450e9, "H100 datasheet: NVLink 900 GB/s, both directions together"),
    "PCIe 4.0 x16": Link("PCIe 4.0 x16", 32e9, "A100 datasheet: PCIe Gen4 64 GB/s, both directions together"),
    "10 GbE": Link(
        "10 GbE", 1.25e9, "IEEE 802.3ae: 10 Gbit/s = 1.25 GB/s per direction, before TCP/IP headers"
    ),
}


def cluster_step(
    model: cost.Model,
    plan: cost.Strategy,
    gpu: GPU,
    links: dict,
    efficiency: float = 0.5,
) -> dict:
    """Seconds and bytes per GPU of one step of ``plan`` on ``model``: chapter 09's traffic
    per axis (:func:`course_lib.cost.estimate`) over the bandwidth of the link that axis
    crosses (``links``: {"dp": Link, "tp": Link, "pp": Link}), compute at ``efficiency`` of
    the GPU's bf16 peak, and the 1F1B bubble (p−1)/m of the compute.

    Returns {"compute", "bubble", "dp", "tp", "pp" (seconds), "serial" (all added: no
    overlap), "overlapped" (communication hidden under compute wherever it can be: the larger
    of compute + bubble and the slowest axis), "memory" (bytes per GPU), "fits"}.
    Bandwidth terms only: at these message sizes (tens of MB) α's microseconds are negligible.
    """
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency!r}")
    est = cost.estimate(model, plan)
    if est.problems:
        raise ValueError(f"the plan cannot run this model: {'; '.join(est.problems)}")
    tokens = plan.dp * plan.microbatches * plan.micro_batch_size * model.seq_len
    h = model.hidden
    psi = model.params
    flops = 6 * psi * tokens + 12 * model.layers * model.seq_len * h * tokens
    if plan.recompute:
        flops *= 4 / 3
    compute = flops / (plan.gpus * gpu.bf16_flops * efficiency)
    bubble = compute * (plan.pp - 1) / plan.microbatches
    seconds = {
        axis: est.traffic[axis] / links[axis].bandwidth if est.traffic[axis] else 0.0
        for axis in ("dp", "tp", "pp")
    }
    serial = compute + bubble + sum(seconds.values())
    overlapped = max(compute + bubble, *seconds.values())
    return {
        "compute": compute,
        "bubble": bubble,
        **seconds,
        "serial": serial,
        "overlapped": overlapped,
        "tokens": tokens,
        "memory": est.memory_total,
        "fits": est.memory_total <= gpu.memory,
    }
