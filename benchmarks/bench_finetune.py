"""Consolidation benchmark: what does ``shortcut-finetune`` add to practised skills?

Packaged SmolLM2-135M-Instruct, greedy decoding, 64 new tokens, lossless mode, learning
frozen. Starting from the skills of the practice benchmark (``runs/eval/full/skills``,
written by ``shortcut-eval practice --out runs/eval/full``: 30 prompts x 5 rounds), it

1. measures those skills: tokens/s relative to plain ``generate`` (paired, same run,
   order alternating, median over prompts) on exact repeats (split "practice" of
   shortcut_eval/data/prompts.jsonl), near-duplicates (shortcut_eval/data/near_duplicates.jsonl) and
   novel prompts (split "novel"), identical-token check, draft acceptance, share of
   tokens drafted from practised sequences, and the oracle exit layer (per generated
   token, the shallowest exit layer whose exit head names the full model's token; the
   full depth where none does);
2. runs heads consolidation (``shortcut.finetune.consolidate.finetune``, default settings) and
   measures the consolidated skills the same way.

   Each skills folder is measured with practised-sequence replay on (the default) and,
   with ``--replay both``, off as well: with replay on, exact repeats draft from the
   practised sequences on both sides, so heads consolidation shows in what the shallow
   path drafts (near-duplicates, novel text, and everything with replay off);
3. with ``--layerskip``, trains the LoRA adapter too and reports its quality cost:
   teacher-forced perplexity on the held-out passages (shortcut/corpus/passages.jsonl split
   "heldout") and log-likelihood choice accuracy (shortcut_eval/data/choice.jsonl), base vs
   adapted; then measures the adapted skills' speed like the others (each prompt against
   the adapted model's own plain generate: lossless means identical to the adapted model).

    python benchmarks/bench_finetune.py                          # 30 + 30 test prompts
    python benchmarks/bench_finetune.py --test-prompts 15        # faster
    python benchmarks/bench_finetune.py --layerskip              # also the LoRA level
    python benchmarks/bench_finetune.py --replay on              # replay on only (half the time)
    python benchmarks/bench_finetune.py --layerskip --quality-only   # only the LoRA level's quality

Skills whose prompt log is empty (written before practice calls were logged) get a
copy whose log holds the prompts the practice benchmark practised (the first
``--prompts`` of split "practice").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch

import shortcut
from shortcut.data import DEFAULT_PASSAGES, prompt_input_ids, read_jsonl
from shortcut.finetune import consolidate as ft
from shortcut.policy.heads import collect_states
from shortcut_eval.workload import prompt_sets

DATA = Path(__file__).resolve().parent.parent / "shortcut_eval" / "data"


@torch.no_grad()
def oracle_layers(handle, seq: torch.Tensor, prompt_len: int) -> list[float]:
    """Oracle exit layer of each generated token of ``seq`` (teacher-forced, full path)."""
    heads = handle.heads
    with handle.disabled():
        states, _, tokens = collect_states(handle.model, handle.parts, seq, heads.layers)
    keep = slice(prompt_len - 1, seq.shape[0] - 1)
    agrees = ft.agreement(heads, {layer: s[keep] for layer, s in states.items()}, tokens[keep])
    return ft.oracle_exit_layer(agrees, heads.layers, handle.num_layers).tolist()


def measure(handle, ids: torch.Tensor, new_tokens: int, plain_first: bool) -> dict:
    """One paired measurement (plain and wrapped generate of the same prompt)."""
    model = handle.model
    gen = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens, "do_sample": False}
    outs, seconds = {}, {}
    counters = handle.decode_stats.copy()
    calls = handle.stats.total.layer_calls
    for kind in (("plain", "wrapped") if plain_first else ("wrapped", "plain")):
        start = time.perf_counter()
        if kind == "plain":
            with handle.disabled():
                outs[kind] = model.generate(**gen)
        else:
            outs[kind] = model.generate(**gen)
        seconds[kind] = time.perf_counter() - start
    new = outs["plain"].shape[1] - ids.shape[1]
    delta = handle.decode_stats - counters
    return {
        "recalled": float(delta.recall_accepted),
        "new_tokens": new,
        "identical": bool(torch.equal(outs["plain"], outs["wrapped"])),
        "speed_ratio": seconds["plain"] / seconds["wrapped"],
        "wrapped_tok_s": new / seconds["wrapped"],
        "plain_tok_s": new / seconds["plain"],
        "drafted": float(delta.drafted),
        "accepted": float(delta.accepted),
        "layer_calls_per_token": (handle.stats.total.layer_calls - calls) / max(new, 1),
        "oracle": oracle_layers(handle, outs["plain"][0], ids.shape[1]),
    }


def measure_skills(model, folder: Path, sets: dict, new_tokens: int, label: str, replays: list[bool]) -> list[dict]:
    handle = shortcut.load(model, folder)
    handle.set_learning(False)
    rows, pair = [], 0
    try:
        for replay, (name, inputs) in ((r, item) for r in replays for item in sets.items()):
            handle.config.lossless.recall_sequences = replay
            results = []
            for ids in inputs:
                results.append(measure(handle, ids, new_tokens, plain_first=pair % 2 == 0))
                pair += 1
            drafted = sum(r["drafted"] for r in results)
            oracle = [x for r in results for x in r["oracle"]]
            rows.append({
                "set": name, "skills": label, "replay": replay, "prompts": len(results),
                "speed_ratio_median": statistics.median(r["speed_ratio"] for r in results),
                "speed_ratios": [r["speed_ratio"] for r in results],  # per prompt, in order: pairs across skills
                "wrapped_tok_s_median": statistics.median(r["wrapped_tok_s"] for r in results),
                "plain_tok_s_median": statistics.median(r["plain_tok_s"] for r in results),
                "identical": sum(r["identical"] for r in results) / len(results),
                "acceptance": sum(r["accepted"] for r in results) / drafted if drafted else 0.0,
                "drafted_per_token": drafted / sum(r["new_tokens"] for r in results),
                "recalled_share": sum(r["recalled"] for r in results) / sum(r["new_tokens"] for r in results),
                "layer_calls_per_token": statistics.mean(r["layer_calls_per_token"] for r in results),
                "oracle_exit_layer": sum(oracle) / len(oracle),
            })
            print(_row(rows[-1]), flush=True)
    finally:
        handle.remove()
    return rows


def run_finetune(model, tokenizer, skills: Path, out: Path, cfg: ft.FinetuneConfig, quality=None) -> tuple[dict, float]:
    """Run (or reuse a finished identical run of) the consolidation; returns summary and seconds."""
    start = time.perf_counter()
    try:
        summary = ft.finetune(model, skills, out, tokenizer=tokenizer, quality_texts=quality, config=cfg, resume=True)
    except (ValueError, FileExistsError):
        summary = ft.finetune(model, skills, out, tokenizer=tokenizer, quality_texts=quality, config=cfg,
                              overwrite=True)
    return summary, time.perf_counter() - start


@torch.no_grad()
def choice_accuracy(model, tokenizer, records: list[dict]) -> float:
    """Log-likelihood multiple choice: the choice with the highest summed log-probability
    after ``Question: ...\\nAnswer:`` is the model's answer."""
    correct = 0
    for record in records:
        prefix = tokenizer(f"Question: {record['question']}\nAnswer:")["input_ids"]
        scores = []
        for choice in record["choices"]:
            ids = tokenizer(" " + choice)["input_ids"]
            x = torch.tensor([prefix + ids])
            logp = model(input_ids=x).logits[0, len(prefix) - 1:-1].float().log_softmax(-1)
            scores.append(float(logp.gather(1, torch.tensor(ids)[:, None]).sum()))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == record["answer"])
    return correct / len(records)


def heads_benchmark(model, tokenizer, args: argparse.Namespace, n_test: int, sets: dict, replays: list[bool],
                    result: dict) -> list:
    """Steps 1-2 of the module doc: the practised skills, heads consolidation, the
    consolidated skills; rows and summary go into ``result``; returns the checks."""
    print(f"model={args.model} greedy new_tokens={args.new_tokens} test prompts={n_test} "
          f"threads={torch.get_num_threads()} (lossless; speed = tokens/s vs plain generate, same run)")
    print(_header())
    rows = measure_skills(model, args.skills, sets, args.new_tokens, "practised", replays)
    cfg = ft.FinetuneConfig(max_new_tokens=args.new_tokens, seed=args.seed, heads=ft.HeadsFitConfig(steps=args.steps))
    summary, seconds = run_finetune(model, tokenizer, args.skills, args.work / "heads", cfg)
    print(ft.format_summary(summary), flush=True)
    rows += measure_skills(model, args.work / "heads", sets, args.new_tokens, "consolidated", replays)

    result.update(rows=rows, heads_summary=summary, heads_seconds=seconds)
    by = {(r["set"], r["skills"], r["replay"]): r for r in rows}

    def paired(name: str, replay: bool) -> float:
        """Median over prompts of each prompt's speed ratio after / before (same prompt,
        each against its own plain run): robust to prompts of different answer lengths."""
        after, before = by[name, "consolidated", replay], by[name, "practised", replay]
        return statistics.median(a / b for a, b in zip(after["speed_ratios"], before["speed_ratios"]))

    checks = []
    for replay in replays:
        tag = f"replay {'on' if replay else 'off'}"
        exact_b, exact_a = by["exact repeats", "practised", replay], by["exact repeats", "consolidated", replay]
        checks += [
            (f"{tag}: exact repeats speed after / before (>= 1.2)", paired("exact repeats", replay), 1.2),
            (f"{tag}: exact repeats oracle exit shallower (>= 30%)",
             1 - exact_a["oracle_exit_layer"] / exact_b["oracle_exit_layer"], 0.30),
            (f"{tag}: near-duplicates speed after / before (>= 0.97)", paired("near-duplicates", replay), 0.97),
            (f"{tag}: novel speed after / before (>= 0.97)", paired("novel", replay), 0.97),
            (f"{tag}: novel speed after vs plain (>= 0.97)", by["novel", "consolidated", replay]["speed_ratio_median"],
             0.97),
        ]
    checks += [
        ("all: identical tokens (100%)", min(r["identical"] for r in rows), 1.0),
        ("heads run time in minutes (< 15)", -summary["seconds"] / 60, -15.0),
    ]
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--skills", type=Path, default=Path("runs/eval/full/skills"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench_finetune"), help="where outputs go")
    parser.add_argument("--prompts", type=int, default=30, help="practised prompts (as in the practice benchmark)")
    parser.add_argument("--test-prompts", type=int, default=None, help="prompts per test set (default: --prompts)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=ft.HeadsFitConfig.steps, help="most exit-head steps")
    parser.add_argument("--layerskip", action="store_true", help="also train and assess the LoRA level")
    parser.add_argument("--lora-steps", type=int, default=ft.LayerSkipConfig.steps)
    parser.add_argument("--lora-final-target", choices=("base", "tokens"), default=ft.LayerSkipConfig.final_target)
    parser.add_argument("--quality-passages", type=int, default=70)
    parser.add_argument("--choice", type=int, default=100, help="choice questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replay", choices=("on", "off", "both"), default="both",
                        help="practised-sequence replay while measuring (default: both, on first)")
    parser.add_argument("--quality-only", action="store_true",
                        help="with --layerskip: only the LoRA level's quality checks (no speed rows, no heads run)")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args(argv)
    if args.quality_only and not args.layerskip:
        parser.error("--quality-only needs --layerskip")
    if not args.skills.is_dir():
        print(f"{args.skills} is missing: make it with `shortcut-eval practice --out runs/eval/full` (it saves "
              f"its skills there), or pass --skills <a skills folder made on {args.model}>", file=sys.stderr)
        return 2
    n_test = args.test_prompts or args.prompts
    model, tokenizer = shortcut.load_model(args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "skills": str(args.skills), "new_tokens": args.new_tokens, "test_prompts": n_test,
              "threads": torch.get_num_threads(), "rows": []}
    prompts = prompt_sets(DATA / "prompts.jsonl", DATA / "near_duplicates.jsonl", n_practice=args.prompts,
                          n_test=n_test)
    sets = {name: [prompt_input_ids(tokenizer, r) for r in prompts[name]]
            for name in ("exact repeats", "near-duplicates", "novel")}
    replays = {"on": [True], "off": [False], "both": [True, False]}[args.replay]
    checks: list = []
    if not args.quality_only:
        checks = heads_benchmark(model, tokenizer, args, n_test, sets, replays, result)

    if args.layerskip:
        records = read_jsonl(DEFAULT_PASSAGES, required=("text",))
        quality = [r["text"] for r in records if r.get("split") == "heldout"][:args.quality_passages]
        lcfg = ft.FinetuneConfig(level="layerskip", max_new_tokens=args.new_tokens, seed=args.seed,
                                 heads=ft.HeadsFitConfig(steps=args.steps),
                                 layerskip=ft.LayerSkipConfig(steps=args.lora_steps,
                                                              final_target=args.lora_final_target))
        ls_summary, ls_seconds = run_finetune(model, tokenizer, args.skills, args.work / "layerskip", lcfg, quality)
        print(ft.format_summary(ls_summary), flush=True)
        choice = read_jsonl(DATA / "choice.jsonl")[:args.choice]
        acc_base = choice_accuracy(model, tokenizer, choice)
        adapted, _ = shortcut.load_model(args.model)
        handle = shortcut.load(adapted, args.work / "layerskip")  # merges the adapter
        with handle.disabled():
            acc_adapted = choice_accuracy(adapted, tokenizer, choice)
        handle.remove()
        ls = ls_summary["layerskip"]
        ppl_change = ls["perplexity_adapted"] / ls["perplexity_base"] - 1
        print(f"layerskip: perplexity base {ls['perplexity_base']:.3f} adapted {ls['perplexity_adapted']:.3f} "
              f"({100 * ppl_change:+.2f}%); choice accuracy base {100 * acc_base:.1f}% "
              f"adapted {100 * acc_adapted:.1f}% "
              f"({len(choice)} questions); run {ls_seconds / 60:.1f} min")
        checks += [("layerskip: held-out perplexity change (<= +3%)", -ppl_change, -0.03),
                   ("layerskip: choice accuracy change in points (>= -1)", 100 * (acc_adapted - acc_base), -1.0)]
        result.update(layerskip_summary=ls_summary, layerskip_seconds=ls_seconds, choice_accuracy_base=acc_base,
                      choice_accuracy_adapted=acc_adapted)
        if not args.quality_only:  # speed of the adapted skills, each prompt against the adapted model's plain run
            fresh, _ = shortcut.load_model(args.model)  # loading the folder merges the adapter into it
            result["rows"] += measure_skills(fresh, args.work / "layerskip", sets, args.new_tokens, "layerskip",
                                             replays)

    if result["rows"]:
        print()
        print(_header())
        for row in result["rows"]:
            print(_row(row))
    print()
    for name, value, target in checks:
        shown = -value if "minutes" in name or "perplexity" in name else value
        unit = "%" if "%" in name else ""
        shown = f"{100 * shown:.1f}%" if unit else f"{shown:.2f}"
        print(f"{name:<58}{shown:>10}  {'met' if value >= target else 'NOT met'}")
    result["checks"] = [{"name": n, "value": v, "target": t, "met": v >= t} for n, v, t in checks]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return 0


def _header() -> str:
    return (f"{'set':<17}{'skills':<14}{'replay':>7}{'speed x':>8}{'tok/s':>7}{'ident':>7}{'accept':>8}"
            f"{'draft/tok':>10}{'recalled':>9}{'layer calls/tok':>16}{'oracle exit':>12}")


def _row(r: dict) -> str:
    return (f"{r['set']:<17}{r['skills']:<14}{'on' if r['replay'] else 'off':>7}{r['speed_ratio_median']:>8.2f}"
            f"{r['wrapped_tok_s_median']:>7.1f}{100 * r['identical']:>6.0f}%{100 * r['acceptance']:>7.0f}%"
            f"{r['drafted_per_token']:>10.2f}{100 * r['recalled_share']:>8.0f}%{r['layer_calls_per_token']:>16.1f}"
            f"{r['oracle_exit_layer']:>12.2f}")


if __name__ == "__main__":
    sys.exit(main())
