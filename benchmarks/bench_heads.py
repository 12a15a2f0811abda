"""Benchmark exit heads on the packaged SmolLM2-135M-Instruct.

Greedy-generates answers for practice prompts with the plain model (the practised
answers), collects hidden states at the exit layers over prompt+answer, fits the heads,
then reports per layer the top-1 agreement with the full model on the practised answer
tokens and on novel prompts' answers (heads never trained on them), for full-vocabulary
and shortlist scoring, the confidence calibration, and the wall time of one head
evaluation vs one decoder layer at batch 1, seq 1.

    python benchmarks/bench_heads.py            # 8 practice + 8 novel prompts, 64 tokens
    python benchmarks/bench_heads.py --quick    # 4 + 4 prompts, 32 tokens, fewer steps
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

import shortcut  # noqa: E402
from shortcut.arch import resolve  # noqa: E402
from shortcut.policy.heads import ExitHeads, collect_states  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "shortcut_eval" / "data" / "prompts.jsonl"
NEAR = Path(__file__).resolve().parent.parent / "shortcut_eval" / "data" / "near_duplicates.jsonl"


def near_duplicates(prompts: list[str]) -> list[str]:
    """The committed near-duplicate rewording of each prompt (shortcut_eval/data/near_duplicates.jsonl)."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    by_id = {r["id"]: r["prompt"] for r in rows}
    nd = {r["of"]: r["prompt"] for r in map(json.loads, NEAR.read_text().splitlines())}
    ids = {v: k for k, v in by_id.items()}
    return [nd[ids[p]] for p in prompts if ids[p] in nd]


def load_prompts(split: str, n: int) -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows if r["split"] == split][:n]


@torch.no_grad()
def generate(model, tok, prompts: list[str], new_tokens: int,
             cache_dir: Path | None = None) -> list[tuple[torch.Tensor, int]]:
    """(prompt+answer ids [T], prompt length) per prompt, greedy, plain model."""
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([prompts, new_tokens]).encode()).hexdigest()[:16]
        path = cache_dir / f"answers-{key}.pt"
        if path.exists():
            return [(s, int(n)) for s, n in torch.load(path)]
        out = generate(model, tok, prompts, new_tokens)
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save([(s, torch.tensor(n)) for s, n in out], path)
        return out
    out = []
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=False)
        if not isinstance(ids, torch.Tensor):
            ids = ids["input_ids"]
        seq = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        out.append((seq[0], ids.shape[1]))
    return out


def gather(model, parts, seqs, layers):
    """Concatenated states over all positions, plus a mask of the answer positions
    (positions whose next token is an answer token)."""
    states, finals, nexts, answer = {l: [] for l in layers}, [], [], []
    for seq, plen in seqs:
        s, f, nt = collect_states(model, parts, seq, layers)
        for l in layers:
            states[l].append(s[l])
        finals.append(f)
        nexts.append(nt)
        m = torch.zeros(len(seq), dtype=torch.bool)
        m[plen - 1:len(seq) - 1] = True
        answer.append(m)
    return ({l: torch.cat(v) for l, v in states.items()}, torch.cat(finals), torch.cat(nexts), torch.cat(answer))


def median_time(fn, repeats: int = 200) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def layer_time(model, tok, parts) -> float:
    """Median wall time of one decoder layer in a single-token decode step (KV cache
    of a ~60-token prompt), measured with hooks inside the real forward."""
    ids = tok("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt").input_ids
    out = model(ids, use_cache=True)
    starts, spans = {}, []
    hooks = []
    for i, layer in enumerate(parts.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: starts.__setitem__(i, time.perf_counter())))
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: spans.append(time.perf_counter() - starts[i])))
    try:
        nxt = out.logits[:, -1:].argmax(-1)
        cache = getattr(out, "cache", None) or out.past_key_values
        for step in range(30):
            out = model(nxt, cache=cache, use_cache=True)
            if step < 5:
                spans.clear()
    finally:
        for h in hooks:
            h.remove()
    return statistics.median(spans)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4+4 prompts, 32 tokens, 300 steps")
    ap.add_argument("--layers", default="4,6,8,10,14,18")
    ap.add_argument("--practice", type=int, default=8)
    ap.add_argument("--novel", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--hard-weight", type=float, default=1.0,
                    help="weight of the cross-entropy on the full model's argmax")
    ap.add_argument("--no-precondition", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default). 1 by default: on a shared 2-core machine two "
                         "threads under contention run 20-50x slower")
    ap.add_argument("--vocab", choices=["full", "shortlist", "auto"], default="shortlist")
    ap.add_argument("--top-k", type=int, default=4, help="shortlist: add the full model's top-k per practised position")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--cache-dir", type=Path, help="reuse generated answers saved here (keyed by prompts)")
    args = ap.parse_args(argv)
    if args.quick:
        args.practice, args.novel, args.new_tokens, args.steps = 4, 4, 32, 300
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    layers = [int(x) for x in args.layers.split(",")]

    t0 = time.perf_counter()
    model, tok = shortcut.load_model("smollm2")
    parts = resolve(model)
    practice_prompts = load_prompts("practice", args.practice)
    practised = generate(model, tok, practice_prompts, args.new_tokens, args.cache_dir)
    near = generate(model, tok, near_duplicates(practice_prompts), args.new_tokens, args.cache_dir)
    novel = generate(model, tok, load_prompts("novel", args.novel), args.new_tokens, args.cache_dir)
    sets = {"prac": gather(model, parts, practised, layers), "near": gather(model, parts, near, layers),
            "novel": gather(model, parts, novel, layers)}
    p_states, p_final, p_next, p_ans = sets["prac"]
    print(f"setup {time.perf_counter() - t0:.1f} s; practice: {len(practised)} prompts, {len(p_next)} tokens "
          f"({int(p_ans.sum())} answer); near-duplicates of them: {int(sets['near'][3].sum())} answer tokens; "
          f"novel: {len(novel)} prompts, {int(sets['novel'][3].sum())} answer tokens")

    heads = ExitHeads(parts, layers)
    heads.grow_shortlist(p_next, final_hidden=p_final, top_k=args.top_k)
    results: dict[str, dict] = {}

    def evaluate(tag: str) -> None:
        for name, (st, _, nx, m) in sets.items():
            for short in (False, True):
                for l in layers:
                    pred = heads.predict(l, st[l][m], use_shortlist=short)
                    ok, conf = pred.token_ids == nx[m], pred.confidence
                    r = results.setdefault(f"{tag}_{name}_{'short' if short else 'full'}", {})
                    hi = conf >= args.threshold
                    order = conf.argsort(descending=True)
                    cum = ok[order].float().cumsum(0) / torch.arange(1, len(ok) + 1)
                    good = (cum >= 0.99).nonzero()
                    k = int(good.max()) + 1 if len(good) else 0
                    r[l] = {"agree": ok.float().mean().item(),
                            "cov": hi.float().mean().item(),
                            "prec": ok[hi].float().mean().item() if hi.any() else float("nan"),
                            # lowest threshold keeping >= 99% precision, and the share above it
                            "t99": conf[order][k - 1].item() if k else float("nan"), "cov99": k / len(ok)}

    evaluate("lens")
    t = time.perf_counter()
    hist = heads.fit(p_states, p_final, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                     seed=args.seed, vocab=args.vocab, weight_decay=args.weight_decay,
                     hard_weight=args.hard_weight, precondition=not args.no_precondition, progress=False)
    fit_s = time.perf_counter() - t
    print(f"fit: {args.steps} steps, lr {args.lr}, batch {args.batch_size}, vocab {args.vocab}, "
          f"hard {args.hard_weight}, threads {torch.get_num_threads()}, "
          f"{len(p_next)} tokens, {len(layers)} layers: {fit_s:.1f} s; shortlist {heads.shortlist.numel()} ids "
          f"(top-k {args.top_k}); final batch loss " + ", ".join(f"L{l} {h[-1]:.3f}" for l, h in hist.items()))
    evaluate("head")

    def line(cells):
        return " | ".join(f"{c:>{w}}" for c, w in cells)

    print()
    print("top-1 agreement with the full model on answer tokens (lens = untrained head; full = full-vocabulary "
          "scoring, short = shortlist)")
    cols = [("lens", "prac", "full"), ("lens", "prac", "short")] + [
        ("head", n, v) for n in ("prac", "near", "novel") for v in ("full", "short")]
    print(line([("layer", 5)] + [(f"{t} {n} {v}", 16) for t, n, v in cols]))
    for l in layers:
        print(line([(l, 5)] + [(f"{results[f'{t}_{n}_{v}'][l]['agree']:.3f}", 16) for t, n, v in cols]))
    print()
    print(f"calibration of trained heads, shortlist scoring: precision/coverage at confidence >= {args.threshold}; "
          "lowest threshold with >= 99% precision (coverage)")
    print(line([("layer", 5)] + [(f"{n} p/c@{args.threshold}", 16) for n in ("prac", "near", "novel")]
               + [(f"{n} thr99 (cov)", 16) for n in ("prac", "near", "novel")]))
    for l in layers:
        rs = [results[f"head_{n}_short"][l] for n in ("prac", "near", "novel")]
        print(line([(l, 5)] + [(f"{r['prec']:.3f}/{r['cov']:.3f}", 16) for r in rs]
                   + [(f"{r['t99']:.3f} ({r['cov99']:.3f})", 16) for r in rs]))
    rows = [{"layer": l, **{k: v[l] for k, v in results.items()},
             **{f"cost_{k}": v for k, v in heads.head_cost(l).items()}}
            for l in layers]

    h1 = p_states[layers[0]][:1].clone()
    t_full = median_time(lambda: heads.predict(layers[0], h1, use_shortlist=False))
    t_short = median_time(lambda: heads.predict(layers[0], h1, use_shortlist=True))
    t_layer = layer_time(model, tok, parts)
    layer_params = sum(p.numel() for p in parts.layers[0].parameters())

    print()
    print(f"batch 1, seq 1 wall time (median): decoder layer {t_layer * 1e3:.3f} ms "
          f"({layer_params / 1e6:.2f}M params); "
          f"head full vocab {t_full * 1e3:.3f} ms ({rows[0]['cost_full'] / 1e6:.2f}M params, "
          f"{t_full / t_layer:.2f} layers); head shortlist {t_short * 1e3:.3f} ms "
          f"({rows[0]['cost_shortlist'] / 1e6:.2f}M params, {t_short / t_layer:.2f} layers)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "fit_s": fit_s,
                                         "rows": rows, "t_layer": t_layer, "t_full": t_full, "t_short": t_short},
                                        indent=1))


if __name__ == "__main__":
    main()
