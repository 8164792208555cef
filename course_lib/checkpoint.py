"""Chapter 09c: checkpoints that reshard — each rank saves its own slices, any layout loads them.

    train_gpt(dp=2, tp=2, steps=20, checkpoint_dir="ckpt", checkpoint_every=5)   # saves steps 5, 10, ...
    train_gpt(pp=2, cp=2, steps=30, checkpoint_dir="ckpt")   # resumes at step 20 in another layout
    tensors = read_global(latest("ckpt"))                    # {"param": {name: full tensor}, ...}

A checkpoint is a folder ``step_000020`` holding one file per rank, ``rank00003.pt``, and one
``meta.json``. A rank's file holds only the model state that rank owns — parameters, Adam's two
moments — as **boxes**: each a block of one tensor of the dense model
(:func:`course_lib.gpt.make_gpt`), named in ``meta.json`` by the tensor's name, the box's
``offsets`` and ``sizes`` (``torch.distributed.checkpoint`` describes its chunks the same way).
A value held by several ranks (a replica over dp, a LayerNorm every tp rank keeps) is written
once, by the lowest rank holding it. ``meta.json`` also records the model, the layout, the step,
the data position (the next step's global batch depends only on (seed, step)), the loss curve so
far, every file's size, and each rank's RNG state sits in its file.

Which box of which tensor a rank holds is not worked out by hand for every axis and sharding:
the rank builds its part of a second copy of the model whose every parameter element holds its
own global index + 1 (:func:`index_model`), through the same ``build_stage`` and optimizer
(ZeRO or FSDP) as the real one; whatever element of the real state sits at a position, that
copy's element there names it. Loading asks the same question for the new layout and copies the
intersections of the boxes it needs with the boxes on disk, reading only the files that hold them.

Writes are atomic: every rank writes into ``.step_000020.tmp``, rank 0 writes ``meta.json`` last
and renames the folder; a crash before the rename leaves the previous checkpoint the latest.
A checkpoint from another model, a missing or truncated file, a file that does not unpickle, or a
tensor no file holds raise :class:`CheckpointError` naming the file and what is missing.

:func:`run_torchrun_killing_a_rank` runs ``python -m course_lib.train`` under ``torchrun
--max-restarts``, kills one rank with SIGKILL once a checkpoint exists, and lets torchrun restart
the group, which resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from course_lib import fsdp as fsdp_lib

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import torch.nn as nn

FORMAT = "course_lib.checkpoint/1"
MOMENTS = ("exp_avg", "exp_avg_sq")
KINDS = ("param", *MOMENTS)
#: Largest model :func:`index_model` can label: every index + 1 must be exact in fp32.
MAX_ELEMENTS = 2**24 - 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded here; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------
# the global tensors, and which of their elements a rank holds


def global_layout(model: nn.Module) -> dict:
    """{name: (offset, shape)}: the dense model's parameters laid end to end, in order."""
    layout, offset = {}, 0
    for name, p in model.named_parameters():
        layout[name] = (offset, tuple(p.shape))
        offset += p.numel()
    return layout


@torch.no_grad()
def index_model(model: nn.Module) -> nn.Module:
    """``model`` with every parameter element replaced by its global index + 1 (0 never occurs:
    the padding ZeRO and FSDP add is 0)."""
    layout = global_layout(model)
    total = sum(torch.Size(shape).numel() for _, shape in layout.values())
    if total > MAX_ELEMENTS:
        raise ValueError(f"the model has {total:,} parameters; index_model labels at most {MAX_ELEMENTS:,}")
    for name, p in model.named_parameters():
        offset, _ = layout[name]
        p.copy_(torch.arange(offset + 1, offset + 1 + p.numel(), dtype=torch.float64).view_as(p))
    return model


@dataclass
class Box:
    """A block of one global tensor: ``offsets`` and ``sizes`` per dimension; ``positions`` are
    the flat positions of its elements (row-major) in the local tensor that holds them."""

    tensor: str
    offsets: tuple
    sizes: tuple
    positions: torch.Tensor

    @property
    def key(self) -> str:
        return f"{self.tensor}@{','.join(map(str, self.offsets))}"

    def describe(self) -> str:
        return f"{self.tensor}[{', '.join(f'{o}:{o + s}' for o, s in zip(self.offsets, self.sizes))}]"


def boxes_of(index: torch.Tensor, layout: dict) -> list:
    """The boxes of global tensors that a local tensor holds, from its index copy (values: global
    index + 1, 0 = padding). Runs of consecutive indices within one row are merged into boxes."""
    idx = index.detach().reshape(-1).to(torch.int64)
    names = list(layout)
    offsets = torch.tensor([layout[n][0] for n in names])
    valid = idx > 0
    g = (idx - 1).clamp(min=0)
    t = torch.searchsorted(offsets, g, right=True) - 1
    cols = torch.tensor([layout[n][1][-1] if layout[n][1] else 1 for n in names])
    local = g - offsets[t]
    row, col = local // cols[t], local % cols[t]
    # a piece ends where the next element is not the next one of the same row of the same tensor
    same = torch.zeros_like(valid)
    same[1:] = valid[1:] & valid[:-1] & (t[1:] == t[:-1]) & (row[1:] == row[:-1]) & (col[1:] == col[:-1] + 1)
    starts = torch.nonzero(valid & ~same).flatten().tolist()
    ends = torch.nonzero(valid & ~torch.cat([same[1:], torch.zeros(1, dtype=torch.bool)])).flatten().tolist()
    boxes = []
    for a, b in zip(starts, ends):
        name, r, c, n = names[int(t[a])], int(row[a]), int(col[a]), b - a + 1
        last = boxes[-1] if boxes else None
        if (
            last is not None
            and last[0] == name
            and last[2] == c
            and last[3] == n
            and last[1] + last[4] == r
            and last[5][-1] + 1 == a
        ):
            last[4] += 1
            last[5].extend(range(a, b + 1))
        else:
            boxes.append([name, r, c, n, 1, list(range(a, b + 1))])
    out = []
    for name, r, c, n, rows, pos in boxes:
        shape = layout[name][1]
        if len(shape) == 1:
            off, size = (c,), (n,)
        elif len(shape) == 2:
            off, size = (r, c), (rows, n)
        else:
            raise ValueError(f"{name}: checkpoints of tensors with {len(shape)} dimensions are not supported")
        out.append(Box(name, off, size, torch.tensor(pos, dtype=torch.long)))
    return out


def overlap(
    want_offsets: Sequence[int],
    want_sizes: Sequence[int],
    have_offsets: Sequence[int],
    have_sizes: Sequence[int],
) -> tuple[list, list] | None:
    """Where two boxes of one tensor overlap: ``(want, have)``, the overlap's ``(start, stop)`` in
    every dimension in each box's own coordinates, or None when they share no element. (``have`` is
    a box on disk, ``want`` one a rank needs; :func:`as_slices` turns a list into an index.)"""
    lo = [max(w, h) for w, h in zip(want_offsets, have_offsets)]
    hi = [min(w + ws, h + hs) for w, ws, h, hs in zip(want_offsets, want_sizes, have_offsets, have_sizes)]
    if any(a >= z for a, z in zip(lo, hi)):
        return None
    want = [(a - w, z - w) for a, z, w in zip(lo, hi, want_offsets)]
    have = [(a - h, z - h) for a, z, h in zip(lo, hi, have_offsets)]
    return want, have


def as_slices(ranges: Sequence[tuple[int, int]]) -> tuple[slice, ...]:
    """``[(start, stop), …]`` as an index: ``block[as_slices(want)] = saved[as_slices(have)]``."""
    return tuple(slice(a, z) for a, z in ranges)


# ----------------------------------------------------------------------------
# a rank's model state: ZeroAdam units or FSDP shards


@dataclass
class Slot:
    """One flat tensor of parameters the optimizer updates on this rank, with its Adam state.

    ``save``: the elements this rank owns (its shard); ``load``: the tensor a load fills (the
    whole local parameters where ZeRO-1/2 keep them, else the shard); ``moments()``: Adam's
    moments, laid out like ``save``; ``get_step``/``set_step``: Adam's step count."""

    name: str
    save: torch.Tensor
    load: torch.Tensor
    moments: Callable[[], dict]
    get_step: Callable[[], int]
    set_step: Callable[[int], None]


def slots(optimizer: Any) -> list:
    """The :class:`Slot` s of a :class:`course_lib.train` optimizer (ZeroAdam stages 0–3 or FSDP)."""
    out = []
    if optimizer.sharding == "fsdp":
        adam = optimizer.torch_adam
        for unit in fsdp_lib._state(optimizer.stage).units:
            p = unit.shard

            def moments(p=p):
                if p not in adam.state:  # torch's AdamW creates its state at the first step
                    adam.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p),
                    }
                return {m: adam.state[p][m].detach().view(-1) for m in MOMENTS}

            def set_step(n, p=p):
                moments(p)
                adam.state[p]["step"] = torch.tensor(float(n))

            def get_step(p=p):
                return int(adam.state[p]["step"].item()) if p in adam.state else 0

            out.append(
                Slot(
                    f"fsdp unit {unit.name}",
                    p.detach().view(-1),
                    p.detach().view(-1),
                    moments,
                    get_step,
                    set_step,
                )
            )
        return out
    for z_index, z in enumerate(optimizer.zero):
        for u_index, unit in enumerate(z.units):
            load = unit.param_shard if z.stage == 3 else unit.full
            out.append(
                Slot(
                    f"ZeroAdam {z_index} unit {u_index}",
                    unit.param_shard,
                    load,
                    lambda unit=unit: {"exp_avg": unit.exp_avg, "exp_avg_sq": unit.exp_avg_sq},
                    lambda unit=unit: unit.step,
                    lambda n, unit=unit: setattr(unit, "step", n),
                )
            )
    return out


# ----------------------------------------------------------------------------
# saving


def step_dir(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step_{step:06d}"


def latest(directory: str | os.PathLike) -> Path | None:
    """The checkpoint folder of the highest step in ``directory`` (unfinished ``.tmp`` folders are
    not checkpoints), or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [
        (int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return max(found)[1] if found else None


def _file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


class Checkpointer:
    """Save and load one rank's training state; built once per run on every rank.

    ``optimizer`` is train_gpt's, ``index_optimizer`` the same construction on
    :func:`index_model`'s copy; ``model`` names the dense model (vocabulary, sizes) and
    ``run`` the settings that fix the data order (seed, batch size)."""

    def __init__(
        self, optimizer: Any, index_optimizer: Any, layout: dict, model: dict, run: dict, where: dict
    ) -> None:
        self.slots, self.layout = slots(optimizer), layout
        self.model, self.run, self.where = model, run, where
        index_slots = slots(index_optimizer)
        if [s.save.shape for s in self.slots] != [s.save.shape for s in index_slots]:
            raise RuntimeError("the index copy of the model was not built like the real one")
        self.save_boxes = [boxes_of(s.save, layout) for s in index_slots]
        self.load_boxes = [boxes_of(s.load, layout) for s in index_slots]
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # Each box is written once: by the lowest rank that holds it.
        mine = [(b.key, b.sizes) for boxes in self.save_boxes for b in boxes]
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine)
        earlier = {sig for r in range(self.rank) for sig in everyone[r]}
        self.written = [[b for b in boxes if (b.key, b.sizes) not in earlier] for boxes in self.save_boxes]

    @torch.no_grad()
    def save(self, directory: str | os.PathLike, step: int, loss: Sequence[float], keep: int = 2) -> Path:
        """Write step ``step``'s checkpoint (a collective: every rank calls it)."""
        directory = Path(directory)
        final = step_dir(directory, step)
        tmp = directory / f".{final.name}.tmp"
        if self.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        tensors, entries = {}, []
        for slot, boxes in zip(self.slots, self.written):
            moments = slot.moments()
            for b in boxes:
                tensors[f"param/{b.key}"] = slot.save[b.positions].view(b.sizes).clone()
                for m in MOMENTS:
                    tensors[f"{m}/{b.key}"] = moments[m][b.positions].view(b.sizes).clone()
                entries.append(
                    {
                        "key": b.key,
                        "tensor": b.tensor,
                        "offsets": b.offsets,
                        "sizes": b.sizes,
                        "adam_step": slot.get_step(),
                    }
                )
        path = tmp / _file(self.rank)
        torch.save({"tensors": tensors, "rng": torch.get_rng_state()}, path)
        _fsync(path)
        files = [None] * self.world
        dist.all_gather_object(files, {"rank": self.rank, "bytes": path.stat().st_size, "boxes": entries})
        if self.rank == 0:
            meta = {
                "format": FORMAT,
                "step": step,
                "tokens_seen": step * self.run["batch_size"] * self.model["seq_len"],
                "loss": list(loss),
                "model": self.model,
                "run": self.run,
                "layout": self.where,
                "tensors": {n: list(shape) for n, (_, shape) in self.layout.items()},
                "files": {_file(f["rank"]): f for f in files},
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            _fsync(tmp / "meta.json")
            if final.exists():  # the same step again (saved under another layout): set the old one aside
                old = directory / f".{final.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
            os.rename(tmp, final)  # the moment the checkpoint exists, whole
            shutil.rmtree(directory / f".{final.name}.old", ignore_errors=True)
            for old in sorted(
                (p for p in directory.iterdir() if _STEP_DIR.match(p.name)), key=lambda p: p.name
            )[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    # -- loading -----------------------------------------------------------

    @torch.no_grad()
    def load(self, path: str | os.PathLike) -> dict:
        """Fill this rank's parameters, Adam moments and step counts, and RNG state, from the
        checkpoint folder ``path`` whatever layout wrote it; returns its ``meta.json``."""
        path = Path(path)
        meta = read_meta(path)
        check_compatible(meta, path, self.model, self.layout, self.run)
        on_disk = {}  # tensor name -> [(file, entry)]
        for file, info in meta["files"].items():
            for e in info["boxes"]:
                on_disk.setdefault(e["tensor"], []).append((file, e))
        cache = {}
        for slot, save_boxes, load_boxes in zip(self.slots, self.save_boxes, self.load_boxes):
            steps = set()
            targets = [("param", slot.load, load_boxes)] + [
                (m, t, save_boxes) for m, t in slot.moments().items()
            ]
            for kind, target, boxes in targets:
                covered = torch.zeros(target.numel(), dtype=torch.bool)
                flat = target.view(-1)
                for b in boxes:
                    for file, e in on_disk.get(b.tensor, []):
                        pieces = overlap(b.offsets, b.sizes, e["offsets"], e["sizes"])
                        if pieces is None:
                            continue
                        dst, src = (as_slices(r) for r in pieces)
                        saved = _read(path, file, meta, cache)[f"{kind}/{e['key']}"]
                        where = b.positions.view(b.sizes)[dst].reshape(-1)
                        flat[where] = saved[src].reshape(-1).to(flat.dtype)
                        covered[where] = True
                        if kind == "param":
                            steps.add(e["adam_step"])
                    if not covered[b.positions].all():
                        raise CheckpointError(
                            f"no file of {path} holds all of {kind} {b.describe()} (needed by rank {self.rank}): "
                            "the checkpoint is incomplete"
                        )
            if len(steps) > 1:
                raise CheckpointError(
                    f"{path}: the slices rank {self.rank} loads into {slot.name} "
                    f"have different Adam steps {sorted(steps)}"
                )
            slot.set_step(steps.pop() if steps else 0)
        rng_file = _file(self.rank) if _file(self.rank) in meta["files"] else _file(0)
        torch.set_rng_state(_read(path, rng_file, meta, cache, "rng"))
        return meta


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def read_meta(path: str | os.PathLike) -> dict:
    """A checkpoint folder's ``meta.json``, or a :class:`CheckpointError` naming what is wrong."""
    file = Path(path) / "meta.json"
    if not file.exists():
        raise CheckpointError(f"{file} is missing: {path} is not a complete checkpoint")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}): the file is damaged or truncated") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    return meta


def check_compatible(meta: dict, path: Path, model: dict, layout: dict, run: dict | None = None) -> None:
    """Raise :class:`CheckpointError` if the checkpoint was written for another model (or for a run
    whose data order differs)."""
    file = Path(path) / "meta.json"
    differ = [
        f"{k} {meta['model'].get(k)!r} there, {v!r} here"
        for k, v in model.items()
        if meta["model"].get(k) != v
    ]
    shapes = {n: list(s) for n, (_, s) in layout.items()}
    if not differ and meta["tensors"] != shapes:
        gone = sorted(set(shapes) ^ set(meta["tensors"]))
        other = [n for n in shapes if n in meta["tensors"] and meta["tensors"][n] != shapes[n]]
        differ = [
            f"tensors only on one side: {gone[:4]}"
            if gone
            else f"shape of {other[0]}: {meta['tensors'][other[0]]} there, {shapes[other[0]]} here"
        ]
    if differ:
        raise CheckpointError(f"{file} was written for another model: {'; '.join(differ)}")
    if run:
        differ = [
            f"{k} {meta['run'].get(k)!r} there, {v!r} here" for k, v in run.items() if meta["run"].get(k) != v
        ]
        if differ:
            raise CheckpointError(
                f"{file} was written by a run with other data settings ({'; '.join(differ)}): "
                "its data position would not continue that run's batches"
            )


def _read(path: Path, file: str, meta: dict, cache: dict, part: str = "tensors"):
    if file not in cache:
        full = path / file
        holds = sorted({e["tensor"] for e in meta["files"][file]["boxes"]})
        if not full.exists():
            raise CheckpointError(
                f"shard file {full} is missing (rank {meta['files'][file]['rank']} wrote it); "
                f"it holds slices of {len(holds)} tensors: {', '.join(holds[:4])}{' …' if len(holds) > 4 else ''}"
            )
        size, expected = full.stat().st_size, meta["files"][file]["bytes"]
        if size != expected:
            raise CheckpointError(
                f"shard file {full} is truncated or damaged: {size:,} bytes, meta.json says {expected:,}"
            )
        try:
            cache[file] = torch.load(full, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure, named with its file
            raise CheckpointError(f"shard file {full} cannot be read: {type(exc).__name__}: {exc}") from None
    return cache[file][part]


def read_global(path: str | os.PathLike) -> dict:
    """{kind: {tensor name: full tensor}} assembled from every file of a checkpoint (one process,
    no ranks): the state as one process would hold it ("param", "exp_avg", "exp_avg_sq")."""
    path = Path(path)
    meta = read_meta(path)
    out = {k: {n: torch.full(s, float("nan")) for n, s in meta["tensors"].items()} for k in KINDS}
    cache = {}
    for file, info in meta["files"].items():
        for e in info["boxes"]:
            where = tuple(slice(o, o + s) for o, s in zip(e["offsets"], e["sizes"]))
            for k in KINDS:
                out[k][e["tensor"]][where] = _read(path, file, meta, cache)[f"{k}/{e['key']}"]
    for k in KINDS:
        for n, t in out[k].items():
            if torch.isnan(t).any():
                raise CheckpointError(f"no file of {path} holds all of {k} {n}: the checkpoint is incomplete")
    return out


# ----------------------------------------------------------------------------
# the same state through torch.distributed.checkpoint


def _dcp_save(tensors: dict, directory: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    dcp.save({n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in tensors.items()}, checkpoint_id=directory)


def _dcp_load(shapes: dict, directory: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    state = {n: distribute_tensor(torch.zeros(s), mesh, [Shard(len(s) - 1)]) for n, s in shapes.items()}
    dcp.load(state, checkpoint_id=directory)
    return {n: t.full_tensor() for n, t in state.items()}


def dcp_round_trip(
    tensors: dict, directory: str | os.PathLike, save_ranks: int = 2, load_ranks: int = 3
) -> dict:
    """``tensors`` (name -> full tensor) saved by ``torch.distributed.checkpoint`` from
    ``save_ranks`` ranks, each holding a block of rows (DTensor ``Shard(0)``), and loaded on
    ``load_ranks`` ranks that each want a block of the last dimension (``Shard(-1)``): DCP
    reshards. Returns what the loading ranks hold, gathered to full tensors (rank 0's)."""
    from course_lib.launch import run

    run(_dcp_save, save_ranks, tensors, str(directory), backend="gloo")
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    return run(_dcp_load, load_ranks, shapes, str(directory), backend="gloo")[0]


def dcp_chunks(directory: str | os.PathLike, name: str) -> list:
    """[(offsets, sizes)] of the chunks DCP's metadata lists for tensor ``name``."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(directory)).read_metadata()
    return [(tuple(c.offsets), tuple(c.sizes)) for c in meta.state_dict_metadata[name].chunks]


# ----------------------------------------------------------------------------
# surviving a killed rank


def _workers(proc: subprocess.Popen) -> list:
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in family:
        try:
            env = child.environ()
        except (psutil.Error, OSError):
            continue
        if "RANK" in env and "TORCHELASTIC_RESTART_COUNT" in env:
            found.append((child, int(env["RANK"]), int(env["TORCHELASTIC_RESTART_COUNT"])))
    return found


def run_torchrun_killing_a_rank(
    args: Sequence[str],
    nproc: int,
    checkpoint_dir: str | os.PathLike,
    kill_rank: int = 1,
    after_step: int = 1,
    max_restarts: int = 1,
    timeout: float = 180.0,
) -> dict:
    """``torchrun --standalone --nproc-per-node=nproc --max-restarts=max_restarts -m course_lib.train
    ARGS``; as soon as a checkpoint of step ≥ ``after_step`` is in ``checkpoint_dir``, kill rank
    ``kill_rank`` with SIGKILL (somewhere in the steps after that checkpoint: choose ``after_step``
    at random for a random step). torchrun then stops the other ranks and starts the group
    again, whose ranks resume from the latest checkpoint.

    Returns {"output", "killed_pid", "killed_after": the latest checkpoint's step when the signal
    went}; raises :class:`course_lib.torchrun.TorchrunError` if torchrun fails, the run ends
    before the kill, or it exceeds ``timeout``."""
    from course_lib.torchrun import TorchrunError, _end, _start, _torchrun_argv

    if not 0 <= kill_rank < nproc:
        raise ValueError(f"kill_rank must be one of the {nproc} ranks, got {kill_rank}")
    if latest(checkpoint_dir) is not None:
        raise ValueError(
            f"{checkpoint_dir} already holds a checkpoint: the run would resume from it; use an empty folder"
        )
    flags = [
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.2",
    ]
    command = _torchrun_argv(flags, args, "course_lib.train", nproc=nproc)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = _start(command, env)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline, killed, killed_after = time.monotonic() + timeout, None, None
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if killed is None:
                newest = latest(checkpoint_dir)
                if newest is not None and int(newest.name.split("_")[1]) >= after_step:
                    target = [w for w, r, restart in _workers(proc) if r == kill_rank and restart == 0]
                    if target:
                        killed_after = int(latest(checkpoint_dir).name.split("_")[1])
                        os.kill(target[0].pid, signal.SIGKILL)
                        killed = target[0].pid
            time.sleep(0.01)
        if proc.poll() is None:
            raise TimeoutError
    except BaseException:
        _end(proc)
        reader.join(2)
        raise TorchrunError(
            f"torchrun did not finish within {timeout:g} s and was stopped; last output:\n{''.join(lines[-25:])}",
            None,
            "".join(lines),
        ) from None
    reader.join(5)
    output = "".join(lines)
    if proc.returncode != 0:
        raise TorchrunError(
            f"torchrun failed with exit code {proc.returncode}:\n{output[-3000:]}", proc.returncode, output
        )
    if killed is None:
        raise TorchrunError(
            f"the run ended before a checkpoint of step {after_step} appeared in {checkpoint_dir}: nothing was killed",
            0,
            output,
        )
    return {"output": output, "killed_pid": killed, "killed_after": killed_after}


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use course_lib.train with --checkpoint-dir, or the functions of this module")
