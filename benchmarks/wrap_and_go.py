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
- reloaded: the saved folder loaded onto a fresh copy of the model (what a second
  process would do), asked the practised prompts once.

For each it prints the median over prompts of the per-prompt tokens/s ratio to plain,
how many outputs are identical to plain, and the practised-sequence tokens accepted.
Other processes may share the CPU: ratios measured in the same run are what count.

    OMP_NUM_THREADS=1 python benchmarks/wrap_and_go.py
    OMP_NUM_THREADS=1 python benchmarks/wrap_and_go.py --prompts 10 --new-tokens 32
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
from shortcut.data import read_jsonl, read_prompts  # noqa: E402

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


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=30, help="first N prompts of the practice split")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--save", type=Path, default=None, help="skills folder to write (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table's rows here")
    args = parser.parse_args(argv)

    records = read_prompts(DATA / "prompts.jsonl", split="practice")[:args.prompts]
    prompts = [r["prompt"] for r in records]
    practised_ids = {r["id"] for r in records}
    near = [n["prompt"] for n in read_jsonl(DATA / "near_duplicates.jsonl", required=("of", "prompt"))
            if n["of"] in practised_ids]
    folder = args.save or Path(tempfile.mkdtemp(prefix="wrap_and_go.")) / "skills"
    meter = Meter(args.new_tokens)

    # ---- the user's code: five lines (meter.ask is model.generate on the chat template) ----
    model, tok = shortcut.load_model(args.model)
    handle = meter.handle = shortcut.wrap(model)
    for p in range(args.passes):
        for text in prompts: meter.ask(model, tok, text, f"pass {p + 1}")  # noqa: E701
    handle.save_pretrained(folder)
    # -----------------------------------------------------------------------------------------

    for text in near:
        meter.ask(model, tok, text, "near-duplicates")
    handle.remove()
    fresh, _ = shortcut.load_model(args.model)  # a second process: a fresh model, the saved folder
    meter.handle = shortcut.load(fresh, folder)
    for text in prompts:
        meter.ask(fresh, tok, text, "reloaded")

    table = meter.table()
    print(f"\n{args.model}: {len(prompts)} practice prompts x {args.passes} passes, {len(near)} near-duplicates, "
          f"{args.new_tokens} new tokens greedy, torch threads {torch.get_num_threads()}; skills in {folder}")
    print_table(table)
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    return table


if __name__ == "__main__":
    main()
