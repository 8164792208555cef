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
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

#: Lines of output an error message quotes.
TAIL_LINES = 25


class TorchrunError(RuntimeError):
    """torchrun exited non-zero (``returncode``) or ran out of time (``returncode`` None)."""

    def __init__(self, message: str, returncode: int | None, output: str):
        super().__init__(message)
        self.returncode, self.output = returncode, output


def torchrun_command(args, nproc: int = 2, module: str | None = "course_lib.demo") -> list[str]:
    """The command line ``run_torchrun`` starts (``python -m torch.distributed.run ...``)."""
    args = args.split() if isinstance(args, str) else [str(a) for a in args]
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    target = ["-m", module] if module else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *target, *args]


def run_torchrun(args, nproc: int = 2, timeout: float = 120.0, module: str | None = "course_lib.demo",
                 echo: bool = True, env: dict | None = None) -> str:
    """Run ``torchrun --standalone --nproc-per-node=nproc -m module *args``; return its output.

    ``args`` is a string (split on spaces) or a list. Output is printed as it
    arrives when ``echo``. Raises :class:`TorchrunError` on a non-zero exit or
    after ``timeout`` seconds (the whole process group is ended first).
    """
    command = torchrun_command(args, nproc, module)
    child_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    # Its own session, so a timeout can end torchrun and every rank it started, and nothing else.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env=child_env, start_new_session=True)
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
        raise TorchrunError(f"torchrun did not finish within {timeout:g} s and was stopped; "
                            f"last output:\n{_tail(output)}", None, output) from None
    reader.join()
    output = "".join(lines)
    if returncode != 0:
        raise TorchrunError(f"torchrun failed with exit code {returncode}: {' '.join(command[3:])}\n"
                            f"{_summary(output)}", returncode, output)
    return output


def _end(proc) -> None:
    """SIGTERM to torchrun's process group (it forwards to the ranks), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _summary(output: str) -> str:
    """What the ranks said about the failure, without torchrun's long report after it."""
    own = [ln for ln in output.splitlines() if ln.startswith(("course_lib.demo:", "demo "))
           or "Error" in ln and not ln.startswith(("torch.distributed.elastic", "  "))]
    return "\n".join(own[-TAIL_LINES:]) if own else _tail(output)


def _tail(output: str) -> str:
    return "\n".join(output.rstrip().splitlines()[-TAIL_LINES:])
