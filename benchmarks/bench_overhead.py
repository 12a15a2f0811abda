"""What does wrapping cost when nothing is learned yet?

Greedy decoding of N new tokens on real prompts with the packaged model, unwrapped and
wrapped (empty policy) interleaved pair by pair in one run; prints per-pair tokens/s and
the median ratio wrapped / plain. Also checks the tokens are identical.

    python benchmarks/bench_overhead.py                 # 10 prompts x 64 tokens, 3 repeats
    python benchmarks/bench_overhead.py --prompts 3 --repeats 1 --new-tokens 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import shortcut
from shortcut.data import prompt_input_ids, read_prompts

DATA = Path(__file__).resolve().parent.parent / "shortcut_eval" / "data" / "prompts.jsonl"


def _timed_generate(model, ids, new_tokens):
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False)
    return out, new_tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = shortcut.load_model(args.model)
    records = read_prompts(DATA)[: args.prompts]
    _timed_generate(model, prompt_input_ids(tokenizer, records[0]), 4)  # warm-up
    ratios, rows = [], []
    for index, record in enumerate(records):
        ids = prompt_input_ids(tokenizer, record)
        for repeat in range(args.repeats):
            # Alternate which goes first so drift in machine speed cancels out.
            order = ("plain", "wrapped") if (index + repeat) % 2 == 0 else ("wrapped", "plain")
            speed, outputs = {}, {}
            for kind in order:
                handle = shortcut.wrap(model) if kind == "wrapped" else None
                try:
                    with torch.no_grad():
                        outputs[kind], speed[kind] = _timed_generate(model, ids, args.new_tokens)
                finally:
                    if handle is not None:
                        handle.remove()
            if not torch.equal(outputs["plain"], outputs["wrapped"]):
                raise AssertionError(f"prompt {record['id']}: wrapped tokens differ from plain")
            ratios.append(speed["wrapped"] / speed["plain"])
            rows.append((record["id"], repeat, speed["plain"], speed["wrapped"], ratios[-1]))

    print(f"model={args.model} threads={torch.get_num_threads()} new_tokens={args.new_tokens} "
          f"prompts={len(records)} repeats={args.repeats} (greedy; tokens identical in every pair)")
    print(f"{'prompt':<16}{'rep':>4}{'plain tok/s':>13}{'wrapped tok/s':>15}{'ratio':>8}")
    for pid, rep, plain, wrapped, ratio in rows:
        print(f"{pid:<16}{rep:>4}{plain:>13.2f}{wrapped:>15.2f}{ratio:>8.3f}")
    summary = {
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "median_plain_tok_s": statistics.median(r[2] for r in rows),
        "median_wrapped_tok_s": statistics.median(r[3] for r in rows),
    }
    print(f"median ratio wrapped/plain = {summary['median_ratio']:.3f} "
          f"(min {summary['min_ratio']:.3f}, max {summary['max_ratio']:.3f}); target >= 0.97")
    return summary


if __name__ == "__main__":
    main()
