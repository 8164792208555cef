"""Chapter 10: the torchrun demos, the notebook helper, and the debugging labs' checks.

Every torchrun here starts fresh Python processes (~3.5 s each on 2 cores), so
each strategy gets exactly one run, with its smallest useful world size: the two-rank
strategies and a perturbed run in lesson 10, the 8-rank grid and the refusals here.
"""

import pathlib
import subprocess
import sys

import jupytext
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import wait_for_no_ranks

from course_lib.checks import FAILED, NOT_ATTEMPTED, PASSED
from course_lib.checks import debugging as check
from course_lib.torchrun import TorchrunError, run_torchrun, torchrun_command

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------
# course_lib.demo under torchrun


# The seven two-rank strategies in one torchrun, and the perturbed ring's failure, are run and
# asserted by lesson 10 itself (tests/ui or nbval): not run a second time here.


def test_3d_on_eight_ranks():
    # The full DP=2 × TP=2 × PP=2 grid: ~10 s on 2 cores (9 processes import torch).
    out = run_torchrun("3d", nproc=8, timeout=90, echo=False)
    assert "demo 3d: OK  world_size=8" in out


def test_unusable_world_size_says_what_is_needed():
    with pytest.raises(TorchrunError) as info:
        run_torchrun("tp 3d", nproc=3, timeout=60, echo=False)
    message = str(info.value)
    assert "tp cannot run on 3 rank(s): needs N dividing H=16" in message
    assert "3d cannot run on 3 rank(s): needs DP·TP·PP ranks: 8" in message


def test_unknown_strategy_exits_non_zero():
    # Without torchrun: a world of one; the name is refused before any rendezvous.
    done = subprocess.run(
        [sys.executable, "-m", "course_lib.demo", "fsdp"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert "unknown strategy 'fsdp': choose from dp, ring, tp, sp, pp, zero, moe, 3d" in done.stderr


def test_run_torchrun_stops_a_run_that_takes_too_long():
    with pytest.raises(TorchrunError) as info:
        run_torchrun(["--no-python", "sleep", "60"], nproc=2, timeout=3, module=None, echo=False)
    assert info.value.returncode is None
    assert "did not finish within 3 s" in str(info.value)
    assert wait_for_no_ranks() == []


def test_torchrun_command():
    command = torchrun_command(["3d", "--grid", "1,2,2"], nproc=4)
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "-m",
        "course_lib.demo",
        "3d",
        "--grid",
        "1,2,2",
    ]
    with pytest.raises(ValueError):
        torchrun_command("dp", nproc=0)


# ----------------------------------------------------------------------------
# the debugging labs' checks


@pytest.fixture(scope="module")
def solution():
    """The answer cells (and the broken versions) of solutions/10_debugging.py."""
    namespace = {"__name__": "debugging_solutions"}
    exec("import torch\nimport torch.distributed as dist\nimport torch.nn.functional as F", namespace)
    for cell in jupytext.read(ROOT / "solutions" / "10_debugging.py").cells:
        if cell.cell_type == "code" and "\ndef " in "\n" + cell.source:
            source = "\n".join(ln for ln in cell.source.splitlines() if not ln.startswith("check."))
            exec(source, namespace)
    return namespace


# That every reference answer passes its check is tested once, through the grader: tests/test_course.py.


@pytest.mark.parametrize(
    "name, broken, words",
    [
        ("global_mean", "global_mean_broken", "deadlock"),
        pytest.param(
            "row_parallel_output",
            "row_parallel_output_broken",
            "pass group=tp_group",
            marks=pytest.mark.mistake("10.3"),
        ),
        pytest.param(
            "accumulate_with_no_sync",
            "accumulate_broken",
            "never averaged",
            marks=pytest.mark.mistake("10.4"),
        ),
    ],
)
def test_broken_versions_are_diagnosed(solution, monkeypatch, name, broken, words):
    monkeypatch.setattr(check, "TIMEOUT", 4.0)  # the deadlock is reported sooner
    result = getattr(check, name)(solution[broken])
    assert result.status == FAILED and words in result.message, result.message


def test_a_crash_names_the_last_rank(solution):
    result = check.pass_right(solution["pass_right_broken"])
    assert result.status != PASSED
    assert "rank 1 raised IndexError" in result.message, result.message


@pytest.mark.mistake("10.4")
def test_syncing_every_micro_batch_is_flagged():
    def every_time(ddp_model, micro_batches):
        for x, y in micro_batches:
            (F.mse_loss(ddp_model(x), y) / len(micro_batches)).backward()

    result = check.accumulate_with_no_sync(every_time)
    assert result.status == FAILED and "all-reduced 3 times" in result.message, result.message


def own_mean(losses):
    return losses.mean().item()


def mean_of_means(losses):
    mean = torch.tensor([losses.mean().item() if len(losses) else 0.0])
    dist.all_reduce(mean)
    return mean.item() / dist.get_world_size()


def pass_left(t):
    rank, n = dist.get_rank(), dist.get_world_size()
    received = torch.empty_like(t)
    request = dist.isend(t, (rank - 1) % n)
    dist.recv(received, (rank + 1) % n)
    request.wait()
    return received


@pytest.mark.parametrize(
    "name, wrong, words",
    [
        pytest.param(
            "global_mean",
            own_mean,
            "N=2, rank 1: expected the global mean 1, got nan (this rank's own mean: nothing was combined",
            marks=pytest.mark.mistake("10.1"),
            id="own mean",
        ),
        pytest.param(
            "global_mean",
            mean_of_means,
            "(a mean of the ranks' means: the shards differ in size",
            marks=pytest.mark.mistake("10.1"),
            id="mean of means",
        ),
        pytest.param(
            "pass_right",
            pass_left,
            "that is rank 1's tensor, the RIGHT neighbour's: send to (r + 1) mod N",
            marks=pytest.mark.mistake("10.2"),
            id="sends left",
        ),
    ],
)
def test_typical_wrong_fixes_are_named(name, wrong, words):
    result = getattr(check, name)(wrong)
    assert result.status == FAILED and words in result.message, result.message


def test_not_attempted():
    def global_mean(losses):
        raise NotImplementedError("exercise")

    assert check.global_mean(global_mean).status == NOT_ATTEMPTED


def test_show_prints_the_report_and_never_raises(solution, capsys):
    check.show(check.pass_right, solution["pass_right_broken"])
    assert "RankError (rank 1)" in capsys.readouterr().out
    check.show(check.pass_right, solution["pass_right"])
    assert "no problem found" in capsys.readouterr().out
