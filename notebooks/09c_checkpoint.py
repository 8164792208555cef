# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09c · Checkpoints across layouts, and a killed rank
#
# A long training run stops: the job's time is up, a machine is taken away, a process dies. A
# **checkpoint** saves everything the run needs to go on — the parameters, the optimizer's state,
# the step, where in the data it was, the random-number state — so the next job continues as if
# nothing had happened. In parallel training no rank holds the whole state: with tp the matrices
# are split, with pp the layers, with ZeRO or FSDP even the pieces are cut into flat shards. And
# the next job may run on a different number of machines, in a different **layout**.
#
# This chapter builds checkpoints for chapter 09b's `train_gpt` in which **each rank writes only
# what it owns**, plus a description of which block of which tensor of the one-process model
# every piece is; a run in another layout then **reshards**: each rank reads the blocks it now
# needs. `torch.distributed.checkpoint` (DCP) works the same way; section 4 compares the two.
# Then a rank is killed on purpose under `torchrun --max-restarts`, and training survives it.
#
# ```python
# train_gpt(dp=2, tp=2, sharding="zero3", steps=6, checkpoint_dir=D, checkpoint_every=3)
# train_gpt(dp=2, cp=2, sharding="fsdp", steps=12, checkpoint_dir=D)   # resumes at step 6
# ```

# %%
import inspect
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from course_lib import checkpoint, launch, train
from course_lib.units import format_bytes

WORK = Path(tempfile.mkdtemp(prefix="checkpoints-"))
MODEL = dict(n_layers=2, d_model=16, n_heads=2, seq_len=8, progress=False)

# %% [markdown]
# ## 1. What each rank writes
#
# Layout A: dp2 × tp2 with ZeRO-3 on 4 ranks, 6 steps, a checkpoint every 3 steps. A
# checkpoint is a folder `step_000006` with one file per rank and a `meta.json`:

# %%
DIR_A = WORK / "A"
LAYOUT_A = dict(dp=2, tp=2, sharding="zero3")
run_a = train.run_configs(
    {"A": {**LAYOUT_A, "checkpoint_dir": str(DIR_A), "checkpoint_every": 3}}, steps=6, **MODEL
)
step6 = checkpoint.latest(DIR_A)
for f in sorted(step6.iterdir()):
    print(f"{f.name:14s} {format_bytes(f.stat().st_size):>10s}")
meta = json.loads((step6 / "meta.json").read_text())
print({k: meta[k] for k in ("step", "tokens_seen", "layout", "run")})
print("model:", meta["model"])

# %% [markdown]
# The `files` entry of `meta.json` lists, per file, its size and its **boxes**: a block of one
# tensor of the one-process model (`course_lib.gpt.make_gpt`'s names), given by where it starts
# (`offsets`) and how big it is (`sizes`) in every dimension. A rank's file holds, for each of its
# boxes, the parameters and Adam's two moments. Here is who holds what of the first block's qkv
# weight (3d × d = 48 × 16): tp splits its rows by heads, then ZeRO-3 cuts each tp rank's flat
# buffer in two, so the four ranks hold four different pieces:

# %%
TENSOR = "1.attn.qkv.weight"
for file, info in meta["files"].items():
    for box in info["boxes"]:
        if box["tensor"] == TENSOR:
            print(f"{file}: offsets {box['offsets']}, sizes {box['sizes']}, Adam step {box['adam_step']}")

# %% [markdown]
# A value several ranks hold — a LayerNorm every tp rank keeps whole, say — is written once, by
# the lowest rank holding it. So the files hold every element of every tensor **exactly once**,
# and their tensors take 4 bytes for the parameter and 8 for the moments: 12Ψ bytes in all, Ψ
# the parameter count (the files add each rank's RNG state, the names and the pickle's framing).

# %%
psi = sum(torch.Size(s).numel() for s in meta["tensors"].values())
counted = {}
for info in meta["files"].values():
    for box in info["boxes"]:
        counted[box["tensor"]] = counted.get(box["tensor"], 0) + torch.Size(box["sizes"]).numel()
assert counted == {n: torch.Size(s).numel() for n, s in meta["tensors"].items()}  # each element once
files = {f: torch.load(step6 / f) for f in meta["files"]}
tensor_bytes = sum(t.numel() * t.element_size() for held in files.values() for t in held["tensors"].values())
assert all(held["rng"].dtype == torch.uint8 for held in files.values())  # each rank's RNG state
file_bytes = sum(info["bytes"] for info in meta["files"].values())
print(
    f"Ψ = {psi:,}; tensors in the files {tensor_bytes:,} bytes = 12Ψ = {12 * psi:,}; files {file_bytes:,} bytes"
)
assert tensor_bytes == 12 * psi

# %% [markdown]
# How does a rank know which box of which tensor each of its elements is? Working it out by hand
# for every axis and every sharding would be a second implementation of all of them. Instead,
# the rank builds its part of a second copy of the model in which **every element holds its own
# global index + 1** — through the same `build_stage` and the same ZeRO or FSDP construction as
# the real model. Whatever real element sits at some position of a rank's shard, the copy's
# element at that position names it (0 marks the padding ZeRO and FSDP add).

# %%
print(inspect.getsource(checkpoint.index_model))
print(inspect.getsource(checkpoint.Checkpointer.__init__))

# %% [markdown]
# ## 2. Resume in another layout
#
# Loading asks the same question in the new layout: which boxes does this rank need? For each,
# it finds the boxes on disk of the same tensor that **overlap** it, reads only the files holding
# them, and copies the overlaps (exercise 9c.1 writes `overlap`). Three runs continue layout A's
# checkpoint at step 6 to step 12: FSDP2 × CP2, PP2 × TP2 with ZeRO-1, and one process. Each is
# compared with one process trained for 12 steps without a stop: the claim is the same as
# chapter 09b's, the continued curve within 1e-4 (relative) of the uninterrupted one.

# %%
print(inspect.getsource(checkpoint.overlap))
LAYOUTS_B = {
    "fsdp2·cp2": dict(dp=2, cp=2, sharding="fsdp"),
    "pp2·tp2 zero1": dict(pp=2, tp=2, sharding="zero1"),
    "1 process": {},
}
configs = {"uninterrupted": {}}
for name, layout in LAYOUTS_B.items():
    shutil.copytree(DIR_A, WORK / name)  # each continues its own copy of A's folder
    configs[name] = {**layout, "checkpoint_dir": str(WORK / name)}
# and one more (section 2b): A's folder loaded as pp2·tp2 with ZeRO-1, nothing to train, saved again
RESAVED = WORK / "A resaved as pp2·tp2"
shutil.copytree(DIR_A, RESAVED)
configs["resaved"] = {
    **LAYOUTS_B["pp2·tp2 zero1"],
    "checkpoint_dir": str(RESAVED),
    "checkpoint_every": 6,
    "steps": 6,
}
runs = train.run_configs(configs, steps=12, **MODEL)  # one launch per world size: 1 and 4 ranks
reference = runs["uninterrupted"]["loss"]
for name in LAYOUTS_B:
    assert runs[name]["resumed_from"] == 6
    dev = max(train.relative_deviation(runs[name]["loss"][6:], reference[6:]))
    print(f"A (dp2·tp2 zero3) -> {name:14s}: steps 7-12 largest relative deviation {dev:.1e}")
    assert dev <= 1e-4
assert max(train.relative_deviation(run_a["A"]["loss"], reference[:6])) <= 1e-4

# %% [markdown]
# Equal to fp32 rounding, as in chapter 09b: the model after step 6, its Adam moments and step
# counts all came back, each rank's own slices of them. The data position needs no file of its
# own: step t's global batch depends only on (seed, t), so the step *is* the position
# (`meta.json` also records `tokens_seen`), and `resume` refuses a checkpoint written with
# another seed or batch size.
#
# ### 2b. The same tensors come back, exactly
#
# The launch above also loaded A's step-6 checkpoint as pp2 × tp2 with ZeRO-1 and, with nothing
# left to train, saved it again in that layout. The files differ — another split, other boxes —
# but `read_global`, which assembles every tensor from a checkpoint's boxes in one process, gives
# the same numbers bit for bit:

# %%
ours_a, ours_b = checkpoint.read_global(step6), checkpoint.read_global(checkpoint.latest(RESAVED))
same = all(torch.equal(ours_a[k][n], ours_b[k][n]) for k in ours_a for n in ours_a[k])
meta_b = checkpoint.read_meta(checkpoint.latest(RESAVED))
print(f"A wrote {len(meta['files'])} files, B wrote {len(meta_b['files'])}; every tensor equal: {same}")
assert same and meta_b["layout"]["pp"] == 2

# %% [markdown]
# ## 3. Bad checkpoints, and a crash while writing
#
# A checkpoint is written **atomically**: every rank writes into a hidden folder
# `.step_000006.tmp`, rank 0 writes `meta.json` last and renames the folder — one step that either
# happens or does not. A crash before the rename leaves a `.tmp` folder that `latest` ignores, so
# the last good checkpoint stays the latest. Below: a half-written step 9 next to step 6; then
# a run of another model (d_model 32), a run with another batch size (its data position would
# mean other batches), and two damaged copies of the checkpoint — one with a file missing, one
# with a file cut short. Each error names the file and what is wrong.

# %%
CRASHED = WORK / "crashed"
shutil.copytree(DIR_A, CRASHED)
half = CRASHED / ".step_000009.tmp"
half.mkdir()
(half / "rank00000.pt").write_bytes((step6 / "rank00000.pt").read_bytes()[:100])  # what a crash leaves
print("latest with a half-written step 9:", checkpoint.latest(CRASHED).name)
assert checkpoint.latest(CRASHED).name == "step_000006"

MISSING, TRUNCATED = WORK / "missing", WORK / "truncated"
for folder in (MISSING, TRUNCATED):
    shutil.copytree(DIR_A, folder)
os.remove(checkpoint.latest(MISSING) / "rank00002.pt")
cut = checkpoint.latest(TRUNCATED) / "rank00001.pt"
cut.write_bytes(cut.read_bytes()[:-500])


def try_to_resume(cases):
    messages = {}
    for name, (folder, extra) in cases.items():
        try:
            train.train_gpt(**{**MODEL, **extra, "steps": 8, "checkpoint_dir": folder})
            messages[name] = "loaded"
        except checkpoint.CheckpointError as exc:
            messages[name] = str(exc)
    return messages


CASES = {
    "crash while writing": (str(CRASHED), {}),
    "another model": (str(DIR_A), {"d_model": 32}),
    "another batch size": (str(DIR_A), {"batch_size": 16}),
    "a missing file": (str(MISSING), {}),
    "a truncated file": (str(TRUNCATED), {}),
}
messages = launch.run(try_to_resume, 1, CASES, backend="gloo")[0]
for name, message in messages.items():
    print(f"{name}:\n  {message}")
assert messages["crash while writing"] == "loaded"
assert "meta.json was written for another model: d_model 16 there, 32 here" in messages["another model"]
assert "batch_size 8 there, 16 here" in messages["another batch size"]
assert "rank00002.pt is missing" in messages["a missing file"]
assert "rank00001.pt is truncated" in messages["a truncated file"]

# %% [markdown]
# ## 4. The same state through `torch.distributed.checkpoint`
#
# DCP (`torch.distributed.checkpoint`) saves a state dict of DTensors: each rank writes its own
# chunks to a file of its own (`__0_0.distcp`, `__1_0.distcp`, …) and the coordinator writes a
# `.metadata` file that lists, per tensor, every chunk's `offsets` and `sizes` — the same
# description as our boxes. Loading into
# DTensors of another placement reshards, and it runs on CPU with gloo. Here A's step-6 state
# (parameters and moments, as `read_global` assembles them) goes through DCP: saved by 2 ranks
# holding blocks of rows (`Shard(0)`), loaded by 3 ranks wanting blocks of the last dimension
# (`Shard(-1)`), gathered back. The same tensors come back:

# %%
flat_state = {f"{k}.{n}": t for k, tensors in ours_a.items() for n, t in tensors.items()}
DCP_DIR = WORK / "dcp"
back = checkpoint.dcp_round_trip(flat_state, DCP_DIR, save_ranks=2, load_ranks=3)
assert back.keys() == flat_state.keys() and all(torch.equal(back[n], flat_state[n]) for n in flat_state)
print(sorted(os.listdir(DCP_DIR)))
print(f"DCP's chunks of param.{TENSOR}:", checkpoint.dcp_chunks(DCP_DIR, f"param.{TENSOR}"))
print(f"every one of {len(flat_state)} tensors equal after DCP's resharding and after ours")

# %% [markdown]
# The differences are in what each format expects of its user: DCP needs the model's state as
# DTensors (torch's FSDP2 and tensor parallelism produce them); the course's modules hold plain
# tensors, so the index copy of the model supplies the boxes instead.
#
# ## 5. Surviving a killed rank
#
# `python -m course_lib.train` takes `--checkpoint-dir` and `--checkpoint-every` and resumes from
# the latest checkpoint by default. Under `torchrun --max-restarts=1`, when one rank dies torchrun
# stops the others and starts the whole group again, once; every new process runs the same
# script from the top, finds the checkpoint and continues (chapter 10 introduced torchrun).
#
# The next cell starts dp2 training for 12 steps with a checkpoint every 3 steps, waits for the
# checkpoint of step 3 or 6 (chosen at random) and kills rank 1 with SIGKILL in the steps after
# it — no chance to clean up, as when a machine disappears. The steps after the last checkpoint
# are lost and trained again; the final curve must equal the uninterrupted run's.

# %%
KILLED = WORK / "killed"
OUT = WORK / "killed.json"
args = [
    "--dp",
    "2",
    "--steps",
    "12",
    "--n-layers",
    "2",
    "--d-model",
    "16",
    "--n-heads",
    "2",
    "--seq-len",
    "8",
]
args += ["--checkpoint-dir", str(KILLED), "--checkpoint-every", "3", "--json", str(OUT)]
after = random.choice([3, 6])  # the kill lands in a step after this checkpoint
killed = checkpoint.run_torchrun_killing_a_rank(
    args, nproc=2, checkpoint_dir=KILLED, kill_rank=1, after_step=after
)
print(f"killed rank 1 (pid {killed['killed_pid']}) after the checkpoint of step {killed['killed_after']}")
print(
    *[line for line in killed["output"].splitlines() if "resumed at" in line or "final loss" in line],
    sep="\n",
)
survived = json.loads(OUT.read_text())
dev = max(train.relative_deviation(survived["loss"], reference))  # section 2's one process, 12 steps
print(
    f"resumed from step {survived['resumed_from']}; largest relative deviation from the uninterrupted run {dev:.1e}"
)
assert "resumed at step" in killed["output"]  # torchrun started the group again, and it resumed
assert survived["resumed_from"] >= after and len(survived["loss"]) == 12
assert dev <= 1e-4

# %% [markdown]
# The loss curve after the kill is the uninterrupted one: the parameters, the moments, the
# step and the data position came back from the last checkpoint, and every step after it ran
# again on the same batches.
#
# ## What you measured
#
# - Each rank of dp2 × tp2 with ZeRO-3 wrote only its own boxes: every element of every tensor
#   once, 12Ψ bytes of tensors in all (parameter and two Adam moments), described in `meta.json`
#   by tensor name, offsets and sizes.
# - Resumed at step 6 in three other layouts — FSDP2 × CP2, PP2 × TP2 with ZeRO-1, one process —
#   the loss curve of steps 7–12 stayed within 1e-4 of a run that never stopped; loading in
#   another layout and saving again gave the same tensors bit for bit.
# - A half-written checkpoint left the last good one the latest; another model, a missing file
#   and a truncated file each raised an error naming the file and what was wrong.
# - `torch.distributed.checkpoint` saved the same state from 2 ranks and loaded it resharded on
#   3: the same tensors came back, and its metadata lists chunks by offsets and sizes as ours does.
# - A rank killed with SIGKILL under `torchrun --max-restarts=1`: the group restarted, resumed
#   from the last checkpoint, and ended on the uninterrupted run's loss curve.
