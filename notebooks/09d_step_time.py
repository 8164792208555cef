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
# # 09d · A time model that predicts the step
#
# Chapter 09b trained one GPT in many layouts and checked they learn the same model; it also
# printed tokens per second, and they fell as ranks were added. This chapter says **why**, with
# numbers made before the clock runs: the time of one training step predicted from what each
# rank does (counted in one traced step) and a few figures measured on this machine, set beside
# the measured step for every capstone layout. Then the same arithmetic, with datasheet figures
# for GPUs, answers a question the source notes ask: should someone with a few gaming GPUs in two
# machines run ZeRO-3 across a 10 Gbit/s Ethernet link, or 3D parallelism?
#
# The model adds four kinds of work per rank and the pipeline's idle time:
#
# **step ≈ FLOPs / R  +  bytes / B  +  ops · t_op  +  Σ messages (α + S/β)  +  bubble**
#
# * **compute**: the FLOPs of the rank's matrix products (6·Ψ·T plus attention for the whole
#   model) over R, the rank's measured matmul rate on one core — where a back-of-the-envelope
#   estimate of a step usually stops;
# * **memory**: the bytes the other ops (LayerNorm, softmax, GELU, additions, Adam) read and
#   write, over B, the rate of an element-wise op on one core;
# * **overhead**: every op costs t_op before it does any arithmetic — Python, the dispatcher,
#   autograd's bookkeeping; measured on an op that does almost nothing;
# * **communication**: every collective and send priced by the α–β model of chapter 01;
# * **bubble**: the pipeline's idle time, from chapter 06b's simulator.
#
# And one thing a laptop adds that a GPU cluster does not: **ranks share cores**. Eight ranks on
# two cores each get a quarter of a core, and a message waits until its receiver gets one.

# %%
import inspect
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from course_lib import cost, gpt, launch, step_time, viz_step_time
from course_lib.units import format_bytes

T0 = time.perf_counter()

# %% [markdown]
# ## 1. The FLOPs of one step
#
# A matrix product of a (T × d) input with a (d × k) weight does 2·T·d·k FLOPs (a multiply and an
# add per term). The backward does two such products — the input's gradient and the weight's —
# so a weight costs 2 FLOPs per token forward and 4 backward: **6·Ψ·T** for the whole model, Ψ
# the weights of its matrix products, T the tokens of the step (Kaplan et al. 2020, "Scaling Laws
# for Neural Language Models", §2.1). Attention adds two products that have no weights, q·kᵀ and
# scores·v, each 2·s·d FLOPs per token forward: **12·L·s·d·T** with the backward (the PaLM paper's
# appendix B counts the same, Chowdhery et al. 2022). Embedding look-ups, biases, LayerNorms and
# the softmax do no matrix products and are not counted.
#
# This chapter's model is 09b's GPT, four times wider and with a four times longer sequence, so
# that arithmetic shows up next to everything else:

# %%
MODEL = step_time.CAPSTONE_MODEL
print(MODEL)
BATCH = 8  # train_gpt's default global batch
vocab = gpt.CharTokenizer().vocab_size
flops = step_time.model_flops(vocab, batch_size=BATCH, **MODEL)
print(inspect.getsource(step_time.model_flops).split('"""')[0] + "...")
print(
    f"Ψ = {flops['psi']:,} weights, T = {flops['tokens']} tokens: 6ΨT = {flops['matmul'] / 1e9:.3f} GFLOP, "
    f"attention {flops['attention'] / 1e9:.3f} GFLOP, total {flops['total'] / 1e9:.3f} GFLOP per step"
)

model = gpt.make_gpt(vocab, **MODEL)
x = torch.randint(0, vocab, (BATCH, MODEL["seq_len"]))
with FlopCounterMode(display=False) as counter:
    gpt.token_loss_sum(model(x), x).backward()
print(f"torch's FlopCounterMode, one forward and backward: {counter.get_total_flops() / 1e9:.3f} GFLOP")
assert counter.get_total_flops() == flops["total"]

# %% [markdown]
# The formula and torch's own counter agree to the FLOP.
#
# ## 2. The machine, measured
#
# Each figure is measured here, in one launch of 8 ranks (`step_time.measure_machine`):
#
# * R, the FLOP/s of 256 × 256 fp32 matmuls on one core (one thread, the other ranks idle);
# * the **peak**: the same matmuls on every core at once, added up. This is what MFU divides by
#   — measured, not a number from a CPU's data sheet;
# * B, the bytes per second an element-wise multiplication of 1 Mi floats reads and writes;
# * t_op, the time per op of a chain of 64 multiplications of a 4-element tensor, forward and
#   backward: what an op costs when it does (almost) no arithmetic;
# * α and β, chapter 01's ping-pong fitted by `alpha_beta.fit` — with 2 ranks, and again with 4
#   and 8 ranks bouncing messages in pairs at once, each rank doing 32 small ops between
#   messages as a training rank computes between its calls. With 2 ranks on 2 cores that is
#   chapter 01's α; with more ranks than cores a message also waits until its receiver gets a
#   core back from the others' work, and the fit takes that in.
#
# Every figure is the fastest of several batches: another program on the machine only ever
# makes a batch slower.

# %%
machine = step_time.measure_machine(worlds=(2, 4, 8))
print(machine.describe())
assert machine.core_flops > 0 and machine.peak_flops > 0 and machine.op_seconds > 0
assert machine.memory_bandwidth > 0 and all(ab.alpha > 0 and ab.beta > 0 for ab in machine.links.values())


# %% [markdown]
# ## 3. What one rank does in a step
#
# The capstone's layouts from 09b, in fp32 (09b's bf16 runs are left out: see the end), and the
# same model for all. Every axis (dp, tp, pp, cp, ep) and every sharding (ZeRO-1/2/3, FSDP)
# appears at least once:

# %%
CONFIGS = step_time.CAPSTONE_LAYOUTS
for name, layout in CONFIGS.items():
    print(f"{name:22} {layout}")

# %% [markdown]
# `measure_configs` launches each layout once. Every rank first runs one step of
# `train.train_gpt` under `step_time.trace_step()`, which **counts** and does not time: the FLOPs
# of its matrix products (torch's `FlopCounterMode`), every op it dispatches, and every
# collective and send with its group size and bytes. Then it trains four more steps and
# `train_gpt` returns each step's wall time (`step_s`); the first is a warm-up.

# %%
runs = step_time.measure_configs(CONFIGS, steps=4, **MODEL)

name = "dp2·tp2·pp2 zero1"
trace = runs[name].traces[0]
print(f"{name}, rank 0: {trace.flops / 1e9:.3f} GFLOP, {trace.ops:,} ops, {len(trace.calls)} calls")
kinds = {}
for call in trace.calls:
    kinds.setdefault((call.op, call.group), []).append(call.nbytes)
for (op, group), sizes in sorted(kinds.items()):
    print(f"  {op:18s} over {group} ranks: {len(sizes):3d} calls, {format_bytes(sum(sizes)):>10s} in all")

# %% [markdown]
# Each rank does about 1/N of the model's FLOPs — the layouts split the work, they do not add to
# it — but the number of ops does not shrink with N: a tensor-parallel rank runs every op of its
# layers on half-width matrices, and a pipeline stage runs its layers' ops once per micro-batch.
# Over all ranks the FLOPs add up to the model's (for the MoE layouts: a token's FLOPs count the
# gate and the k = 2 experts it visits, `model_flops(..., moe=True)`):

# %%
moe_flops = step_time.model_flops(vocab, batch_size=BATCH, moe=True, **MODEL)
for name, run in runs.items():
    expected = moe_flops if "moe" in name else flops
    total = sum(t.flops for t in run.traces)
    ops = max(t.ops for t in run.traces)
    print(
        f"{name:22s} N={run.world}  Σ FLOPs {total / 1e9:.3f} GFLOP (formula {expected['total'] / 1e9:.3f}), "
        f"per rank {max(t.flops for t in run.traces) / 1e9:.3f} GFLOP, {ops:,} ops"
    )
    assert abs(total / expected["total"] - 1) < 0.03

# %% [markdown]
# ## 4. The model
#
# Per rank, from its trace: compute = its matrix products' time, memory = bytes/B, overhead =
# ops·t_op, and
# communication = Σ α–β over its calls (`step_time.call_seconds`: a message α + S/β, a ring
# all-reduce over n ranks 2(n−1)(α + S/(nβ)), an all-gather, reduce-scatter or all-to-all
# (n−1)(α + S/(nβ)), as chapter 01 measured them).
#
# Compute needs one more measurement. R above is the rate of a square 256 × 256 product that stays
# in the cache; the model's products are thinner (width 128, 512 rows) and write new outputs, and
# run at a different rate. So `measure_configs` also times each rank's own products, shape by shape,
# alone on one core (`step_time.matmul_seconds`) — the rank's measured matmul throughput:

# %%
for name, run in runs.items():
    t = run.traces[0]
    shapes = sum(t.matmuls.values())
    print(
        f"{name:22s} rank 0: {shapes:3d} products of {len(t.matmuls):2d} shapes, {t.flops / 1e9:.3f} GFLOP in "
        f"{t.matmul_seconds * 1e3:5.1f} ms = {t.flops / t.matmul_seconds / 1e9:5.1f} GFLOP/s "
        f"(R = {machine.core_flops / 1e9:.1f})"
    )

# %% [markdown]
# Sharing cores. Compute, memory and overhead are CPU work: with N ranks on C < N cores, each
# runs at C/N of a core. The messages are priced with the α–β measured with as many ranks
# exchanging, which already includes waiting for a core. A step then takes the larger of two
# bounds:
#
# * the **path**: each pipeline stage's busiest rank, its work cut into m forwards (⅓) and m
#   backwards (⅔) and played through the 1F1B schedule by `pipeline_schedules.simulate` — the
#   bubble is what the schedule adds; without a pipeline, the busiest rank's work;
# * the **machine**: all ranks' CPU work over all cores (plus the busiest rank's messages). When
#   this is larger, a stage waiting in the bubble lends its core to the other stage, and the
#   bubble costs nothing.

# %%
print(inspect.getsource(step_time.predict))

# %% [markdown]
# ## 5. Predicted against measured, every layout
#
# The measured step is the fastest of the three timed steps after the warm-up (a step ends for
# all ranks at once, at the loss's all-reduce, so a step's time is its slowest rank's). Another
# program that holds the cores for a whole launch makes all its steps slow (seen on a shared CI
# machine: a one-process step at 3.7 times its prediction); so a layout outside a factor of 3 of
# its prediction is launched once more and the faster of its two launches kept.

# %%
PARTS = ("compute", "memory", "overhead", "comm", "bubble")
far = [n for n in runs if not 1 / 3 <= step_time.predict(runs[n], machine).total / runs[n].measured <= 3]
if far:
    print(f"launched again, outside a factor of 3 of the prediction: {', '.join(far)}")
    again = step_time.measure_configs({n: CONFIGS[n] for n in far}, steps=4, **MODEL)
    runs.update({n: min(runs[n], again[n], key=lambda r: r.measured) for n in far})
rows, predictions = {}, {}
print(f"{'layout':22s} {'N':>2s} " + " ".join(f"{k:>8s}" for k in PARTS) + "  predicted  measured  ratio")
for name, run in runs.items():
    p = predictions[name] = step_time.predict(run, machine)
    rows[name] = {k: getattr(p, k) for k in PARTS} | {"measured": run.measured}
    print(
        f"{name:22s} {run.world:2d} "
        + " ".join(f"{getattr(p, k) * 1e3:8.1f}" for k in PARTS)
        + f"  {p.total * 1e3:9.1f} {run.measured * 1e3:9.1f} {p.total / run.measured:6.2f}"
    )
ratios = {n: predictions[n].total / runs[n].measured for n in runs}
errors = sorted(abs(q - 1) for q in ratios.values())
within = sum(e <= 0.3 for e in errors)
print(f"(ms) within 30 %: {within} of {len(errors)}; median error {errors[len(errors) // 2]:.0%}")

# %%
viz_step_time.predicted_vs_measured(rows)

# %% [markdown]
# On an idle machine the goal is every prediction within 30 % (`benchmarks/bench_step_time.py`
# measures it with more steps; on this course's 2-core machine, idle, it found 6 of 7 within 30 %,
# median error 11 %, the one-process MoE step the one under-predicted, at 0.64 of what it took;
# "Why they differ" below says where the model is off). The claim asserted here is looser, so
# that it holds on a shared CI machine where other jobs take the cores unevenly between the
# machine's measurements and the steps': every prediction within a factor of 3 of the measured
# step, and the model and the clock agree on which layout is fastest (one process) and that every
# multi-rank layout is at least 1.5 times as slow as one process on these cores (on the idle
# machine 2.9–5.4 times measured, 3.8–7.8 times predicted; in one CI run, other tests sharing
# the cores brought one layout under 2 times).

# %%
SCHED_BATCH = launch.batch_scheduling_requested()
if SCHED_BATCH:
    # Chapter 03: with the ranks as SCHED_BATCH the multi-rank steps run faster and this model,
    # fitted with the default policy, predicted 35–65 % of them. Said, not checked.
    print(
        f"{launch.SCHED_BATCH_ENV}=1: the ranks ran as SCHED_BATCH, for which this model is known to "
        "under-predict multi-rank steps (chapter 03); the model's checks are skipped. Unset it and "
        "restart the kernel to check the model."
    )
else:
    assert all(1 / 3 <= q <= 3 for q in ratios.values()), ratios
    fastest = min(runs, key=lambda n: runs[n].measured)
    assert fastest == min(predictions, key=lambda n: predictions[n].total) == "1 rank"
    for name, run in runs.items():
        if run.world > 1:
            measured_x = run.measured / runs["1 rank"].measured
            predicted_x = predictions[name].total / predictions["1 rank"].total
            assert measured_x > 1.5 and predicted_x > 1.5, (
                f"{name}: {measured_x:.2f}× measured, {predicted_x:.2f}× predicted"
            )

# %% [markdown]
# ### Why they differ
#
# Read the table by its columns. On one rank the step is arithmetic and overhead; on 4 and 8
# ranks sharing two cores it is mostly messages — each rank's FLOPs shrink as 1/N, its ops and
# calls do not, and every call waits for partners that are queued behind other ranks for a core.
# Where the model is off, these are the reasons, each a simplification it makes:
#
# * each product is timed alone, repeated on the same operands; in a step it follows other ops
#   that have pushed its operands out of the cache. B comes from one large multiplication; some
#   ops cost more than their bytes (GELU computes an erf per element). A rank's Python between
#   its ops — the course's modules' bookkeeping, the activation meter of 09b — is in no term;
# * t_op is one op's cost on a cheap op; ops differ;
# * the α–β with N ranks is measured with 32 small ops between messages; a rank's real work
#   between two calls varies (below), and so does how long its partners wait for a core;
# * messages that overlap (ring attention posts its sends before computing; ZeRO-3 and FSDP
#   prefetch the next gather) are added as if they did not;
# * other programs on the machine slow the steps but hardly the fastest of many short batches
#   the machine's figures are made of: on a busy machine the model predicts too little.

# %%
for name, run in runs.items():
    t = max(run.traces, key=lambda t: t.ops)
    calls = max(len(t.calls), 1)
    share = predictions[name].comm / predictions[name].total
    print(
        f"{name:22s} {t.ops:5d} ops, {len(t.calls):3d} calls: {t.ops / calls:5.0f} ops per call; messages {share:4.0%} of the prediction"
    )
if not SCHED_BATCH:  # see the cell above
    assert all(predictions[n].comm / predictions[n].total > 0.3 for n, r in runs.items() if r.world > 2)

# %% [markdown]
# ## 6. MFU
#
# Model FLOPs utilisation (the term comes from the PaLM paper, Chowdhery et al. 2022): the
# model's FLOPs per step — 6ΨT + attention, not the FLOPs the hardware did — per second, over
# the peak of the hardware the run occupied. Here that is min(N, cores) cores at the peak
# measured in section 2.

# %%
mfus = {}
for name, run in runs.items():
    model_flops = (moe_flops if "moe" in name else flops)["total"]
    mfus[name] = step_time.mfu(model_flops, run.measured, machine, run.world)
    print(f"{name:22s} MFU {mfus[name]:6.1%}")
assert all(0 < u < 1 for u in mfus.values())
assert mfus["1 rank"] == max(v for k, v in mfus.items() if "moe" not in k)

# %% [markdown]
# ## 7. GPUs: ZeRO-3 over 10 GbE, or 3D parallelism?
#
# The source notes ask whether someone without a data centre should try 3D parallelism, or go
# straight to ZeRO-3 over several machines joined by 10 Gbit/s Ethernet (万兆网), and answer with
# cost and difficulty. The time model gives a sharper answer. Take two machines
# with four RTX 4090s each — 24 GB per GPU, the GPUs of a machine joined by PCIe 4.0 (no NVLink on
# this card), the machines by one 10 GbE link — and train a 7B model, and a 1.3B one, on 64 Ki
# tokens per step.
#
# The figures, each from a stated source (`step_time.GPUS`, `step_time.LINKS`):

# %%
for gpu in step_time.GPUS.values():
    print(
        f"{gpu.name:14s} {gpu.bf16_flops / 1e12:6.1f} TFLOP/s bf16, {gpu.memory / 1e9:3.0f} GB — {gpu.source}"
    )
for link in step_time.LINKS.values():
    print(f"{link.name:14s} {link.bandwidth / 1e9:6.2f} GB/s one way — {link.source}")

# %% [markdown]
# The GPU side of the model is chapter 09's cost model (`cost.estimate`: memory per GPU and bytes
# per GPU per axis, bf16 with Adam's fp32 states, 16 bytes per parameter) with each axis's bytes
# sent over the link it crosses: ZeRO-3's gathers and reduce-scatters go round a ring of all 8
# GPUs, and a ring is as fast as its slowest hop, the Ethernet link; in the 3D layout tensor
# parallelism stays inside a machine (PCIe) and only the pipeline's activations cross the
# Ethernet (each GPU sends its 1/t share of them, Narayanan et al. 2021's scatter/gather). Compute
# runs at an assumed 50 % of the bf16 peak (an assumption: PaLM reports an MFU of 46.2 % for its
# 540B model, Chowdhery et al. 2022), with full activation recomputation (4/3 of the FLOPs) so that the
# activations fit in 24 GB. Two totals: nothing overlapped (every part added), and communication
# fully hidden under compute where it can be (the larger of compute and the slowest axis) — a
# real run lands between them.

# %%
GPU, L = step_time.GPUS["RTX 4090"], step_time.LINKS
TWO_BOXES = dict(dp=L["10 GbE"], tp=L["PCIe 4.0 x16"], pp=L["10 GbE"])
TOKENS = 65536


def plans(size):
    seqs = TOKENS // cost.PRESETS[size].seq_len
    common = dict(recompute=True, attention="flash")
    return {
        "ZeRO-3, dp8 over 10 GbE": cost.Strategy(dp=8, zero=3, micro_batch_size=seqs // 8, **common),
        "3D: tp4 (PCIe) × pp2 (10 GbE)": cost.Strategy(tp=4, pp=2, sp=True, microbatches=seqs, **common),
        "tp4 (PCIe) × dp2 ZeRO-1 (10 GbE)": cost.Strategy(
            tp=4, dp=2, zero=1, sp=True, microbatches=seqs // 2, **common
        ),
    }


gpu_rows = {}
print(
    f"{'model':5s} {'plan':34s} {'GB/GPU':>6s} {'fits':>4s} {'compute':>7s} {'bubble':>6s} {'dp':>6s} "
    f"{'tp':>5s} {'pp':>5s} {'serial':>7s} {'overlap':>7s}  (seconds per step)"
)
for size in ("7B", "1.3B"):
    for label, plan in plans(size).items():
        r = step_time.cluster_step(cost.PRESETS[size], plan, GPU, TWO_BOXES)
        assert r["tokens"] == TOKENS
        gpu_rows[(size, label)] = r
        print(
            f"{size:5s} {label:34s} {r['memory'] / 1e9:6.1f} {'yes' if r['fits'] else 'no':>4s} {r['compute']:7.2f} "
            f"{r['bubble']:6.2f} {r['dp']:6.2f} {r['tp']:5.2f} {r['pp']:5.2f} {r['serial']:7.2f} {r['overlapped']:7.2f}"
        )
reference = step_time.cluster_step(
    cost.PRESETS["7B"],
    plans("7B")["ZeRO-3, dp8 over 10 GbE"],
    step_time.GPUS["H100 SXM"],
    dict(dp=L["NVLink 4"], tp=L["NVLink 4"], pp=L["NVLink 4"]),
)
print(
    f"\nfor comparison, 7B ZeRO-3 on 8 H100 in one NVLink box: compute {reference['compute']:.2f} s, "
    f"ZeRO-3 traffic {reference['dp']:.2f} s per step"
)

# %%
viz_step_time.plan_times(
    {f"{size} {label}": gpu_rows[(size, label)] for size, label in gpu_rows},
    "two boxes of 4 × RTX 4090, 10 GbE between them: one step of 64 Ki tokens",
)

# %% [markdown]
# The answer the numbers give: **not ZeRO-3 across the Ethernet.** For 7B every step must gather
# every parameter twice and reduce-scatter every gradient, 3Ψ·(N−1)/N bf16 values per GPU — about
# 35 GB — and a 10 GbE ring moves 1.25 GB/s: about 28 s of traffic against about 6 s of compute,
# so even perfect overlap leaves the GPUs idle four fifths of the time. The 3D layout keeps the
# heavy traffic (tensor parallelism's all-reduces) on PCIe inside each machine and sends only
# activations across the link; its step is about 3.5× (nothing overlapped) to 4.3× (all
# overlapped) shorter, at about the same memory per GPU. For
# 1.3B the same holds at a smaller scale. In one NVLink box ZeRO-3's traffic is under a tenth of a
# second: ZeRO-3 is a good plan where the links are fast, and a poor one where they are not.
# The caveats: the efficiency (50 %) is assumed; with NVIDIA's stock driver an RTX 4090 has no
# GPU-to-GPU peer-to-peer over PCIe (NVIDIA/nccl issue #1127), so its traffic goes through host
# memory and the tp column is optimistic; and the notes' other points — cost, and the skill to
# run it — stand.

# %%
for size in ("7B", "1.3B"):
    zero3 = gpu_rows[(size, "ZeRO-3, dp8 over 10 GbE")]
    three_d = gpu_rows[(size, "3D: tp4 (PCIe) × pp2 (10 GbE)")]
    assert zero3["fits"] and three_d["fits"]
    assert zero3["overlapped"] > 2 * three_d["overlapped"] and zero3["serial"] > 2 * three_d["serial"]
assert reference["dp"] < 0.1 * reference["compute"] and reference["dp"] < 0.1
seven_b = gpu_rows[("7B", "ZeRO-3, dp8 over 10 GbE")], gpu_rows[("7B", "3D: tp4 (PCIe) × pp2 (10 GbE)")]
assert round(seven_b[0]["serial"] / seven_b[1]["serial"], 1) == 3.5
assert round(seven_b[0]["overlapped"] / seven_b[1]["overlapped"], 1) == 4.3
assert 0.75 < 1 - seven_b[0]["compute"] / seven_b[0]["overlapped"] < 0.85  # idle four fifths of the time

# %% [markdown]
# ## What you measured
#
# - The FLOPs of one training step, 6·Ψ·T + 12·L·s·d·T, equal to the FLOP torch's
#   `FlopCounterMode` counts in a forward and backward of the GPT; over all ranks of every
#   capstone layout the traced FLOPs add up to it (the MoE layouts with the k experts a token
#   visits).
# - This machine: one core's matmul rate R, the peak of all cores at once (the MFU denominator,
#   measured here), the element-wise rate B, one op's cost t_op, α–β with 2, 4 and 8 ranks
#   exchanging at once (with more ranks than cores a message also waits for a core), and every
#   rank's own matrix products timed alone, shape by shape.
# - Every capstone layout traced for one step — its FLOPs, bytes, ops and each collective and send
#   — priced as compute + memory + overhead + messages + pipeline bubble, with ranks beyond the
#   cores sharing them, beside the fastest measured step: the table and plot of section 5,
#   every prediction within a factor of 3 (asserted; the goal on an idle machine is 30 %,
#   `benchmarks/bench_step_time.py`), both agreeing that one process is fastest here and every
#   multi-rank layout at least twice as slow. On 4 and 8 ranks the messages are most of the time.
# - MFU of every run against the measured peak: highest for one process, lower with every rank
#   added on the same two cores.
# - With datasheet figures (H100, A100, RTX 4090; NVLink, PCIe 4.0, 10 GbE, each sourced) and
#   chapter 09's cost model: for 7B and 1.3B on two machines of four RTX 4090s, ZeRO-3 across
#   10 GbE spends most of its step on the network and takes more than twice as long as tp4 × pp2
#   (tensor parallelism inside a machine, the pipeline across), at similar memory per GPU.
# - Not covered: overlap of communication with compute on the CPU ranks (the model adds them);
#   09b's bf16 layouts (their products would have to be timed in bf16, which a CPU runs at a
#   very different rate); and a GPU measurement of the GPU table (its efficiency is assumed).

# %%
print(f"lesson: {time.perf_counter() - T0:.1f} s")
