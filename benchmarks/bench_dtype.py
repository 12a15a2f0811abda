"""Plain decoding speed and tokens in float32 against bfloat16, and lossless decoding
against plain in each dtype.

    OMP_NUM_THREADS=1 python benchmarks/bench_dtype.py --model qwen2.5-coder-0.5b --prompts 4 --tokens 32

For each dtype the model is loaded, then each of the first ``--prompts`` practice
prompts of the code workload (``shortcut_eval/data/code_prompts.jsonl``, one per kind)
is generated greedily: plain (the unwrapped model), then lossless twice with fresh
skills, learning on. The second lossless call drafts the first call's tokens from the
practised-sequence memory, so every one of its tokens is verified in a multi-token
forward: the place where reduced precision could change an argmax. Reported: plain
tokens/s (median over prompts), how many lossless outputs equal plain's in the same
dtype, and how far bfloat16's plain tokens agree with float32's (positions equal, and
the shared prefix).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import shortcut  # noqa: E402
from shortcut.data import prompt_input_ids, read_prompts  # noqa: E402
from shortcut_eval.workload import DTYPES, WORKLOADS  # noqa: E402


def run(model_name: str, dtype: str, records: list[dict], tokens: int) -> dict:
    model, tokenizer = shortcut.load_model(model_name, dtype=DTYPES[dtype])
    handle = shortcut.wrap(model)
    plain, speeds, identical, accepted = [], [], 0, 0
    for record in records:
        ids = prompt_input_ids(tokenizer, record)
        gen = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
        with handle.disabled():
            start = time.perf_counter()
            out = model.generate(**gen)
            seconds = time.perf_counter() - start
        new = out[0, ids.shape[1]:]
        plain.append(new.tolist())
        speeds.append(len(new) / seconds)
        for call in (1, 2):
            before = handle.decode_stats.copy()
            lossless = model.generate(**gen)
            same = torch.equal(lossless, out)
            identical += same
            accepted += (handle.decode_stats - before).accepted
            print(f"{dtype:9} {record['id']:40} plain {len(new) / seconds:5.2f} tok/s  "
                  f"lossless call {call} identical {same}", flush=True)
    handle.remove()
    del model, handle
    gc.collect()
    return {"plain": plain, "tokens_per_second": statistics.median(speeds), "identical": identical,
            "calls": 2 * len(records), "accepted": accepted}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    records = read_prompts(WORKLOADS["code"][0], split="practice")[: args.prompts]
    results = {dtype: run(args.model, dtype, records, args.tokens) for dtype in ("float32", "bfloat16")}
    for dtype, r in results.items():
        print(f"{dtype:9} plain {r['tokens_per_second']:.2f} tok/s (median)  lossless identical to plain "
              f"{r['identical']}/{r['calls']} calls  accepted drafts {r['accepted']}")
    pairs = list(zip(results["float32"]["plain"], results["bfloat16"]["plain"]))
    equal = sum(a == b for x, y in pairs for a, b in zip(x, y))
    total = sum(min(len(x), len(y)) for x, y in pairs)
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y))) for x, y in pairs]
    print(f"bfloat16 plain tokens equal to float32's: {equal}/{total} positions ({100 * equal / total:.1f}%), "
          f"{sum(x == y for x, y in pairs)}/{len(pairs)} outputs identical, first difference at token {prefix}")
    print(f"bfloat16/float32 plain speed: "
          f"{results['bfloat16']['tokens_per_second'] / results['float32']['tokens_per_second']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
