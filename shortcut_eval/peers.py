"""Peers measured beside shortcut in the same run.

- ``assistant_early_exit=E``: transformers' self-speculative decoding, the model's
  first ``E`` layers plus its own final norm and unembedding draft, the full model
  verifies. ``E`` is swept on a few prompts and the best one is kept.
- prompt lookup decoding (``prompt_lookup_num_tokens``): drafts by copying n-gram
  continuations from the prompt.
- the oracle bound: per generated token, the shallowest exit layer whose exit head
  (with the skills as they are now) names the full model's token; its compute is what a
  perfect exit policy would spend without verification. Not a decoder, so no speed.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from shortcut.policy.heads import collect_states

from .workload import Method, System, input_ids, measure_prompt


def peer_methods(system: System, early_exit_layers: list[int], lookup_tokens: int) -> list[Method]:
    """The peer methods: transformers' early-exit drafting at each layer, and prompt lookup."""
    methods = [Method(f"early-exit E={e}", "peer", system, options={"assistant_early_exit": e})
               for e in early_exit_layers]
    if lookup_tokens > 0:
        methods.append(Method("prompt lookup", "peer", system, options={"prompt_lookup_num_tokens": lookup_tokens}))
    return methods


def default_early_exits(num_layers: int) -> list[int]:
    """A quarter, half and three quarters of the depth."""
    return sorted({max(1, num_layers // 4), max(1, num_layers // 2), max(1, 3 * num_layers // 4)})


def sweep_early_exit(system: System, plain: Method, layers: list[int], records: list[dict], new_tokens: int,
                     ) -> tuple[int, dict[int, float]]:
    """Median speed ratio of each ``assistant_early_exit`` layer on ``records``; the best layer."""
    methods = peer_methods(system, layers, 0)
    ratios: dict[int, list[float]] = {e: [] for e in layers}
    for rotation, record in enumerate(records):
        rows = measure_prompt(methods, plain, record, new_tokens, rotation)
        for e, method in zip(layers, methods):
            ratios[e].append(rows[method.name]["speed_ratio"])
    medians = {e: statistics.median(r) for e, r in ratios.items()}
    return max(medians, key=medians.get), medians


@torch.no_grad()
def oracle(system: System, record: dict, output_ids: list[int]) -> dict[str, Any]:
    """The oracle exit bound on one generated continuation (teacher forced)."""
    handle, sizes = system.handle, system.sizes
    heads = handle.heads
    prompt = input_ids(system, record)
    sequence = torch.cat([prompt, torch.tensor([output_ids], dtype=prompt.dtype)], dim=1)
    exits = list(heads.layers)
    with handle.disabled():
        states, _, full_tokens = collect_states(system.model, handle.parts, sequence, exits)
    start = prompt.shape[1] - 1
    targets = full_tokens[start:sequence.shape[1] - 1]
    n = int(targets.shape[0])
    depth = torch.full((n,), handle.num_layers, dtype=torch.long)
    head_params = torch.full((n,), float(sizes.unembed))
    if heads.shortlist.numel() > 0:
        for layer in reversed(exits):  # the shallowest agreeing layer wins
            agree = heads.predict(layer, states[layer][start:start + n]).token_ids == targets
            depth[agree] = layer
            head_params[agree] = float(heads.head_cost(layer)["shortlist"])
    full = sizes.num_layers * sizes.layer + sizes.unembed
    per_token = (depth.float() * sizes.layer + head_params) / full
    return {"prompt_id": record.get("id"), "tokens": n, "mean_layers": float(depth.float().mean()) if n else 0.0,
            "flops_rel": float(per_token.mean()) if n else 1.0,
            "exit_histogram": {int(k): int(v) for k, v in zip(*torch.unique(depth, return_counts=True))}}


def summarise_oracle(rows: list[dict[str, Any]], num_layers: int) -> dict[str, Any]:
    """Token-weighted mean layers and the summed exit histogram of the oracle rows."""
    tokens = sum(r["tokens"] for r in rows)
    histogram: dict[int, int] = {}
    for r in rows:
        for k, v in r["exit_histogram"].items():
            histogram[k] = histogram.get(k, 0) + v
    mean_layers = sum(r["mean_layers"] * r["tokens"] for r in rows) / max(tokens, 1)
    return {"prompts": len(rows), "tokens": tokens, "mean_layers": mean_layers,
            "layers_rel": mean_layers / num_layers,
            "flops_rel": statistics.median(r["flops_rel"] for r in rows) if rows else 1.0,
            "bytes_rel": statistics.median(r["flops_rel"] for r in rows) if rows else 1.0,
            "exit_histogram": dict(sorted(histogram.items()))}
