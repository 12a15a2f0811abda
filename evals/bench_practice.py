"""Practice benchmark: does the wrapped model get faster on what it practised?

Packaged SmolLM2-135M-Instruct, greedy decoding, lossless mode. A stream of real
instruction prompts (evals/data/prompts.jsonl, split "practice") is practised for R
rounds in shuffled order; then three frozen test sets: the same prompts (exact repeats),
their near-duplicates (evals/data/near_duplicates.jsonl) and novel prompts (split
"novel"). Every wrapped generation is paired with a plain one of the same prompt in
the same run (order alternating), so each speed figure is a ratio measured side by
side; the table reports medians. Compute per generated token (parameter bytes read,
FLOPs) counts every layer, exit head, observer encode and unembedding that ran,
verification included, relative to plain decoding (see shortcut/accounting.py).

    python evals/bench_practice.py                       # 30 prompts, 5 rounds, 64 tokens
    python evals/bench_practice.py --quick               # 8 prompts, 3 rounds, 32 tokens
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

import shortcut
from shortcut.accounting import ParamSizes, decode_only, plain_cost, shortcut_cost, stats_delta
from shortcut.data import prompt_input_ids, read_jsonl, read_prompts
from shortcut.models import cache_root
from shortcut.observe import load_observer, save_observer

DATA = Path(__file__).parent / "data"


def observer_for(handle, tokenizer, args):
    """The default observer of this model: trained once on the committed passages and
    cached (keyed by the model fingerprint and the training settings)."""
    key = f"{handle.fingerprint['weights_sha256'][:12]}-L{handle.config.observer_layers[0]}-{args.sae_steps}"
    folder = cache_root() / "observers" / key
    width = handle.parts.unembed.weight.shape[1]
    if folder.is_dir():
        observer = load_observer(folder, d_model=width, n_layers=handle.num_layers,
                                 expected_fingerprint=handle.fingerprint)
        handle.attach_observer(observer)
        return observer, 0.0
    texts = [r["text"] for r in read_jsonl(DATA / "passages.jsonl") if r.get("split") == "train"]
    start = time.perf_counter()
    observer = handle.train_observer(texts, tokenizer, steps=args.sae_steps)
    seconds = time.perf_counter() - start
    save_observer(observer.sae, folder, layer=observer.layer, fingerprint=handle.fingerprint, quality=observer.quality)
    return observer, seconds


def measure(handle, model, ids, new_tokens, sizes, plain_first):
    """One paired measurement: plain and wrapped generation of the same prompt."""
    gen = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    result = {}
    for kind in (("plain", "wrapped") if plain_first else ("wrapped", "plain")):
        stats_before = handle.stats.total.as_dict()
        counters_before = dict(handle.draft_counters)
        learn_before = handle.learner.stats.learn_seconds
        start = time.perf_counter()
        if kind == "plain":
            with handle.disabled():
                out = model.generate(**gen)
        else:
            out = model.generate(**gen)
        seconds = time.perf_counter() - start
        result[kind] = out
        result[f"{kind}_seconds"] = seconds
        if kind == "wrapped":
            stats = stats_delta(handle.stats.total.as_dict(), stats_before)
            counters = {k: v - counters_before.get(k, 0.0) for k, v in handle.draft_counters.items()}
            result["cost"] = decode_only(shortcut_cost(sizes, stats, counters), sizes, ids.shape[1])
            result["counters"] = counters
            result["learn_seconds"] = handle.learner.stats.learn_seconds - learn_before
    new = result["plain"].shape[1] - ids.shape[1]
    plain = plain_cost(sizes, ids.shape[1], new)
    return {
        "new_tokens": new,
        "identical": bool(torch.equal(result["plain"], result["wrapped"])),
        "speed_ratio": result["plain_seconds"] / result["wrapped_seconds"],
        "plain_tok_s": new / result["plain_seconds"],
        "wrapped_tok_s": new / result["wrapped_seconds"],
        "bytes_rel": result["cost"]["bytes"] / plain["bytes"],
        "flops_rel": result["cost"]["flops"] / plain["flops"],
        "drafted": result["counters"].get("drafted", 0.0),
        "accepted": result["counters"].get("accepted", 0.0),
        "learn_seconds": result["learn_seconds"],
    }


def summarise(name, rows, extra=None):
    drafted = sum(r["drafted"] for r in rows)
    summary = {
        "set": name,
        "prompts": len(rows),
        "speed_ratio_median": statistics.median(r["speed_ratio"] for r in rows),
        "bytes_rel_median": statistics.median(r["bytes_rel"] for r in rows),
        "flops_rel_median": statistics.median(r["flops_rel"] for r in rows),
        "identical": sum(r["identical"] for r in rows) / len(rows),
        "acceptance": sum(r["accepted"] for r in rows) / drafted if drafted else 0.0,
        "drafted_per_token": drafted / sum(r["new_tokens"] for r in rows),
        "learn_seconds": sum(r["learn_seconds"] for r in rows),
    }
    summary.update(extra or {})
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=30, help="practice prompts")
    parser.add_argument("--test-prompts", type=int, default=None, help="prompts per test set (default: --prompts)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sae-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8 prompts, 3 rounds, 32 tokens")
    parser.add_argument("--json", type=Path, default=None, help="write every raw number here")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.rounds, args.new_tokens = 8, 3, 32
    n_test = args.test_prompts or args.prompts

    model, tokenizer = shortcut.load_model(args.model)
    handle = shortcut.wrap(model, shortcut.ShortcutConfig(seed=args.seed, consolidate_every=0))
    observer, sae_seconds = observer_for(handle, tokenizer, args)
    sizes = ParamSizes.of(handle)
    practice = read_prompts(DATA / "prompts.jsonl", split="practice")[: args.prompts]
    novel = read_prompts(DATA / "prompts.jsonl", split="novel")[:n_test]
    near_all = {r["of"]: r for r in read_jsonl(DATA / "near_duplicates.jsonl", required=("of", "prompt"))}
    near = [near_all[r["id"]] for r in practice if r["id"] in near_all][:n_test]
    ids = {r["id"]: prompt_input_ids(tokenizer, r) for r in practice}

    rng = random.Random(args.seed)
    rounds, pair = [], 0
    for round_index in range(1, args.rounds + 1):
        order = list(practice)
        rng.shuffle(order)
        rows = []
        for record in order:
            rows.append(measure(handle, model, ids[record["id"]], args.new_tokens, sizes, plain_first=pair % 2 == 0))
            pair += 1
        start = time.perf_counter()
        fit = handle.learner.consolidate()
        rounds.append(summarise(f"round {round_index}", rows, {"consolidate_seconds": time.perf_counter() - start,
                                                               "head_agreement": fit.get("agreement", {})}))
        print(_row(rounds[-1]), flush=True)

    handle.set_learning(False)  # frozen skills for the test sets
    tests = []
    for name, records in (("exact repeats", practice[:n_test]), ("near-duplicates", near), ("novel", novel)):
        rows = []
        for record in records:
            rows.append(measure(handle, model, prompt_input_ids(tokenizer, record), args.new_tokens, sizes,
                                plain_first=pair % 2 == 0))
            pair += 1
        tests.append(summarise(name, rows))
        print(_row(tests[-1]), flush=True)

    folder = Path("runs") / "bench_practice_skills"
    handle.save_pretrained(folder)
    skill_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {
        "model": args.model, "prompts": args.prompts, "rounds": args.rounds, "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(), "seed": args.seed, "observer_quality": observer.quality,
        "observer_train_seconds": sae_seconds, "rounds_summary": rounds, "tests": tests,
        "skill_folder_bytes": skill_bytes, "model_weight_bytes": model_bytes,
        "skill_fraction_of_model": skill_bytes / model_bytes,
        "versions": {"torch": torch.__version__, "shortcut": shortcut.__version__},
    }
    print()
    print(f"model={args.model} greedy new_tokens={args.new_tokens} practice prompts={args.prompts} "
          f"rounds={args.rounds} threads={torch.get_num_threads()} (lossless; ratios vs plain generate, same run)")
    print(_header())
    for row in rounds + tests:
        print(_row(row))
    print(f"skill folder {skill_bytes / 1e6:.1f} MB = {100 * skill_bytes / model_bytes:.1f}% of model weights "
          f"({model_bytes / 1e6:.0f} MB)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    handle.remove()
    return result


def _header() -> str:
    return (f"{'set':<16}{'speed x':>8}{'bytes':>7}{'flops':>7}{'ident':>7}{'accept':>8}"
            f"{'draft/tok':>10}{'learn s':>9}")


def _row(r: dict) -> str:
    return (f"{r['set']:<16}{r['speed_ratio_median']:>8.2f}{r['bytes_rel_median']:>7.2f}{r['flops_rel_median']:>7.2f}"
            f"{100 * r['identical']:>6.0f}%{100 * r['acceptance']:>7.0f}%{r['drafted_per_token']:>10.2f}"
            f"{r['learn_seconds'] + r.get('consolidate_seconds', 0.0):>9.1f}")


if __name__ == "__main__":
    main()
