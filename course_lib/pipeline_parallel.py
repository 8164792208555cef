"""Chapter 06: pipeline parallelism. Each of p ranks holds a contiguous slice of the layers.

    schedule = pp.gpipe_schedule(p, m)          # per stage: [("F", 0), ..., ("B", m - 1)]
    sim = pp.simulate(schedule, t_f=1, t_b=2)   # .timeline, .total_time, .bubble_fraction, ...
    stage = pp.partition(model, rank, p)        # inside each rank: its slice of an nn.Sequential
    loss = pp.train_step(stage, x, y, F.mse_loss, m, schedule="1f1b")
    t_f, t_b = pp.time_forward_backward(stage, x)             # one micro-batch, one thread
    per_rank = launch.run(pp.timed_steps, p, configs, t_f, t_b)   # sleeping stages, timelines

Notation: p stages (one per rank), m micro-batches per step, t_f and t_b the
time of one micro-batch's forward and backward on one stage. The batch is cut
into m equal micro-batches; each micro-batch's loss is divided by m, so the
gradients equal one process training on the whole batch with a mean loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode  # what torch's FlopCounterMode builds on
from torch.utils.flop_counter import flop_registry

from course_lib import launch
from course_lib.p2p import global_rank, recv_header, send_header

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

# ----------------------------------------------------------------------------
# schedules: the order in which each stage runs its forwards (F) and backwards (B)


def _check_sizes(num_stages, num_microbatches) -> tuple[int, int]:
    for name, value in (("num_stages", num_stages), ("num_microbatches", num_microbatches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return num_stages, num_microbatches


def gpipe_schedule(num_stages: int, num_microbatches: int) -> list[list[tuple[str, int]]]:
    """GPipe: every stage runs all m forwards, then all m backwards (micro-batch 0 first)."""
    p, m = _check_sizes(num_stages, num_microbatches)
    return [[("F", i) for i in range(m)] + [("B", i) for i in range(m)] for _ in range(p)]


def one_f_one_b_schedule(num_stages: int, num_microbatches: int) -> list[list[tuple[str, int]]]:
    """1F1B: stage s runs min(p-s-1, m) forwards to fill the pipe, then alternates one
    forward and one backward, then drains the remaining backwards.

    A backward frees its micro-batch's activations, so stage s never holds more
    than min(p - s, m) micro-batches at once (GPipe holds all m).
    """
    p, m = _check_sizes(num_stages, num_microbatches)
    schedule = []
    for s in range(p):
        warmup = min(p - s - 1, m)
        actions = [("F", i) for i in range(warmup)]
        for i in range(m - warmup):
            actions += [("F", warmup + i), ("B", i)]
        actions += [("B", i) for i in range(m - warmup, m)]
        schedule.append(actions)
    return schedule


SCHEDULES = {"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule}


def bubble_formula(num_stages: int, num_microbatches: int) -> float:
    """GPipe's idle share of all stage-time: (p - 1) / (m + p - 1)."""
    p, m = _check_sizes(num_stages, num_microbatches)
    return (p - 1) / (m + p - 1)


def validate_schedule(schedule: Sequence[Sequence[tuple[str, int]]]) -> int:
    """Return m, or raise ValueError unless every stage runs F 0..m-1 and B 0..m-1 once each."""
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ValueError("a schedule is a non-empty list with one list of actions per stage")
    m = None
    for s, actions in enumerate(schedule):
        for a in actions if isinstance(actions, (list, tuple)) else [actions]:
            if not (
                isinstance(a, (list, tuple)) and len(a) == 2 and a[0] in ("F", "B") and type(a[1]) is int
            ):
                raise ValueError(f"stage {s}: {a!r} is not an action like ('F', 0) or ('B', 0)")
        seen = [tuple(a) for a in actions]
        m = sum(kind == "F" for kind, _ in seen) if m is None else m  # stage 0 sets m
        expected = sorted((kind, i) for kind in "FB" for i in range(m))
        if sorted(seen) != expected:
            wrong = sorted(set(expected) - set(seen)) or [
                a for a in seen if seen.count(a) > 1 or a not in expected
            ]
            what = "misses" if set(expected) - set(seen) else "has an extra"
            raise ValueError(
                f"stage {s} {what} {wrong[0]}: every stage must run F 0..{m - 1} and "
                f"B 0..{m - 1} exactly once each (m = {m}, from stage 0)"
            )
    if m == 0:
        raise ValueError("a schedule needs at least one micro-batch")
    return m


# ----------------------------------------------------------------------------
# the simulator: when would each action run, with every stage as early as its inputs allow?


@dataclass
class Simulation:
    #: Per stage: ((kind, micro-batch), start, end) in the order the stage ran them.
    timeline: list
    total_time: float
    #: Idle share of all stage-time: 1 - busy / (p * total_time).
    bubble_fraction: float
    #: Per stage: most micro-batches whose activations are alive at once (forward done, backward not).
    peak_activations: list


def _dependencies(kind: str, i: int, s: int, p: int) -> list:
    """(kind, micro-batch, stage) that must finish before ``kind`` i can start on stage s."""
    if kind == "F":
        return [("F", i, s - 1)] if s > 0 else []
    return [("F", i, s)] + ([("B", i, s + 1)] if s < p - 1 else [])


def _per_stage(value, p: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * p
    if len(values) != p or any(v < 0 for v in values):
        raise ValueError(f"{name} must be a time >= 0 or a list of {p} of them, got {value!r}")
    return [float(v) for v in values]


def simulate(
    schedule: Sequence[Sequence[tuple]],
    t_f: float | Sequence[float] = 1.0,
    t_b: float | Sequence[float] = 2.0,
    t_w: float | Sequence[float] | None = None,
    *,
    fb_pairs_together: bool = False,
    latency: float = 0.0,
    durations: Mapping[tuple, float] | None = None,
) -> Simulation:
    """Run ``schedule`` on an idealised machine: no communication cost, each stage does one
    action at a time, in its order, as soon as the action's inputs exist.

    ``t_f``/``t_b`` are one micro-batch's forward/backward time on a stage: a number, or one
    per stage (an unbalanced partition). Raises ValueError when the schedule deadlocks.
    Actions with a stage, ``(kind, i, stage)`` (chapter 06b: virtual stages, split backward
    with ``t_w``, a message ``latency``, measured ``durations``), go to
    :func:`course_lib.pipeline_schedules.simulate`.
    """
    from course_lib import pipeline_schedules

    if any(isinstance(a, (list, tuple)) and len(a) == 3 for row in schedule or [] for a in row):
        return pipeline_schedules.simulate(
            schedule, t_f, t_b, t_w, fb_pairs_together=fb_pairs_together, latency=latency, durations=durations
        )
    if latency or durations:
        raise ValueError("latency and durations need actions with a stage, (kind, i, stage): see chapter 06b")
    m, p = validate_schedule(schedule), len(schedule)
    t_f, t_b = _per_stage(t_f, p, "t_f"), _per_stage(t_b, p, "t_b")
    with_stage = [[(kind, i, s) for kind, i in actions] for s, actions in enumerate(schedule)]
    timeline, total = pipeline_schedules._play(
        with_stage, list(range(p)), lambda a: (t_f if a[0] == "F" else t_b)[a[2]], _describe_wait
    )
    timeline = [[((kind, i), start, end) for (kind, i, _), start, end in row] for row in timeline]
    busy = sum(m * (t_f[s] + t_b[s]) for s in range(p))
    bubble = 1 - busy / (p * total) if total > 0 else 0.0
    return Simulation(timeline, total, bubble, [_peak_alive(actions) for actions in schedule])


def _describe_wait(stage, action, missing) -> str:
    needs = " and ".join(f"{'F' if kind == 'F' else 'B'} {i} on stage {s}" for kind, i, s in missing)
    return f"stage {stage} waits at {action[:2]} for {needs}"


def _peak_alive(actions) -> int:
    alive = peak = 0
    for kind, _ in actions:
        alive += 1 if kind == "F" else -1
        peak = max(peak, alive)
    return peak


# ----------------------------------------------------------------------------
# splitting a model into stages


def partition_bounds(costs: Sequence[float], world_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges, one per rank, with nearly equal total cost.

    Cut k goes where the running cost is closest to k/world_size of the total, keeping
    at least one layer per rank.
    """
    n = len(costs)
    if world_size < 1 or n < world_size:
        raise ValueError(
            f"cannot split {n} layer(s) over {world_size} ranks: every rank needs "
            f"at least one layer (use fewer ranks or a deeper model)"
        )
    costs = list(costs) if sum(costs) > 0 else [1] * n
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    cuts = [0]
    for k in range(1, world_size):
        lowest, highest = cuts[-1] + 1, n - (world_size - k)
        target = k * prefix[-1] / world_size
        cuts.append(min(range(lowest, highest + 1), key=lambda c: abs(prefix[c] - target)))
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:]))


def partition(
    model: nn.Sequential, rank: int, world_size: int, num_virtual: int = 1, schedule: str = "1f1b"
) -> nn.Sequential | list[nn.Sequential]:
    """Rank ``rank``'s contiguous slice of ``model``, balanced by **parameter count**.

    For stacks of linear layers a layer's compute is proportional to its
    parameters, so equal parameters mean equal stage times. The slice shares
    the model's modules (no copy); parameter names keep their global indices.
    With ``num_virtual`` > 1 or ``schedule="dualpipe-v"`` a rank holds several stages:
    see :func:`course_lib.pipeline_schedules.partition` (chapter 06b).
    """
    if num_virtual != 1 or schedule not in SCHEDULES:
        from course_lib import pipeline_schedules

        return pipeline_schedules.partition(model, rank, world_size, num_virtual, schedule)
    return _partition_one(model, rank, world_size)


def _partition_one(model: nn.Sequential, rank: int, world_size: int) -> nn.Sequential:
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"partition() splits an nn.Sequential, got {type(model).__name__}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    costs = [sum(p.numel() for p in layer.parameters()) for layer in model]
    start, end = partition_bounds(costs, world_size)[rank]
    return model[start:end]


# ----------------------------------------------------------------------------
# activation memory: measure it, and trade it for a second forward


class ActivationMeter(torch.autograd.graph.saved_tensors_hooks):
    """Bytes that autograd keeps for backward while the block runs: now and at the peak.

        with ActivationMeter(stage) as meter:
            loss = stage(x).sum()      # meter.live_bytes grows
            loss.backward()            # ... and falls back to 0
        meter.peak_bytes

    Parameters (which backward also keeps) are left out: they are not activations.
    """

    def __init__(self, module: nn.Module):
        super().__init__(self._pack, _unpack)
        self._param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._counts = {}  # (data pointer, bytes) -> how many saved references
        self.live_bytes = self.peak_bytes = 0

    def __enter__(self):
        super().__enter__()
        return self

    def _pack(self, tensor):
        if tensor.untyped_storage().data_ptr() in self._param_storages:
            return tensor
        key = (tensor.data_ptr(), tensor.numel() * tensor.element_size())
        if key not in self._counts:  # the same tensor saved by two ops costs memory once
            self.live_bytes += key[1]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._counts[key] = self._counts.get(key, 0) + 1
        return _Saved(tensor, self, key)

    def _release(self, key):
        self._counts[key] -= 1
        if not self._counts[key]:
            del self._counts[key]
            self.live_bytes -= key[1]


class _Saved:
    """A saved tensor; autograd drops it when the graph is freed, and the memory returns."""

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter._release(self.key)


def _unpack(packed):
    return packed.tensor if isinstance(packed, _Saved) else packed


class _Rematerialize(torch.autograd.Function):
    """Forward without a graph, keeping only the input; backward re-runs the forward first."""

    @staticmethod
    def forward(ctx, module, x, *params):
        ctx.module = module
        ctx.save_for_backward(x)
        with torch.no_grad():
            return module(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[1])
        params = [p for p in ctx.module.parameters() if p.requires_grad]
        with torch.enable_grad():
            output = ctx.module(x)  # the second forward: the price of the memory saved
        wanted = ([x] if x.requires_grad else []) + params
        grads = list(torch.autograd.grad(output, wanted, grad_output, allow_unused=True))
        grad_x = grads.pop(0) if x.requires_grad else None
        return (None, grad_x, *grads)


def checkpointed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` storing only ``x`` for backward (activation checkpointing, our own).

    Gives the same output and gradients as ``torch.utils.checkpoint.checkpoint(module, x,
    use_reentrant=False)`` for modules without randomness (no dropout).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    return _Rematerialize.apply(module, x, *params)


# ----------------------------------------------------------------------------
# the runtime: one rank runs its stage's actions, talking to its neighbours


def _split(batch, m: int, what: str):
    if batch.shape[0] % m:
        raise ValueError(
            f"{what} has a batch of {batch.shape[0]}, which does not split into "
            f"{m} equal micro-batches: use a batch size that is a multiple of {m}"
        )
    return batch.split(batch.shape[0] // m)


def train_step(
    stage: nn.Module | Sequence[nn.Module],
    inputs: torch.Tensor | None,
    targets: torch.Tensor | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    num_microbatches: int,
    schedule: str = "gpipe",
    group: dist.ProcessGroup | None = None,
    *,
    checkpoint: bool = False,
    timeline: list | None = None,
) -> torch.Tensor | None:
    """One training step of a pipeline; call it on every rank of ``group`` with its own stage.

    ``inputs`` are used by the first stage, ``targets`` by the last (other ranks may pass
    None). ``loss_fn(output, target)`` must average over its micro-batch (like
    ``F.mse_loss``). Gradients accumulate into ``.grad`` as ``loss.backward()`` would:
    zero them before the step. Returns the loss, the mean over the batch, on the last
    rank and None on the others. ``checkpoint=True`` stores only each micro-batch's stage
    input and recomputes the rest in backward. A list passed as ``timeline`` receives
    ``((kind, i), start, end)`` for every action's computation (``time.perf_counter``).
    """
    if schedule not in SCHEDULES or isinstance(stage, (list, tuple)):
        from course_lib import pipeline_schedules  # chapter 06b: any schedule, several stages per rank

        if checkpoint:
            raise ValueError(
                f"checkpoint=True runs with 'gpipe' and '1f1b' on one stage per rank, not {schedule!r}"
            )
        return pipeline_schedules.train_step(
            stage, inputs, targets, loss_fn, num_microbatches, schedule, group, timeline=timeline
        )
    s, p = dist.get_rank(group), dist.get_world_size(group)
    _, m = _check_sizes(p, num_microbatches)
    first, last = s == 0, s == p - 1
    micro_inputs = None if inputs is None else _split(inputs, m, "inputs")
    micro_targets = None if targets is None else _split(targets, m, "targets")
    if (first and micro_inputs is None) or (last and micro_targets is None):
        raise ValueError("the first stage needs inputs and the last stage needs targets")

    before = None if first else global_rank(group, s - 1)
    after = None if last else global_rank(group, s + 1)
    device = next(stage.parameters(), torch.empty(0)).device  # NCCL sends only GPU tensors
    stage_inputs, stage_outputs = {}, {}  # micro-batch -> what its backward needs
    in_flight = []  # (request, tensor): a tensor must live until its isend completes
    in_shape = in_dtype = None
    header_sent = False
    total_loss = torch.zeros((), device=device)
    for kind, i in SCHEDULES[schedule](p, m)[s]:
        if kind == "F":
            if first:
                x = micro_inputs[i]
            else:
                if in_shape is None:
                    in_shape, in_dtype = recv_header(before, group, device)
                x = torch.empty(in_shape, dtype=in_dtype, device=device)
                dist.recv(x, before, group=group)
                x.requires_grad_()
            start = time.perf_counter()  # from here on the stage works; before, it waited
            y = checkpointed(stage, x) if checkpoint else stage(x)
            if last:
                y = loss_fn(y, micro_targets[i]) / m  # mean over the batch = mean of m means
                total_loss += y.detach()
            else:
                if not header_sent:
                    in_flight.append(send_header(y, after, group))
                    header_sent = True
                out = y.detach()
                in_flight.append((dist.isend(out, after, group=group), out))
            stage_inputs[i], stage_outputs[i] = x, y
        else:
            x, y = stage_inputs.pop(i), stage_outputs.pop(i)  # dropping them frees the activations
            grad = None
            if not last:
                grad = torch.empty_like(y)
                dist.recv(grad, after, group=group)
            start = time.perf_counter()
            y.backward(grad)
            if not first:
                in_flight.append((dist.isend(x.grad, before, group=group), x.grad))
        if timeline is not None:
            timeline.append(((kind, i), start, time.perf_counter()))
    for request, _ in in_flight:
        request.wait()
    return total_loss if last else None


# ----------------------------------------------------------------------------
# measuring: how long a forward and a backward take, and a pipeline's idle time


def time_forward_backward(
    stage: nn.Module, x: torch.Tensor, repeats: int = 30, threads: int = 1
) -> tuple[float, float]:
    """(t_f, t_b): the fastest of ``repeats`` forwards and of as many backwards of ``stage`` on ``x``.

    ``x`` gets ``requires_grad`` like the input of any stage but the first, so the
    backward computes the input's gradient as well as the weights'. Runs on
    ``threads`` intra-op threads (one, like a rank on a shared CPU). The minimum is
    the least disturbed run: other processes only ever make a run slower.
    """
    x = x.detach().requires_grad_()
    grad_output = torch.randn_like(stage(x))
    forward, backward = [], []
    with _threads(threads):
        for _ in range(repeats):
            start = time.perf_counter()
            y = stage(x)
            middle = time.perf_counter()
            y.backward(grad_output)
            end = time.perf_counter()
            forward.append(middle - start)
            backward.append(end - middle)
    stage.zero_grad(set_to_none=True)
    return min(forward), min(backward)


def fastest(calls: dict, repeats: int = 10, threads: int = 1) -> dict:
    """The fastest of ``repeats`` runs of each zero-argument function in ``calls``, in seconds.

    The functions take turns (a, b, c, a, b, c, ...), so a busy moment of the machine
    slows all of them alike instead of one; ``threads`` intra-op threads, like a rank.
    """
    times = {name: [] for name in calls}
    with _threads(threads):
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


class _threads:
    def __init__(self, n):
        self.n, self.before = n, None

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


class FlopCounter(TorchDispatchMode):
    """Floating-point operations of the matrix products run inside the block, forward and
    backward alike (one multiply-add counts 2), by torch's own per-operation formulas.

        with pp.FlopCounter() as flops:
            stage(x).backward(g)
        flops.total
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


class SleepInBackward(torch.autograd.Function):
    """Identity whose backward sleeps: a backward of known duration."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, seconds: float) -> torch.Tensor:
        ctx.seconds = seconds
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        time.sleep(ctx.seconds)
        return grad, None


class TimedStage(nn.Module):
    """A stage whose forward sleeps ``work``·t_f seconds and whose backward ``work``·t_b.

    Sleeping ranks do not compete for CPU cores, so on a laptop the only waiting
    left to see is the pipeline's own. A tiny ``nn.Linear`` keeps real gradients flowing.
    """

    def __init__(self, work: float, t_f: float, t_b: float, width: int = 4):
        super().__init__()
        self.work, self.t_f, self.t_b = work, t_f, t_b
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.work * self.t_f)
        return SleepInBackward.apply(self.linear(x), self.work * self.t_b)


def measured_bubble(timelines: Sequence[Sequence[tuple]]) -> tuple[float, float]:
    """(bubble, wall seconds) of one step from every rank's ``train_step`` timeline.

    bubble = 1 - Σ busy / (p × wall): the idle share of all stage-time, as the simulator's.
    """
    start = min(row[0][1] for row in timelines)
    end = max(row[-1][2] for row in timelines)
    busy = sum(b - a for row in timelines for _, a, b in row)
    return 1 - busy / (len(timelines) * (end - start)), end - start


def timed_steps(
    configs: Iterable[tuple[str, int, Sequence[float]]], t_f: float, t_b: float, repeats: int = 3
) -> list[list[list[tuple]]]:
    """Run on every rank: per (schedule, m, work of each stage) in ``configs``, ``repeats``
    steps of :class:`TimedStage` stages; returns this rank's timeline of each repeat."""
    rank, device = dist.get_rank(), launch.device()
    torch.manual_seed(0)
    warm_up = TimedStage(0.0, t_f, t_b).to(device)
    ones = torch.ones(1, 4, device=device)
    train_step(warm_up, ones, ones, nn.functional.mse_loss, 1)  # open the links
    results = []
    for schedule, m, work in configs:
        stage = TimedStage(work[rank], t_f, t_b).to(device)
        x, y = torch.randn(m, 4, device=device), torch.randn(m, 4, device=device)
        runs = []
        for _ in range(repeats):
            dist.barrier()  # start together
            timeline = []
            train_step(stage, x, y, nn.functional.mse_loss, m, schedule, timeline=timeline)
            runs.append(timeline)
        results.append(runs)
    return results


def least_disturbed(per_rank: Sequence[Sequence[Sequence[list[tuple]]]]) -> list:
    """From :func:`timed_steps`' per-rank results: per configuration, every rank's
    timeline in the repeat with the smallest bubble (a rank that got no core when
    its input arrived only ever adds idle time)."""
    best = []
    for c in range(len(per_rank[0])):
        repeats = [[rank_result[c][k] for rank_result in per_rank] for k in range(len(per_rank[0][c]))]
        best.append(min(repeats, key=lambda timelines: measured_bubble(timelines)[0]))
    return best


#: Chapter 06b's names, importable from here (``pp.schedule``, ``pp.zb_h1_schedule``, ...).
_SCHEDULES_NAMES = {
    "schedule",
    "validate",
    "interleaved_1f1b_schedule",
    "zb_h1_schedule",
    "dualpipe_v_schedule",
    "stage_ranks",
    "stages_of_rank",
    "virtual_stages",
    "messages_per_rank",
    "peak_alive",
    "SplitBackward",
    "WeightGradients",
    "input_gradient",
    "weight_gradient",
    "ScheduleSimulation",
}


def __getattr__(name: str):
    # pipeline_schedules imports this module: resolve its names lazily.
    if name in _SCHEDULES_NAMES:
        from course_lib import pipeline_schedules

        return getattr(pipeline_schedules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
