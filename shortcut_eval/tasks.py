"""The three tasks of ``shortcut-eval``: practice, agreement, choice.

Each takes the parsed options and the loaded systems and returns a JSON-ready dict;
``report.py`` turns it into tables, Markdown and plots.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shortcut.policy.heads import collect_states

from .peers import oracle, peer_methods, summarise_oracle, sweep_early_exit
from .workload import Method, System, measure_prompt, summarise

MODES = ("lossless", "fast")
MEMORY_ONLY = "memory only"  # the method row of the skills with the shallow path off


def _modes(mode: str) -> list[str]:
    return list(MODES) if mode == "both" else [mode]


# -- practice --------------------------------------------------------------------------
def practice(args: Any, systems: list[System], sets: dict[str, list[dict]], log: Callable[[str], None]) -> dict:
    """Practise the stream for ``args.rounds`` rounds (lossless, learning on), then measure
    the frozen skills on every test set (exact repeats, near-duplicates, transfer, novel)
    beside the peers. In lossless mode a ``shortcut lossless memory only`` row measures the
    same skills with the shallow path off (``lossless.shallow_drafts=False``: only the practised
    sequences draft), so each set shows what the sequence memory gives alone."""
    plain = Method("plain", "plain", systems[0])
    modes = _modes(args.mode)
    many = len(systems) > 1

    def shortcut_methods(mode_list: list[str]) -> list[Method]:
        return [Method(f"shortcut {mode}" + (f" [{s.label}]" if many else ""), "shortcut", s, mode=mode)
                for s in systems for mode in mode_list]

    test_sets = {k: v for k, v in sets.items() if k != "practice"}
    early_exits = args.early_exit
    sweep_records = test_sets["exact repeats"][: args.sweep_prompts]
    total = (args.rounds * len(sets["practice"])  # one step per prompt, all methods on it
             + (args.rounds * len(test_sets["exact repeats"]) if "fast" in modes else 0)
             + len(sweep_records) * bool(early_exits)
             + sum(len(v) for v in test_sets.values()))
    bar = tqdm(total=total, desc="shortcut-eval practice", disable=args.quiet, unit="prompt")
    rng = random.Random(args.seed)
    rotation = 0

    def run(records: list[dict], methods: list[Method]) -> dict[str, list[dict]]:
        nonlocal rotation
        rows: dict[str, list[dict]] = {m.name: [] for m in [plain, *methods]}
        for record in records:
            for name, row in measure_prompt(methods, plain, record, args.max_new_tokens, rotation).items():
                rows[name].append(row)
            rotation += 1
            bar.update(1)
        return rows

    rounds: list[dict] = []
    raw: dict[str, Any] = {"rounds": [], "tests": {}}
    for round_index in range(1, args.rounds + 1):
        order = list(sets["practice"])
        rng.shuffle(order)
        for system in systems:
            system.handle.set_learning(True)
        rows = run(order, shortcut_methods(["lossless"]))
        for system in systems:
            system.handle.set_learning(False)
        for system in systems:
            start = time.perf_counter()
            fit = system.handle.learner.consolidate()
            name = "shortcut lossless" + (f" [{system.label}]" if many else "")
            rounds.append({"round": round_index, "set": "practice stream", "method": name,
                           **summarise(rows[name], consolidate_seconds=time.perf_counter() - start,
                                       head_agreement=fit.get("agreement", {}))})
            log(_line(rounds[-1]))
            oracle_rows = [oracle(system, r, row["output_ids"]) for r, row in zip(order, rows[plain.name])]
            rounds.append({"round": round_index, "set": "practice stream",
                           "method": "oracle" + (f" [{system.label}]" if many else ""),
                           **summarise_oracle(oracle_rows, system.handle.num_layers)})
        if "fast" in modes:
            fast_rows = run(test_sets["exact repeats"], shortcut_methods(["fast"]))
            for method in shortcut_methods(["fast"]):
                rounds.append({"round": round_index, "set": "exact repeats", "method": method.name,
                               **summarise(fast_rows[method.name])})
                log(_line(rounds[-1]))
            raw["rounds"].append({"round": round_index, "practice": rows, "fast": fast_rows})
        else:
            raw["rounds"].append({"round": round_index, "practice": rows})

    sweep: dict[str, Any] = {}
    methods = []
    for method in shortcut_methods(modes):
        methods.append(method)
        if method.mode == "lossless":  # the ablation beside the full system, in the same rotation
            methods.append(Method(method.name.replace("shortcut lossless", f"shortcut lossless {MEMORY_ONLY}"),
                                  "shortcut", method.system, mode="lossless",
                                  options={"lossless.shallow_drafts": False}))
    if early_exits:
        best, medians = sweep_early_exit(systems[0], plain, early_exits, sweep_records, args.max_new_tokens)
        bar.update(len(sweep_records))
        sweep = {"layers": early_exits, "speed_ratio_median": medians, "best": best, "prompts": len(sweep_records)}
        log(f"assistant_early_exit sweep on {len(sweep_records)} prompts: "
            + ", ".join(f"E={e}: {r:.2f}x" for e, r in medians.items()) + f" -> best E={best}")
        methods += peer_methods(systems[0], [best], args.lookup_tokens)
    elif args.lookup_tokens > 0:
        methods += peer_methods(systems[0], [], args.lookup_tokens)

    tests: list[dict] = []
    for set_name, records in test_sets.items():
        rows = run(records, methods)
        raw["tests"][set_name] = rows
        for method in [plain, *methods]:
            tests.append({"set": set_name, "method": method.name, **summarise(rows[method.name])})
            log(_line(tests[-1]))
        for system in systems:
            oracle_rows = [oracle(system, r, row["output_ids"]) for r, row in zip(records, rows[plain.name])]
            tests.append({"set": set_name, "method": "oracle" + (f" [{system.label}]" if many else ""),
                          **summarise_oracle(oracle_rows, system.handle.num_layers)})
    bar.close()
    fast_report = {s.label: s.handle.fast.report() for s in systems} if "fast" in modes else {}
    return {"rounds": rounds, "tests": tests, "early_exit_sweep": sweep, "fast_audits": fast_report, "raw": raw}


def _line(row: dict) -> str:
    where = f"round {row['round']}" if "round" in row else "test"
    speed = f"{row['speed_ratio']:.2f}x" if "speed_ratio" in row else "  -  "
    agreement = f"{100 * row['agreement']:.1f}%" if "agreement" in row else "-"
    return (f"{where:<8} {row['set']:<16} {row['method']:<24} speed {speed} flops {row['flops_rel']:.2f} "
            f"agreement {agreement}")


# -- teacher-forced scoring (agreement, choice) ----------------------------------------------
@torch.no_grad()
def candidate_logits(system: System, mode: str, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits [T, V] of ``system`` in ``mode`` at every position of
    ``sequence`` [1, T], teacher forced, and the exit layer each position took
    (``num_layers`` for the full path).

    lossless: the wrapped model's own logits (drafts are verified, so what it emits is
    the full path's). fast: at positions the policy calls familiar as a sequence (each
    token continuing its predecessor's practised matches, as in decoding; above fast
    mode's familiarity bar too) and whose exit head is confident enough to commit (fast mode's
    confidence bar), the exit head's logits at the chosen layer, else the full path's;
    hidden states come from a full forward, so this measures the decisions with an
    exact cache (the practice task's fast rows measure real committed decoding). These
    are the gates alone, as with ``FastConfig(practised_prompts_only=False)``: ``generate`` on
    a prompt never practised verbatim decodes losslessly.
    """
    handle = system.handle
    if mode == "lossless":
        with handle.reference():
            logits = system.model(input_ids=sequence).logits[0].float()
        return logits, torch.full((logits.shape[0],), handle.num_layers)
    learner = handle.learner
    policy, heads = learner.policy, learner.heads
    layers = sorted({*heads.layers, learner.signature_layer})
    with handle.reference():
        states, _, _ = collect_states(system.model, handle.parts, sequence, layers)
        logits = system.model(input_ids=sequence).logits[0].float()
    sig = learner.observer.encode(states[learner.signature_layer])
    probs = policy.probabilities(sig)
    familiar = policy.sequence_familiarity(sig) >= max(policy.min_familiarity, handle.fast.min_familiarity)
    passing = probs >= policy.threshold
    depth = torch.full((logits.shape[0],), handle.num_layers)
    for column in reversed(range(len(policy.exit_layers))):
        take = familiar & passing[:, column]
        depth[take] = policy.exit_layers[column]
    if heads.shortlist.numel() == 0:
        return logits, torch.full_like(depth, handle.num_layers)
    for layer in heads.layers:
        where = (depth == layer).nonzero().flatten()
        if len(where) == 0:
            continue
        head_logits = heads.logits(layer, states[layer][where]).float()
        # fast mode's confidence: the softmax over the shortlist columns of the same logits
        sure = torch.softmax(head_logits[:, heads.shortlist], -1).max(-1).values >= handle.fast.min_confidence
        depth[where[~sure]] = handle.num_layers
        logits[where[sure]] = head_logits[sure]
    return logits, depth


def agreement(args: Any, systems: list[System], passages: list[dict], log: Callable[[str], None]) -> dict:
    """Teacher-forced next-token agreement and perplexity of each system (in each mode)
    against the unwrapped model on text passages."""
    reference_system = systems[0]
    results, raw = [], []
    combos = [(s, m) for s in systems for m in _modes(args.mode)]
    totals = {(s.label, m): {"agree": 0, "tokens": 0, "nll": 0.0, "ref_nll": 0.0, "layers": 0.0} for s, m in combos}
    tokenizer = reference_system.tokenizer
    for record in tqdm(passages, desc="shortcut-eval agreement", disable=args.quiet, unit="passage"):
        ids = tokenizer(record["text"], return_tensors="pt", truncation=True, max_length=args.max_length)["input_ids"]
        if ids.shape[1] < 2:
            continue
        with reference_system.handle.disabled(), torch.no_grad():
            ref = reference_system.model(input_ids=ids).logits[0, :-1].float()
        targets = ids[0, 1:]
        ref_nll = float(F.cross_entropy(ref, targets, reduction="sum"))
        for system, mode in combos:
            logits, depth = candidate_logits(system, mode, ids)
            logits, depth = logits[:-1], depth[:-1]
            t = totals[(system.label, mode)]
            agree = int((logits.argmax(-1) == ref.argmax(-1)).sum())
            nll = float(F.cross_entropy(logits, targets, reduction="sum"))
            t["agree"] += agree
            t["tokens"] += int(targets.numel())
            t["nll"] += nll
            t["ref_nll"] += ref_nll
            t["layers"] += float(depth.float().sum())
            raw.append({"passage_id": record.get("id"), "system": system.label, "mode": mode,
                        "tokens": int(targets.numel()), "agreed": agree, "nll": nll, "reference_nll": ref_nll})
    for (label, mode), t in totals.items():
        if t["tokens"] == 0:
            raise ValueError("no passage has two or more tokens")
        ppl, ref_ppl = math.exp(t["nll"] / t["tokens"]), math.exp(t["ref_nll"] / t["tokens"])
        results.append({"set": "passages", "method": f"shortcut {mode}" + (f" [{label}]" if len(systems) > 1 else ""),
                        "tokens": t["tokens"], "agreement": t["agree"] / t["tokens"], "perplexity": ppl,
                        "reference_perplexity": ref_ppl, "perplexity_ratio": ppl / ref_ppl,
                        "mean_layers": t["layers"] / t["tokens"]})
        log(f"{results[-1]['method']:<28} agreement {100 * results[-1]['agreement']:.2f}%  perplexity "
            f"{ppl:.3f} vs {ref_ppl:.3f} ({100 * (ppl / ref_ppl - 1):+.2f}%)  layers/token "
            f"{results[-1]['mean_layers']:.1f}")
    return {"tests": results, "raw": {"passages": raw}}


def choice(args: Any, systems: list[System], items: list[dict], log: Callable[[str], None]) -> dict:
    """Multiple-choice accuracy by log-likelihood of each choice after its question,
    unwrapped model vs each system (in each mode)."""
    reference_system = systems[0]
    tokenizer = reference_system.tokenizer
    combos = [(s, m) for s in systems for m in _modes(args.mode)]
    correct = {("unwrapped", None): 0, **{(s.label, m): 0 for s, m in combos}}
    same_pick = {(s.label, m): 0 for s, m in combos}
    raw = []
    for number, item in enumerate(tqdm(items, desc="shortcut-eval choice", disable=args.quiet, unit="question")):
        scores: dict[tuple, list[float]] = {key: [] for key in correct}
        for context_ids, option_ids in choice_sequences(tokenizer, item):
            sequence = torch.cat([context_ids, option_ids], dim=1)
            span = slice(context_ids.shape[1] - 1, sequence.shape[1] - 1)
            targets = sequence[0, context_ids.shape[1]:]
            with reference_system.handle.disabled(), torch.no_grad():
                ref = reference_system.model(input_ids=sequence).logits[0].float()
            scores[("unwrapped", None)].append(_loglik(ref[span], targets))
            for system, mode in combos:
                logits, _ = candidate_logits(system, mode, sequence)
                scores[(system.label, mode)].append(_loglik(logits[span], targets))
        picks = {key: max(range(len(v)), key=v.__getitem__) for key, v in scores.items()}
        for key, pick in picks.items():
            correct[key] += int(pick == item["answer"])
            if key in same_pick:
                same_pick[key] += int(pick == picks[("unwrapped", None)])
        raw.append({"id": item.get("id", number), "answer": item["answer"],
                    "loglik": {f"{k[0]}/{k[1]}": v for k, v in scores.items()}})
    n = len(items)
    results = [{"set": "choice", "method": "plain (unwrapped)", "questions": n,
                "accuracy": correct[("unwrapped", None)] / n}]
    for system, mode in combos:
        key = (system.label, mode)
        method = f"shortcut {mode}" + (f" [{system.label}]" if len(systems) > 1 else "")
        results.append({"set": "choice", "method": method, "questions": n, "accuracy": correct[key] / n,
                        "same_choice_as_unwrapped": same_pick[key] / n})
    for r in results:
        log(f"{r['method']:<28} accuracy {100 * r['accuracy']:.1f}%"
            + (f"  same choice as unwrapped {100 * r['same_choice_as_unwrapped']:.1f}%"
               if "same_choice_as_unwrapped" in r else ""))
    return {"tests": results, "raw": {"questions": raw}}


def choice_sequences(tokenizer: Any, item: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The token ids [1, T] of a question's context and of each of its choices, as scored."""
    context_ids = tokenizer(f"Question: {item['question']}\nAnswer:", return_tensors="pt")["input_ids"]
    return [(context_ids, tokenizer(" " + option, add_special_tokens=False, return_tensors="pt")["input_ids"])
            for option in item["choices"]]


def _loglik(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).sum())
