"""Run one function on N ranks, each a real process with a process group.

    from course_lib.launch import run
    results = run(fn, 4, x)          # fn(x) on ranks 0..3, results in rank order

Ranks are forked from a *forkserver* that has torch and course_lib imported
already, so a warm launch costs tens of milliseconds instead of the seconds a
fresh `import torch` takes (on Linux the server is itself a fork of the caller,
see :func:`start_forkserver`, so not even the first launch imports torch again).
The function travels by value (cloudpickle), so one defined in a notebook cell
works. Every rank's output comes back prefixed with ``[rank r]``; a rank that
raises, crashes or waits forever in a collective is turned into a clear error
within seconds, and no child outlives the call.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import io
import linecache
import math
import multiprocessing as mp
import multiprocessing.spawn as mp_spawn
import operator
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any, NoReturn

import cloudpickle
import torch
import torch.distributed as dist

# dist's communication calls and the one way of replacing them live in their own module;
# their names are importable from here too.
from course_lib.dist_calls import (  # noqa: F401
    COLLECTIVE_CALLS,
    POINT_TO_POINT,
    PROCESS_GROUP_METHODS,
    replace_dist_functions,
)

# Pickling an answer by value needs no torch: the grader's kernels of a chapter without torch
# import it from there.
from course_lib.pickling import dumps_by_value  # noqa: F401

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: Seconds a rank may wait inside one collective before it gives up. Short on
#: purpose: in a classroom a deadlock should surface in tens of seconds.
PG_TIMEOUT = float(os.environ.get("COURSE_PG_TIMEOUT", "30"))
#: Set to "1" in the launching process's environment to run every gloo rank as SCHED_BATCH
#: (see :func:`schedule_as_batch`).
SCHED_BATCH_ENV = "COURSE_SCHED_BATCH"
#: Largest world a launch accepts; each rank is a whole process.
MAX_WORLD_SIZE = 64

# Functions whose entry and exit each rank records, so a deadlock report can say where every
# rank is waiting.
TRACED_CALLS = tuple(name for name in (*POINT_TO_POINT, *COLLECTIVE_CALLS, "barrier") if hasattr(dist, name))
_NON_BLOCKING = {TRACED_CALLS.index(name) for name in ("isend", "irecv", "batch_isend_irecv")}
_RUNNING, _RETURNED = -1, -2
SECONDARY_ERRORS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "ECONNRESET",
    "EPIPE",
)


def lost_connection(error_text: str) -> bool:
    """Whether a rank's error only says a peer's connection closed: a consequence, not a cause."""
    return any(s in error_text for s in SECONDARY_ERRORS)


class RankError(RuntimeError):
    """A rank raised or died; ``.rank`` is the rank that failed first."""

    def __init__(self, rank: int, message: str, exc_type: str = "", lost_connection: bool = False):
        super().__init__(message)
        self.rank = rank
        #: Name of the exception the rank raised ("" when it died without one).
        self.exc_type = exc_type
        #: True when the rank only saw a peer's connection close (no rank failed on its own):
        #: a peer left while this one waited, the sign of a mismatched send/recv.
        self.lost_connection = lost_connection


class LaunchTimeout(RankError):
    """Some ranks had not returned when the launch's ``timeout`` ran out."""

    def __init__(self, rank: int, message: str, waiting_ranks: list[int], rank_states: list[str] = ()):
        super().__init__(rank, message, type(self).__name__)
        self.waiting_ranks = waiting_ranks
        #: One line per rank, in rank order: "rank 1: waiting in dist.recv (its communication call #2)".
        self.rank_states = list(rank_states)


class DeadlockError(LaunchTimeout):
    """Some ranks waited in communication that the others never joined."""


# ----------------------------------------------------------------------------
# public helpers


# What "auto" starts on a machine with a GPU per rank: CUDA tensors travel over NCCL, and the
# CPU tensors of the chapters that keep tiny models on the CPU still work, over gloo.
GPU_BACKEND = "cpu:gloo,cuda:nccl"


def choose_backend(backend: str, world_size: int) -> str:
    """Resolve ``"auto"`` to NCCL+gloo (one GPU per rank) or gloo, and validate."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto" and os.environ.get("COURSE_BACKEND"):
        backend = os.environ["COURSE_BACKEND"]  # an instructor's choice for the whole session
        if not _BACKEND_STRING.fullmatch(backend):
            raise ValueError(
                f"COURSE_BACKEND must be 'gloo', 'nccl' or like {GPU_BACKEND!r}, got {backend!r}"
            )
    if backend == "auto":
        return GPU_BACKEND if 0 < world_size <= gpus else "gloo"
    if uses_nccl(backend) and world_size > gpus:
        raise ValueError(
            f"backend {backend!r} needs one GPU per rank: world_size={world_size} but "
            f"{gpus} CUDA device(s) are visible. Use backend='auto' or 'gloo'."
        )
    return backend


_BACKEND_STRING = re.compile(r"(gloo|nccl)|(cpu|cuda):(gloo|nccl)(,(cpu|cuda):(gloo|nccl))*")


def uses_nccl(backend: str) -> bool:
    """Whether a backend string (``"nccl"``, ``"cpu:gloo,cuda:nccl"``, ...) includes NCCL."""
    return "nccl" in backend


def device() -> torch.device:
    """This rank's device: ``cuda:rank`` when NCCL is in the process group, otherwise the CPU."""
    if dist.is_initialized() and uses_nccl(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    backend: str = "auto",
    timeout: float = 120.0,
    debug: bool = False,
    safe_results: bool = False,
    **kwargs,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return their results.

    Each rank is its own process with the default process group initialised
    (``dist.get_rank()``, ``dist.get_world_size()`` work inside ``fn``).
    Returns the list of per-rank return values in rank order; tensors come back
    on the CPU. Raises :class:`RankError` when a rank raises or dies and
    :class:`DeadlockError` when ranks are still waiting in communication after
    ``timeout`` seconds or a collective times out (``PG_TIMEOUT``), and
    :class:`LaunchTimeout` (its base class) when they are merely still running.

    ``debug=True`` sets ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` in the ranks: every
    collective first checks that all ranks called the same operation with the
    same shapes and dtypes, and names the difference. That check is itself
    communication, milliseconds per collective on gloo (chapter 10 measures it),
    so it is off unless you are hunting a bug.

    ``safe_results=True`` brings the results back in a format that cannot carry code
    (``torch.save`` read with ``weights_only=True``: tensors, numbers, strings and their
    containers), so a rank running untrusted code cannot run code here; the grader uses it.
    """
    if not callable(fn):
        raise TypeError(f"run() needs a function to run on every rank, got {type(fn).__name__}")
    world_size = _check_world_size(world_size)
    if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    backend = choose_backend(backend, world_size)
    payload = dumps_by_value((fn, args, kwargs, _source_lines(fn)))
    env = dict(os.environ)
    if debug:
        env["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
    env[_SAFE_RESULTS] = "1" if safe_results else ""
    return _Launch(payload, world_size, backend, float(timeout), env).start()


#: Set in a rank's environment when its result must come back in the safe format.
_SAFE_RESULTS = "COURSE_SAFE_RESULTS"


def _dump_result(value) -> bytes:
    if os.environ.get(_SAFE_RESULTS):
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.getvalue()
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


class _NoGlobals(pickle.Unpickler):
    """Unpickles tuples, strings, bytes and numbers only: a rank's message can carry no code."""

    def find_class(self, module: str, name: str) -> NoReturn:
        raise pickle.UnpicklingError(f"a rank's message may not name {module}.{name}")


# ----------------------------------------------------------------------------
# the parent side


def _check_world_size(world_size) -> int:
    if isinstance(world_size, bool):
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    try:
        n = operator.index(world_size)
    except TypeError:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}") from None
    if n < 1:
        raise ValueError(f"world_size must be at least 1, got {n}")
    if n > MAX_WORLD_SIZE:
        raise ValueError(
            f"world_size={n} is more processes than this course launches (at most {MAX_WORLD_SIZE})"
        )
    return n


def _source_lines(fn) -> dict:
    """The source of the cell that defined ``fn``: a rank has no copy of it."""
    filename = getattr(getattr(fn, "__code__", None), "co_filename", "")
    if not filename or os.path.exists(filename):
        return {}
    return {filename: linecache.getlines(filename)}


_CONTEXT = None


def _context():
    """The forkserver context, its server preloaded with torch and course_lib."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = mp.get_context("forkserver")
        # Preloaded once, shared by every rank forked later. DTensor and dynamo are
        # heavy (~1 s each) and get imported by optimizers, DDP, FSDP and even by
        # cloudpickle's submodule detection once the notebook has imported them.
        ctx.set_forkserver_preload(
            [
                "torch",
                "torch.distributed",
                "torch.distributed.tensor",
                "torch._dynamo",
                "cloudpickle",
                "course_lib.launch",
            ]
        )
        _CONTEXT = ctx
    start_forkserver()
    return _CONTEXT


def start_forkserver() -> None:
    """Start the forkserver now, if it is not running: on Linux a fork of this process.

    A freshly started server would pay ``import torch`` again (~4 s of CPU on a slow
    laptop, in every notebook that launches ranks); a fork of this process has it already.
    Forking is safe here because the server and its ranks use one intra-op thread (a child
    forked after its parent used OpenMP threads hangs only if it uses them too) and CUDA is
    not initialised in this process (checked; otherwise a fresh server, as on other systems).

    The server is a snapshot of this process at the moment it starts, and every rank is a
    copy of it: a process whose ranks must not see what it holds later (the grader, before
    it reads any notebook; a test session, before any test patches anything) calls this first.
    """
    from multiprocessing import forkserver, util

    if _CONTEXT is None:
        _context()  # sets the preload list, then calls this again
        return
    if not sys.platform.startswith("linux") or torch.cuda.is_initialized():
        with _main_module_not_rerun():
            forkserver.ensure_running()
        return
    spawn_fresh = util.spawnv_passfds

    def fork_the_server(path, args, passfds):
        if "multiprocessing.forkserver import main" not in args[-1]:
            return spawn_fresh(path, args, passfds)  # the resource tracker: a fresh Python
        return _fork_server_process(passfds)

    util.spawnv_passfds = fork_the_server
    try:
        forkserver.ensure_running()
    finally:
        util.spawnv_passfds = spawn_fresh


def _fork_server_process(passfds) -> int:
    """Stands in for multiprocessing's spawn of the server: fork, and serve in the child."""
    listener_fd, alive_r = passfds
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _forget_the_parent(keep=passfds)
        from multiprocessing import forkserver

        forkserver._forkserver._lock = threading.Lock()  # held by the parent as it forked
        forkserver.main(listener_fd, alive_r, forkserver._forkserver._preload_modules)
        code = 0
    except SystemExit:  # the server's way of ending once every client is gone
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _forget_the_parent(keep) -> None:
    """In the forked server: drop what belongs to the kernel that forked it.

    What a freshly started Python would not have: the kernel's files and sockets (one of
    them the write end of the server's own "alive" pipe, which must close for the server
    to notice a dead kernel; the others would keep the kernel's pipes and ports open), its
    signal handlers and wake-up fd, its output streams, its thread count and its random state.
    """
    import gc

    gc.collect()  # finalisers that close files run now, before their fd numbers are reused
    gc.freeze()  # and nothing inherited is collected later, in a rank
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        try:
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        except (OSError, ValueError, TypeError):
            pass
    # Not closed but pointed at /dev/null: objects inherited from the kernel still hold these
    # numbers (a logging handler's file, say), and a number closed here would be reused for a
    # rank's pipe, into which they would then write.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
        if fd > 2 and fd not in keep and fd != devnull:
            with contextlib.suppress(OSError):
                os.dup2(devnull, fd)
    os.close(devnull)
    sys.stdout = sys.__stdout__ or open(os.devnull, "w")  # noqa: SIM115
    sys.stderr = sys.__stderr__ or open(os.devnull, "w")  # noqa: SIM115
    sys.excepthook, sys.displayhook = sys.__excepthook__, sys.__displayhook__
    try:
        _forget_ipython()
    except Exception:  # noqa: BLE001 - a server that still knows the kernel beats no server
        traceback.print_exc()
    torch.set_num_threads(1)
    torch.seed()  # the ranks share the server's stream, as before; not the kernel's


def _forget_ipython() -> None:
    """In the forked server: no IPython kernel here, as in a fresh Python.

    A rank that took itself for the kernel (``get_ipython()``, ``ipykernel`` imported) would
    draw notebook widgets, as tqdm.auto does, whose messages the copied kernel cannot send:
    it prints each one whole instead.
    """
    if "IPython" in sys.modules:
        from IPython.core.interactiveshell import InteractiveShell

        if InteractiveShell.initialized():
            type(InteractiveShell.instance()).clear_instance()
    kernelbase = sys.modules.get("ipykernel.kernelbase")
    if kernelbase is not None and kernelbase.Kernel.initialized():
        kernel = kernelbase.Kernel.instance()
        with contextlib.suppress(Exception):  # input() and getpass asked the notebook for a line
            kernel._restore_input()
        type(kernel).clear_instance()
    kernelapp = sys.modules.get("ipykernel.kernelapp")
    if kernelapp is not None and kernelapp.IPKernelApp.initialized():
        type(kernelapp.IPKernelApp.instance()).clear_instance()
    for name in [n for n in sys.modules if n == "ipykernel" or n.startswith("ipykernel.")]:
        del sys.modules[name]  # what tqdm.auto looks for; imported afresh if a rank asks
    if "matplotlib.pyplot" in sys.modules:  # the notebook's inline backend would "show" as text
        pyplot = sys.modules["matplotlib.pyplot"]
        pyplot.close("all")
        pyplot.switch_backend("agg")


@contextlib.contextmanager
def _main_module_not_rerun():
    """Stop multiprocessing from re-running the caller's script in each rank.

    Like spawn, forkserver children re-import ``__main__`` (a whole script, or
    ipykernel) before running. The function already travels by value, so that
    is wasted time at best and a second launch from an unguarded script at worst.
    """
    original = mp_spawn.get_preparation_data

    def without_main(name):
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    mp_spawn.get_preparation_data = without_main
    try:
        yield
    finally:
        mp_spawn.get_preparation_data = original


class _Launch:
    def __init__(self, payload, world_size, backend, timeout, env):
        self.payload, self.n, self.backend, self.timeout = payload, world_size, backend, timeout
        self.env = env
        self.last_lines = [[] for _ in range(world_size)]  # for the report of a rank that died
        # A collective gives up a little before the launch does, so the waiting
        # rank's own traceback (which line it is stuck on) reaches the report.
        self.pg_timeout = min(PG_TIMEOUT, 0.8 * timeout)
        self.procs, self.conns, self.outputs = [], [], []
        self.results = [None] * world_size
        self.returned = [False] * world_size
        self.partial = [""] * world_size

    def start(self) -> list[Any]:
        ctx = _context()
        # The ranks meet in a file of a fresh temporary folder: concurrent
        # launches never collide, and no DNS lookup of a TCP rendezvous can
        # stall (c10d's TCPStore reverse-resolves its peers).
        rendezvous_dir = tempfile.mkdtemp(prefix="course-launch-")
        store_path = os.path.join(rendezvous_dir, "store")
        # Where each rank is: index into TRACED_CALLS, or _RUNNING / _RETURNED; and its call count.
        self.where = ctx.RawArray("q", [_RUNNING] * self.n)
        self.calls = ctx.RawArray("q", [0] * self.n)
        env = self.env
        try:
            with _main_module_not_rerun():
                for rank in range(self.n):
                    parent_end, child_end = ctx.Pipe(duplex=True)
                    # The rank's fds 1 and 2 become this pipe, read here: even the
                    # last words of a rank that aborts in C++ reach the notebook.
                    output_r, output_w = ctx.Pipe(duplex=False)
                    proc = ctx.Process(
                        target=_rank_main,
                        name=f"rank-{rank}",
                        daemon=True,
                        args=(
                            rank,
                            self.n,
                            store_path,
                            self.backend,
                            self.pg_timeout,
                            self.payload,
                            child_end,
                            output_w,
                            self.where,
                            self.calls,
                            env,
                        ),
                    )
                    proc.start()
                    child_end.close()
                    output_w.close()
                    self.procs.append(proc)
                    self.conns.append(parent_end)
                    self.outputs.append(output_r)
            self._collect()
            return self.results
        finally:
            self._flush_partial()
            _reap(self.procs)
            for conn in self.conns + self.outputs:
                conn.close()
            shutil.rmtree(rendezvous_dir, ignore_errors=True)

    def _collect(self):
        deadline = time.monotonic() + self.timeout
        self.open_conns = {conn: rank for rank, conn in enumerate(self.conns)}
        self.open_outputs = {out: rank for rank, out in enumerate(self.outputs)}
        while not all(self.returned):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._deadlock_error(None, f"after the launch timeout of {self.timeout:g} s")
            sentinels = {self.procs[r].sentinel: r for r in range(self.n) if not self.returned[r]}
            ready = wait(
                list(self.open_outputs) + list(self.open_conns) + list(sentinels), timeout=min(remaining, 1.0)
            )
            self._read_ready(ready)
            for obj in ready:
                if obj in sentinels and not self.returned[sentinels[obj]]:
                    rank = sentinels[obj]
                    self._drain(rank)  # its last words: output, or the error it sent
                    self._died(rank)
        # A rank closes its output before it reports "ok"; read what is left.
        while self.open_outputs:
            self._read_ready(wait(list(self.open_outputs), timeout=1.0) or list(self.open_outputs))
        for conn in self.conns:  # everyone returned: let the ranks tear down together
            try:
                conn.send_bytes(b"exit")
            except OSError:
                pass

    def _read_ready(self, ready):
        for obj in ready:
            if obj in self.open_outputs:
                rank = self.open_outputs[obj]
                try:
                    chunk = os.read(obj.fileno(), 65536)
                except OSError:
                    chunk = b""
                if chunk:
                    self._print(rank, chunk.decode("utf-8", errors="replace"))
                else:
                    del self.open_outputs[obj]
            elif obj in self.open_conns:
                rank = self.open_conns[obj]
                msg = self._receive(obj)
                if msg is None:
                    del self.open_conns[obj]
                else:
                    self._handle(rank, msg)

    def _drain(self, rank, wait_s=0.5):
        """Read a dead rank's output and messages up to their end."""
        end = time.monotonic() + wait_s
        pending = [
            c
            for c in (self.outputs[rank], self.conns[rank])
            if c in self.open_outputs or c in self.open_conns
        ]
        while pending and time.monotonic() < end:
            self._read_ready(wait(pending, timeout=max(0.0, end - time.monotonic())))
            pending = [c for c in pending if c in self.open_outputs or c in self.open_conns]

    @staticmethod
    def _receive(conn):
        try:
            return _NoGlobals(io.BytesIO(conn.recv_bytes())).load()
        except (EOFError, OSError):
            return None
        except pickle.UnpicklingError as exc:
            return (
                "error",
                f"the rank sent a message that is not the launcher's: {exc}",
                False,
                "RuntimeError",
            )

    def _handle(self, rank, msg):
        kind = msg[0]
        if kind == "ok":
            try:
                if self.env.get(_SAFE_RESULTS):
                    self.results[rank] = torch.load(io.BytesIO(msg[1]), weights_only=True)
                else:
                    self.results[rank] = pickle.loads(msg[1])
            except Exception as exc:  # e.g. a class the kernel cannot import
                raise RankError(
                    rank, f"rank {rank} returned a value the notebook cannot unpickle: {exc!r}"
                ) from None
            self.returned[rank] = True
            self.where[rank] = _RETURNED
        elif kind == "error":
            self._failed(rank, *msg[1:])

    def _failed(self, rank, tb, timed_out, exc_type):
        """A rank raised: gather what else arrives briefly, report the root cause."""
        errors = {rank: (tb, timed_out, exc_type)}
        end, live = time.monotonic() + 0.3, [c for c in self.conns if c in self.open_conns]
        while live and time.monotonic() < end:
            for conn in wait(live, timeout=max(0.0, end - time.monotonic())):
                r = self.conns.index(conn)
                msg = self._receive(conn)
                if msg is None:
                    live.remove(conn)
                    del self.open_conns[conn]
                elif msg[0] == "error":
                    errors.setdefault(r, tuple(msg[1:]))
        for r in range(self.n):  # a rank that died without a word is the likelier cause
            if r not in errors and not self.returned[r] and not self.procs[r].is_alive():
                self._drain(r)
                if r not in errors:
                    self._died(r)
        secondary = {r for r, (tb, t, _) in errors.items() if not t and lost_connection(tb)}
        timed_out = {r for r, (_, t, _) in errors.items() if t}
        # A rank whose collective timed out leaves, and its peers then see their
        # connection close: still a deadlock, reported as one.
        if timed_out and set(errors) == timed_out | secondary:
            first = min(timed_out)
            raise self._deadlock_error(
                first,
                f"when rank {first}'s collective timed out (PG_TIMEOUT={self.pg_timeout:g} s)",
                errors[first][0],
            )
        primary = [r for r, (tb, t, _) in errors.items() if not t and not lost_connection(tb)]
        first = min(primary or [r for r, (_, t, _) in errors.items() if not t])
        tb, _, exc_type = errors[first]
        tb = tb.rstrip()
        others = sorted(set(errors) - {first})
        note = f"\n(ranks {others} failed after it, most likely because rank {first} left.)" if others else ""
        message = f"rank {first} of {self.n} raised an exception:\n\n{tb}{note}"
        raise RankError(first, message, exc_type, lost_connection=not primary)

    def _died(self, rank):
        code = self.procs[rank].exitcode
        how = (
            f"was killed by signal {signal.Signals(-code).name}"
            if code and code < 0
            else f"exited with code {code}"
        )
        hint = ""
        tail = self.last_lines[rank] + ([self.partial[rank]] if self.partial[rank] else [])
        if tail:
            hint += "\nIts last output:\n" + "\n".join("    " + line for line in tail)
        if code == -signal.SIGABRT:
            hint += (
                "\nAn abort inside a collective usually means the ranks passed tensors "
                "of different dtypes or sizes to the same call; run(..., debug=True) names "
                "the difference."
            )
        raise RankError(rank, f"rank {rank} of {self.n} {how} before returning{hint}")

    def _deadlock_error(self, blamed, when, traceback_text=None):
        waiting = [r for r in range(self.n) if not self.returned[r]]
        lines = []
        for r in range(self.n):
            where, calls = self.where[r], self.calls[r]
            if self.returned[r] or where == _RETURNED:
                state = f"returned after {calls} communication call(s)"
            elif where >= 0:
                state = f"waiting in dist.{TRACED_CALLS[where]} (its communication call #{calls})"
            else:
                state = f"running its own code after {calls} communication call(s)"
            lines.append(f"  rank {r}: {state}")
        done = [r for r in range(self.n) if self.returned[r]]
        in_comm = traceback_text is not None or any(self.where[r] >= 0 for r in waiting)
        summary = f"ranks {waiting} were still {'waiting' if in_comm else 'running'} {when}"
        if done:
            summary += f", while ranks {done} had already returned"
        if in_comm:
            hint = (
                "The likely cause is a mismatched collective: every rank of a group must make "
                "the same communication calls in the same order, and a send needs a matching recv."
            )
        else:
            hint = (
                "None of them was inside a communication call: an endless loop, or more work "
                "than the timeout allows (run(..., timeout=seconds) gives more)."
            )
        msg = f"{summary}.\n" + "\n".join(lines) + "\n" + hint
        if traceback_text:
            msg += f"\n\nWhere rank {blamed} was waiting:\n{traceback_text.rstrip()}"
        error = DeadlockError if in_comm else LaunchTimeout
        states = [line.strip() for line in lines]
        return error(waiting[0] if blamed is None else blamed, msg, waiting, states)

    def _print(self, rank, text):
        text = self.partial[rank] + text
        *lines, self.partial[rank] = text.split("\n")
        for line in lines:
            print(f"[rank {rank}] {line}", flush=True)
        self.last_lines[rank] = (self.last_lines[rank] + lines)[-10:]

    def _flush_partial(self):
        for rank, text in enumerate(self.partial):
            if text:
                print(f"[rank {rank}] {text}", flush=True)
                self.partial[rank] = ""


def _reap(procs, grace: float = 1.0):
    """End every child: SIGTERM, a short grace, then SIGKILL; always join."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


# ----------------------------------------------------------------------------
# the rank side


def _rank_main(rank, world_size, store_path, backend, pg_timeout, payload, conn, output, where, calls, env):
    _die_with_parent()
    os.environ.clear()  # the caller's environment as it is now, not as the forkserver copied it:
    os.environ.update(env)  # a variable unset since then must be unset here too
    dist.set_debug_level_from_env()  # torch read it at import, in the forkserver
    torch.set_num_threads(1)  # N ranks share a laptop's cores; more threads only fight
    send = _Sender(conn)
    output = _CapturedOutput(output)
    _trace_calls(rank, where, calls, on_gpu=uses_nccl(backend))
    global _CALL_COUNTER
    _CALL_COUNTER = (calls, rank)
    try:
        timeout = datetime.timedelta(seconds=pg_timeout)
        store = dist.FileStore(store_path, world_size)
        store.set_timeout(timeout)
        options = {}
        if uses_nccl(backend):
            torch.cuda.set_device(rank)
        if batch_scheduling_requested() and not uses_nccl(backend):
            schedule_as_batch()  # before init_process_group: gloo's threads inherit it
        if backend == "nccl":  # bind the GPU now; beside gloo, NCCL starts at the first GPU call,
            options["device_id"] = torch.device("cuda", rank)  # so CPU-only chapters never pay for it
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **options
        )
        fn, args, kwargs, sources = cloudpickle.loads(payload)
        for filename, lines in sources.items():  # so tracebacks can quote notebook cells
            linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
        result = _dump_result(_to_cpu(fn(*args, **kwargs)))
        output.close()
        send(("ok", result))
        try:  # wait until every rank returned, so nobody leaves a peer mid-talk
            conn.recv_bytes()
        except (EOFError, OSError):
            pass
        if uses_nccl(backend):  # gloo needs no goodbye; its teardown can hang with DDP alive
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        os._exit(0)
    except BaseException as exc:  # noqa: B902 - ship everything, KeyboardInterrupt included
        tb = _user_traceback(exc)
        output.close()
        try:
            send(("error", tb, _is_timeout(exc), type(exc).__name__))
        finally:
            os._exit(1)


def batch_scheduling_requested() -> bool:
    """Whether this process's environment asks for gloo ranks run as SCHED_BATCH (a launch from
    here passes the environment on, so its ranks see the same answer)."""
    return os.environ.get(SCHED_BATCH_ENV) == "1"


def schedule_as_batch() -> bool:
    """Run this thread, and every thread it starts from now on, as Linux's SCHED_BATCH.

    A rank does this before ``init_process_group`` (so gloo's threads inherit it) when the
    launching process has ``COURSE_SCHED_BATCH=1`` in its environment; off by default, since
    it changes every timing the chapters measure. Why it exists (measured, issue 21): gloo's
    I/O thread wakes for every message and, as an ordinary thread, may preempt its own rank's
    Python thread on that core while the Python thread holds the connection's lock inside an
    ``isend`` or ``irecv``. The I/O thread then retries the lock without sleeping until the
    scheduler hands the core back, a millisecond or more, for a message whose round trip
    takes a tenth of that. A SCHED_BATCH thread never preempts on waking: it waits for the
    running thread to block or for the next tick. ``make bench`` (bench_ring) measures with
    and without. Returns whether it applied (False off Linux, or where it is not allowed)."""
    if not hasattr(os, "SCHED_BATCH"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def threads_as_batch() -> Iterator[bool]:
    """Inside a rank: every thread of this process, gloo's I/O threads included, runs as
    SCHED_BATCH for the block (see :func:`schedule_as_batch` for why), and as before after it.

    Chapter 03's all-reduces wait this way (``ring_allreduce._waiting_as_batch``), and its α–β
    fit measures the link the same way: with the default policy a woken gloo thread can preempt
    its rank's Python thread while that holds the connection's lock, and a small message then
    takes a millisecond instead of a tenth of one, more or less often from run to run. Threads
    started inside the block keep SCHED_BATCH.
    Yields whether it applied (False off Linux, or where it is not allowed)."""
    if not hasattr(os, "SCHED_BATCH"):
        yield False
        return
    before, applied = {}, True
    for tid in map(int, os.listdir("/proc/self/task")):
        try:
            policy = os.sched_getscheduler(tid)
            if policy != os.SCHED_BATCH:
                os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
                before[tid] = policy
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        except OSError:  # not allowed here
            applied = False
    try:
        yield applied
    finally:
        for tid, policy in before.items():
            with contextlib.suppress(OSError):
                os.sched_setscheduler(tid, policy, os.sched_param(0))


class _Sender:
    def __init__(self, conn):
        self.conn, self.lock = conn, threading.Lock()

    def __call__(self, msg):
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self.lock:
            self.conn.send_bytes(data)


class _CapturedOutput:
    """Point fds 1 and 2 at the parent's pipe, so C++ messages come along too."""

    def __init__(self, pipe):
        os.dup2(pipe.fileno(), 1)
        os.dup2(pipe.fileno(), 2)
        pipe.close()
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)

    def close(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)


#: (shared per-rank call counts, this rank), set inside a rank by _rank_main.
_CALL_COUNTER = None


def count_calls_from_here() -> None:
    """Inside a rank: number the communication calls from 1 again, so a deadlock report counts
    the learner's calls (a check's own set-up calls before them are not the learner's)."""
    if _CALL_COUNTER is not None:
        calls, rank = _CALL_COUNTER
        calls[rank] = 0


def _trace_calls(rank, where, calls, on_gpu=False):
    """Wrap torch.distributed's calls in this rank so a deadlock can be located.

    ``on_gpu``: NCCL only queues a collective on the GPU and returns at once, so a skipped
    collective would hang later, far from the call (in ``.item()``). There a blocking call
    also waits for its GPU work, as it does on gloo: a hang then stays inside the call.
    """
    depth = [0]  # calls made inside a traced call (recv uses irecv) are not counted again

    for index, name in enumerate(TRACED_CALLS):
        original = getattr(dist, name, None)
        if original is None:
            continue

        @functools.wraps(original)
        def traced(*args, _original=original, _index=index, **kwargs):
            if depth[0]:
                return _original(*args, **kwargs)
            calls[rank] += 1
            where[rank] = _index
            depth[0] += 1
            try:
                result = _original(*args, **kwargs)
                if on_gpu and _index not in _NON_BLOCKING and not kwargs.get("async_op"):
                    torch.cuda.current_stream().synchronize()
            finally:
                depth[0] -= 1
            where[rank] = _RUNNING  # on an error `where` keeps the call
            return result

        replace_dist_functions({name: traced})


def _die_with_parent():
    """Ask Linux to kill this rank when its parent, the forkserver, dies.

    The forkserver exits when the kernel that started it dies, but only once no
    process holds its "alive" pipe, and each forked child inherits a copy of
    that pipe: close ours, or a killed kernel would leave its ranks running.
    """
    from multiprocessing import forkserver

    alive_fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        try:
            os.close(alive_fd)
        except OSError:
            pass
        forkserver._forkserver._forkserver_alive_fd = None
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _user_traceback(exc: BaseException) -> str:
    """The traceback without this module's or torch's frames: the learner's code."""
    hidden = (os.path.abspath(__file__), os.path.dirname(torch.__file__) + os.sep)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not os.path.abspath(f.filename).startswith(hidden)
    ]
    lines = ["Traceback (most recent call last):\n"] if frames else []
    lines += traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
    return explain_mismatch("".join(lines))


_FINGERPRINT = re.compile(
    r"Rank (\d+) is running collective: CollectiveFingerPrint\(SequenceNumber=(\d+), "
    r"OpType=(\w+), TensorShape=\[([^\]]*)\], TensorDtypes=(\w+)"
)


def explain_mismatch(text: str) -> str:
    """Reword torch's TORCH_DISTRIBUTED_DEBUG=DETAIL mismatch report (one long line ending in
    "Tensor Tensor shapes: 4vs 2") as one line per rank saying what each called."""
    head = "Detected mismatch between collectives on ranks."
    start = text.find(head)
    if start < 0:
        return text
    end = text.find("\n", start)
    report = text[start:] if end < 0 else text[start:end]
    calls = _FINGERPRINT.findall(report)
    if len(calls) < 2:
        return text
    lines = [
        "The ranks made different communication calls at the same point "
        "(TORCH_DISTRIBUTED_DEBUG=DETAIL compares them):"
    ]
    for rank, seq, op, shape, dtype in calls:
        shape = f"[{shape}]" if shape else "[] (no tensor)"
        lines.append(
            f"  rank {rank}: {op.lower()} of a {dtype.lower()} tensor of shape {shape}, "
            f"its collective number {int(seq) + 1}"
        )
    diff = report.split("differ in the following aspects:", 1)[-1].strip()
    if diff and diff != report:
        diff = re.sub(r"\bTensor Tensor\b", "tensor", diff)
        diff = re.sub(r"(\S)vs\s", r"\1 vs ", diff)
        lines.append(f"They differ in: {' '.join(diff.split())}.")
    return text[:start] + "\n".join(lines) + ("" if end < 0 else text[end:])


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc)
    return (
        isinstance(exc, (TimeoutError, dist.DistStoreError))
        or "Timed out" in text
        or "timed out" in text
        or "Timeout" in text
    )


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_to_cpu(x) for x in obj)
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj
