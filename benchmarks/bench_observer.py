"""The default SAE observer on the packaged model: training time, held-out quality,
and its cost during decoding.

1. Collects layer-L residuals of SmolLM2-135M-Instruct over the committed passages
   (split "train") and trains the default sae-lens TopK SAE; times both.
2. Measures on held-out passages (split "heldout"): fraction of variance explained,
   mean L0, dead-feature fraction.
3. Greedy decoding of N new tokens on real prompts with and without the observer hook
   encoding every new token (interleaved pairs, median ratio of tokens/s).

    python benchmarks/bench_observer.py                  # defaults of shortcut.observe
    python benchmarks/bench_observer.py --steps 300 --prompts 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import shortcut
from shortcut.data import DEFAULT_PASSAGES, prompt_input_ids, read_jsonl, read_prompts
from shortcut.observe import (
    DEFAULT_D_SAE,
    DEFAULT_K,
    DEFAULT_STEPS,
    Observer,
    collect_activations,
    sae_quality,
    train_sae,
)

DATA = Path(__file__).resolve().parent.parent / "shortcut_eval" / "data"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--d-sae", type=int, default=DEFAULT_D_SAE)
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    model, tokenizer = shortcut.load_model(args.model)
    layer = shortcut.arch.resolve(model).layers[args.layer]
    passages = read_jsonl(DEFAULT_PASSAGES)
    train = [p["text"] for p in passages if p.get("split") == "train"]
    heldout = [p["text"] for p in passages if p.get("split") == "heldout"]

    start = time.perf_counter()
    acts = collect_activations(model, layer, train, tokenizer, progress=False)
    collect_s = time.perf_counter() - start
    start = time.perf_counter()
    sae = train_sae(acts, d_sae=args.d_sae, k=args.k, steps=args.steps, progress=False)
    train_s = time.perf_counter() - start
    quality = sae_quality(sae, collect_activations(model, layer, heldout, tokenizer, progress=False))

    observer = Observer(sae, args.layer)
    ratios = []
    for index, record in enumerate(read_prompts(DATA / "prompts.jsonl")[: args.prompts]):
        ids = prompt_input_ids(tokenizer, record)
        speed = {}
        for kind in (("plain", "observed") if index % 2 == 0 else ("observed", "plain")):
            if kind == "observed":
                observer.attach(layer)
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False)
            speed[kind] = args.new_tokens / (time.perf_counter() - start)
            observer.detach()
        ratios.append(speed["observed"] / speed["plain"])

    result = {"collect_seconds": collect_s, "train_seconds": train_s, "train_tokens": int(acts.shape[0]),
              "quality_heldout": quality, "observer_speed_ratio_median": statistics.median(ratios)}
    print(f"model={args.model} layer={args.layer} d_sae={args.d_sae} k={args.k} steps={args.steps} "
          f"threads={torch.get_num_threads()}")
    print(f"collect {acts.shape[0]} tokens: {collect_s:.0f} s; train: {train_s:.0f} s; "
          f"total {collect_s + train_s:.0f} s (target < 600 s)")
    print(f"held-out ({quality['n_tokens']} tokens): FVE {quality['fve']:.4f} (target >= 0.95), "
          f"L0 {quality['l0']:.1f}, dead {100 * quality['dead_fraction']:.1f}% (target <= 10%)")
    print(f"decode tokens/s with observer / without: median {result['observer_speed_ratio_median']:.3f} "
          f"over {len(ratios)} prompts x {args.new_tokens} tokens (target >= 0.97)")
    return result


if __name__ == "__main__":
    main()
