"""Chapter 09: a cost model — memory per GPU and traffic per step for a strategy mix.

    model = PRESETS["7B"]
    plan = Strategy(dp=8, tp=4, pp=2, zero=1, sp=True, microbatches=8)
    est = estimate(model, plan)            # est.memory, est.traffic (bytes), est.bubble, est.problems

Every formula is one an earlier chapter derived and measured; the sources are the papers named:

* model states (ch. 07; Rajbhandari et al. 2020, "ZeRO"): 16Ψ bytes with mixed-precision Adam
  (2 + 2 + 12), or fp32 4 + 4 + 8; TP and PP each cut the parameters a rank holds, Ψ/(tp·pp);
  ZeRO then shards what is left over the dp ranks: stage 1 the optimizer states, 2 also the
  gradients, 3 also the parameters.
* activations per transformer layer (ch. 05; Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models"): s·b·h·(34 + 5·a·s/h) bytes, 16-bit activations;
  TP t: s·b·h·(10 + 24/t + 5·a·s/(h·t)); TP + SP: s·b·h·(34 + 5·a·s/h)/t. The 5·a·s/h term is
  the a attention-score matrices of s × s per sequence (softmax, dropout mask, dropout output):
  stored only when attention is *materialised*. FlashAttention never stores them, and selective
  recomputation recomputes them in the backward: ``Strategy(attention="flash")`` (or
  ``"selective"``) drops the term. With full recomputation (ch. 06) a layer keeps only its
  input: 2·s·b·h (÷ t with SP).
* pipeline (ch. 06; GPipe, Huang et al. 2019; 1F1B, Narayanan et al. 2021): bubble
  (p−1)/(m+p−1); GPipe keeps m micro-batches alive on a stage, 1F1B at most min(p, m) (the
  first stage is the fullest).
* DP / ZeRO traffic (ch. 02, 07): 2Ψ (DP, ZeRO-1, ZeRO-2) or 3Ψ (ZeRO-3) elements × (N−1)/N
  per step. With m micro-batches accumulated per step, DP and ZeRO-1 keep the full gradient
  and reduce it once; ZeRO-2 reduce-scatters every micro-batch ((m+1)Ψ) and ZeRO-3 also
  gathers the parameters twice per micro-batch (3mΨ) — ``zero.formula_traffic``.
* TP (ch. 04; Shoeybi et al. 2019, "Megatron-LM"): per transformer layer 2 all-reduces forward
  + 2 backward of s·b·h elements, each 2(t−1)/t of it sent per rank; SP swaps each for
  reduce-scatter + all-gather, same volume. Full recomputation runs the forward twice, so its
  2 all-reduces twice: 6 per layer (Korthikanti et al.).
* PP (ch. 06): a stage sends each micro-batch's activation forward and its gradient back.

Sizes are in bytes; "traffic" is what one rank sends per training step. Times come from the
α–β model (``course_lib.alpha_beta``): see ``course_lib.mesh.StepMessages``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from course_lib.pp import bubble_formula
from course_lib.units import format_bytes as _format_bytes
from course_lib.zero import formula_bytes, formula_traffic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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


#: How attention's s × s scores are kept for the backward (see the module's docstring).
ATTENTION = ("materialised", "flash", "selective")

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
    attention: str = "materialised"  # or "flash" / "selective": the s × s scores are not stored

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


def model_state_bytes(
    psi: float, zero: int = 0, dp: int = 1, tp: int = 1, pp: int = 1, precision: str = "mixed"
) -> dict:
    """Params, grads and optimizer states per GPU: Ψ/(tp·pp) per rank, then ZeRO over dp."""
    return formula_bytes(zero, psi / (tp * pp), dp, precision)


def activation_bytes_per_layer(
    seq_len: int,
    batch: int,
    hidden: int,
    heads: int,
    tp: int = 1,
    sp: bool = False,
    attention: str = "materialised",
) -> float:
    """Activations one transformer layer keeps for backward (16-bit, no full recomputation).

    ``attention="materialised"``: the a score matrices of s × s are stored (the 5·a·s/h term);
    ``"flash"`` (FlashAttention) or ``"selective"`` (Korthikanti et al.'s selective
    recomputation of the attention core): they are not, and the term is 0.
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    sbh = seq_len * batch * hidden
    attention = 5 * heads * seq_len / hidden if attention == "materialised" else 0.0
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


def dp_traffic_bytes(
    psi: float, zero: int, dp: int, tp: int = 1, pp: int = 1, element_bytes: int = 2, microbatches: int = 1
) -> float:
    """Gradient (and parameter) sync per step over the dp group: 2Ψ or 3Ψ·(N−1)/N.

    With ``microbatches`` m > 1 backwards per step: DP and ZeRO-1 accumulate the full
    gradient locally and reduce it once (2Ψ); ZeRO-2 reduce-scatters every micro-batch,
    (m+1)Ψ; ZeRO-3 gathers and reduce-scatters every micro-batch, 3mΨ (chapter 07).
    """
    return formula_traffic(
        zero, psi / (tp * pp), dp, element_bytes, micro_batches=microbatches, accumulate_unsharded=zero <= 1
    )


def tp_traffic_bytes(
    tokens: int, hidden: int, layers: int, tp: int, allreduces_per_layer: int = 4, element_bytes: int = 2
) -> float:
    """All-reduces of the (tokens × hidden) activation: 2(t−1)/t of it sent per rank each."""
    return allreduces_per_layer * layers * tokens * hidden * element_bytes * 2 * (tp - 1) / tp


def pp_traffic_bytes(
    tokens_per_microbatch: int, hidden: int, m: int, p: int, element_bytes: int = 2, neighbours: int = 2
) -> float:
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
    if plan.attention not in ATTENTION:
        found.append(f"attention must be one of {ATTENTION}, got {plan.attention!r}")
    return found


def estimate(model: Model, plan: Strategy, gpus: int | None = None) -> Estimate:
    """Memory per GPU, traffic per GPU per step and the bubble for ``plan`` on ``model``."""
    element = ELEMENT_BYTES[plan.precision]
    memory = model_state_bytes(model.params, plan.zero, plan.dp, plan.tp, plan.pp, plan.precision)
    b, s, m = plan.micro_batch_size, model.seq_len, plan.microbatches
    layers_here = -(-model.layers // plan.pp)  # the fullest stage
    attention = plan.attention if plan.attention in ATTENTION else "materialised"
    per_layer = activation_bytes_per_layer(s, b, model.hidden, model.heads, plan.tp, plan.sp, attention)
    if plan.recompute:  # the layer's input, 2·s·b·h fp16 bytes (split by t with SP)
        per_layer = 2 * s * b * model.hidden / (plan.tp if plan.sp else 1)
    memory["activations"] = (
        per_layer
        * element
        / 2  # the formula counts fp16 bytes
        * layers_here
        * microbatches_alive(plan.pp, m, plan.schedule)
    )
    traffic = {
        "dp": dp_traffic_bytes(model.params, plan.zero, plan.dp, plan.tp, plan.pp, element, m),
        # 2 all-reduces forward + 2 backward per layer; full recomputation repeats the forward's 2
        "tp": m
        * tp_traffic_bytes(
            s * b,
            model.hidden,
            layers_here,
            plan.tp,
            allreduces_per_layer=6 if plan.recompute else 4,
            element_bytes=element,
        ),
        "pp": pp_traffic_bytes(s * b, model.hidden, m, plan.pp, element),
    }
    result = Estimate(memory, traffic, bubble_fraction(plan.pp, m), problems(model, plan, gpus))
    if plan.pp > 1 and m < plan.pp:
        result.notes.append(f"m={m} < p={plan.pp}: the pipeline never fills; use m ≥ 4·p or so")
    if m > 1 and plan.zero >= 2:
        result.notes.append(
            f"ZeRO-{plan.zero} with m={m} micro-batches reduce-scatters the gradients every "
            "micro-batch (counted in the dp traffic); DeepSpeed allows only ZeRO-1 with its pipeline"
        )
    if plan.tp > 8:
        result.notes.append(f"tp={plan.tp} > 8: TP's all-reduces leave the 8-GPU NVLink node")
    return result


# ----------------------------------------------------------------------------
# a picture: memory per GPU of a few plans, side by side

PARTS = ("params", "grads", "optimizer", "activations")


def draw_plans(model: Model, plans: dict, gpu_bytes: float = 80e9) -> Figure:
    """Stacked bars of memory per GPU, one per ``{label: Strategy}``, against the GPU's memory."""
    from course_lib.viz import plot_plan_memory

    memories = {label: estimate(model, plan).memory for label, plan in plans.items()}
    return plot_plan_memory(
        memories, gpu_bytes, f"{model.params / 1e9:.3g}B parameters, sequence {model.seq_len}: memory per GPU"
    )


def format_bytes(n: float) -> str:
    """Memory in the decimal units GPUs are sold in: 80e9 -> '80 GB'."""
    return _format_bytes(n, decimal=True)
