import os
import time

import psutil
import pytest
import torch

from course_lib import checks, launch

# Ranks are processes on a 2-core machine: keep every test's world small.
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: The longest modules (minutes each in CI), started first: `make test` has pytest-xdist hand
#: whole modules to its two workers in collection order (--no-loadscope-reorder), and a long
#: module handed out last would leave the other worker idle until it ends.
LONGEST_FIRST = ("ui/test_lab_second_half.py", "ui/test_lab.py", "test_course.py", "test_grade_attacks.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


def pytest_sessionstart(session):
    """Start the forkserver before any test runs (in each xdist worker, not in the controller).

    Every rank is a copy of the server, which is a fork of the process that started it: started
    now, it holds nothing a test patches later (a patched `dist.all_reduce` stays in its test).
    """
    config = session.config
    if getattr(config, "workerinput", None) is None and config.getoption("numprocesses", None):
        return
    launch.start_forkserver()


def rank_processes():
    """Live processes below this one, except multiprocessing's own helpers
    (the forkserver and the resource tracker live as long as the kernel)."""
    from multiprocessing import forkserver

    me = psutil.Process()
    found = []
    for child in me.children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(child.cmdline())
            # Ours by its pid (forked, it has this process's command line); others' by their command.
            if (
                child.pid == forkserver._forkserver._forkserver_pid
                or "forkserver" in cmd
                or "resource_tracker" in cmd
            ):
                continue
            found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_for_no_ranks(seconds=3.0):
    """Ranks are reaped asynchronously by the forkserver; give it a moment."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        left = rank_processes()
        if not left:
            return []
        time.sleep(0.05)
    return rank_processes()


@pytest.fixture(autouse=True)
def _no_results_file(monkeypatch):
    """Checks judge here (they do not hand answers to a grader), and each test starts with no
    earlier results (a failure would otherwise say "fix 7.2 first" after a test that failed 7.2
    on purpose)."""
    monkeypatch.delenv("COURSE_SUBMIT", raising=False)
    monkeypatch.setattr(checks.registry, "RESULTS", [])


def run_gloo(fn, n, *args):
    """Ranks on the CPU with gloo, also on a machine with GPUs (for tests whose tensors are CPU tensors)."""
    return launch.run(fn, n, *args, backend="gloo")


@pytest.fixture
def no_orphans():
    yield
    left = wait_for_no_ranks()
    assert not left, f"rank processes survived: {[p.pid for p in left]}"


def gpus(n):
    """Skip unless there are ``n`` GPUs: "auto" gives NCCL only with a GPU per rank."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    what = f"{n} CUDA GPU" + ("s" if n > 1 else "")
    return pytest.mark.skipif(have < n, reason=f"needs {what} (instructor mode), found {have}")
