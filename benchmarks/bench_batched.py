"""Batched lossless decoding: do padded batches gain from practice?

The packaged SmolLM2 is wrapped with no observer (drafts come from the practised
sequences only) and practises the first ``--practised`` chat prompts of the practice
split one at a time (greedy, ``--new-tokens`` each: what the memory keeps). Then, in
the same process, left-padded batches of 4 and 8 rows are generated greedily, plain
(``with handle.disabled():``) and wrapped, in alternating order per batch:

- exact: every row a practised prompt asked again;
- mixed: half the rows practised prompts, half prompts of the novel split;
- fast: exact repeats in fast mode (``handle.config.mode = "fast"``): each row commits
  its practised answer with no layer after the prefill. Fast mode commits only with an
  observer and on prompts practised before the heads' latest re-fit, so when this kind
  is asked for, a small observer is trained first (its quality does not matter: batches
  commit practised answers only) and the heads are re-fitted after the practice calls.
  Lossless batches recall practised sequences only, so the observer changes nothing in
  the other kinds' batches.

For each it prints the median over batches of plain and wrapped tokens/s (new tokens,
pad tokens after an end of sequence not counted), the median of the per-batch ratio,
how many batches are identical to plain, and the tokens recalled per new token (drafts
accepted, or answers committed in fast mode).

With ``--costs`` it first times one forward of ``rows x width`` new tokens after a
cache of 100 tokens (logits at every position, as verification computes them) for each
batch size: a plain step is ``width 1``; an exact-repeat batch verifies every row's
answer in one forward about ``new tokens`` wide. The ratio of ``new tokens - 1`` plain
steps to that forward bounds what exact repeats can gain on the answer part alone (the
prompt's prefill costs both sides the same, so the whole call gains less).

    OMP_NUM_THREADS=1 python benchmarks/bench_batched.py
    OMP_NUM_THREADS=1 python benchmarks/bench_batched.py --batches 2 --new-tokens 16
    OMP_NUM_THREADS=1 python benchmarks/bench_batched.py --costs
    OMP_NUM_THREADS=1 python benchmarks/bench_batched.py --kinds exact,fast
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import shortcut  # noqa: E402
from shortcut.data import DEFAULT_PASSAGES, read_passages, read_prompts  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "shortcut_eval" / "data"


def chat(tok: Any, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


def timed(model: Any, batch: dict[str, torch.Tensor], new_tokens: int, pad: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return out, time.perf_counter() - start


def new_count(out: torch.Tensor, width: int, pad: int) -> int:
    """New tokens in ``out`` (padding after a finished row left out)."""
    return int((out[:, width:] != pad).sum())


@torch.no_grad()
def forward_costs(model: Any, sizes: list[int], new_tokens: int, repeats: int = 5) -> None:
    """Print the median ms of a forward of ``rows x width`` tokens after a 100-token cache."""
    widths = sorted({1, 2, 4, 8, 16, new_tokens})
    print(f"forward ms by rows x width (after 100 cached tokens), median of {repeats}")
    print(f"{'rows':>5}" + "".join(f"{w:>9}" for w in widths) + f"{'bound x':>9}")
    for rows in sizes:
        prompt = torch.randint(100, 20000, (rows, 100))
        ms = []
        for width in widths:
            times = []
            for _ in range(repeats):
                cache = DynamicCache(config=model.config)
                model(input_ids=prompt, cache=cache, use_cache=True)
                feed = torch.randint(100, 20000, (rows, width))
                start = time.perf_counter()
                model(input_ids=feed, cache=cache, use_cache=True)
                times.append(time.perf_counter() - start)
            ms.append(1000 * statistics.median(times))
        bound = (new_tokens - 1) * ms[0] / ms[-1]  # plain steps per answer-wide forward
        print(f"{rows:>5}" + "".join(f"{m:>9.1f}" for m in ms) + f"{bound:>8.2f}x")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--practised", type=int, default=16, help="practice prompts practised (and asked again)")
    parser.add_argument("--batches", type=int, default=3, help="batches per kind and size")
    parser.add_argument("--sizes", default="4,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="exact,mixed,fast", help="batch kinds: exact, mixed, fast")
    parser.add_argument("--costs", action="store_true", help="first time forwards by rows x width")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - {"exact", "mixed", "fast"}:
        parser.error(f"--kinds: unknown {', '.join(sorted(unknown))} (allowed: exact, mixed, fast)")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tok = shortcut.load_model(args.model)
    tok.padding_side = "left"
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.costs:
        forward_costs(model, sizes, args.new_tokens)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tok.pad_token_id = pad
    practised = [chat(tok, r["prompt"]) for r in read_prompts(DATA / "prompts.jsonl", split="practice")
                 [:args.practised]]
    novel = [chat(tok, r["prompt"]) for r in read_prompts(DATA / "prompts.jsonl", split="novel")]
    handle = shortcut.wrap(model, observer=None)
    if "fast" in kinds:  # fast mode commits only with an observer's skills
        passages = [r["text"] for r in read_passages(DEFAULT_PASSAGES) if r.get("split") != "heldout"]
        handle.train_observer(passages, tok, max_tokens=4000, steps=100, progress=False)
    for text in practised:  # plain greedy single-row calls: the memory keeps their answers
        model.generate(**tok(text, return_tensors="pt"), max_new_tokens=args.new_tokens, do_sample=False)
    if handle.learner is not None:
        handle.learner.consolidate()  # the prompts above now count as practised verbatim
    rows = []
    for size in sizes:
        for kind in kinds:
            plain_tps, wrapped_tps, ratios, identical, accepted, new = [], [], [], 0, 0, 0
            for b in range(args.batches):
                if kind in ("exact", "fast"):
                    texts = rng.sample(practised, size)
                else:
                    texts = rng.sample(practised, size // 2) + rng.sample(novel, size - size // 2)
                    rng.shuffle(texts)
                batch = tok(texts, return_tensors="pt", padding=True)
                width = batch["input_ids"].shape[1]
                before = handle.decode_stats.copy()
                for order in ((0, 1) if b % 2 == 0 else (1, 0)):
                    if order == 0:
                        with handle.disabled():
                            ref, plain_s = timed(model, batch, args.new_tokens, pad)
                    else:
                        handle.config.mode = "fast" if kind == "fast" else "lossless"
                        try:
                            out, wrapped_s = timed(model, batch, args.new_tokens, pad)
                        finally:
                            handle.config.mode = "lossless"
                delta = handle.decode_stats - before
                identical += torch.equal(out, ref)
                n = new_count(ref, width, pad)
                plain_tps.append(n / plain_s)
                wrapped_tps.append(n / wrapped_s)
                ratios.append(plain_s / wrapped_s)
                accepted += delta.accepted + delta.recall_committed
                new += n
            rows.append({"size": size, "kind": kind, "batches": args.batches,
                         "plain_tps": statistics.median(plain_tps), "wrapped_tps": statistics.median(wrapped_tps),
                         "ratio": statistics.median(ratios), "identical": identical,
                         "accepted_share": accepted / max(1, new)})
    print(f"\n{args.model}: {args.practised} practised prompts, {args.new_tokens} new tokens, greedy, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'batch':>6} {'kind':<7}{'plain tok/s':>12}{'wrapped tok/s':>15}{'median x':>10}{'identical':>11}"
          f"{'recalled':>10}")
    for r in rows:
        print(f"{r['size']:>6} {r['kind']:<7}{r['plain_tps']:>12.1f}{r['wrapped_tps']:>15.1f}{r['ratio']:>9.2f}x"
              f"{r['identical']:>7}/{r['batches']:<3}{100 * r['accepted_share']:>9.0f}%")
    print("median x: median over batches of plain/wrapped seconds; recalled: drafted tokens accepted (or, in fast "
          "mode, answer tokens committed) per new token")
    return rows


if __name__ == "__main__":
    main()
