"""Chapter 09: a cost model — memory per GPU and traffic per step for a strategy mix.

    model = PRESETS["7B"]
    plan = Strategy(dp=8, tp=4, pp=2, zero=1, sp=True, microbatches=8)
    est = estimate(model, plan)            # est.memory, est.traffic (bytes), est.bubble, est.problems

Every formula is one an earlier chapter derived and measured (COURSE_GUIDE §7):

* model states (ch. 07): 16Ψ bytes with mixed-precision Adam (2 + 2 + 12), or fp32 4 + 4 + 8;
  TP and PP each cut the parameters a rank holds, Ψ/(tp·pp); ZeRO then shards what is left
  over the dp ranks: stage 1 the optimizer states, 2 also the gradients, 3 also the parameters.
* activations per transformer layer (ch. 05, Korthikanti et al.): s·b·h·(34 + 5·a·s/h) bytes;
  TP t: s·b·h·(10 + 24/t + 5·a·s/(h·t)); TP + SP: s·b·h·(34 + 5·a·s/h)/t.
  With full recomputation (ch. 06) a layer keeps only its input: 2·s·b·h (÷ t with SP).
* pipeline (ch. 06): bubble (p−1)/(m+p−1); GPipe keeps m micro-batches alive on a stage,
  1F1B at most min(p, m) (the first stage is the fullest).
* DP / ZeRO traffic (ch. 02, 07): 2Ψ (DP, ZeRO-1, ZeRO-2) or 3Ψ (ZeRO-3) elements × (N−1)/N.
* TP (ch. 04): per transformer layer 2 all-reduces forward + 2 backward of s·b·h elements,
  each 2(t−1)/t of it sent per rank; SP swaps each for reduce-scatter + all-gather, same volume.
* PP (ch. 06): a stage sends each micro-batch's activation forward and its gradient back.

Sizes are in bytes; "traffic" is what one rank sends per training step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from course_lib.pp import bubble_formula
from course_lib.zero import formula_bytes, formula_traffic

#: Bytes per element of activations and of messages (fp16/bf16 training, or the course's fp32).
ELEMENT_BYTES = {"mixed": 2, "fp32": 4}


@dataclass(frozen=True)
class Model:
    """A GPT-like transformer: Ψ parameters, L layers, hidden h, a heads, sequence s."""
    params: float
    layers: int
    hidden: int
    heads: int
    seq_len: int = 2048


#: Roughly GPT-3 1.3B, Llama-2 7B and 70B shapes (70B's grouped KV heads ignored).
PRESETS = {
    "1.3B": Model(1.3e9, 24, 2048, 16, 2048),
    "7B": Model(6.7e9, 32, 4096, 32, 4096),
    "70B": Model(69e9, 80, 8192, 64, 4096),
}


@dataclass(frozen=True)
class Strategy:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0  # ZeRO stage over the dp ranks; 0 = plain data parallel
    sp: bool = False  # sequence parallel on top of tp
    microbatches: int = 1  # m, per step per pipeline
    micro_batch_size: int = 1  # b, sequences per micro-batch
    schedule: str = "1f1b"  # or "gpipe"
    recompute: bool = False  # full activation checkpointing: keep only each layer's input
    precision: str = "mixed"  # or "fp32"

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp


@dataclass
class Estimate:
    memory: dict  # bytes per GPU: params, grads, optimizer, activations
    traffic: dict  # bytes one GPU sends per step: dp, tp, pp
    bubble: float  # idle share of the pipeline's time
    problems: list = field(default_factory=list)  # why the mix cannot run (empty: it can)
    notes: list = field(default_factory=list)  # it runs, but mind this

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())


# ----------------------------------------------------------------------------
# the formulas, one function each


def model_state_bytes(psi: float, zero: int = 0, dp: int = 1, tp: int = 1, pp: int = 1,
                      precision: str = "mixed") -> dict:
    """Params, grads and optimizer states per GPU: Ψ/(tp·pp) per rank, then ZeRO over dp."""
    return formula_bytes(zero, psi / (tp * pp), dp, precision)


def activation_bytes_per_layer(seq_len: int, batch: int, hidden: int, heads: int,
                               tp: int = 1, sp: bool = False) -> float:
    """Activations one transformer layer keeps for backward (fp16, no recomputation)."""
    sbh, attention = seq_len * batch * hidden, 5 * heads * seq_len / hidden
    if tp == 1:
        return sbh * (34 + attention)
    if sp:  # LayerNorm and dropout activations are cut by t too
        return sbh * (34 + attention) / tp
    return sbh * (10 + 24 / tp + attention / tp)  # 10·sbh: LayerNorms, dropouts, replicated


def bubble_fraction(p: int, m: int) -> float:
    """Idle share of a GPipe/1F1B pipeline: (p−1)/(m+p−1)."""
    return bubble_formula(p, m)


def microbatches_alive(p: int, m: int, schedule: str = "1f1b") -> int:
    """Most micro-batches whose activations the first stage holds at once."""
    return m if schedule == "gpipe" else min(p, m)


def dp_traffic_bytes(psi: float, zero: int, dp: int, tp: int = 1, pp: int = 1,
                     element_bytes: int = 2) -> float:
    """Gradient (and parameter) sync per step over the dp group: 2Ψ or 3Ψ·(N−1)/N."""
    return formula_traffic(zero, psi / (tp * pp), dp, element_bytes)


def tp_traffic_bytes(tokens: int, hidden: int, layers: int, tp: int, allreduces_per_layer: int = 4,
                     element_bytes: int = 2) -> float:
    """All-reduces of the (tokens × hidden) activation: 2(t−1)/t of it sent per rank each."""
    return allreduces_per_layer * layers * tokens * hidden * element_bytes * 2 * (tp - 1) / tp


def pp_traffic_bytes(tokens_per_microbatch: int, hidden: int, m: int, p: int,
                     element_bytes: int = 2, neighbours: int = 2) -> float:
    """A middle stage sends each micro-batch's activation forward and its gradient back
    (``neighbours=2``); the first stage only the activations, the last only the gradients (1)."""
    return 0.0 if p == 1 else neighbours * m * tokens_per_microbatch * hidden * element_bytes


# ----------------------------------------------------------------------------
# all of them for one model and one strategy


def problems(model: Model, plan: Strategy, gpus: int | None = None) -> list[str]:
    """Why ``plan`` cannot run ``model`` (an empty list when it can)."""
    found = []
    if gpus is not None and plan.gpus != gpus:
        found.append(f"dp·tp·pp = {plan.dp}·{plan.tp}·{plan.pp} = {plan.gpus}, but there are {gpus} GPUs")
    if model.heads % plan.tp:
        found.append(f"tp={plan.tp} does not divide the {model.heads} attention heads")
    if model.hidden % plan.tp:
        found.append(f"tp={plan.tp} does not divide the hidden size {model.hidden}")
    if plan.pp > model.layers:
        found.append(f"pp={plan.pp} stages but only {model.layers} layers")
    if plan.sp and plan.tp == 1:
        found.append("sequence parallelism splits the tensor-parallel group's work: it needs tp > 1")
    if plan.sp and model.seq_len % plan.tp:
        found.append(f"tp={plan.tp} does not divide the sequence length {model.seq_len} (needed for SP)")
    if plan.zero not in (0, 1, 2, 3):
        found.append(f"ZeRO stage must be 0..3, got {plan.zero}")
    return found


def estimate(model: Model, plan: Strategy, gpus: int | None = None) -> Estimate:
    """Memory per GPU, traffic per GPU per step and the bubble for ``plan`` on ``model``."""
    element = ELEMENT_BYTES[plan.precision]
    memory = model_state_bytes(model.params, plan.zero, plan.dp, plan.tp, plan.pp, plan.precision)
    b, s, m = plan.micro_batch_size, model.seq_len, plan.microbatches
    layers_here = -(-model.layers // plan.pp)  # the fullest stage
    per_layer = activation_bytes_per_layer(s, b, model.hidden, model.heads, plan.tp, plan.sp)
    if plan.recompute:  # the layer's input, 2·s·b·h fp16 bytes (split by t with SP)
        per_layer = 2 * s * b * model.hidden / (plan.tp if plan.sp else 1)
    memory["activations"] = (per_layer * element / 2  # the formula counts fp16 bytes
                             * layers_here * microbatches_alive(plan.pp, m, plan.schedule))
    traffic = {"dp": dp_traffic_bytes(model.params, plan.zero, plan.dp, plan.tp, plan.pp, element),
               "tp": m * tp_traffic_bytes(s * b, model.hidden, layers_here, plan.tp, element_bytes=element),
               "pp": pp_traffic_bytes(s * b, model.hidden, m, plan.pp, element)}
    result = Estimate(memory, traffic, bubble_fraction(plan.pp, m), problems(model, plan, gpus))
    if plan.pp > 1 and m < plan.pp:
        result.notes.append(f"m={m} < p={plan.pp}: the pipeline never fills; use m ≥ 4·p or so")
    if plan.pp > 1 and plan.zero >= 2:
        result.notes.append("ZeRO-2/3 with pp > 1: each micro-batch would reduce-scatter the gradients "
                            "again (DeepSpeed allows only ZeRO-1 with its pipeline)")
    if plan.tp > 8:
        result.notes.append(f"tp={plan.tp} > 8: TP's all-reduces leave the 8-GPU NVLink node")
    return result


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000


# ----------------------------------------------------------------------------
# a picture: memory per GPU of a few plans, side by side

PARTS = ("params", "grads", "optimizer", "activations")
PART_COLORS = {"params": "tab:blue", "grads": "tab:orange", "optimizer": "tab:green", "activations": "tab:red"}


def draw_plans(model: Model, plans: dict, gpu_bytes: float = 80e9):
    """Stacked bars of memory per GPU, one per ``{label: Strategy}``, against the GPU's memory."""
    from course_lib.viz import CourseFigure

    fig = CourseFigure(figsize=(7.5, 3.6), layout="constrained")
    ax = fig.subplots()
    labels = list(plans)
    for i, label in enumerate(labels):
        est = estimate(model, plans[label])
        bottom = 0.0
        for part in PARTS:
            value = est.memory[part] / 1e9
            ax.bar(i, value, bottom=bottom, color=PART_COLORS[part], width=0.6,
                   label=part if i == 0 else None)
            bottom += value
        ax.text(i, bottom, f"{bottom:.3g} GB", ha="center", va="bottom", fontsize=8)
    ax.axhline(gpu_bytes / 1e9, color="black", linestyle="--", linewidth=1)
    ax.text(-0.45, gpu_bytes / 1e9, f"one GPU: {gpu_bytes / 1e9:.0f} GB", va="bottom", ha="left", fontsize=8,
            bbox=dict(facecolor="white", alpha=0.8, linewidth=0, pad=1))
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("memory per GPU (GB)")
    ax.set_ylim(0, max(ax.get_ylim()[1], gpu_bytes / 1e9) * 1.15)  # room for the labels
    ax.legend(fontsize=8, loc="upper right", ncols=4)
    ax.set_title(f"{model.params / 1e9:.3g}B parameters, sequence {model.seq_len}: memory per GPU", fontsize=10)
    return fig
