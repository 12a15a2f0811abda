"""Exact repeats at several answer lengths: how the lossless speed-up on a practised
prompt grows with the number of new tokens.

    OMP_NUM_THREADS=1 python benchmarks/bench_repeat_length.py --model qwen2.5-coder-0.5b \
        --prompts 5 --lengths 32 64 128

The model is wrapped with fresh skills and the harness's default observer (trained once
on the default passages and cached, as ``shortcut-eval practice`` does). The first
``--prompts`` practice prompts of the code workload are practised once in lossless mode
with learning on, at the longest length, and the skills are consolidated. Then, with
learning off, each prompt is generated at every length by plain ``generate`` and by
lossless shortcut, paired in the same process in rotating order
(:func:`shortcut_eval.workload.measure_prompt`). Reported per prompt and length: prompt
and new tokens (answers may end early at an end-of-sequence token), seconds of each,
speed ratio, FLOPs per generated token relative to plain, whether the tokens are
identical, and drafts accepted; then medians per length. A forward over the prompt
alone (the prefill both sides pay) is timed per prompt, median of 3.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shortcut.data import DEFAULT_PASSAGES, read_prompts  # noqa: E402
from shortcut_eval.workload import WORKLOADS, Method, generate, input_ids, load_system, measure_prompt  # noqa: E402


@torch.no_grad()
def prefill_seconds(system, ids: torch.Tensor, repeats: int = 3) -> float:
    """Median wall time of one plain forward over the prompt alone."""
    times = []
    with system.handle.disabled():
        for _ in range(repeats):
            start = time.perf_counter()
            system.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the per-prompt rows")
    args = parser.parse_args()
    records = read_prompts(WORKLOADS["code"][0], split="practice")[: args.prompts]
    start = time.perf_counter()
    system = load_system("fresh", args.model, dtype="float32", skills=None, seed=0, corpus=DEFAULT_PASSAGES,
                         sae_steps=1500, progress=False)
    print(f"loaded in {time.perf_counter() - start:.0f} s (observer trained for {system.observer_seconds:.0f} s)",
          flush=True)
    plain = Method("plain", "plain", system)
    lossless = Method("lossless", "shortcut", system, mode="lossless")

    longest = max(args.lengths)
    system.handle.set_learning(True)
    for record in records:
        start = time.perf_counter()
        run = generate(lossless, input_ids(system, record), longest)
        print(f"practised {record['id']}: {run['new_tokens']} tokens in {time.perf_counter() - start:.1f} s",
              flush=True)
    system.handle.set_learning(False)
    start = time.perf_counter()
    system.handle.learner.consolidate()
    print(f"consolidated in {time.perf_counter() - start:.1f} s", flush=True)

    rows, rotation = [], 0
    for record in records:
        ids = input_ids(system, record)
        prefill = prefill_seconds(system, ids)
        for length in args.lengths:
            result = measure_prompt([lossless], plain, record, length, rotation)
            rotation += 1
            p, s = result["plain"], result["lossless"]
            row = {"prompt": record["id"], "length": length, "prompt_tokens": p["prompt_tokens"],
                   "new_tokens": p["new_tokens"], "prefill_s": prefill, "plain_s": p["seconds"],
                   "lossless_s": s["seconds"], "speed": s["speed_ratio"], "flops": s["flops_rel"],
                   "identical": s["identical"], "drafted": s["drafted"], "accepted": s["accepted"],
                   "recalled": s["recalled"]}
            rows.append(row)
            print(f"{record['id']:32} n={length:3} prompt {row['prompt_tokens']:3} new {row['new_tokens']:3}  "
                  f"prefill {prefill:.2f} s  plain {row['plain_s']:6.2f} s  lossless {row['lossless_s']:5.2f} s  "
                  f"{row['speed']:5.2f}x  FLOPs {row['flops']:.2f}  identical {row['identical']}  "
                  f"accepted {row['accepted']:.0f}/{row['drafted']:.0f}", flush=True)
    for length in args.lengths:
        group = [r for r in rows if r["length"] == length]
        print(f"n={length:3}: median speed {statistics.median(r['speed'] for r in group):.2f}x  "
              f"FLOPs {statistics.median(r['flops'] for r in group):.2f}  "
              f"identical {sum(r['identical'] for r in group)}/{len(group)}  "
              f"new tokens {[r['new_tokens'] for r in group]}  "
              f"plain {statistics.median(r['new_tokens'] / r['plain_s'] for r in group):.2f} tok/s")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    system.handle.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
