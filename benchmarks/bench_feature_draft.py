"""Could a small head trained on the model's own features draft new content?

The shallow path (exits) and skip drafts are slices of the model; on new content of a
practised task they are right too rarely for what they cost (docs/findings.md). The other
kind of learned draft source reads the model's last feature instead: a head that takes
the final hidden state at position t and the embedding of token t+1, predicts the
feature at t+1, and reads token t+2 from it through the model's own unembedding
(the idea of EAGLE-style feature drafting). It costs one small MLP and an unembedding,
no layer of the model.

This trains such a head (one gated MLP block, as wide as the model's MLPs) on the
features of the skills' practised sequences and of general text from the packaged
corpus, with the model's own greedy next tokens as targets, then measures on the
greedy answers of unseen sets (teacher-forced, so the verified text is exactly the
lossless text): the head's top-1 agreement with the model, and a simulated lossless
decode where the head drafts one token whenever its confidence is at least a bar.
A step costs one full forward (1.0, or the measured width-2 cost with a draft) plus the
head's measured cost; a right draft gives two tokens for the step. The head scores
the ``--shortlist`` most frequent target tokens (0: the whole vocabulary).

    OMP_NUM_THREADS=2 python benchmarks/bench_feature_draft.py --skills runs/eval/<run>/skills
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import shortcut  # noqa: E402
from shortcut.data import DEFAULT_PASSAGES, prompt_input_ids, read_passages  # noqa: E402
from shortcut.decode.lossless import crop_all  # noqa: E402
from shortcut_eval.workload import WORKLOADS, prompt_sets  # noqa: E402

BARS = (0.0, 0.3, 0.5, 0.7, 0.9)


class FeatureHead(nn.Module):
    """(feature_t, embedding of token t+1) -> feature at t+1, normalised like the
    model's final norm output (so the unembedding reads it directly)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.join = nn.Linear(2 * width, width, bias=False)
        self.norm = nn.RMSNorm(width)
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        self.out_norm = nn.RMSNorm(width)

    def forward(self, feature: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        x = self.join(torch.cat([feature, embedded], dim=-1))
        h = self.norm(x)
        return self.out_norm(x + self.down(F.silu(self.gate(h)) * self.up(h)))


@torch.no_grad()
def features(model: Any, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, final (post-norm) features [T, d] and the model's greedy next tokens [T]."""
    out = model(torch.tensor([ids]), output_hidden_states=True)
    return torch.tensor(ids), out.hidden_states[-1][0], out.logits[0].argmax(-1)


def pairs(model: Any, item: tuple) -> tuple[torch.Tensor, ...]:
    """Inputs (f_t, emb(x_{t+1})) and targets (f_{t+1}, greedy token after t+1)."""
    ids, feats, greedy = item[:3]
    with torch.no_grad():
        embedded = model.get_input_embeddings()(ids[1:])
    return feats[:-1], embedded, feats[1:], greedy[1:]


def train_head(model: Any, data: list[tuple], shortlist: torch.Tensor, epochs: int, seed: int) -> FeatureHead:
    torch.manual_seed(seed)
    width = model.config.hidden_size
    head = FeatureHead(width, model.config.intermediate_size)
    unembed = model.get_output_embeddings().weight[shortlist].detach()
    index = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    index[shortlist] = torch.arange(len(shortlist))
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    prepared = [pairs(model, item) for item in data]
    for epoch in range(epochs):
        total = 0.0
        for k in torch.randperm(len(prepared)).tolist():
            f_in, embedded, f_out, target = prepared[k]
            predicted = head(f_in, embedded)
            inside = index[target] >= 0
            loss = F.smooth_l1_loss(predicted, f_out)
            if inside.any():
                loss = loss + 0.1 * F.cross_entropy(predicted[inside] @ unembed.T, index[target[inside]])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item()
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(prepared):.3f}", flush=True)
    return head.eval()


@torch.no_grad()
def step_costs(model: Any, head: FeatureHead, shortlist: torch.Tensor, repeats: int = 15) -> tuple[float, float]:
    """(head cost, width-2 forward cost) in plain decode steps, medians of ``repeats``."""
    from transformers import DynamicCache

    ids = torch.arange(100, 164)[None]
    cache = DynamicCache(config=model.config)
    model(ids, cache=cache, use_cache=True)
    unembed = model.get_output_embeddings().weight[shortlist]
    width = model.config.hidden_size

    def timed(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def forward(w: int) -> None:
        model(torch.arange(200, 200 + w)[None], cache=cache, use_cache=True)
        crop_all(cache, 64)

    one = timed(lambda: forward(1))
    two = timed(lambda: forward(2))
    f, e = torch.randn(1, width), torch.randn(1, width)
    drafted = timed(lambda: (head(f, e) @ unembed.T).softmax(-1).max())
    return drafted / one, two / one


def simulate(items: list[tuple], head_out: list[tuple[torch.Tensor, torch.Tensor]], bar: float,
             head_cost: float, width2: float) -> dict[str, float]:
    """Lossless decode of each answer, drafting one head token where confidence >= bar."""
    speeds, drafted, right, tokens, positions = [], 0, 0, 0, 0
    for (ids, _, greedy, start), (pred, conf) in zip(items, head_out):
        # pairs index t: draft for token t+2 made after token t+1 is known
        first, end = start - 1, len(ids) - 2  # first decode step reads the prompt's last token
        i, cost, steps = first, 0.0, 0
        while i < end:
            steps += 1
            if conf[i] >= bar:
                drafted += 1
                cost += width2 + head_cost
                positions += 2
                if pred[i] == greedy[i + 1] and i + 1 < end:
                    right += 1
                    i += 2
                    continue
            else:
                cost += 1.0 + head_cost
                positions += 1
            i += 1
        generated = end - first
        tokens += generated
        speeds.append(generated / cost)
    return {"speed": statistics.median(speeds), "drafted": drafted / max(tokens, 1),
            "accepted": right / max(drafted, 1), "flops": positions / max(tokens, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skills", required=True, help="a practised skills folder (its practised sequences train)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--corpus-tokens", type=int, default=80_000, help="general-text tokens added to training")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--shortlist", type=int, default=8192, help="target tokens the head scores (0: all)")
    parser.add_argument("--test-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, tokenizer = shortcut.load_model(args.model)
    skills = json.loads((Path(args.skills) / "replay_log.json").read_text())
    start = time.perf_counter()
    data = [features(model, ids) for ids in skills["sequences"]]
    practised_tokens = sum(len(d[0]) for d in data)
    corpus_tokens = 0
    for record in read_passages(DEFAULT_PASSAGES):
        if corpus_tokens >= args.corpus_tokens or record.get("split") == "heldout":
            continue
        ids = tokenizer(record["text"])["input_ids"][:256]
        if len(ids) >= 32:
            data.append(features(model, ids))
            corpus_tokens += len(ids)
    print(f"features: {practised_tokens} practised + {corpus_tokens} corpus tokens "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    counts = torch.bincount(torch.cat([d[2] for d in data]), minlength=model.config.vocab_size)
    size = args.shortlist or model.config.vocab_size
    shortlist = counts.argsort(descending=True)[:size].sort().values
    head = train_head(model, data, shortlist, args.epochs, args.seed)
    head_cost, width2 = step_costs(model, head, shortlist)
    print(f"costs in plain steps: head {head_cost:.3f}, width-2 verification {width2:.3f}")

    prompts, near, families = WORKLOADS["chat"]
    sets = prompt_sets(prompts, near, n_practice=30, n_test=args.test_prompts, families=families, n_family=16)
    unembed = model.get_output_embeddings().weight[shortlist]
    results: dict[str, Any] = {"head_cost": head_cost, "width2": width2, "practised_tokens": practised_tokens,
                               "corpus_tokens": corpus_tokens}
    print(f"\n{'set':<16} {'top-1':>6} {'bar':>5} {'drafted':>8} {'accepted':>9} {'FLOPs':>6} {'speed':>6}")
    for name in ("transfer", "near-duplicates", "novel"):
        items, outs, hits, total = [], [], 0, 0
        for record in sets[name]:
            ids = prompt_input_ids(tokenizer, record)
            with torch.no_grad():
                answer = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            item = (*features(model, answer[0].tolist()), ids.shape[1])
            f_in, embedded, _, target = pairs(model, item)
            with torch.no_grad():
                probs = (head(f_in, embedded) @ unembed.T).softmax(-1)
            conf, pick = probs.max(-1)
            pred = shortlist[pick]
            items.append(item)
            outs.append((pred, conf))
            s = item[3] - 1
            hits += int((pred[s:] == target[s:]).sum())
            total += len(target[s:])
        rows = {bar: simulate(items, outs, bar, head_cost, width2) for bar in BARS}
        results[name] = {"top1": hits / total, "positions": total, "by_bar": rows}
        for bar, row in rows.items():
            print(f"{name:<16} {hits / total:>6.3f} {bar:>5.1f} {row['drafted']:>8.2f} {row['accepted']:>9.2f} "
                  f"{row['flops']:>6.2f} {row['speed']:>5.2f}x", flush=True)
    return results


if __name__ == "__main__":
    main()
