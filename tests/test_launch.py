"""The launcher: results, output, errors, deadlocks, interrupts and orphans."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch
import torch.distributed as dist
from conftest import wait_for_no_ranks

from course_lib import comm, launch
from course_lib.launch import DeadlockError, LaunchTimeout, RankError, run

pytestmark = pytest.mark.usefixtures("no_orphans")


def rank_info(scale, offset=0.0):
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "sum": t * scale + offset,
        "backend": dist.get_backend(),
    }


def test_results_in_rank_order_with_args_and_kwargs():
    results = run(rank_info, 4, 2.0, offset=1.0)
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert all(r["world"] == 4 for r in results)
    assert all(r["backend"] == launch.choose_backend("auto", 4) for r in results)
    for r in results:
        assert torch.equal(r["sum"], torch.tensor([(0 + 1 + 2 + 3) * 2.0 + 1.0]))
        assert r["sum"].device.type == "cpu"


def test_one_rank_and_a_lambda():
    assert run(lambda: dist.get_world_size() * 10, 1) == [10]


def test_function_closing_over_local_state_travels_by_value():
    secret = torch.arange(3)

    def uses_closure():
        return secret * (dist.get_rank() + 1)

    out = run(uses_closure, 2)
    assert torch.equal(out[1], torch.tensor([0, 2, 4]))


def test_printed_output_is_prefixed_with_the_rank(capsys):
    def talk():
        print(f"hello from {dist.get_rank()}")
        print("no newline at the end", end="")
        os.write(2, b"raw C-level write\n")

    run(talk, 2)
    out = capsys.readouterr().out
    for r in range(2):
        assert f"[rank {r}] hello from {r}" in out
        assert f"[rank {r}] no newline at the end" in out
        assert f"[rank {r}] raw C-level write" in out


@pytest.mark.parametrize("bad", [0, -1, 2.5, "2", True, None])
def test_bad_world_size_is_a_value_error(bad):
    with pytest.raises(ValueError, match="world_size"):
        run(rank_info, bad, 1.0)


def test_bad_backend_and_timeout_are_value_errors():
    with pytest.raises(ValueError, match="backend"):
        run(rank_info, 2, 1.0, backend="mpi")
    with pytest.raises(ValueError, match="timeout"):
        run(rank_info, 2, 1.0, timeout=0)
    with pytest.raises(TypeError, match="function"):
        run("not a function", 2)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() >= 64, reason="has GPUs")
def test_nccl_with_too_few_gpus_says_so():
    with pytest.raises(ValueError, match="one GPU per rank"):
        run(rank_info, 64, 1.0, backend="nccl")


def test_auto_backend_without_enough_gpus_is_gloo():
    many = torch.cuda.device_count() + 1
    assert launch.choose_backend("auto", many) == "gloo"


@pytest.fixture
def four_gpus(monkeypatch):
    """What choose_backend sees on a machine with 4 GPUs (it only counts them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("COURSE_BACKEND", raising=False)


def test_auto_backend_with_a_gpu_per_rank_puts_nccl_beside_gloo(four_gpus):
    assert launch.choose_backend("auto", 4) == "cpu:gloo,cuda:nccl"
    assert launch.choose_backend("auto", 5) == "gloo"  # two ranks may not share a GPU
    assert launch.choose_backend("gloo", 4) == "gloo"
    assert launch.choose_backend("nccl", 4) == "nccl"
    with pytest.raises(ValueError, match="one GPU per rank: world_size=5 but 4"):
        launch.choose_backend("nccl", 5)


def test_course_backend_overrides_auto_only(four_gpus, monkeypatch):
    monkeypatch.setenv("COURSE_BACKEND", "gloo")
    assert launch.choose_backend("auto", 4) == "gloo"
    monkeypatch.setenv("COURSE_BACKEND", "nccl")
    assert launch.choose_backend("gloo", 2) == "gloo"  # an explicit backend= wins
    with pytest.raises(ValueError, match="one GPU per rank"):
        launch.choose_backend("auto", 8)
    monkeypatch.setenv("COURSE_BACKEND", "mpi")
    with pytest.raises(ValueError, match="COURSE_BACKEND must be"):
        launch.choose_backend("auto", 2)


def chapter_style_work():
    t = torch.ones(1000) * dist.get_rank()
    with comm.count_traffic() as traffic:
        dist.all_reduce(t)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))
    model(torch.ones(2, 3)).sum().backward()
    return dist.get_backend(), launch.device(), t, traffic.received, model.module.weight.grad


def test_a_group_with_a_backend_per_device_type_runs_cpu_chapters(monkeypatch):
    # On GPUs "auto" starts cpu:gloo,cuda:nccl. Here gloo stands in for NCCL: the CPU code of
    # the chapters (collectives, DDP, the wire-byte counter) must work in such a group too.
    monkeypatch.setenv("COURSE_BACKEND", "cpu:gloo,cuda:gloo")
    for backend, dev, t, received, grad in run(chapter_style_work, 2):
        assert backend == "cpu:gloo,cuda:gloo" and dev == torch.device("cpu")
        assert torch.equal(t, torch.ones(1000))
        assert received >= 4000 / 2  # a ring all-reduce of 4000 B receives (N-1)/N of it twice
        assert torch.equal(grad, torch.full((3, 3), 2.0))


def fails_on_rank_two():
    if dist.get_rank() == 2:
        raise ValueError("rank two is unhappy")
    dist.barrier()


def test_a_rank_that_raises_becomes_rank_error_quickly():
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        run(fails_on_rank_two, 4, timeout=60)
    assert time.monotonic() - start < 30  # not a speed goal (make bench): it did not wait for timeout=60
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.rank == 2 and err.exc_type == "ValueError"
    assert "rank two is unhappy" in str(err)
    assert "fails_on_rank_two" in str(err)  # the rank's own traceback
    assert "course_lib/launch.py" not in str(err)  # without the launcher's frames


def test_a_rank_that_dies_without_an_exception_is_reported():
    def vanish():
        if dist.get_rank() == 1:
            print("about to abort")
            os.abort()
        dist.barrier()

    start = time.monotonic()
    with pytest.raises(RankError) as info:
        run(vanish, 3, timeout=60)
    assert time.monotonic() - start < 30  # it did not wait for timeout=60
    assert info.value.rank == 1
    assert "SIGABRT" in str(info.value) and "about to abort" in str(info.value)


def skips_a_collective():
    if dist.get_rank() != 0:
        dist.all_reduce(torch.ones(3))
    return dist.get_rank()


def test_a_skipped_collective_is_reported_as_a_deadlock():
    start = time.monotonic()
    with pytest.raises(DeadlockError) as info:
        run(skips_a_collective, 3, timeout=4)
    assert time.monotonic() - start < 4 + 5
    err = info.value
    assert err.waiting_ranks == [1, 2]
    msg = str(err)
    assert "mismatched collective" in msg
    assert "rank 0: returned" in msg
    assert "rank 1: waiting in dist.all_reduce" in msg
    assert "skips_a_collective" in msg  # where the waiting rank is stuck


def test_a_slow_rank_hits_the_launch_deadline():
    def sleepy():
        if dist.get_rank() == 1:
            time.sleep(30)

    start = time.monotonic()
    with pytest.raises(LaunchTimeout) as info:
        run(sleepy, 2, timeout=2)
    assert time.monotonic() - start < 2 + 5
    assert not isinstance(info.value, DeadlockError)
    assert info.value.waiting_ranks == [1]
    assert "rank 1: running its own code" in str(info.value)
    assert "endless loop" in str(info.value)


def test_keyboard_interrupt_ends_every_rank():
    def sleep_forever():
        time.sleep(60)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(sleep_forever, 3, timeout=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert wait_for_no_ranks() == []


def test_unpicklable_return_value_is_a_clear_error():
    with pytest.raises(RankError, match="pickle"):
        run(lambda: lambda: 1, 2)


def test_debug_mode_names_a_shape_mismatch():
    def mismatched():
        dist.all_reduce(torch.ones(8 if dist.get_rank() == 0 else 4))

    with pytest.raises(RankError) as info:
        run(mismatched, 2, timeout=20, debug=True)
    msg = str(info.value)
    assert "rank 0: allreduce of a float tensor of shape [8]" in msg
    assert "rank 1: allreduce of a float tensor of shape [4]" in msg
    assert "tensor shapes: 8 vs 4" in msg
    assert "Tensor Tensor" not in msg and "CollectiveFingerPrint" not in msg


def test_deadlock_report_counts_the_learners_calls_not_the_checks():
    from course_lib.checks import learner_in_rank

    def learner():
        if dist.get_rank() == 0:
            dist.all_reduce(torch.ones(1))  # the learner's first call; rank 1 never joins

    def check_rank(payload):
        dist.barrier()  # a check's own set-up call, before the learner's code
        learner_in_rank(payload)()

    with pytest.raises(DeadlockError) as info:
        run(check_rank, 2, launch.dumps_by_value((learner,)), timeout=4)
    assert "rank 0: waiting in dist.all_reduce (its communication call #1)" in str(info.value)


SCRIPT = textwrap.dedent("""
    import sys, time, torch, torch.distributed as dist
    from course_lib.launch import run

    def work(path):
        with open(f"{path}.{dist.get_rank()}", "w") as f:
            f.write(str(__import__("os").getpid()))
        t = torch.ones(4)
        dist.all_reduce(t)
        time.sleep(float(sys.argv[2]))
        return t

    # no `if __name__ == "__main__"` guard on purpose: the ranks must not re-run this
    out = run(work, 2, sys.argv[1])
    print("total", float(sum(o.sum() for o in out)))
""")


def test_plain_script_and_two_concurrent_launches(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"pids{i}"), "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        assert "total 16.0" in out


def test_ranks_die_with_a_killed_kernel(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    kernel = subprocess.Popen([sys.executable, str(script), str(tmp_path / "pids"), "120"])
    try:
        end = time.monotonic() + 60
        while not all((tmp_path / f"pids.{r}").exists() for r in range(2)):
            assert time.monotonic() < end and kernel.poll() is None, "ranks never started"
            time.sleep(0.1)
        time.sleep(0.2)
        pids = [int((tmp_path / f"pids.{r}").read_text()) for r in range(2)]
        assert all(psutil.pid_exists(p) for p in pids)
        kernel.kill()  # like a kernel killed from the outside: no finally blocks run
        kernel.wait()
        end = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "ranks outlived their killed parent"
    finally:
        kernel.kill()


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_ranks_launched_from_a_notebook_are_not_the_notebook(tmp_path):
    """On Linux the forkserver is a fork of the kernel: its ranks must still be plain processes.
    A rank that took itself for the kernel drew tqdm's notebook widget, whose messages the
    copied kernel cannot send and printed whole instead (750 kB of output for one cell)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import torch\nbig = torch.randn(256, 256)\nbig @ big  # intra-op threads, used"
        ),
        nbformat.v4.new_code_cell(
            textwrap.dedent("""
            import os, sys
            from course_lib.launch import run

            def look():
                from IPython import get_ipython
                from tqdm.auto import tqdm
                for _ in tqdm(range(3), file=sys.stdout, mininterval=0):
                    pass
                m = torch.randn(256, 256)
                m @ m  # one thread here: a fork of a process that used OpenMP must not hang
                widget = any("notebook" in c.__module__ for c in tqdm.__mro__)
                return get_ipython() is None, "ipykernel.zmqshell" in sys.modules, widget

            print(run(look, 2, timeout=60), os.getpid())
            """)
        ),
    ]
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert "[(True, False, False), (True, False, False)]" in text, text[:2000]
    assert "attempted to send message from fork" not in text and len(text) < 2000, text[:2000]


def _probe_in_rank():
    from course_lib import launch as in_rank

    return getattr(in_rank, "SNAPSHOT_PROBE", None)


def test_ranks_copy_the_process_as_it_was_when_the_forkserver_started(monkeypatch):
    """The grader and tests/conftest.py start the forkserver before any notebook or test runs:
    what this process holds later (a test's patch, a learner's answer) never reaches a rank."""
    launch.start_forkserver()  # already running (conftest): nothing changes
    monkeypatch.setattr(launch, "SNAPSHOT_PROBE", "set after the forkserver started", raising=False)
    assert run(_probe_in_rank, 2) == [None, None]


def scheduling_policies():
    """Inside a rank: the policy of each thread, by name, after one more group is made."""
    dist.new_group(list(range(dist.get_world_size())))
    policies = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            name = f.read().strip()
        policies.setdefault(name, set()).add(os.sched_getscheduler(int(tid)))
    return policies


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_ranks_run_as_sched_batch_only_when_asked(monkeypatch):
    monkeypatch.delenv(launch.SCHED_BATCH_ENV, raising=False)
    default = run(scheduling_policies, 2)[0]
    assert default["gloo_tcp_loop"] == {os.SCHED_OTHER}
    monkeypatch.setenv(launch.SCHED_BATCH_ENV, "1")
    batch = run(scheduling_policies, 2)[0]
    # every thread, the I/O threads of a group made later included
    assert set().union(*batch.values()) == {os.SCHED_BATCH}
    assert "gloo_tcp_loop" in batch and "pt_gloo_runloop" in batch


def _policies_inside_the_block_and_after():
    def policies():
        return {os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/self/task")}

    with launch.threads_as_batch() as applied:
        inside = policies()
    return applied, len(os.listdir("/proc/self/task")), inside, policies()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_a_rank_s_threads_run_as_batch_inside_the_block_and_as_before_after_it(monkeypatch):
    monkeypatch.delenv(launch.SCHED_BATCH_ENV, raising=False)
    for applied, threads, inside, after in run(_policies_inside_the_block_and_after, 2):
        assert applied and threads > 1  # gloo's threads are there, and switched too
        assert inside == {os.SCHED_BATCH} and after == {os.SCHED_OTHER}


def _environment_probe():
    return os.environ.get("PATH"), os.environ.get("COURSE_TEST_PROBE")


def test_ranks_see_the_callers_environment_as_it_is_at_the_launch(monkeypatch):
    # The forkserver copied this process's environment when it started (PATH included); a
    # variable unset since must be unset in the ranks too, and a new one set.
    assert "PATH" in os.environ
    monkeypatch.delenv("PATH")
    monkeypatch.setenv("COURSE_TEST_PROBE", "set at the launch")
    assert run(_environment_probe, 2) == [(None, "set at the launch")] * 2
