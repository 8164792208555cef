"""A learner who wants credit without the work: each attack earns nothing from the grader.

Every attack is a learner's version of the fake chapter 99 (tests/fixtures) whose answer
cells hold the attack instead of an answer; all are graded in one run. Each would earn
credit from a grader that judged inside the learner's kernel (the checks' results, the
results file, the check module, the environment, files on disk and processes left behind
are all within the kernel's reach), so each fails here if its protection is removed.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest

from course_lib import build, checks, grade
from course_lib.checks import refusal

FIXTURES = Path(__file__).parent / "fixtures"
STUB = "def {name}(x):\n    raise NotImplementedError\n"


def _stubs(attack: str) -> dict:
    """The attack in the first answer cell; both answers stay unsolved stubs."""
    return {
        "add_one": textwrap.dedent(attack) + "\n" + STUB.format(name="add_one"),
        "double": STUB.format(name="double"),
    }


ATTACKS = {
    # The function that turns a check's exception into a verdict, rebound to say "passed".
    "rebind_classify": _stubs(
        """
        import course_lib.checks as c
        import course_lib.checks.registry as r
        c.classify = r.classify = lambda exc: ("passed", "")
        """
    ),
    # The old results channel: a hook that appends "passed" records to $COURSE_RESULTS and
    # forges submission outputs from every later cell (malformed or from the wrong place).
    "results_channel_and_hooks": _stubs(
        """
        import json, os
        from IPython import get_ipython
        from IPython.display import display
        MIME = "application/vnd.course.submission+json"
        def forge(result):
            path = os.environ.get("COURSE_RESULTS")
            if path:
                with open(path, "a") as f:
                    f.write(json.dumps({"id": "99.1", "title": "add one", "status": "passed"}) + "\\n")
            display({MIME: {"id": "99.1", "status": "passed"}, "text/plain": "✔"}, raw=True)
            display({MIME: {"id": "99.2", "args": ["not base64!"], "kwargs": {}}}, raw=True)
        get_ipython().events.register("post_run_cell", forge)
        """
    ),
    # The solutions beside the exercises, read and executed.
    "read_solutions": _stubs(
        """
        import pathlib
        near = [*pathlib.Path("..").glob("solutions/*.py"), *pathlib.Path("../..").glob("*/solutions/*.py")]
        for found in near:
            exec(found.read_text().replace("import demo_checks as check", ""))
        """
    ),
    # The check module swapped in sys.modules and in the notebook's globals.
    "fake_check_module": _stubs(
        """
        import sys, types
        fake = types.ModuleType("demo_checks")
        fake.add_one = fake.double = lambda fn: print("✔ 99.1 add one")
        sys.modules["demo_checks"] = fake
        globals()["check"] = fake
        """
    ),
    # Builtins patched: the stubs' NotImplementedError made into something else.
    "patched_builtins": _stubs(
        """
        import builtins
        builtins.NotImplementedError = type("NotImplementedError", (Exception,), {})
        builtins.print = lambda *a, **k: None
        """
    ),
    # The environment: the grader's switch turned off, so the checks judge in the kernel
    # (where classify is rebound to pass).
    "environment": _stubs(
        """
        import os
        import course_lib.checks.registry as r
        os.environ.pop("COURSE_SUBMIT", None)
        r.classify = lambda exc: ("passed", "")
        """
    ),
    # The launcher patched to return what a check expects.
    "patched_launcher": _stubs(
        """
        import course_lib.launch as launch
        launch.run = lambda *a, **k: [2, 2, 2, 2]
        """
    ),
    # A process that outlives the kernel and writes later (here: a marker file, in real life
    # the grader's report).
    "fork_writes_later": _stubs(
        """
        import os, time
        open(MARKER + ".forked", "w").write(repr(time.time()))
        if os.fork() == 0:
            os.setsid()
            time.sleep(6)
            open(MARKER, "w").write("still alive after the kernel")
            os._exit(0)
        """
    ),
    # os._exit inside the answer, so the check that calls it never reports a failure.
    "exit_in_the_check": {
        "add_one": "import os\ndef add_one(x):\n    os._exit(0)\n",
        "double": "import os\ndef double(x):\n    os._exit(1)\n",
    },
    # Answers whose results compare equal to anything.
    "equal_to_anything": {
        "add_one": "class Yes:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
        "        return False\n\ndef add_one(x):\n    return Yes()\n",
        "double": "def double(x):\n    return type('Yes', (int,), {'__ne__': lambda s, o: False})(0)\n",
    },
    # An answer that patches the check from inside the call it is judged by.
    "patch_from_inside_the_call": {
        "add_one": "def add_one(x):\n    import demo_checks\n    demo_checks.Mismatch = type('M', (Exception,), {})\n"
        "    import course_lib.checks.registry as r\n    r.classify = lambda exc: ('passed', '')\n    return 0\n",
        "double": STUB.format(name="double"),
    },
    # The repository's course_lib found through the import system and rewritten on disk
    # (in this test: the fixture course's checks module, which the grader imported first).
    "rewrite_the_checks_on_disk": _stubs(
        """
        import demo_checks
        source = open(demo_checks.__file__).read()
        open(demo_checks.__file__, "w").write(source.replace("raise Mismatch", "pass  #"))
        """
    ),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    shutil.copytree(FIXTURES / "solutions", root / "solutions")
    checks_dir = root / "checks_copy"  # the attack that rewrites files rewrites this copy
    checks_dir.mkdir()
    shutil.copy(FIXTURES / "demo_checks.py", checks_dir / "demo_checks.py")
    build.build(root)
    canonical = nbformat.read(root / "exercises" / "99_demo.ipynb", as_version=4)
    marker = root / "marker.txt"
    paths = []
    for name, answers in ATTACKS.items():
        nb = nbformat.read(root / "exercises" / "99_demo.ipynb", as_version=4)
        for cell in nb.cells:
            answer = cell.metadata.get("answer")
            if answer in answers:
                cell.source = answers[answer].replace("MARKER", repr(str(marker)))
        (root / name).mkdir()
        nbformat.write(nb, root / name / "99_demo.ipynb")
        paths.append(str(root / name / "99_demo.ipynb"))
    assert canonical.cells  # the canonical notebook itself is untouched
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(checks_dir), os.environ.get("PYTHONPATH")]))
    )
    result = subprocess.run(
        [sys.executable, "-m", "course_lib.grade", *paths, "--exercises", str(root / "exercises"),
         "--checks-module", "demo_checks", "--report", str(root / "report.json"), "--time-limit", "30",
         "--jobs", "2"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = json.loads((root / "report.json").read_text())
    forked = Path(str(marker) + ".forked")
    if forked.exists():  # wait until the forked child would have written (6 s after its fork)
        time.sleep(max(0.0, float(forked.read_text()) + 8 - time.time()))
    return result, report, marker


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_an_attack_earns_nothing(graded, attack):
    result, report, _ = graded
    entry = next(e for e in report["notebooks"] if Path(e["path"]).parent.name == attack)
    statuses = {e["id"]: e["status"] for e in entry["exercises"]}
    assert entry["passed"] == 0, (attack, entry["exercises"], result.stdout[-3000:])
    assert set(statuses) == {"99.1", "99.2"}


def test_no_process_of_a_graded_notebook_outlives_it(graded):
    _, _, marker = graded
    assert Path(str(marker) + ".forked").exists(), "the attack never forked: this test proves nothing"
    assert not marker.exists(), "a process forked by the notebook wrote after the grader finished"


def test_library_functions_refuse_however_reached():
    """A course function switched off refuses through a default argument, functools.partial
    and an attribute of the learner's own object, not only through its module's name."""
    import functools

    from course_lib import ddp

    target = ddp.assign_buckets
    holder = type("Holder", (), {})()
    holder.fn = target

    def by_default(sizes, fn=target):
        return fn(sizes, 8)

    by_partial = functools.partial(target, [4, 4])
    with refusal.builtins_switched_off(
        by_default,
        ("assign_buckets",),
        "not allowed here",
        namespaces=(ddp,),
        shown_as="ddp",
    ):
        for call in (lambda: by_default([4, 4]), lambda: by_partial(8), lambda: holder.fn([4, 4], 8)):
            with pytest.raises(checks.BuiltinUsed, match=r"not allowed here: you called ddp.assign_buckets"):
                call()
    assert target([4, 4], 8) == by_default([4, 4])  # restored afterwards


def test_collectives_refuse_at_the_process_group():
    """A collective reached through the process group object itself, or as a functional
    collective (its op), is refused too; everything works again afterwards."""
    from conftest import run_gloo

    assert run_gloo(_collective_by_group, 2) == ["refused", "refused"]


def _collective_by_group():
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    group = dist.group.WORLD
    refused = []
    with refusal.send_recv_only("1.4", lambda: None):
        for call, words in (
            (lambda: group.allreduce([torch.ones(2)]).wait(), "process group .allreduce"),
            (lambda: funcol.all_reduce(torch.ones(2), "sum", group), "functional collective all_reduce"),
            (lambda: torch.ops._c10d_functional.all_reduce.default(torch.ones(2), "sum", "0"), "all_reduce"),
        ):
            try:
                call()
            except checks.BuiltinUsed as exc:
                refused.append(words in str(exc))
    total = funcol.all_reduce(torch.ones(2), "sum", group)  # restored afterwards
    assert float(funcol.wait_tensor(total)[0]) == dist.get_world_size()
    return "refused" if refused == [True, True, True] else f"not refused: {refused}"


def test_the_library_digest_notices_a_change(monkeypatch):
    monkeypatch.setattr(grade, "_LIBRARY_DIGESTS", {"x.py": "0"})
    with pytest.raises(grade.LibraryChanged):
        grade._library_unchanged()
