"""Decoding variants on frozen skills, each paired with plain ``generate`` per prompt.

Loads a skills folder (e.g. the ``skills/`` of a ``shortcut-eval practice`` run), then
for every prompt of the chosen test sets runs plain ``generate`` and each variant in
rotating order in one process, and prints per set and variant the median speed ratio
and FLOPs ratio to plain, drafted tokens per generated token, acceptance, identical
outputs and agreement (``shortcut_eval.workload.measure_prompt``). A variant is a
``ShortcutConfig`` change by dotted name, plus ``"mode"`` and benchmark-only switches:
``"shallow_odds": false`` proposes every shallow token the heads are sure of, as before
the learned odds existed (an ablation of ``ShallowOdds``); ``"shallow_costs": false``
proposes them against ``accept_bar`` alone, not against what their draft step costs
(the rule before the costs were counted); ``"skip_set": [layers]`` makes
skip drafts (``lossless.skip_drafts``) step over exactly these layers, e.g. the best
global set ``bench_skips.py`` found, and ``"skip_always": true`` with it drafts with them
wherever the chance of reaching the token is at least 0.5, paying or not (measures the
set's acceptance). ``"kept_prefixes": false`` reads no kept keys and values of earlier
text (``shortcut/decode/prefix.py``); with ``--keep-practised`` the others start from
those of the practised sequences, as a practice run leaves them.

    OMP_NUM_THREADS=1 python benchmarks/bench_variants.py --skills runs/eval/<run>/skills \\
        --sets transfer --variants '{"full": {}, "memory only": {"lossless.shallow_drafts": false}}'
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

import shortcut_eval.workload as workload
from shortcut.decode.draft_length import ShallowOdds
from shortcut.decode.prefix import PrefixCache
from shortcut.decode.skip_draft import ALL, PRIOR_TOKENS, SkipDrafter, SkipPlan
from shortcut_eval.peers import peer_methods
from shortcut_eval.workload import WORKLOADS, Method, load_system, prompt_sets, summarise

SETS = ("exact repeats", "near-duplicates", "transfer", "novel")


class ProposeAll(ShallowOdds):
    """Odds that find every shallow token worth proposing (the ablation)."""

    def worth(self, exit_layer: int, confidence: float, reach: float = 1.0) -> bool:
        return True


class PinnedPlan(SkipPlan):
    """A skip plan with one fixed layer set (e.g. the best global set ``bench_skips.py``
    found offline) and no situations; it still learns the set's chance and drafts only
    where that pays."""

    def __init__(self, num_layers: int, layers: list[int], always: bool = False) -> None:
        super().__init__(num_layers, min(layers))
        self.layers = frozenset(layers)
        self.always = always  # draft every token (while its reach is at least 0.5): measures the set's chance
        self.counts[(ALL, len(self.layers))] = [PRIOR_TOKENS, 0.0]  # drafts until outcomes say otherwise

    def choose(self, situation: int, reach: float = 1.0) -> int | None:
        if self.always:
            return len(self.layers) if reach * self.probability(situation, len(self.layers)) >= 0.5 else None
        return super().choose(situation, reach)

    @property
    def warm(self) -> bool:
        return True

    @property
    def depths(self) -> list[int]:
        return [len(self.layers)]

    def skip_set(self, depth: int) -> frozenset[int]:
        return self.layers


def _with_own_state(ablated: set[str], uncosted: set[str], pinned: dict[str, list[int]],
                    unkept: AbstractSet[str] = frozenset()) -> Any:
    """``workload.generate`` where each variant keeps its own learned shallow odds and
    skip plan (the shallow odds start from the skills folder's when it kept them), so one
    variant's outcomes do not steer another's drafts; ``uncosted``
    variants propose shallow tokens against ``accept_bar`` alone (not their cost); ``pinned``
    variants draft with a fixed skip set and no observer situations; ``unkept`` variants
    read no kept keys and values."""
    plain_generate = workload.generate
    odds: dict[str, ShallowOdds] = {}
    plans: dict[str, SkipPlan | None] = {}

    def generate(method: Method, ids: Any, new_tokens: int) -> dict[str, Any]:
        handle = method.system.handle
        if method.kind != "shortcut" or handle.learner is None:
            return plain_generate(method, ids, new_tokens)
        saved, saved_plan, saved_prefixes = handle._shallow_odds, handle._skip_plan, handle.prefixes
        if method.name in unkept:
            handle.prefixes = PrefixCache(0)
        handle._odds_for = (id(handle.learner), handle.learner.stats.consolidations)  # frozen skills
        bar = handle.config.lossless.accept_bar
        if method.name not in odds:
            odds[method.name] = (ProposeAll(bar) if method.name in ablated
                                 else ShallowOdds(bar) if method.name in uncosted
                                 else copy.deepcopy(saved) if saved.counts  # the skills folder's own
                                 else handle._fresh_shallow_odds(handle.learner))
        handle._shallow_odds = odds[method.name]
        handle._skip_plan = plans.get(method.name)
        if method.name in pinned:
            plan = plans.get(method.name) or PinnedPlan(handle.parts.num_layers, *pinned[method.name])
            handle._skip_plan = plan
            handle._skip_drafter = lambda learner: SkipDrafter(handle.model, handle._runtime, plan, None,
                                                               handle.decode_stats)
        try:
            return plain_generate(method, ids, new_tokens)
        finally:
            odds[method.name], plans[method.name] = handle._shallow_odds, handle._skip_plan
            handle._shallow_odds, handle._skip_plan, handle.prefixes = saved, saved_plan, saved_prefixes
            handle.__dict__.pop("_skip_drafter", None)

    generate.plans = plans  # type: ignore[attr-defined]
    return generate


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skills", required=True, help="a practised skills folder")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="chat",
                        help="the prompt sets the skills were practised on")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=["transfer"])
    parser.add_argument("--test-prompts", type=int, default=12, help="prompts per set")
    parser.add_argument("--family-prompts", type=int, default=6,
                        help="practised instances per task family (as the practice run had them)")
    parser.add_argument("--practice-prompts", type=int, default=8, help="as the practice run had them")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--lookup-tokens", type=int, default=0, help="add prompt lookup with this many tokens")
    parser.add_argument("--keep-practised", action="store_true",
                        help="start from the kept keys and values of the practised sequences")
    parser.add_argument("--variants", default='{"full": {}, "memory only": {"lossless.shallow_drafts": false}}',
                        help="JSON: name -> options")
    args = parser.parse_args(argv)
    try:
        variants = json.loads(args.variants)
    except json.JSONDecodeError as error:
        parser.error(f"--variants is not JSON: {error}")
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        parser.error('--variants must map names to option objects, e.g. {"full": {}}')

    system = load_system("skills", args.model, dtype="float32", skills=args.skills, seed=0, corpus=Path("."),
                         sae_steps=1, progress=False)
    prompts, near, families = WORKLOADS[args.workload]
    sets = prompt_sets(prompts, near, n_practice=args.practice_prompts, n_test=args.test_prompts,
                       families=families, n_family=args.family_prompts)
    ablated = {name for name, options in variants.items() if options.pop("shallow_odds", True) is False}
    uncosted = {name for name, options in variants.items() if options.pop("shallow_costs", True) is False}
    unkept = {name for name, options in variants.items() if options.pop("kept_prefixes", True) is False}
    pinned = {name: (options.pop("skip_set"), options.pop("skip_always", False))
              for name, options in variants.items() if "skip_set" in options}
    methods = [Method(name, "shortcut", system, mode=options.pop("mode", "lossless"), options=options)
               for name, options in variants.items()]
    methods += peer_methods(system, [], args.lookup_tokens)
    workload.generate = _with_own_state(ablated, uncosted, pinned, unkept)
    if args.keep_practised:
        keep_practised(system.handle)
    plain = Method("plain", "plain", system)
    results: dict[str, dict[str, Any]] = {}
    rotation = 0
    for set_name in args.sets:
        rows: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
        for record in sets[set_name]:
            for name, row in workload.measure_prompt(methods, plain, record, args.max_new_tokens, rotation).items():
                if name in rows:
                    rows[name].append(row)
            rotation += 1
        for method in methods:
            s = summarise(rows[method.name])
            results[f"{set_name} / {method.name}"] = s
            print(f"{set_name:<16} {method.name:<24} speed {s['speed_ratio']:.2f}x  FLOPs {s['flops_rel']:.2f}  "
                  f"drafted/token {s['drafted_per_token']:.2f}  acceptance {s['acceptance'] or 0:.2f}  "
                  f"identical {s['identical']:.0%}  agreement {s['agreement']:.3f}", flush=True)
            if s["skip_drafted_per_token"]:
                print(f"{'':<41} skip-drafted/token {s['skip_drafted_per_token']:.3f}  "
                      f"skip-accepted/token {s['skip_accepted_per_token']:.3f}", flush=True)
    for name, plan in workload.generate.plans.items():  # type: ignore[attr-defined]
        if plan is not None:
            print(f"{name}: {describe_plan(plan)}")
    return results


def keep_practised(handle: Any) -> None:
    """Keep the keys and values of every practised sequence (prompt and answer), as the
    practice run that made the skills left them (a skills folder does not hold them)."""
    model = handle.model
    for sequence in handle.experience.sequences.sequences:
        cache = DynamicCache(config=model.config)
        with handle.disabled(), torch.no_grad():
            model(input_ids=torch.tensor([sequence]), cache=cache, use_cache=True)
        handle.prefixes.keep(model, list(sequence), cache, len(sequence))
    print(f"kept {len(handle.prefixes)} blocks ({handle.prefixes.nbytes / 2**20:.0f} MiB) "
          f"of {len(handle.experience.sequences.sequences)} practised sequences", flush=True)


def describe_plan(plan: SkipPlan) -> str:
    """What the skip drafts learned: each depth's layers, its chance over all situations
    against the chance it needs to pay, and how many situations clear that."""
    influence = plan.influence / max(plan.measured, 1)
    lines = [f"skip plan: {plan.measured} tokens measured; influence per layer "
             + " ".join(f"{i}:{float(v):.3f}" for i, v in enumerate(influence))]
    situations = {key[0] for key in plan.counts if key[0] != ALL}
    for depth in plan.depths:
        accepted, rejections = plan._counts(ALL, depth)
        paying = sum(plan.probability(sit, depth) > plan.cost(depth) for sit in situations)
        lines.append(f"  depth {depth:>2} layers {sorted(plan.skip_set(depth))}: chance "
                     f"{plan.probability(ALL, depth):.3f} (needs > {plan.cost(depth):.3f}; "
                     f"{accepted:.1f} accepted, {rejections:.1f} rejected with the prior); "
                     f"{paying} of {len(situations)} situations pay")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
