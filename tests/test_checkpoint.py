"""Chapter 09c: checkpoints that reshard, bad checkpoints named, DCP's resharding, a killed rank."""

from __future__ import annotations

import os
import shutil

import pytest
import reference_answers
import torch

from course_lib import checkpoint, launch, train
from course_lib.checks import checkpoint as check
from course_lib.checks.registry import FAILED, NOT_ATTEMPTED, PASSED

TINY = dict(n_layers=2, d_model=16, n_heads=2, seq_len=8, progress=False)
LAYOUT_A = dict(dp=2, tp=2, sharding="zero3")


# ----------------------------------------------------------------------------
# boxes, no ranks


def test_boxes_of_a_column_split_a_row_split_and_a_flat_shard():
    layout = {"w": (0, (4, 6)), "b": (24, (6,))}
    index = torch.arange(1, 31, dtype=torch.float32)
    w = index[:24].view(4, 6)
    cols = checkpoint.boxes_of(w[:, 3:], layout)  # a row-parallel shard: columns 3..5
    assert [(b.tensor, b.offsets, b.sizes) for b in cols] == [("w", (1 - 1, 3), (4, 3))]
    rows = checkpoint.boxes_of(w[2:], layout)
    assert [(b.tensor, b.offsets, b.sizes) for b in rows] == [("w", (2, 0), (2, 6))]
    flat = torch.cat([index[10:30], torch.zeros(2)])  # a ZeRO shard from w[1, 4] into b, then padding
    boxes = [(b.tensor, b.offsets, b.sizes, b.positions.tolist()) for b in checkpoint.boxes_of(flat, layout)]
    assert boxes == [
        ("w", (1, 4), (1, 2), [0, 1]),
        ("w", (2, 0), (2, 6), list(range(2, 14))),
        ("b", (0,), (6,), list(range(14, 20))),
    ]


def test_index_model_refuses_a_model_too_big_to_label():
    big = torch.nn.Linear(4097, 4096, bias=False)
    with pytest.raises(ValueError, match="labels at most"):
        checkpoint.index_model(big)


# ----------------------------------------------------------------------------
# save under one layout, resume under others


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Layout A (dp2·tp2 ZeRO-3) trained 4 steps with checkpoints at 2 and 4; its folder and curve."""
    folder = tmp_path_factory.mktemp("ckpt") / "A"
    config = {**LAYOUT_A, "checkpoint_dir": str(folder), "checkpoint_every": 2}
    result = train.run_configs({"A": config}, steps=4, **TINY)["A"]
    return folder, result["loss"]


@pytest.fixture(scope="module")
def uninterrupted():
    """One process trained 8 steps without a stop: the curve every resumed run must continue."""
    return train.run_configs({"1": {}}, steps=8, **TINY)["1"]["loss"]


def test_each_rank_writes_its_own_boxes_every_element_once(saved):
    folder, _ = saved
    meta = checkpoint.read_meta(checkpoint.latest(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["step_000002", "step_000004"]
    assert meta["step"] == 4 and meta["layout"]["tp"] == 2 and len(meta["files"]) == 4
    counted = {}
    for info in meta["files"].values():
        for box in info["boxes"]:
            counted[box["tensor"]] = counted.get(box["tensor"], 0) + torch.Size(box["sizes"]).numel()
    assert counted == {n: torch.Size(s).numel() for n, s in meta["tensors"].items()}


def test_resumed_in_other_layouts_the_curve_continues_and_the_same_tensors_come_back(
    saved, uninterrupted, tmp_path
):
    folder, curve_a = saved
    layouts = {
        "fsdp2·cp2": dict(dp=2, cp=2, sharding="fsdp"),
        "pp2 zero2": dict(pp=2, dp=2, sharding="zero2"),
        "1 process": {},
    }
    configs = {}
    for name, layout in layouts.items():
        shutil.copytree(folder, tmp_path / name)
        configs[name] = {**layout, "checkpoint_dir": str(tmp_path / name)}
    # pp2·tp2 ZeRO-1 loads step 4 and, with nothing left to train, saves it again in its layout
    shutil.copytree(folder, tmp_path / "resaved")
    configs["resaved"] = dict(pp=2, tp=2, sharding="zero1", checkpoint_dir=str(tmp_path / "resaved"))
    configs["resaved"].update(checkpoint_every=4, steps=4)
    results = train.run_configs(configs, steps=6, **TINY)
    reference = uninterrupted[:6]
    assert train.compare_curves(reference[:4], {"A": curve_a}, rtol=1e-5) <= 1e-5
    for name in layouts:
        assert results[name]["resumed_from"] == 4 and len(results[name]["loss"]) == 6
        assert train.compare_curves(reference, {name: results[name]["loss"]}, rtol=1e-5) <= 1e-5
    a = checkpoint.read_global(checkpoint.latest(folder))
    b = checkpoint.read_global(checkpoint.latest(tmp_path / "resaved"))
    assert checkpoint.read_meta(checkpoint.latest(tmp_path / "resaved"))["layout"]["pp"] == 2
    assert all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


# ----------------------------------------------------------------------------
# bad checkpoints


def _resume(cases):
    out = {}
    for name, (folder, extra) in cases.items():
        try:
            train.train_gpt(**{**TINY, **extra, "steps": 5, "checkpoint_dir": folder})
            out[name] = "loaded"
        except checkpoint.CheckpointError as exc:
            out[name] = str(exc)
    return out


def test_bad_checkpoints_are_named_and_a_crash_mid_write_leaves_the_last_good_one(saved, tmp_path):
    folder, _ = saved
    copies = {name: tmp_path / name for name in ("crashed", "missing", "truncated", "meta", "absent")}
    for path in copies.values():
        shutil.copytree(folder, path)
    half = copies["crashed"] / ".step_000006.tmp"
    half.mkdir()
    (half / "rank00000.pt").write_bytes(b"PK\x03")
    assert checkpoint.latest(copies["crashed"]).name == "step_000004"
    os.remove(checkpoint.latest(copies["missing"]) / "rank00003.pt")
    cut = checkpoint.latest(copies["truncated"]) / "rank00001.pt"
    cut.write_bytes(cut.read_bytes()[:-100])
    meta = checkpoint.latest(copies["meta"]) / "meta.json"
    meta.write_text(meta.read_text()[:200])
    os.remove(checkpoint.latest(copies["absent"]) / "meta.json")
    cases = {
        "crashed": (str(copies["crashed"]), {}),
        "model": (str(folder), {"n_layers": 3}),
        "data": (str(folder), {"batch_size": 16}),
        "missing": (str(copies["missing"]), {}),
        "truncated": (str(copies["truncated"]), {}),
        "meta": (str(copies["meta"]), {}),
        "absent": (str(copies["absent"]), {}),
    }
    got = launch.run(_resume, 1, cases, backend="gloo")[0]
    assert got["crashed"] == "loaded"
    assert "meta.json was written for another model: n_layers 2 there, 3 here" in got["model"]
    assert "batch_size 8 there, 16 here" in got["data"] and "data position" in got["data"]
    assert "rank00003.pt is missing (rank 3 wrote it); it holds slices of" in got["missing"]
    assert "rank00001.pt is truncated or damaged" in got["truncated"] and "meta.json says" in got["truncated"]
    assert "meta.json is not valid JSON" in got["meta"]
    assert "meta.json is missing" in got["absent"]
    with pytest.raises(ValueError, match="checkpoint_every must be a non-negative integer"):
        train.train_gpt(**TINY, checkpoint_dir=str(folder), checkpoint_every=-1)


# ----------------------------------------------------------------------------
# torch.distributed.checkpoint on the same state


def test_dcp_reshards_the_same_state_to_the_same_tensors(saved, tmp_path):
    folder, _ = saved
    ours = checkpoint.read_global(checkpoint.latest(folder))
    state = {f"{k}.{n}": t for k, tensors in ours.items() for n, t in tensors.items() if n.startswith("1.")}
    back = checkpoint.dcp_round_trip(state, tmp_path / "dcp", save_ranks=2, load_ranks=3)
    assert back.keys() == state.keys() and all(torch.equal(back[n], state[n]) for n in state)
    chunks = checkpoint.dcp_chunks(tmp_path / "dcp", "param.1.attn.qkv.weight")
    assert chunks == [((0, 0), (24, 16)), ((24, 0), (24, 16))]


# ----------------------------------------------------------------------------
# a killed rank under torchrun --max-restarts


# The killed rank itself (SIGKILL under torchrun --max-restarts=1, restarted, resumed, the curve
# within 1e-4 of the uninterrupted one) runs once, in lesson 09c (tests/ui or nbval): two
# torchrun groups of fresh processes are not run a second time here. Its argument checks:


def test_killing_needs_a_rank_that_exists():
    with pytest.raises(ValueError, match="kill_rank must be one of the 2 ranks"):
        checkpoint.run_torchrun_killing_a_rank([], nproc=2, checkpoint_dir="x", kill_rank=2)


def test_killing_needs_an_empty_folder(saved):
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        checkpoint.run_torchrun_killing_a_rank([], nproc=2, checkpoint_dir=saved[0])


# ----------------------------------------------------------------------------
# the check of exercise 9c.1


@pytest.fixture(scope="module")
def solution():
    return reference_answers.load("09c_checkpoint")


def _not_attempted(*args):
    raise NotImplementedError


def test_the_check_passes_the_solution_reads_a_stub_and_refuses_the_library(solution):
    assert check.overlap(solution.overlap).status == PASSED
    assert check.overlap(_not_attempted).status == NOT_ATTEMPTED
    refused = check.overlap(checkpoint.overlap)
    assert refused.status == FAILED and "checkpoint.overlap" in refused.message


def _inclusive_ends(wo, ws, ho, hs):  # touching boxes reported as overlapping
    lo = [max(w, h) for w, h in zip(wo, ho)]
    hi = [min(w + a, h + b) for w, a, h, b in zip(wo, ws, ho, hs)]
    if any(a > z for a, z in zip(lo, hi)):
        return None
    return [(a - w, z - w) for a, z, w in zip(lo, hi, wo)], [(a - h, z - h) for a, z, h in zip(lo, hi, ho)]


def _global_coordinates(wo, ws, ho, hs):
    lo = [max(w, h) for w, h in zip(wo, ho)]
    hi = [min(w + a, h + b) for w, a, h, b in zip(wo, ws, ho, hs)]
    if any(a >= z for a, z in zip(lo, hi)):
        return None
    both = list(zip(lo, hi))
    return both, both


def _swapped(wo, ws, ho, hs):
    lo = [max(w, h) for w, h in zip(wo, ho)]
    hi = [min(w + a, h + b) for w, a, h, b in zip(wo, ws, ho, hs)]
    if any(a >= z for a, z in zip(lo, hi)):
        return None
    want = [(a - w, z - w) for a, z, w in zip(lo, hi, wo)]
    have = [(a - h, z - h) for a, z, h in zip(lo, hi, ho)]
    return have, want


WRONG_ANSWERS = [
    (_inclusive_ends, "end of a box is exclusive"),
    (_global_coordinates, "global coordinates"),
    (_swapped, "other way round"),
    (lambda *box: None, "the boxes overlap, expected a pair of (start, stop) lists, got None"),
]


@pytest.mark.mistake("9c.1")
@pytest.mark.parametrize("answer, hint", WRONG_ANSWERS, ids=[w[1] for w in WRONG_ANSWERS])
def test_the_check_names_typical_mistakes(answer, hint):
    result = check.overlap(answer)
    assert result.status == FAILED and hint in result.message, result.message
