"""Chapter 10's multi-node part: the arithmetic, its checks (10.5, 10.6), run_nodes, and the
pieces of the two-node worker that run in any process group.

The full two-node run (python -m course_lib.torchrun under two torchruns) is the lesson's
own cell, run by nbval; here only what fails or hangs is launched, with cheap workers.
"""

import pathlib
import re
import time

import jupytext
import psutil
import pytest
from conftest import run_gloo, wait_for_no_ranks

from course_lib import torchrun
from course_lib.checks import ERROR, FAILED, NOT_ATTEMPTED, PASSED
from course_lib.checks import debugging as check
from course_lib.torchrun import TorchrunError, accumulation_steps, nodes_command, placement, run_nodes

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------
# the arithmetic


@pytest.mark.parametrize(
    "rank, counts, visible, expected",
    [
        (0, [2, 2], None, (0, 0, 0)),
        (3, [2, 2], None, (1, 1, 1)),
        (2, [2, 2], ["0,1", "2,3"], (1, 0, 2)),
        (5, [4, 2, 2], None, (1, 1, 1)),
        (6, [4, 2, 2], None, (2, 0, 0)),
        (1, [8, 8], ["7,6,5,4,3,2,1,0", None], (0, 1, 6)),
        (9, [8, 8], ["7,6,5,4,3,2,1,0", None], (1, 1, 1)),
    ],
)
def test_placement(rank, counts, visible, expected):
    assert placement(rank, counts, visible) == expected


@pytest.mark.parametrize(
    "rank, counts, visible, words",
    [
        (4, [2, 2], None, "rank 4 does not exist"),
        (-1, [2, 2], None, "does not exist"),
        (2, [3, 3], ["0,1", "0,1,2"], "shows 2 GPU(s)"),
        (0, [1], [""], "shows 0 GPU(s)"),
    ],
)
def test_placement_refuses(rank, counts, visible, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        placement(rank, counts, visible)


def test_accumulation_steps():
    assert accumulation_steps(16, 2, 4) == 2
    assert accumulation_steps(1024, 4, 64, tp=2, pp=4) == 32  # 8 data-parallel ranks
    with pytest.raises(ValueError, match="choose a global batch of 16 or 32"):
        accumulation_steps(30, 4, 4)
    with pytest.raises(ValueError, match="choose a global batch of 16$"):
        accumulation_steps(8, 4, 4)
    with pytest.raises(ValueError, match="not a multiple of tp·pp"):
        accumulation_steps(32, 2, 6, tp=4)


# ----------------------------------------------------------------------------
# exercises 10.5 and 10.6


@pytest.fixture(scope="module")
def solution():
    namespace = {"__name__": "debugging_solutions"}
    for cell in jupytext.read(ROOT / "solutions" / "10_debugging.py").cells:
        source = cell.source
        if cell.cell_type == "code" and ("def placement" in source or "def accumulation_steps" in source):
            exec(source, namespace)
    return namespace


def test_solutions_pass(solution):
    assert check.placement(solution["placement"]).status == PASSED
    assert check.accumulation_steps(solution["accumulation_steps"]).status == PASSED


def test_untouched_is_not_attempted():
    def placement(rank, nproc_per_node, cuda_visible_devices):
        raise NotImplementedError("exercise")

    def accumulation_steps(global_batch, micro_batch, world_size, tp, pp):
        raise NotImplementedError("exercise")

    assert check.placement(placement).status == NOT_ATTEMPTED
    assert check.accumulation_steps(accumulation_steps).status == NOT_ATTEMPTED


def test_the_library_answer_is_refused():
    result = check.placement(lambda rank, n, v: torchrun.placement(rank, n, v))
    assert result.status == FAILED and "you called course_lib.torchrun.placement" in result.message
    from course_lib.torchrun import accumulation_steps as by_name  # imported by name: refused too

    result = check.accumulation_steps(lambda b_global, b, w, tp, pp: by_name(b_global, b, w, tp, pp))
    assert result.status == FAILED and "accumulation_steps" in result.message
    assert torchrun.accumulation_steps(16, 2, 4) == 2  # switched back on afterwards


def _correct_placement(rank, counts, visible):
    """The right answer without the library (whose placement the check switches off)."""
    node = next(g for g in range(len(counts)) if rank < sum(counts[: g + 1]))
    local = rank - sum(counts[:node])
    listed = None if visible is None or visible[node] is None else [int(d) for d in visible[node].split(",")]
    return node, local, local if listed is None else listed[local]


@pytest.mark.parametrize(
    "wrong, words",
    [
        (lambda r, n, v: (r // n[0], r % n[0], r), "that GPU is the global RANK"),
        (lambda r, n, v: _correct_placement(r, n, None), "CUDA_VISIBLE_DEVICES renumbers"),
        (
            lambda r, n, v: (
                r // n[0],
                r % n[0],
                r % n[0] if v is None or v[r // n[0]] is None else int(v[r // n[0]].split(",")[r % n[0]]),
            ),
            "torchrun numbers the ranks node after node",
        ),
        (
            lambda r, n, v: list(_correct_placement(r, n, v)) if 0 <= r < sum(n) else (0, 0, 0),
            "expected ValueError (2 + 2 processes have ranks 0 ... 3), got (0, 0, 0)",
        ),
    ],
)
@pytest.mark.mistake("10.5")
def test_placement_mistakes_are_named(wrong, words):
    result = check.placement(wrong)
    assert result.status == FAILED and words in result.message, result.message


@pytest.mark.parametrize(
    "wrong, words",
    [
        (lambda B, b, w, tp, pp: B // (b * w), "only world/(tp·pp) = 8 are data-parallel"),
        (lambda B, b, w, tp, pp: B / (b * w // (tp * pp)), "return an int"),
        (lambda B, b, w, tp, pp: B // b, "divide by them too"),
        (
            lambda B, b, w, tp, pp: max(1, B // (b * w // (tp * pp))),
            "expected ValueError (30 is not a multiple",
        ),
    ],
)
@pytest.mark.mistake("10.6")
def test_accumulation_mistakes_are_named(wrong, words):
    result = check.accumulation_steps(wrong)
    assert result.status == FAILED and words in result.message, result.message


def test_a_crash_is_an_error_not_a_wrong_answer():
    result = check.accumulation_steps(lambda B, b, w, tp, pp: 1 / 0)
    assert result.status == ERROR and "ZeroDivisionError" in result.message, result.message


# ----------------------------------------------------------------------------
# run_nodes: a failing node and a node that never joins end everything, quickly


def test_nodes_command():
    command = nodes_command(1, 2, 4, "10.0.0.1:29400", ["--sizes", "4096"], run_id="job")
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--node_rank",
        "1",
        "--nproc_per_node",
        "4",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "10.0.0.1:29400",
        "--rdzv_id",
        "job",
        "--rdzv_conf",
        "join_timeout=60",
        "--max_restarts",
        "0",
        "-m",
        "course_lib.torchrun",
        "--sizes",
        "4096",
    ]
    with pytest.raises(ValueError):
        nodes_command(0, nnodes=0)
    with pytest.raises(ValueError, match="one dict per node"):
        run_nodes(node_env=[{}])


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_failing_node_stops_the_other(tmp_path, monkeypatch):
    monkeypatch.setattr(torchrun, "FAILURE_GRACE_S", 0.5)  # node 0's rank would wait out any grace
    # Node 1's rank exits 3 after 1 s; node 0's rank would sleep for a minute. (torchrun reads
    # its arguments as string.Template: $$$$ reaches the shell as $$, the shell's own pid.)
    script = (
        f'if [ "$GROUP_RANK" = 1 ]; then sleep 1; exit 3; fi; echo $$$$ > {tmp_path}/$RANK.pid; exec sleep 60'
    )
    start = time.monotonic()
    with pytest.raises(TorchrunError) as info:
        run_nodes(["--no-python", "sh", "-c", script], nproc_per_node=1, module=None, timeout=90, echo=False)
    assert time.monotonic() - start < 45
    message = str(info.value)
    assert message.startswith("the 2-node run failed"), message
    assert re.search(r"torchrun's root cause: rank : [01] \(local_rank: 0\); exitcode : 3", message), message
    assert info.value.returncode == 1  # torchrun's own exit code when a rank fails
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert pids and all(_dead(pid) for pid in pids), pids  # the sleeping rank was ended too
    assert wait_for_no_ranks() == []


def test_a_node_that_never_joins_times_out(monkeypatch):
    real = torchrun.nodes_command

    def node_1_never_starts_torchrun(node_rank, *args, **kwargs):
        return real(node_rank, *args, **kwargs) if node_rank == 0 else ["sleep", "60"]

    monkeypatch.setattr(torchrun, "nodes_command", node_1_never_starts_torchrun)
    start = time.monotonic()
    with pytest.raises(TorchrunError) as info:
        run_nodes(nproc_per_node=1, timeout=4, echo=False)
    assert time.monotonic() - start < 30
    assert info.value.returncode is None
    assert "did not finish within 4 s" in str(info.value)
    assert wait_for_no_ranks() == []


# ----------------------------------------------------------------------------
# the worker's pieces, in the course's launcher (no torchrun start-up)


def test_rank_view_reads_torchruns_variables():
    view = torchrun.rank_view(
        {
            "RANK": "3",
            "LOCAL_RANK": "1",
            "GROUP_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "CUDA_VISIBLE_DEVICES": "2,3",
        }
    )
    assert view["NODE_RANK"] is None and view["physical_gpu"] == 3 and view["device"].startswith("cuda:")
    assert torchrun.rank_view({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "5"})["physical_gpu"] is None


def _batch_rank():
    return torchrun.check_global_batch(16, 2)


def test_global_batch_identity_on_four_ranks():
    for got in run_gloo(_batch_rank, 4):
        assert got["accumulation_steps"] == 2 and got["samples_seen"] == 16
        assert got["max_grad_diff"] <= 1e-5


def _pair_rank():
    return torchrun.time_pair_all_reduce([4096, 65536], [0, 2], min_seconds=0.01, batches=2)


def test_pair_all_reduce_is_timed_on_rank_0():
    got = run_gloo(_pair_rank, 4)
    assert got[0]["nbytes"] == [4096, 65536] and len(got[0]["seconds"]) == 2
    assert all(s > 0 for s in got[0]["fastest"])
    assert got[1]["seconds"] == []  # ranks outside the pair only waited


def test_the_failure_names_the_rank_that_caused_it():
    outputs = [
        "[rank0]: RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:1\n",
        "[rank3]: Traceback (most recent call last):\n[rank3]: ValueError: bad shard\n"
        "[rank2]: RuntimeError: Connection reset by peer\n",
    ]
    message = torchrun._nodes_failure([1, 1], outputs, [["python", "-m", "torch.distributed.run"]] * 2)
    assert "rank 3 on node 1 raised ValueError: bad shard; ranks [0, 2] failed after it" in message


def test_the_node_whose_rank_failed_is_blamed_not_the_one_that_lost_the_store():
    # Node 1 hosted the rendezvous store; when it ended, node 0 failed too, and first in the list.
    outputs = [
        "torch.distributed.DistNetworkError: Failed to recv, got 0 bytes.\n",
        "Root Cause (first observed failure):\n[0]:\n  host      : localhost\n"
        "  rank      : 1 (local_rank: 0)\n  exitcode  : 3 (pid: 7)\n",
    ]
    command = ["python", "-m", "torch.distributed.run", "--node_rank", "0"]
    message = torchrun._nodes_failure([1, 1], outputs, [command, command])
    assert "node 1 failed" in message
    assert "torchrun's root cause: rank : 1 (local_rank: 0); exitcode : 3 (pid: 7)" in message


def test_report_is_parsed_from_rank_0s_line():
    line = torchrun.REPORT_PREFIX + '{"pair": [0, 2]}'
    assert torchrun._report(f"noise\n{line}\n") == {"pair": [0, 2]}
    assert torchrun._report("nothing here") is None
