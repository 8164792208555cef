"""Chapter 09b's capstone: tokens per second and peak bytes of train_gpt per configuration.

Every configuration trains the same small GPT on the same global batches (train_gpt's
defaults but one block of width 32, 20 steps) on gloo/CPU ranks launched here; configurations
of one world size share a launch (course_lib.train.run_configs). Printed as a table: global
tokens per second of wall time, rank 0's peak bytes (model states plus saved activations),
and the median step time of rank 0.

On this course's 2-core machines more ranks mean slower steps (the processes share two
cores, and a model this small spends its time in Python and messages); the table is for
comparing layouts with each other on one machine, not a speed goal. No timing is asserted.
"""

import math
import statistics
import time

from course_lib import train
from course_lib.units import format_bytes

MODEL = dict(n_layers=1, d_model=32, n_heads=4, seq_len=16, progress=False)
STEPS = 20
CONFIGS = {
    "1 rank": {},
    "1 rank bf16": dict(precision="bf16"),
    "dp2": dict(dp=2),
    "tp2": dict(tp=2),
    "pp2": dict(pp=2),
    "cp2": dict(cp=2),
    "fsdp2": dict(dp=2, sharding="fsdp"),
    "dp2·tp2 zero3": dict(dp=2, tp=2, sharding="zero3"),
    "fsdp2·tp2 bf16": dict(dp=2, tp=2, sharding="fsdp", precision="bf16"),
    "dp2·ep2 (moe)": dict(dp=2, ep=2),
    "dp2·tp2·pp2 zero1": dict(dp=2, tp=2, pp=2, sharding="zero1"),
}


def main():
    start = time.perf_counter()
    results = train.run_configs(CONFIGS, steps=STEPS, **MODEL)
    print(
        f"{STEPS} steps of a {MODEL['n_layers']}-block GPT, d={MODEL['d_model']}, sequence {MODEL['seq_len']}"
    )
    print(
        f"{'configuration':20s} {'ranks':>5s} {'tokens/s':>10s} {'median step':>12s} {'peak bytes (rank 0)':>20s}"
    )
    for name, r in results.items():
        ranks = math.prod(CONFIGS[name].get(a, 1) for a in ("dp", "tp", "pp", "cp", "ep"))
        step = statistics.median(r["step_s"])
        print(
            f"{name:20s} {ranks:5d} {r['tokens_per_s']:10,.0f} {step * 1e3:9.1f} ms "
            f"{format_bytes(r['peak_bytes']):>20s}"
        )
    print(f"[{time.perf_counter() - start:.0f} s in all]")


if __name__ == "__main__":
    main()
