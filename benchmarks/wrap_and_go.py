"""Wrap and go: does a freshly wrapped model get faster on prompts it is asked again,
with no setup at all (no observer, no practice call)?

The user's code is five lines (marked in ``main``): load the packaged model, wrap it,
ask 30 chat prompts three times with ``generate`` through the tokenizer's chat
template, save. Around it this script measures, in the same run:

- plain: the untouched model (``with handle.disabled():``), once per prompt, right
  before the prompt's first wrapped call (interleaved, so both see the same load);
- pass 1/2/3: the wrapped model, learning from its own calls;
- near-duplicates: reworded versions of the practised prompts
  (``near_duplicates.jsonl``, ``of`` = a practised id), asked once after the passes:
  do reworded prompts already draft from the memory?
- traffic: the other packaged prompts (task families, the rest of the practice split,
  multiple-choice questions), each asked once, until the handle's observer trained
  itself from this traffic (``observer="auto"``) and was attached: how long the
  training took, and the longest ``generate`` call while it ran (against the median
  call before it), the call that started it and the call that attached it;
- observer quality: the self-trained observer against the corpus-trained default one
  (the harness's: ``shortcut_eval.workload``, the committed training passages, cached),
  both measured on the same held-out residuals neither saw: the held-out passages, and
  the novel prompts' chat template with their greedy answers (the template's shared
  system prompt once);
- reloaded: the saved folder loaded onto a fresh copy of the model (what a second
  process would do), asked the practised prompts once.

For each run it prints the median over prompts of the per-prompt tokens/s ratio to
plain, how many outputs are identical to plain, and the practised-sequence tokens
accepted. Other processes may share the CPU: ratios measured in the same run are what
count.

    OMP_NUM_THREADS=1 python benchmarks/wrap_and_go.py
    OMP_NUM_THREADS=1 python benchmarks/wrap_and_go.py --prompts 10 --new-tokens 32 --no-traffic
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import shortcut  # noqa: E402
from shortcut.data import DEFAULT_PASSAGES, read_jsonl, read_passages, read_prompts  # noqa: E402
from shortcut.observe import collect_activations, sae_quality  # noqa: E402
from shortcut.observe.auto import DEFAULT_MIN_TOKENS, AutoObserver  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "shortcut_eval" / "data"


class Meter:
    """Times each user call, and the first time a prompt is asked, the same call on the
    untouched model just before it."""

    def __init__(self, new_tokens: int) -> None:
        self.new_tokens = new_tokens
        self.handle: shortcut.Shortcut | None = None
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.plain: dict[str, dict[str, Any]] = {}  # by prompt text

    def ask(self, model: Any, tok: Any, text: str, run: str) -> list[int]:
        """The user's call (chat template, greedy ``generate``), and its plain twin."""
        inputs = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
        if text not in self.plain:
            with self.handle.disabled():
                self.plain[text] = self._timed(model, inputs)
        plain = self.plain[text]
        recalled = self.handle.decode_stats.recall_accepted
        wrapped = self._timed(model, inputs)
        wrapped["recalled"] = self.handle.decode_stats.recall_accepted - recalled
        self.rows.setdefault(run, []).append({"plain": plain, "wrapped": wrapped})
        return wrapped["tokens"]

    @torch.no_grad()
    def _timed(self, model: Any, inputs: Any) -> dict[str, Any]:
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=self.new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
        tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
        return {"tokens": tokens, "seconds": seconds, "tps": len(tokens) / seconds}

    def table(self) -> list[dict[str, Any]]:
        table = []
        for run, rows in self.rows.items():
            ratios = [r["wrapped"]["tps"] / r["plain"]["tps"] for r in rows]
            table.append({
                "run": run, "prompts": len(rows),
                "plain_tps": statistics.median(r["plain"]["tps"] for r in rows),
                "wrapped_tps": statistics.median(r["wrapped"]["tps"] for r in rows),
                "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
                "identical": sum(r["wrapped"]["tokens"] == r["plain"]["tokens"] for r in rows),
                "recalled_share": sum(r["wrapped"]["recalled"] for r in rows)
                / max(1, sum(len(r["wrapped"]["tokens"]) for r in rows)),
                "drafting_prompts": sum(r["wrapped"]["recalled"] > 0 for r in rows),
            })
        return table


def print_table(table: list[dict[str, Any]]) -> None:
    print(f"{'run':<16}{'prompts':>8}{'plain tok/s':>13}{'wrapped tok/s':>15}{'median x':>10}"
          f"{'min-max x':>14}{'identical':>11}{'recalled':>10}{'drafting':>10}")
    for t in table:
        print(f"{t['run']:<16}{t['prompts']:>8}{t['plain_tps']:>13.1f}{t['wrapped_tps']:>15.1f}"
              f"{t['median_ratio']:>10.2f}{t['min_ratio']:>7.2f}-{t['max_ratio']:<6.2f}"
              f"{t['identical']:>6}/{t['prompts']:<4}{100 * t['recalled_share']:>9.0f}%"
              f"{t['drafting_prompts']:>6}/{t['prompts']:<3}")
    print("median x: median over prompts of wrapped/plain tokens/s; recalled: share of new tokens drafted from "
          "practised sequences and accepted; drafting: prompts with any such token")


def chat_ids(tok: Any, text: str) -> torch.Tensor:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


@torch.no_grad()
def traffic(model: Any, tok: Any, handle: shortcut.Shortcut, texts: list[str], new_tokens: int) -> dict[str, Any]:
    """Ask ``texts`` once each (greedy) until the auto observer trained and was attached;
    time every call and note which ran while the observer trained."""
    auto = handle.auto_observer
    assert auto is not None, "the handle has no auto observer (was it wrapped with observer='auto'?)"
    calls: list[dict[str, Any]] = []
    started = finished = None
    for text in texts:
        ids = chat_ids(tok, text)
        training_before = auto.training
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
        kind = "before"
        if training_before:
            kind = "training"
        elif started is not None:
            kind = "attach" if handle.observer is not None else "trained, not attached"
        elif auto.training or auto.observer is not None:
            kind, started = "fills the buffer", time.perf_counter()
        if finished is None and started is not None and not auto.training:
            finished = time.perf_counter()
        calls.append({"kind": kind, "seconds": seconds, "tokens": auto.tokens})
        if handle.observer is not None:
            break
    else:
        if started is not None:  # out of prompts while it trains: wait, then attach
            auto.wait()
            finished = time.perf_counter()
            ids = chat_ids(tok, texts[0])
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           do_sample=False)
            calls.append({"kind": "attach", "seconds": time.perf_counter() - start, "tokens": auto.tokens})

    def of(kind: str) -> list[float]:
        return [c["seconds"] for c in calls if c["kind"] == kind]

    return {
        "calls": len(calls), "tokens": auto.tokens, "error": repr(auto.error) if auto.error else None,
        "train_seconds": auto.seconds if handle.observer is not None else None,
        "wall_seconds": finished - started if started is not None and finished is not None else None,
        "median_call_before": statistics.median(of("before")) if of("before") else None,
        "longest_call_before": max(of("before"), default=None),
        "calls_during": len(of("training")), "median_call_during": statistics.median(of("training"))
        if of("training") else None, "longest_call_during": max(of("training"), default=None),
        "filling_call": max(of("fills the buffer"), default=None), "attach_call": max(of("attach"), default=None),
        "observer": handle.observer,
    }


@torch.no_grad()
def heldout_residuals(model: Any, tok: Any, layer: int, novel: list[str], new_tokens: int) -> dict[str, torch.Tensor]:
    """Residuals at ``layer`` neither observer trained on: the held-out passages, and the
    novel prompts with the model's greedy answers (first position and, after the first
    prompt, the chat template's shared prefix left out)."""
    module = shortcut.arch.resolve(model).layers[layer]
    passages = [r["text"] for r in read_passages(DEFAULT_PASSAGES) if r.get("split") == "heldout"]
    out = {"held-out passages": collect_activations(model, module, passages, tok, progress=False)}
    sequences = []
    for text in novel:
        ids = chat_ids(tok, text)
        sequences.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=new_tokens, do_sample=False)[0])
    shared = min(len(s) for s in sequences)
    for s in sequences[1:]:
        shared = min(shared, next((i for i, (a, b) in enumerate(zip(sequences[0], s)) if a != b), shared))
    rows: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda m, a, o: rows.append((o[0] if isinstance(o, tuple) else o)[0]))
    try:
        for index, seq in enumerate(sequences):
            model(input_ids=seq[None], use_cache=False)
            rows[-1] = rows[-1][1 if index == 0 else max(1, shared):]
    finally:
        hook.remove()
    out["novel chat prompts + answers"] = torch.cat(rows).float()
    return out


def corpus_observer(model: Any, tok: Any) -> Any:
    """The harness's default observer (corpus-trained, cached in the shortcut cache)."""
    from shortcut_eval.workload import _default_observer

    handle = shortcut.wrap(model, observer=None)
    try:
        seconds = _default_observer(handle, tok, DEFAULT_PASSAGES, 1500, False)
        return handle.observer, seconds
    finally:
        handle.remove()


def print_training(t: dict[str, Any]) -> None:
    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} s"

    print(f"\nobserver from traffic: {t['tokens']} residuals over {t['calls']} calls; training {s(t['train_seconds'])} "
          f"(buffer full -> trained: {s(t['wall_seconds'])} wall){'; error ' + t['error'] if t['error'] else ''}")
    print(f"generate calls: before training median {s(t['median_call_before'])}, "
          f"longest {s(t['longest_call_before'])}; "
          f"during training ({t['calls_during']} calls) median {s(t['median_call_during'])}, "
          f"longest {s(t['longest_call_during'])}; the call that filled the buffer {s(t['filling_call'])}, "
          f"the call that attached the observer {s(t['attach_call'])}")


def print_fve(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'held-out residuals':<32}{'tokens':>8}{'corpus-trained':>16}{'self-trained':>14}{'difference':>12}")
    for r in rows:
        print(f"{r['set']:<32}{r['tokens']:>8}{r['corpus']:>16.4f}{r['self']:>14.4f}{r['self'] - r['corpus']:>+12.4f}")
    print("fraction of variance explained (FVE); target: self-trained within 0.02 of corpus-trained")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=30, help="first N prompts of the practice split")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--save", type=Path, default=None, help="skills folder to write (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table's rows here")
    parser.add_argument("--no-traffic", dest="traffic", action="store_false",
                        help="skip the observer's training from traffic and its quality comparison")
    parser.add_argument("--traffic-new-tokens", type=int, default=32, help="new tokens per traffic call")
    parser.add_argument("--min-tokens", type=int, default=None,
                        help="residuals before the observer trains (default: the library's; smaller for a smoke run)")
    parser.add_argument("--sae-steps", type=int, default=None, help="its training steps (default: the library's)")
    args = parser.parse_args(argv)

    records = read_prompts(DATA / "prompts.jsonl", split="practice")[:args.prompts]
    prompts = [r["prompt"] for r in records]
    practised_ids = {r["id"] for r in records}
    near = [n["prompt"] for n in read_jsonl(DATA / "near_duplicates.jsonl", required=("of", "prompt"))
            if n["of"] in practised_ids]
    folder = args.save or Path(tempfile.mkdtemp(prefix="wrap_and_go.")) / "skills"
    meter = Meter(args.new_tokens)
    auto = None  # the library's default observer="auto" unless the smoke-run options change it
    if args.min_tokens is not None or args.sae_steps is not None:
        steps = {"steps": args.sae_steps} if args.sae_steps is not None else {}
        auto = AutoObserver(args.min_tokens or DEFAULT_MIN_TOKENS, **steps)

    # ---- the user's code: five lines (meter.ask is model.generate on the chat template) ----
    model, tok = shortcut.load_model(args.model)
    handle = meter.handle = shortcut.wrap(model) if auto is None else shortcut.wrap(model, observer=auto)
    for p in range(args.passes):
        for text in prompts: meter.ask(model, tok, text, f"pass {p + 1}")  # noqa: E701
    handle.save_pretrained(folder)
    # -----------------------------------------------------------------------------------------

    for text in near:
        meter.ask(model, tok, text, "near-duplicates")
    trained, fve = None, []
    if args.traffic:
        asked = set(prompts) | set(near)
        others = ([r["prompt"] for r in read_prompts(DATA / "families.jsonl") if "prompt" in r]
                  + [r["prompt"] for r in read_prompts(DATA / "prompts.jsonl", split="practice")]
                  + [r["question"] for r in read_jsonl(DATA / "choice.jsonl", required=("question",))])
        trained = traffic(model, tok, handle, [t for t in dict.fromkeys(others) if t not in asked],
                          args.traffic_new_tokens)
        if trained["observer"] is not None:
            self_trained = trained["observer"]
            with handle.disabled():
                novel = [r["prompt"] for r in read_prompts(DATA / "prompts.jsonl", split="novel")]
                heldout = heldout_residuals(model, tok, self_trained.layer, novel, args.traffic_new_tokens)
    handle.remove()
    if trained is not None and trained["observer"] is not None:
        corpus, corpus_seconds = corpus_observer(model, tok)
        assert corpus.layer == self_trained.layer
        fve = [{"set": name, "tokens": int(acts.shape[0]), "corpus": sae_quality(corpus, acts)["fve"],
                "self": sae_quality(self_trained, acts)["fve"]} for name, acts in heldout.items()]
    fresh, _ = shortcut.load_model(args.model)  # a second process: a fresh model, the saved folder
    meter.handle = shortcut.load(fresh, folder)
    for text in prompts:
        meter.ask(fresh, tok, text, "reloaded")

    table = meter.table()
    print(f"\n{args.model}: {len(prompts)} practice prompts x {args.passes} passes, {len(near)} near-duplicates, "
          f"{args.new_tokens} new tokens greedy, torch threads {torch.get_num_threads()}; skills in {folder}")
    print_table(table)
    if trained is not None:
        print_training(trained)
        if fve:
            print_fve(fve)
            print(f"self-trained on its own held-out tenth: {self_trained.quality}")
    if args.json:
        extra = {k: v for k, v in (trained or {}).items() if k != "observer"}
        args.json.write_text(json.dumps({"runs": table, "training": extra, "fve": fve}, indent=2) + "\n")
    return table


if __name__ == "__main__":
    main()
