"""Run ``torchrun`` from a notebook, and raise when it fails.

    from course_lib.torchrun import run_torchrun
    run_torchrun("dp", nproc=2)                       # torchrun ... -m course_lib.demo dp
    run_torchrun(["3d", "--grid", "1,2,2"], nproc=4)
    run_torchrun(["train.py", "--lr", "0.1"], nproc=2, module=None)   # a script

A bare ``!torchrun ...`` cell in Jupyter prints the failure and then carries
on as if nothing happened (the shell's exit code is dropped), so the next cells
run on a broken result. This helper streams torchrun's output into the cell
and raises :class:`TorchrunError` with the exit code and the last lines when
any rank fails or the run takes longer than ``timeout``.

It uses ``--standalone`` (one machine; the rendezvous picks a free port, so two
notebooks can run at once) and sets OMP_NUM_THREADS=1 for the ranks.

Several "nodes" on this machine (chapter 10):

    from course_lib.torchrun import run_nodes
    run = run_nodes(nnodes=2, nproc_per_node=2)       # two torchruns, one rendezvous on loopback
    run.report["ranks"]                               # what every rank saw: RANK, LOCAL_RANK, GROUP_RANK, ...

:func:`run_nodes` starts one torchrun per node, as you would on separate machines
(``--nnodes 2 --node_rank i --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT``),
streams their output prefixed ``[node i]``, and raises :class:`TorchrunError` as
soon as one node fails, or when the whole run exceeds ``timeout``; either way
every torchrun and every rank it started is ended first. Its default program is
this module itself: ``python -m course_lib.torchrun`` run by every rank reports
what that rank sees (its environment, the GPU ``LOCAL_RANK`` selects), checks
global batch = micro batch × accumulation steps × data-parallel ranks with real
gradients, times all-reduces across the nodes, and runs a course strategy.

:func:`placement` and :func:`accumulation_steps` are the arithmetic behind it
(and the references of exercises 10.5 and 10.6).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil

#: Lines of output an error message quotes.
TAIL_LINES = 25


class TorchrunError(RuntimeError):
    """torchrun exited non-zero (``returncode``) or ran out of time (``returncode`` None)."""

    def __init__(self, message: str, returncode: int | None, output: str):
        super().__init__(message)
        self.returncode, self.output = returncode, output


def _torchrun_argv(launcher_flags: list[str], args, module: str | None, **counts) -> list[str]:
    """``python -m torch.distributed.run FLAGS [-m MODULE] ARGS``, each of ``counts`` checked to be
    a positive integer first (``args``: a string split on spaces, or a list)."""
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    args = args.split() if isinstance(args, str) else [str(a) for a in args]
    target = ["-m", module] if module else []
    return [sys.executable, "-m", "torch.distributed.run", *launcher_flags, *target, *args]


def _start(command: list[str], env: dict) -> subprocess.Popen:
    """torchrun with its output on one text pipe, in a session of its own (so a timeout can end it
    and every rank it started, and nothing else)."""
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=env,
        start_new_session=True,
    )


def torchrun_command(
    args: str | Sequence[str], nproc: int = 2, module: str | None = "course_lib.demo"
) -> list[str]:
    """The command line ``run_torchrun`` starts (``python -m torch.distributed.run ...``)."""
    return _torchrun_argv(["--standalone", f"--nproc-per-node={nproc}"], args, module, nproc=nproc)


def run_torchrun(
    args: str | Sequence[str],
    nproc: int = 2,
    timeout: float = 120.0,
    module: str | None = "course_lib.demo",
    echo: bool = True,
    env: dict | None = None,
) -> str:
    """Run ``torchrun --standalone --nproc-per-node=nproc -m module *args``; return its output.

    ``args`` is a string (split on spaces) or a list. Output is printed as it
    arrives when ``echo``. Raises :class:`TorchrunError` on a non-zero exit or
    after ``timeout`` seconds (the whole process group is ended first).
    """
    command = torchrun_command(args, nproc, module)
    child_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    # Its own session, so a timeout can end torchrun and every rank it started, and nothing else.
    proc = _start(command, child_env)
    lines = []

    def pump():  # a thread, so the timeout below holds even while no line arrives
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=timeout)
    except BaseException:  # a timeout, or the notebook's Stop button
        _end(proc)
        reader.join(2)
        output = "".join(lines)
        raise TorchrunError(
            f"torchrun did not finish within {timeout:g} s and was stopped; last output:\n{_tail(output)}",
            None,
            output,
        ) from None
    reader.join()
    output = "".join(lines)
    if returncode != 0:
        raise TorchrunError(
            f"torchrun failed with exit code {returncode}: {' '.join(command[3:])}\n{_summary(output)}",
            returncode,
            output,
        )
    return output


def _end(proc) -> None:
    """SIGTERM to torchrun's process group (it forwards to the ranks), then SIGKILL.

    torchrun starts every rank in a session of its own, out of reach of a signal to
    torchrun's group: the ranks it has not stopped by the time it is gone are killed here.
    """
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=3)


def _summary(output: str) -> str:
    """What the ranks said about the failure, without torchrun's long report after it."""
    own = [
        ln
        for ln in output.splitlines()
        if ln.startswith(("course_lib.demo:", "demo "))
        or "Error" in ln
        and not ln.startswith(("torch.distributed.elastic", "  "))
    ]
    return "\n".join(own[-TAIL_LINES:]) if own else _tail(output)


def _tail(output: str) -> str:
    return "\n".join(output.rstrip().splitlines()[-TAIL_LINES:])


# ----------------------------------------------------------------------------
# the arithmetic of a multi-node launch


def placement(
    rank: int, nproc_per_node: Sequence[int], cuda_visible_devices: Sequence[str | None] | None = None
) -> tuple[int, int, int]:
    """Where global rank ``rank`` of a torchrun job runs: ``(node, local_rank, gpu)``.

    ``nproc_per_node`` lists the processes of every node in node order (GROUP_RANK
    0, 1, ...), e.g. ``[2, 2]``; torchrun numbers the ranks node after node, so node
    g's ranks start at the sum of the nodes before it. ``cuda_visible_devices`` is
    None (every GPU of every node visible) or one CUDA_VISIBLE_DEVICES string per
    node (None for a node that does not set it; ``""`` hides every GPU). ``gpu`` is
    the physical GPU that ``torch.cuda.set_device(LOCAL_RANK)`` selects: entry
    LOCAL_RANK of that node's list, or LOCAL_RANK itself when it has none.
    Raises ValueError for a rank that does not exist or a local rank without a GPU.
    """
    counts = [int(c) for c in nproc_per_node]
    if not 0 <= rank < sum(counts):
        raise ValueError(
            f"rank {rank} does not exist: {' + '.join(map(str, counts))} = {sum(counts)} "
            f"processes have ranks 0 ... {sum(counts) - 1}"
        )
    node, first = 0, 0
    while rank >= first + counts[node]:  # ranks are numbered node after node
        first += counts[node]
        node += 1
    local_rank = rank - first
    visible = None if cuda_visible_devices is None else cuda_visible_devices[node]
    if visible is None:
        return node, local_rank, local_rank
    listed = [int(d) for d in visible.split(",") if d.strip()]
    if local_rank >= len(listed):
        raise ValueError(
            f"rank {rank} is local rank {local_rank} on node {node}, but that node's "
            f"CUDA_VISIBLE_DEVICES={visible!r} shows {len(listed)} GPU(s): cuda:{local_rank} "
            f"does not exist there"
        )
    return node, local_rank, listed[local_rank]


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int, tp: int = 1, pp: int = 1) -> int:
    """M in global batch = micro batch × M × data-parallel ranks (DeepSpeed's train_batch_size rule).

    Only world_size / (tp·pp) ranks are data-parallel replicas: the TP and PP
    ranks of one replica work on the same samples. Raises ValueError when the
    numbers do not fit (no rounding: a silently different batch changes training).
    """
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not a multiple of tp·pp = {tp}·{pp} = {tp * pp}")
    dp = world_size // (tp * pp)
    per_step = micro_batch * dp
    if global_batch % per_step or global_batch < per_step:
        lower, higher = global_batch // per_step * per_step, (global_batch // per_step + 1) * per_step
        nearest = f"{lower} or {higher}" if lower else f"{higher}"
        raise ValueError(
            f"global batch {global_batch} is not a multiple of micro batch × data-parallel "
            f"ranks = {micro_batch} × {dp} = {per_step}; choose a global batch of {nearest}"
        )
    return global_batch // per_step


# ----------------------------------------------------------------------------
# several nodes on this machine


#: What a rank of the two-node demo reads from torchrun (NODE_RANK is not among what torchrun sets).
ENV_NAMES = (
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "NODE_RANK",
    "LOCAL_WORLD_SIZE",
    "WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CUDA_VISIBLE_DEVICES",
)
REPORT_PREFIX = "course_lib.torchrun report: "
NODE_RANK_IGNORED = "node_rank is only used for static rdzv_backend"  # torchrun's own warning


@dataclass
class NodesRun:
    """What :func:`run_nodes` returns: each node's output, and the report of this module's worker."""

    outputs: list  # node i's torchrun output (its ranks' output included)
    seconds: float  # wall time of the whole run
    report: dict | None  # parsed from rank 0's report line; None for other programs
    endpoint: str = ""  # the rendezvous, HOST:PORT

    def output(self) -> str:
        return "".join(
            f"[node {i}] {line}\n" for i, out in enumerate(self.outputs) for line in out.splitlines()
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (another program could still take it before we do)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def nodes_command(
    node_rank: int,
    nnodes: int = 2,
    nproc_per_node: int = 2,
    endpoint: str = "127.0.0.1:29500",
    args: str | Sequence[str] = (),
    module: str | None = "course_lib.torchrun",
    run_id: str = "course",
    join_timeout: float = 60,
) -> list[str]:
    """The command line of node ``node_rank``: what you would type on that machine."""
    flags = [
        "--nnodes",
        str(nnodes),
        "--node_rank",
        str(node_rank),
        "--nproc_per_node",
        str(nproc_per_node),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        endpoint,
        "--rdzv_id",
        run_id,
        "--rdzv_conf",
        f"join_timeout={max(1, int(join_timeout))}",
        "--max_restarts",
        "0",
    ]
    return _torchrun_argv(flags, args, module, nnodes=nnodes, nproc_per_node=nproc_per_node)


def run_nodes(
    args: str | Sequence[str] = (),
    nnodes: int = 2,
    nproc_per_node: int = 2,
    timeout: float = 180.0,
    module: str | None = "course_lib.torchrun",
    echo: bool = True,
    env: dict | None = None,
    node_env: list | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
) -> NodesRun:
    """Start ``nnodes`` torchruns on this machine that meet at one c10d rendezvous on ``host``.

    Node i runs :func:`nodes_command` (i) with ``env`` and ``node_env[i]`` added to its
    environment. Output is printed as it arrives (``[node i]`` before each line) when
    ``echo``. Raises :class:`TorchrunError` naming the node when one exits non-zero,
    or when the run takes longer than ``timeout`` seconds; in both cases every node
    and every rank it started is ended first, so nothing waits forever.
    """
    port = free_port(host) if port is None else port
    run_id = f"course-{uuid.uuid4().hex[:8]}"
    node_env = list(node_env or [{}] * nnodes)
    if len(node_env) != nnodes:
        raise ValueError(f"node_env needs one dict per node ({nnodes}), got {len(node_env)}")
    commands = [
        nodes_command(i, nnodes, nproc_per_node, f"{host}:{port}", args, module, run_id, timeout)
        for i in range(nnodes)
    ]
    base = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    procs, lines, readers = [], [[] for _ in range(nnodes)], []
    start = time.perf_counter()

    def pump(i, proc):
        for line in proc.stdout:
            lines[i].append(line)
            if echo:
                print(f"[node {i}] {line}", end="", flush=True)

    def end_all():
        for proc in procs:
            _end(proc)
        for reader in readers:
            reader.join(2)

    def outputs():
        return ["".join(node_lines) for node_lines in lines]

    try:
        for i, command in enumerate(commands):
            proc = _start(command, dict(base, **node_env[i]))
            procs.append(proc)
            readers.append(threading.Thread(target=pump, args=(i, proc), daemon=True))
            readers[-1].start()
        while True:
            codes = [proc.poll() for proc in procs]
            if any(code not in (None, 0) for code in codes):
                # The ranks of the other nodes usually fail a moment later (their peer left):
                # let them say so, then blame the rank whose error is not such a consequence.
                grace = time.perf_counter() + FAILURE_GRACE_S
                while any(proc.poll() is None for proc in procs) and time.perf_counter() < grace:
                    time.sleep(0.05)
                codes = [proc.poll() for proc in procs]
                end_all()
                out = outputs()
                raise TorchrunError(
                    _nodes_failure(codes, out, commands),
                    next(c for c in codes if c),
                    NodesRun(out, 0, None).output(),
                )
            if all(code == 0 for code in codes):
                break
            if time.perf_counter() - start > timeout:
                end_all()
                output = NodesRun(outputs(), 0, None).output()
                raise TorchrunError(
                    f"the {nnodes} nodes did not finish within {timeout:g} s and were stopped "
                    f"(a node that never joined the rendezvous, or ranks waiting for each "
                    f"other); last output:\n{_tail(output)}",
                    None,
                    output,
                )
            time.sleep(0.05)
    except BaseException:
        end_all()  # a TorchrunError above, the notebook's Stop button, or a failed start
        raise
    for reader in readers:
        reader.join()
    out = outputs()
    return NodesRun(out, time.perf_counter() - start, _report(out[0]), f"{host}:{port}")


#: After one node fails, how long the others get to fail (or finish) on their own.
FAILURE_GRACE_S = 3.0
_RANK_ERROR = re.compile(r"^\[rank(\d+)\]: (\w+(?:Error|Exception|Interrupt)\b.*)$")


def _nodes_failure(codes, outputs, commands) -> str:
    """Which node failed, and which rank's error is the cause rather than a consequence."""
    from course_lib.launch import lost_connection

    states = ", ".join(
        f"node {i} " + ("still running (stopped)" if c is None else f"exit code {c}")
        for i, c in enumerate(codes)
    )
    errors = [
        (int(m[1]), node, m[2])
        for node, out in enumerate(outputs)
        for line in out.splitlines()
        if (m := _RANK_ERROR.match(line))
    ]
    causes = [e for e in errors if not lost_connection(e[2])]
    if causes:
        rank, node, text = causes[0]
        others = sorted({r for r, _, _ in errors} - {rank})
        after = f"; ranks {others} failed after it (their peer left)" if others else ""
        head = f"rank {rank} on node {node} raised {text}{after}"
    else:
        # Any node may host the rendezvous store: when it ends, the others fail too (exit 1,
        # "connection closed"). Blame a node whose torchrun names a failed rank if there is one.
        failed = [i for i, c in enumerate(codes) if c]
        facts_of = {i: _root_cause(outputs[i]) for i in failed}
        node = next((i for i in failed if facts_of[i]), failed[0])
        facts = facts_of[node]
        detail = (
            ("torchrun's root cause: " + "; ".join(" ".join(f.split()) for f in facts))
            if facts
            else _summary(outputs[node])
        )
        head = f"node {node} failed ({' '.join(commands[node][3:])})\n{detail}"
    return f"the {len(codes)}-node run failed: {states}.\n{head}"


def _root_cause(output: str) -> list[str]:
    """The rank and exit code lines of torchrun's "Root Cause" summary, if it printed one."""
    lines = output.splitlines()
    root = next((i for i, ln in enumerate(lines) if ln.startswith("Root Cause")), None)
    if root is None:
        return []
    return [ln.strip() for ln in lines[root : root + 8] if ln.strip().startswith(("rank", "exitcode"))]


def _report(output: str) -> dict | None:
    found = [ln[len(REPORT_PREFIX) :] for ln in output.splitlines() if ln.startswith(REPORT_PREFIX)]
    return json.loads(found[-1]) if found else None


# ----------------------------------------------------------------------------
# what every rank of the two-node demo runs: python -m course_lib.torchrun


def rank_view(environ: Mapping[str, str] | None = None) -> dict:
    """This rank's torchrun variables (None where unset) and the GPU LOCAL_RANK selects."""
    import torch

    environ = os.environ if environ is None else environ
    view = {name: environ.get(name) for name in ENV_NAMES}
    local_rank = int(view["LOCAL_RANK"] or 0)
    visible = view["CUDA_VISIBLE_DEVICES"]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        gpu = placement(local_rank, [local_rank + 1], None if visible is None else [visible])[2]
    except ValueError:
        gpu = None  # this node lists fewer GPUs than it runs ranks
    view.update(
        pid=os.getpid(),
        host=socket.gethostname(),
        gpus_here=gpus,
        physical_gpu=gpu,
        device=f"cuda:{local_rank}",
        set_device=False,
    )
    if local_rank < gpus:  # a GPU machine: really select it
        torch.cuda.set_device(local_rank)
        view.update(set_device=True, device=f"cuda:{torch.cuda.current_device()}")
    return view


def check_global_batch(global_batch: int, micro_batch: int, d_model: int = 8, seed: int = 0) -> dict:
    """Inside a process group: one data-parallel step with gradient accumulation, against one process.

    M = accumulation_steps(B, b, N); rank r takes its B/N samples in M micro-batches of b
    (each loss divided by M), the ranks average their gradients, and the result must equal
    the gradient of the mean loss over all B samples computed by one process.
    """
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from course_lib import dp
    from course_lib.models import make_mlp, regression_data, shard

    rank, n = dist.get_rank(), dist.get_world_size()
    m = accumulation_steps(global_batch, micro_batch, n)
    x, y = regression_data(global_batch, d_model, seed=seed + 1)
    model = make_mlp(d_model, 2 * d_model, seed)
    mine_x, mine_y = shard(x, rank, n), shard(y, rank, n)
    seen = 0
    for i in range(m):
        xb, yb = shard(mine_x, i, m), shard(mine_y, i, m)
        (F.mse_loss(model(xb), yb) / m).backward()
        seen += len(xb)
    dp.average_gradients_allreduce(model)
    total = torch.tensor([seen])
    dist.all_reduce(total)
    reference = make_mlp(d_model, 2 * d_model, seed)
    F.mse_loss(reference(x), y).backward()
    diff = max(
        (p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters())
    )
    worst = torch.tensor([diff], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {
        "global_batch": global_batch,
        "micro_batch": micro_batch,
        "accumulation_steps": m,
        "dp_ranks": n,
        "samples_seen": int(total),
        "max_grad_diff": float(worst),
    }


def time_pair_all_reduce(
    sizes: Sequence[int], pair: Sequence[int], min_seconds: float = 0.05, batches: int = 5
) -> dict:
    """Inside a process group: time the course's ring all-reduce between the two ranks of ``pair``.

    Every rank must call it (creating the pair's group is collective); the others wait
    at a barrier meanwhile. Per size: the median over ``batches`` batches of the mean
    time per call, each batch's time being the slower rank's. Rank 0 gets the result.
    """
    import statistics

    import torch
    import torch.distributed as dist

    from course_lib import comm

    group = dist.new_group(list(pair))
    seconds, fastest = [], []
    if dist.get_rank() in pair:
        for nbytes in sizes:
            t = torch.zeros(max(2, nbytes // 4 // 2 * 2))  # float32, even: two equal chunks
            comm.ring_all_reduce(t, group)  # the first call sets up the connection
            start = time.perf_counter()
            comm.ring_all_reduce(t, group)
            once = torch.tensor([max(time.perf_counter() - start, 1e-6)], dtype=torch.float64)
            dist.all_reduce(once, op=dist.ReduceOp.MAX, group=group)  # both must make as many calls
            iters = max(1, min(200, int(min_seconds / batches / float(once))))
            means = []
            for _ in range(batches):
                dist.barrier(group)
                start = time.perf_counter()
                for _ in range(iters):
                    comm.ring_all_reduce(t, group)
                means.append((time.perf_counter() - start) / iters)
            slower = torch.tensor(means, dtype=torch.float64)
            dist.all_reduce(slower, op=dist.ReduceOp.MAX, group=group)
            seconds.append(statistics.median(slower.tolist()))
            fastest.append(min(slower.tolist()))
    dist.barrier()
    return {"nbytes": [max(2, s // 4 // 2 * 2) * 4 for s in sizes], "seconds": seconds, "fastest": fastest}


def _worker(argv=None) -> int:
    """Every rank: report what it sees, check the batch identity, time all-reduces, run a strategy."""
    parser = argparse.ArgumentParser(prog="torchrun ... -m course_lib.torchrun")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--sizes", default="4096,1048576,4194304", help="all-reduce sizes in bytes")
    parser.add_argument("--strategies", default="dp", help="course_lib.demo strategies to run, or ''")
    parser.add_argument(
        "--fail-rank", type=int, default=-1, help="this global rank raises (to see a failure)"
    )
    opts = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from course_lib import demo

    torch.set_num_threads(1)
    view = rank_view()  # before init_process_group: it selects the GPU, as a GPU script would
    dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from torchrun
    rank = dist.get_rank()
    try:
        print(
            f"RANK={view['RANK']} LOCAL_RANK={view['LOCAL_RANK']} GROUP_RANK={view['GROUP_RANK']} "
            f"NODE_RANK={view['NODE_RANK']} CUDA_VISIBLE_DEVICES={view['CUDA_VISIBLE_DEVICES']} -> "
            f"set_device({view['LOCAL_RANK']}) = {view['device']} = physical GPU {view['physical_gpu']}"
            f"{'' if view['set_device'] else ' (no such GPU here: not called)'}",
            flush=True,
        )
        if rank == opts.fail_rank:
            raise RuntimeError(f"rank {rank} fails on purpose (--fail-rank)")
        views = [None] * dist.get_world_size()
        dist.all_gather_object(views, view)
        batch = check_global_batch(opts.global_batch, opts.micro_batch)
        # rank 0 and the first rank of another node: an all-reduce that crosses the node boundary
        others = [int(v["RANK"]) for v in views if v["GROUP_RANK"] != views[0]["GROUP_RANK"]]
        pair = [0, min(others) if others else 1]
        sizes = [int(s) for s in opts.sizes.split(",") if s] if dist.get_world_size() > 1 else []
        timing = time_pair_all_reduce(sizes, pair)
        strategies = [s for s in opts.strategies.split(",") if s]
        ok = all(demo.run_strategy(s, demo.parse([s]), "gloo", torch.device("cpu")) for s in strategies)
        if rank == 0:
            report = {"ranks": views, "batch": batch, "all_reduce": timing, "pair": pair, "strategies_ok": ok}
            print(REPORT_PREFIX + json.dumps(report), flush=True)
        return 0 if ok and batch["max_grad_diff"] <= 1e-5 else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(_worker())
