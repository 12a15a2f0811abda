"""Fast mode on practised skills: compute per token and agreement with the full path.

Loads a skills folder (default: the one evals/bench_practice.py saves), switches to fast
mode with learning frozen, and greedy-decodes the three test sets (exact repeats,
near-duplicates, novel). Agreement is per generated token: the fast output is fed back
through the plain model (teacher forcing) and each token is compared with the full
model's greedy choice after the same prefix. Compute is counted as in
bench_practice.py (layers, propagated K/V, exit heads, observer, unembedding, audits),
relative to plain decoding; speed is paired with plain generation in the same run.

    python evals/bench_fast.py --skills runs/bench_practice_skills
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import shortcut
from shortcut.accounting import ParamSizes, decode_only, plain_cost, shortcut_cost, stats_delta
from shortcut.data import prompt_input_ids, read_jsonl, read_prompts

DATA = Path(__file__).parent / "data"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--skills", type=Path, default=Path("runs/bench_practice_skills"))
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--audit-fraction", type=float, default=0.05)
    args = parser.parse_args(argv)

    model, tokenizer = shortcut.load_model(args.model)
    handle = shortcut.load(model, args.skills)
    handle.set_learning(False)
    handle.config.mode = "fast"
    handle.fast.audit_fraction = args.audit_fraction
    sizes = ParamSizes.of(handle)
    practice = read_prompts(DATA / "prompts.jsonl", split="practice")[: args.prompts]
    near_all = {r["of"]: r for r in read_jsonl(DATA / "near_duplicates.jsonl", required=("of", "prompt"))}
    sets = {
        "exact repeats": practice,
        "near-duplicates": [near_all[r["id"]] for r in practice if r["id"] in near_all],
        "novel": read_prompts(DATA / "prompts.jsonl", split="novel")[: args.prompts],
    }
    results = {}
    for name, records in sets.items():
        flops, bytes_, agree, total, speed = [], [], 0, 0, []
        for index, record in enumerate(records):
            ids = prompt_input_ids(tokenizer, record)
            gen = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False)
            times = {}
            for kind in (("plain", "fast") if index % 2 == 0 else ("fast", "plain")):
                before_stats, before_counters = handle.stats.total.as_dict(), dict(handle.draft_counters)
                start = time.perf_counter()
                if kind == "plain":
                    with handle.disabled():
                        model.generate(**gen)
                else:
                    out = model.generate(**gen)
                    stats = stats_delta(handle.stats.total.as_dict(), before_stats)
                    counters = {k: v - before_counters.get(k, 0.0) for k, v in handle.draft_counters.items()}
                times[kind] = time.perf_counter() - start
            new = out.shape[1] - ids.shape[1]
            cost = decode_only(shortcut_cost(sizes, stats, counters), sizes, ids.shape[1])
            plain = plain_cost(sizes, ids.shape[1], new)
            flops.append(cost["flops"] / plain["flops"])
            bytes_.append(cost["bytes"] / plain["bytes"])
            speed.append(times["plain"] / times["fast"])
            with handle.disabled(), torch.no_grad():
                full = model(input_ids=out).logits[0, ids.shape[1] - 1:-1].argmax(-1)
            agree += int((full == out[0, ids.shape[1]:]).sum())
            total += new
        results[name] = {"flops_rel_median": statistics.median(flops), "bytes_rel_median": statistics.median(bytes_),
                         "speed_ratio_median": statistics.median(speed), "agreement": agree / total, "tokens": total}
    print(f"model={args.model} skills={args.skills} fast mode, greedy, new_tokens={args.new_tokens}, "
          f"audit_fraction={args.audit_fraction}, threads={torch.get_num_threads()}")
    print(f"{'set':<16}{'speed x':>8}{'bytes':>7}{'flops':>7}{'agree':>8}")
    for name, r in results.items():
        print(f"{name:<16}{r['speed_ratio_median']:>8.2f}{r['bytes_rel_median']:>7.2f}{r['flops_rel_median']:>7.2f}"
              f"{100 * r['agreement']:>7.1f}%")
    print(f"audits: {handle.fast.report()}")
    handle.remove()
    return results


if __name__ == "__main__":
    main()
