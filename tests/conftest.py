import os
import time

import psutil
import pytest
import torch

# Ranks are processes on a 2-core machine: keep every test's world small.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def rank_processes():
    """Live processes below this one, except multiprocessing's own helpers
    (the forkserver and the resource tracker live as long as the kernel)."""
    me = psutil.Process()
    found = []
    for child in me.children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(child.cmdline())
            if "forkserver" in cmd or "resource_tracker" in cmd:
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


@pytest.fixture
def no_orphans():
    yield
    left = wait_for_no_ranks()
    assert not left, f"rank processes survived: {[p.pid for p in left]}"


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs (instructor mode)")
