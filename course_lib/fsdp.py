"""Chapter 07b: FSDP — parameters sharded per unit, gathered just in time, prefetched, in mixed precision.

    model = make_stack(depth=4, d_model=64, d_hidden=256)        # the same model on every rank
    fsdp.fully_shard(model, mixed_precision=fsdp.MixedPrecision())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)          # steps on this rank's fp32 shards
    F.mse_loss(model(x_shard).float(), y_shard).backward(); opt.step(); opt.zero_grad()
    fsdp.full_state_dict(model)                                  # {original name: full fp32 tensor}

ZeRO-3 (chapter 07, ``course_lib.zero``) with the pieces people run today:

* **Units.** ``units`` (default: the module's children) each hold their parameters in one flat
  buffer, zero-padded to a multiple of N; rank r keeps elements [r·S, (r+1)·S), S = padded/N, as an
  fp32 ``nn.Parameter`` registered on the unit as ``fsdp_shard``. ``module.parameters()`` yields
  exactly these shards, so any ``torch.optim`` optimizer steps on them unchanged.
* **Just in time.** A forward pre-hook all-gathers the unit, a forward hook frees it again
  (``reshard_after_forward``); when the gradient reaches the unit's output it is gathered again for
  the backward; once every parameter's gradient of the unit is complete, the unit's gradient is
  reduce-scattered (asynchronously: it overlaps the rest of the backward) and freed.
* **Prefetch.** While unit i computes, the all-gather of the unit after it in forward order (forward)
  or before it (backward) is already in flight. The backward's order is the reverse of the order in
  which the units ran forward in this step; the forward's is the one seen in the previous step
  (the list order in the first).
* **Mixed precision.** ``MixedPrecision(param_dtype, reduce_dtype)``: the fp32 shard is the master
  copy; it is cast to ``param_dtype`` before the gather (so the gather moves 2 bytes per element in
  bf16), the unit computes in ``param_dtype`` (its floating inputs are cast on entry), and the
  gradient is cast to ``reduce_dtype`` before the reduce-scatter.
* **Gradient accumulation.** Inside :func:`no_sync` a backward adds the unit's gradient, in
  ``reduce_dtype``, to an unsharded buffer instead of reduce-scattering it; the next backward outside
  reduces the sum once.
* **HSDP.** ``group=(shard_group, replicate_group)`` (see :func:`hsdp_groups`): shard within the
  first, and all-reduce each gradient shard over the second.

A :class:`MemoryTracker` (``track_memory``) samples the bytes this rank holds at every hook, and
:class:`Timeline` (``record_timeline``) times every gather, compute and reduce-scatter.
Notation: N ranks, Ψ parameters.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from course_lib.zero import padded_size, storage_bytes

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator


SHARD_NAME = "fsdp_shard"
#: Seconds a rank waits for one gather or reduce-scatter before it says the other ranks are missing.
WAIT_TIMEOUT = 10.0


def _wait(work, what: str) -> None:
    """Wait for ``work``; if the other ranks never join, raise an error that names the call."""
    try:
        work.wait(timeout=datetime.timedelta(seconds=WAIT_TIMEOUT))
    except RuntimeError as exc:
        if "timed out" not in str(exc).lower():
            raise
        raise RuntimeError(
            f"fsdp: rank {dist.get_rank()} waited {WAIT_TIMEOUT:g} s for the {what} and the other ranks "
            "never joined: every rank must run the model's forward and backward together (a rank that "
            "calls the model while the others do not waits for them forever)"
        ) from None


@dataclass(frozen=True)
class MixedPrecision:
    """Compute in ``param_dtype``, reduce gradients in ``reduce_dtype``; master shards stay fp32."""

    param_dtype: torch.dtype = torch.bfloat16
    reduce_dtype: torch.dtype = torch.float32


def hsdp_groups(shard_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(shard group, replicate group) of this rank for HSDP: ranks [k·S, (k+1)·S) shard one copy.

    Every rank must call it (creating groups is collective). Rank r shards with the ranks of its
    block of ``shard_size`` and replicates with the ranks at the same place in the other blocks.
    """
    n, rank = dist.get_world_size(), dist.get_rank()
    if not (isinstance(shard_size, int) and shard_size >= 1 and n % shard_size == 0):
        raise ValueError(f"shard_size must divide the world size {n}, got {shard_size!r}")
    blocks = [list(range(b, b + shard_size)) for b in range(0, n, shard_size)]
    columns = [list(range(c, n, shard_size)) for c in range(shard_size)]
    shard_group, _ = dist.new_subgroups_by_enumeration(blocks)
    replicate_group, _ = dist.new_subgroups_by_enumeration(columns)
    assert rank in blocks[rank // shard_size]
    return shard_group, replicate_group


# ----------------------------------------------------------------------------
# one unit: its flat buffer, this rank's shard


class _Unit:
    def __init__(self, index, name, module, named, group, mp):
        self.index, self.name, self.module = index, name, module
        self.names = [n for n, _ in named]
        originals = [p for _, p in named]
        self.owners = []  # (submodule, attribute) where each original parameter lived
        self.shapes = [p.shape for p in originals]
        self.numels = [p.numel() for p in originals]
        self.numel = sum(self.numels)
        self.parts, rank = dist.get_world_size(group), dist.get_rank(group)
        self.padded = padded_size(self.numel, self.parts)
        self.shard_size = self.padded // self.parts
        self.requires_grad = originals[0].requires_grad
        self.dtype = mp.param_dtype if mp else originals[0].dtype
        self.reduce_dtype = mp.reduce_dtype if mp else originals[0].dtype
        flat = torch.zeros(self.padded, dtype=originals[0].dtype)
        torch.cat([p.detach().reshape(-1) for p in originals], out=flat[: self.numel])
        start = rank * self.shard_size
        self.shard = nn.Parameter(flat[start : start + self.shard_size].clone(), self.requires_grad)
        self.full = torch.empty(self.padded, dtype=self.dtype)  # the gathered unit; storage 0 when freed
        # The tensors the modules compute with: leaves whose data are views of `full`.
        self.params = []
        for piece, shape in zip(self.full[: self.numel].split(self.numels), self.shapes):
            leaf = torch.empty(0, dtype=self.dtype).requires_grad_(self.requires_grad)
            leaf.data = piece.view(shape)  # its own version counter: gathers do not count as edits
            self.params.append(leaf)
        self.full.untyped_storage().resize_(0)
        self.in_flight = None  # (work, input) of an asynchronous gather
        self.waiting = len(self.params)  # gradients still to come in this backward
        self.backward_gathered = False
        self.accumulated = None  # unsharded gradient summed under no_sync(), reduce_dtype
        self.reducing = None  # (work, received, sent) of a reduce-scatter in flight

    @property
    def gathered(self) -> bool:
        return self.full.untyped_storage().nbytes() > 0

    def flat_grad(self) -> torch.Tensor:
        out = torch.zeros(self.padded, dtype=self.reduce_dtype)
        for piece, p in zip(out[: self.numel].split(self.numels), self.params):
            if p.grad is not None:
                piece.copy_(p.grad.reshape(-1))
        return out


# ----------------------------------------------------------------------------
# the state of one wrapped module


@dataclass
class _Event:
    kind: str  # "all-gather", "compute", "reduce-scatter"
    unit: str
    start: float
    end: float | None = None
    phase: str = "forward"


@dataclass
class Timeline:
    """Start and end (seconds since the step began) of every gather, compute and reduce-scatter."""

    events: list = field(default_factory=list)
    origin: float = field(default_factory=time.perf_counter)

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def begin(self, kind: str, unit: str, phase: str) -> _Event:
        event = _Event(kind, unit, self.now(), phase=phase)
        self.events.append(event)
        return event

    def finish_on(self, event: _Event, work: dist.Work) -> None:
        """Record ``event``'s end when ``work`` completes (gloo runs it on its own thread)."""
        work.get_future().then(lambda _: setattr(event, "end", self.now()))


class _State:
    def __init__(self, module, units, group, replicate, reshard, prefetch, mp):
        self.module, self.units, self.group, self.replicate = module, units, group, replicate
        self.reshard, self.prefetch, self.mp = reshard, prefetch, mp
        self.sync = True
        self.forward_order = list(units)  # the previous forward's order (list order at first)
        self.ran = []  # units in the order they ran forward in this step
        self.backward_queued = False
        self.tracker = None
        self.timeline = None
        self.computing = {}  # unit -> its compute event (timeline)
        self.calls = 0  # forwards of the root module

    # -- gather and free ---------------------------------------------------

    @torch.no_grad()
    def gather(self, unit, async_op=False, phase="forward"):
        """Bring the unit's full parameters into ``unit.full`` (wait for a prefetch if one is in flight)."""
        if unit.in_flight is not None:
            if not async_op:
                _wait(unit.in_flight[0], f"all-gather of unit {unit.name!r} ({phase})")
                unit.in_flight = None
            return
        if unit.gathered:
            return
        unit.full.untyped_storage().resize_(unit.padded * unit.full.element_size())
        mine = unit.shard.detach().to(unit.dtype, copy=True)  # input and output must not overlap
        event = self.timeline.begin("all-gather", unit.name, phase) if self.timeline else None
        work = dist.all_gather_single(unit.full, mine, group=self.group, async_op=True)
        if event:
            self.timeline.finish_on(event, work)
        unit.in_flight = (work, mine)
        if not async_op:
            _wait(work, f"all-gather of unit {unit.name!r} ({phase})")
            unit.in_flight = None

    def free(self, unit):
        if unit.in_flight is not None:
            _wait(unit.in_flight[0], f"all-gather of unit {unit.name!r}")
            unit.in_flight = None
        unit.full.untyped_storage().resize_(0)

    def neighbour(self, unit, order, step):
        """The unit ``step`` places after ``unit`` in ``order`` (None at either end)."""
        if unit not in order:
            return None
        i = order.index(unit) + step
        return order[i] if 0 <= i < len(order) else None

    # -- hooks ---------------------------------------------------------------

    def root_pre_forward(self, module, args, kwargs):
        if self.ran:  # the previous forward's order guides this forward's prefetch
            self.forward_order = self.ran
        self.ran = []
        self.calls += 1
        return tree_map(self._cast, args), tree_map(self._cast, kwargs)

    def _cast(self, x):
        if self.mp and isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.to(self.mp.param_dtype)
        return x

    def pre_forward(self, unit, args, kwargs):
        if unit in self.ran:
            raise RuntimeError(
                f"fsdp: unit {unit.name!r} ran twice in one forward; a unit must run once per forward "
                "(list the module that is called repeatedly inside a larger unit)"
            )
        self.ran.append(unit)
        self.gather(unit)
        if self.prefetch:
            following = self.neighbour(unit, self.forward_order, +1)
            if following is not None:
                self.gather(following, async_op=True)
        self.sample(f"forward {unit.name}: gathered")
        if self.timeline:
            self.computing[unit] = self.timeline.begin("compute", unit.name, "forward")
        return tree_map(self._cast, args), tree_map(self._cast, kwargs)

    def post_forward(self, unit, output):
        if self.timeline and unit in self.computing:
            self.computing.pop(unit).end = self.timeline.now()
        if torch.is_grad_enabled():  # frozen units too: the gradient of their input needs them
            unit.backward_gathered = False
            for t in tree_flatten(output)[0]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda grad, unit=unit: self.pre_backward(unit))
        if self.reshard:
            self.free(unit)
        self.sample(f"forward {unit.name}: done")

    def pre_backward(self, unit):
        if unit.backward_gathered:
            return
        unit.backward_gathered = True
        if not self.backward_queued:
            self.backward_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.post_backward)
        self.gather(unit, phase="backward")
        if self.prefetch:
            before = self.neighbour(unit, self.ran, -1)
            if before is not None:
                self.gather(before, async_op=True, phase="backward")
        self.sample(f"backward {unit.name}: gathered")
        if self.timeline:
            self.computing[unit] = self.timeline.begin("compute", unit.name, "backward")

    def grad_ready(self, unit):
        unit.waiting -= 1
        if unit.waiting == 0:
            self.unit_backward_done(unit)

    @torch.no_grad()
    def unit_backward_done(self, unit):
        """All of the unit's gradients of this backward exist: reduce-scatter (or accumulate) and free."""
        unit.waiting = len(unit.params)
        if self.timeline and unit in self.computing:
            self.computing.pop(unit).end = self.timeline.now()
        grad = unit.flat_grad()
        for p in unit.params:
            p.grad = None
        if unit.accumulated is not None:
            grad += unit.accumulated
            unit.accumulated = None
        if not self.sync:
            unit.accumulated = grad  # reduced once, by a later backward outside no_sync()
        else:
            for other in self.units:  # at most one reduce-scatter in flight: its buffers are full-size
                if other.reducing is not None:
                    self.finish_reduce(other)
            sent = grad.view(unit.parts, -1)
            received = torch.empty_like(sent)
            event = self.timeline.begin("reduce-scatter", unit.name, "backward") if self.timeline else None
            work = dist.all_to_all_single(received, sent, group=self.group, async_op=True)
            if event:
                self.timeline.finish_on(event, work)
            unit.reducing = (work, received, sent)
        self.free(unit)
        self.sample(f"backward {unit.name}: reduced, freed")

    @torch.no_grad()
    def finish_reduce(self, unit):
        work, received, _ = unit.reducing
        unit.reducing = None
        _wait(work, f"reduce-scatter of unit {unit.name!r}")
        shard = received.sum(dim=0).div_(unit.parts)  # zero.reduce_scatter's second half: the mean
        if self.replicate is not None:
            dist.all_reduce(shard, group=self.replicate)
            shard.div_(dist.get_world_size(self.replicate))
        shard = shard.to(unit.shard.dtype)
        if unit.shard.grad is None:
            unit.shard.grad = shard
        else:
            unit.shard.grad += shard

    def post_backward(self):
        """End of the backward: units some of whose gradients never came, reductions in flight."""
        self.backward_queued = False
        for unit in self.units:
            if unit.requires_grad and 0 < unit.waiting < len(unit.params):
                self.unit_backward_done(unit)  # parameters without a gradient count as zero
        for unit in self.units:
            if unit.reducing is not None:
                self.finish_reduce(unit)
            if unit.gathered or unit.in_flight is not None:
                self.free(unit)  # frozen units gathered for the backward; reshard_after_forward=False
            unit.backward_gathered = False
        self.sample("backward done")

    def sample(self, label):
        if self.tracker is not None:
            self.tracker.sample(label, self)


# ----------------------------------------------------------------------------
# the public functions


def fully_shard(
    module: nn.Module,
    group: dist.ProcessGroup | tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None,
    *,
    units: Iterable[nn.Module] | None = None,
    reshard_after_forward: bool = True,
    prefetch: bool = True,
    mixed_precision: MixedPrecision | None = None,
) -> nn.Module:
    """Shard ``module``'s parameters unit by unit over the ranks of ``group``; returns ``module``.

    ``units``: submodules of ``module`` that together hold each of its parameters exactly once
    (default: its children). ``group``: a process group (default: all ranks), or a pair
    ``(shard_group, replicate_group)`` for HSDP. Every rank must call it with the same model.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fully_shard needs an nn.Module, got {type(module).__name__}")
    if hasattr(module, "_fsdp_state"):
        raise ValueError("fully_shard: this module is sharded already")
    if mixed_precision is not None and not isinstance(mixed_precision, MixedPrecision):
        raise TypeError(
            f"mixed_precision must be a fsdp.MixedPrecision, got {type(mixed_precision).__name__}"
        )
    replicate = None
    if isinstance(group, tuple):
        group, replicate = group
    named_units = _named_units(module, units)
    owner_of = {}  # parameter -> (unit name, its name in module)
    for name, p in module.named_parameters(remove_duplicate=False):
        owner_of.setdefault(p, []).append(name)
    where = {}
    plan = []
    for unit_name, unit_module in named_units:
        named = list(unit_module.named_parameters(remove_duplicate=False))
        prefix = f"{unit_name}." if unit_name else ""
        for local, p in named:
            if p in where and where[p] == unit_name:
                raise ValueError(
                    f"fully_shard: parameter {prefix + local!r} appears twice in unit {unit_name!r} "
                    "(tied weights are not supported)"
                )
            if p in where:
                raise ValueError(
                    f"fully_shard: parameter {prefix + local!r} is in two units, {where[p]!r} and "
                    f"{unit_name!r}; every parameter must be in exactly one unit"
                )
            where[p] = unit_name
        if not named:
            raise ValueError(f"fully_shard: unit {unit_name!r} has no parameters")
        dtypes = sorted({str(p.dtype) for _, p in named})
        if len(dtypes) > 1:
            raise ValueError(
                f"fully_shard: unit {unit_name!r} mixes dtypes {dtypes}; one flat buffer needs one dtype "
                "(cast the module, or split it into units of one dtype each)"
            )
        if not named[0][1].is_floating_point():
            raise ValueError(
                f"fully_shard: unit {unit_name!r} holds {dtypes[0]} parameters, not floating point"
            )
        frozen = sorted({p.requires_grad for _, p in named})
        if len(frozen) > 1:
            raise ValueError(
                f"fully_shard: unit {unit_name!r} mixes frozen and trainable parameters; freeze whole units "
                "(or make the frozen part its own unit)"
            )
        plan.append((unit_name, unit_module, [(prefix + local, p) for local, p in named]))
    missed = [names[0] for p, names in owner_of.items() if p not in where]
    if missed:
        raise ValueError(
            f"fully_shard: parameter {missed[0]!r} is in no unit ({len(missed)} missed); "
            "list units that cover every parameter"
        )
    state_units = []
    for index, (unit_name, unit_module, named) in enumerate(plan):
        unit = _Unit(index, unit_name or "(root)", unit_module, named, group, mixed_precision)
        for local_module_name, _ in named:
            owner_name, _, attr = local_module_name.rpartition(".")
            owner = module.get_submodule(owner_name)
            del owner._parameters[attr]
            unit.owners.append((owner, attr))
        for (owner, attr), leaf in zip(unit.owners, unit.params):
            setattr(owner, attr, leaf)
        unit_module.register_parameter(SHARD_NAME, unit.shard)
        state_units.append(unit)
    state = _State(module, state_units, group, replicate, reshard_after_forward, prefetch, mixed_precision)
    module._fsdp_state = state
    module.register_forward_pre_hook(state.root_pre_forward, with_kwargs=True, prepend=True)
    for unit in state_units:
        unit.module.register_forward_pre_hook(
            lambda m, a, k, unit=unit: state.pre_forward(unit, a, k), with_kwargs=True
        )
        unit.module.register_forward_hook(lambda m, a, out, unit=unit: state.post_forward(unit, out))
        if unit.requires_grad:
            for p in unit.params:
                p.register_post_accumulate_grad_hook(lambda p, unit=unit: state.grad_ready(unit))
    return module


def _named_units(module, units):
    if units is None:
        units = [m for m in module.children() if any(True for _ in m.parameters())]
        if any(True for _ in module.parameters(recurse=False)):
            raise ValueError(
                "fully_shard: the module owns parameters directly, outside its children; "
                "pass units=[...] (the module itself may be one unit)"
            )
    names = {m: name for name, m in module.named_modules(remove_duplicate=False)}
    units = list(units)
    if not units:
        raise ValueError("fully_shard: units is empty; list at least one submodule")
    out = []
    for u in units:
        if u not in names:
            raise ValueError(f"fully_shard: unit {type(u).__name__} is not a submodule of the module")
        out.append((names[u], u))
    return out


def _state(module) -> _State:
    state = getattr(module, "_fsdp_state", None)
    if state is None:
        raise ValueError("this module was not wrapped with fsdp.fully_shard")
    return state


@contextlib.contextmanager
def no_sync(module: nn.Module) -> Iterator[None]:
    """Backwards inside add each unit's gradient to an unsharded ``reduce_dtype`` buffer and send
    nothing; the first backward outside reduces the sum (gradient accumulation)."""
    state = _state(module)
    previous, state.sync = state.sync, False
    try:
        yield
    finally:
        state.sync = previous


@torch.no_grad()
def full_state_dict(module: nn.Module) -> dict:
    """{original name: the full fp32 (master) parameter} on every rank; a collective."""
    state = _state(module)
    out = {}
    for unit in state.units:
        full = torch.empty(unit.padded, dtype=unit.shard.dtype)
        dist.all_gather_single(full, unit.shard.detach().clone(), group=state.group)
        for name, piece, shape in zip(unit.names, full[: unit.numel].split(unit.numels), unit.shapes):
            out[name] = piece.view(shape).clone()
    return out


def units_of(module: nn.Module) -> list:
    """(unit name, its parameters' names, elements, padded elements, shard elements) per unit."""
    return [
        dict(name=u.name, names=list(u.names), numel=u.numel, padded=u.padded, shard=u.shard_size)
        for u in _state(module).units
    ]


# ----------------------------------------------------------------------------
# looking inside: memory at every hook, a timeline of one step


class MemoryTracker:
    """Bytes this rank holds, by kind, sampled at every FSDP hook: ``samples`` is a list of
    (label, {kind: bytes}). Activations are the tensors autograd saved for the backward (counted
    through ``saved_tensors_hooks``, each storage once, parameters not counted)."""

    KINDS = (
        "sharded params",
        "sharded grads",
        "optimizer",
        "gathered params",
        "unsharded grads",
        "activations",
    )

    def __init__(self, optimizer=None):
        self.optimizer, self.samples = optimizer, []
        self.saved = {}  # storage pointer -> [bytes, references]

    def activation_bytes(self) -> int:
        return sum(b for b, _ in self.saved.values())

    def sample(self, label: str, state: _State) -> None:
        units = state.units
        opt = self.optimizer
        optimizer = storage_bytes(t for s in opt.state.values() for t in s.values()) if opt else 0
        self.samples.append(
            (
                label,
                {
                    "sharded params": storage_bytes(u.shard for u in units),
                    "sharded grads": storage_bytes(u.shard.grad for u in units),
                    "optimizer": optimizer,
                    "gathered params": sum(u.full.untyped_storage().nbytes() for u in units),
                    "unsharded grads": storage_bytes(
                        [p.grad for u in units for p in u.params]
                        + [u.accumulated for u in units]
                        + [t for u in units if u.reducing for t in u.reducing[1:]]
                    ),
                    "activations": self.activation_bytes(),
                },
            )
        )

    def peak(self, kinds: Iterable[str] | None = None) -> int:
        kinds = kinds or self.KINDS
        return max(sum(d[k] for k in kinds) for _, d in self.samples)


class _Saved:
    """A tensor autograd saved; counted while autograd keeps it."""

    def __init__(self, tensor, tracker):
        self.tensor, self.tracker = tensor, tracker
        storage = tensor.untyped_storage()
        self.key = storage.data_ptr()
        entry = tracker.saved.setdefault(self.key, [storage.nbytes(), 0])
        entry[1] += 1

    def __del__(self):
        if self.key in self.tracker.saved:
            entry = self.tracker.saved[self.key]
            entry[1] -= 1
            if entry[1] == 0:
                del self.tracker.saved[self.key]


@contextlib.contextmanager
def track_memory(
    module: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> Iterator[MemoryTracker]:
    """Sample this rank's bytes at every hook of ``module`` while the block runs; yields the tracker."""
    state = _state(module)
    tracker = MemoryTracker(optimizer)

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if any(ptr == u.full.untyped_storage().data_ptr() for u in state.units if u.gathered):
            return t  # a parameter: counted as gathered, not as an activation
        return _Saved(t, tracker)

    state.tracker = tracker
    try:
        with torch.autograd.graph.saved_tensors_hooks(
            pack, lambda p: p.tensor if isinstance(p, _Saved) else p
        ):
            tracker.sample("start", state)
            yield tracker
    finally:
        state.tracker = None


@contextlib.contextmanager
def record_timeline(module: nn.Module) -> Iterator[Timeline]:
    """Time every gather, compute and reduce-scatter of ``module`` while the block runs."""
    state = _state(module)
    state.timeline = Timeline()
    try:
        yield state.timeline
    finally:
        for work, *_ in [u.in_flight for u in state.units if u.in_flight]:
            work.wait()
        state.timeline = None


# ----------------------------------------------------------------------------
# formulas


def formula_traffic(
    psi: float,
    world_size: int,
    *,
    gather_bytes: int = 4,
    reduce_bytes: int = 4,
    reshard_after_forward: bool = True,
    micro_batches: int = 1,
    accumulate_unsharded: bool = False,
    replicas: int = 1,
) -> float:
    """Bytes each rank receives per step: per micro-batch two gathers (one without resharding)
    and one reduce-scatter (one per step under no_sync), each moving Ψ·(N−1)/N elements; HSDP over
    ``replicas`` copies adds an all-reduce of the Ψ/N-element shard, 2·(Ψ/N)·(R−1)/R, per reduction."""
    m, n, r = micro_batches, world_size, replicas
    if m < 1:
        raise ValueError(f"micro_batches must be at least 1, got {m}")
    gathers = (2 if reshard_after_forward else 1) * m
    reduces = 1 if accumulate_unsharded else m
    within = (gathers * gather_bytes + reduces * reduce_bytes) * psi * (n - 1) / n
    across = reduces * reduce_bytes * 2 * (psi / n) * (r - 1) / r
    return within + across
