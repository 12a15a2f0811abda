"""Depth redundancy of a model: how early could a token leave, and which single layer
could it step over, on practised and on new prompts?

    OMP_NUM_THREADS=2 python benchmarks/bench_depth.py --model qwen2.5-coder-0.5b --prompts 8

For ``--prompts`` practised and as many new prompts (``--data``: records with ``split``
practice / novel), the plain model's greedy answer is generated once; every answer
position is then examined teacher-forced (prompt + answer in one forward):

  lens oracle   the earliest layer from which the logit lens (final norm + unembedding on
                the state after l layers) names the final token at every deeper layer;
  tuned heads   exit heads (``shortcut.policy.heads.ExitHeads``) fitted on the practised
                answers' states (KL to the final distribution, shortlist of the practised
                tokens), their top-1 agreement with the final token at each exit on the
                practised answers and on the new ones (scored over the whole vocabulary);
  single skips  for each layer alone, ``FixedPlan(skip={l})``: the share of answer
                positions whose final top-1 is unchanged.

Prints one table per measurement; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import shortcut
from shortcut import FixedPlan
from shortcut.data import prompt_input_ids, read_prompts
from shortcut.policy.heads import ExitHeads, collect_states

DATA = Path(__file__).resolve().parent.parent / "shortcut_eval" / "data" / "prompts.jsonl"


def answers(model, tokenizer, records, new_tokens):
    """(prompt length, prompt + greedy answer ids [1, T]) per record."""
    out = []
    for record in records:
        ids = prompt_input_ids(tokenizer, record)
        full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False)
        out.append((ids.shape[1], full))
    return out


def lens_oracle(model, parts, seqs):
    """Mean earliest layer from which the logit lens keeps naming the final token."""
    layers = list(range(1, parts.num_layers + 1))
    earliest = []
    for start, ids in seqs:
        states, final, tokens = collect_states(model, parts, ids, layers)
        lens = torch.stack([model.get_output_embeddings()(parts.final_norm(states[l])).argmax(-1) for l in layers])
        agree = lens == tokens  # [L, T]
        for pos in range(start - 1, ids.shape[1] - 1):
            column = agree[:, pos].tolist()
            first = parts.num_layers
            for index in range(len(layers) - 1, -1, -1):
                if not column[index]:
                    break
                first = layers[index]
            earliest.append(first)
    return statistics.mean(earliest)


def answer_states(model, parts, seqs, exits):
    """States at the exits, final states and tokens of the answer positions, concatenated."""
    states, finals, tokens = {e: [] for e in exits}, [], []
    for start, ids in seqs:
        s, f, t = collect_states(model, parts, ids, exits)
        keep = slice(start - 1, ids.shape[1] - 1)
        for e in exits:
            states[e].append(s[e][keep])
        finals.append(f[keep])
        tokens.append(t[keep])
    return {e: torch.cat(v) for e, v in states.items()}, torch.cat(finals), torch.cat(tokens)


def skip_agreement(model, handle, seqs):
    """Per layer: share of answer positions whose top-1 is unchanged when that layer alone is skipped."""
    refs = []
    with torch.no_grad():
        for start, ids in seqs:
            refs.append(model(input_ids=ids, use_cache=False).logits[0, start - 1:-1].argmax(-1))
        shares = []
        for layer in range(handle.num_layers):
            handle.set_policy(FixedPlan(skip={layer}))
            same = total = 0
            for (start, ids), ref in zip(seqs, refs):
                got = model(input_ids=ids, use_cache=False).logits[0, start - 1:-1].argmax(-1)
                same += int((got == ref).sum())
                total += ref.numel()
            shares.append(same / total)
        handle.set_policy(None)
    return shares


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--prompts", type=int, default=8, help="practised prompts, and as many new ones")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--fit-steps", type=int, default=150)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.prompts < 1 or args.new_tokens < 1 or args.fit_steps < 1:
        ap.error("--prompts, --new-tokens and --fit-steps must be at least 1")

    t0 = time.perf_counter()
    model, tokenizer = shortcut.load_model(args.model)
    parts = shortcut.arch.resolve(model)
    n = parts.num_layers
    practised = answers(model, tokenizer, read_prompts(args.data, split="practice")[:args.prompts], args.new_tokens)
    novel = answers(model, tokenizer, read_prompts(args.data, split="novel")[:args.prompts], args.new_tokens)
    result: dict = {"model": args.model, "num_layers": n, "prompts": args.prompts, "new_tokens": args.new_tokens}

    result["lens_oracle"] = {"practised": lens_oracle(model, parts, practised), "new": lens_oracle(model, parts, novel)}

    exits = sorted({max(1, round(n * f)) for f in (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)})
    heads = ExitHeads(parts, exits)
    states, final, tokens = answer_states(model, parts, practised, exits)
    heads.set_shortlist(tokens)
    heads.fit(states, final, steps=args.fit_steps, progress=False)
    new_states, _, new_tokens = answer_states(model, parts, novel, exits)
    with torch.no_grad():
        result["tuned_heads"] = {
            str(e): {"practised": float((heads.predict(e, states[e], use_shortlist=False).token_ids
                                         == tokens).float().mean()),
                     "new": float((heads.predict(e, new_states[e], use_shortlist=False).token_ids
                                   == new_tokens).float().mean())}
            for e in exits}

    handle = shortcut.wrap(model)
    try:
        result["single_skip"] = skip_agreement(model, handle, practised + novel)
    finally:
        handle.remove()
    result["seconds"] = time.perf_counter() - t0

    print(f"\n{args.model}: {n} layers, {args.prompts} practised + {args.prompts} new prompts, "
          f"{args.new_tokens} greedy tokens each ({result['seconds']:.0f} s)")
    print(f"logit-lens oracle (earliest layer that stays right), mean: practised "
          f"{result['lens_oracle']['practised']:.1f}, new {result['lens_oracle']['new']:.1f} of {n}")
    print("\n| exit after | tuned head, practised | tuned head, new |\n| --- | --- | --- |")
    for e, row in result["tuned_heads"].items():
        print(f"| {e} | {row['practised']:.1%} | {row['new']:.1%} |")
    shares = result["single_skip"]
    best = sorted(range(n), key=lambda i: -shares[i])[:5]
    print("\nsingle-layer skip, top-1 unchanged: "
          + ", ".join(f"{i}: {shares[i]:.1%}" for i in range(n)))
    print("best five: " + ", ".join(f"layer {i} {shares[i]:.1%}" for i in best))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
