"""Compute per generated token: parameter bytes read and FLOPs, relative to plain decoding.

Decoding a small model on a CPU is memory-bandwidth bound: every call of a layer reads
all its weights once, however many tokens the call carries. So bytes read count calls
(a verification forward over 9 tokens reads each layer's weights once), and FLOPs count
tokens (2 per weight per token). Attention-score FLOPs are left out on both sides (at
these lengths they are a few percent of the weight FLOPs).

Counted for shortcut: every decoder layer that ran (drafts and verification), keys and
values propagated into skipped layers, every unembedding call, every exit-head scoring
(translator + shortlisted unembedding rows), and every observer encode (the SAE
encoder) during drafting.

The prompt's prefill forward is the same full forward on both sides and is left out of
both (``decode_only``): the figures are per generated token of decoding proper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .stats import DecodeStats


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class ParamSizes:
    """Parameter counts of the parts that run per token."""

    layer: int
    kv_projection: int
    unembed: int
    num_layers: int
    observer: int = 0
    bytes_per_param: int = 4

    @classmethod
    def of(cls, handle: Any) -> ParamSizes:
        """The parameter counts of ``handle``'s model (and observer, if it has one)."""
        parts = handle.parts
        layer = parts.layers[0]
        attn = getattr(layer, parts.spec.attention)
        kv = sum(_numel(getattr(attn, name)) for name in ("k_proj", "v_proj") if hasattr(attn, name))
        observer = handle.observer.d_model * handle.observer.d_sae if handle.observer is not None else 0
        return cls(layer=_numel(layer), kv_projection=kv, unembed=parts.unembed.weight.numel(),
                   num_layers=parts.num_layers, observer=observer,
                   bytes_per_param=parts.unembed.weight.element_size())


def shallow_step_costs(sizes: ParamSizes, heads: Any) -> dict[int, float]:
    """Per exit layer, what one shallow draft step reads (the layers up to the exit, the
    exit head with its shortlist, an observer encode) relative to a plain decoding step
    (every layer and the unembedding). Decoding one token on a CPU is bandwidth bound, so
    this is also its time: on SmolLM2-135M, exits 3/7/11/15/19 measured 0.13/0.25/0.36/
    0.47/0.56 of a plain step in wall time against 0.13/0.23/0.34/0.44/0.55 from here."""
    plain = sizes.num_layers * sizes.layer + sizes.unembed
    return {layer: ((layer + 1) * sizes.layer + heads.head_cost(layer)["shortlist"] + sizes.observer) / plain
            for layer in heads.layers}


def prefill_cost(sizes: ParamSizes, prompt_tokens: int) -> dict[str, float]:
    """The prompt's full forward (logits for its last position only)."""
    params_read = sizes.num_layers * sizes.layer + sizes.unembed
    macs = prompt_tokens * sizes.num_layers * sizes.layer + sizes.unembed
    return {"bytes": params_read * sizes.bytes_per_param, "flops": 2.0 * macs}


def plain_cost(sizes: ParamSizes, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """Bytes and FLOPs of plain greedy decoding after the prefill: one single-token
    forward per generated token after the first."""
    steps = max(new_tokens - 1, 1)
    per_step = sizes.num_layers * sizes.layer + sizes.unembed
    return {"bytes": steps * per_step * sizes.bytes_per_param, "flops": 2.0 * steps * per_step}


def decode_only(cost: dict[str, float], sizes: ParamSizes, prompt_tokens: int) -> dict[str, float]:
    """``cost`` of a whole generate call minus its prefill forward."""
    prefill = prefill_cost(sizes, prompt_tokens)
    return {k: cost[k] - prefill[k] for k in cost}


def shortcut_cost(sizes: ParamSizes, stats: dict[str, Any], decode: DecodeStats) -> dict[str, float]:
    """Bytes and FLOPs from a :class:`~shortcut.decode.runtime.ComputeStats` dict (the
    difference over the measured calls) and the handle's decode statistics (likewise)."""
    head_params = decode.head_params
    observer = decode.observer_encodes * sizes.observer
    params_read = (stats["layer_calls"] * sizes.layer + stats["kv_projection_calls"] * sizes.kv_projection
                   + stats["unembed_calls"] * sizes.unembed + head_params + observer)
    macs = (stats["layers_run"] * sizes.layer + stats["kv_projections"] * sizes.kv_projection
            + stats["unembed_tokens"] * sizes.unembed + head_params + observer)
    return {"bytes": params_read * sizes.bytes_per_param, "flops": 2.0 * macs}


def stats_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Element-wise ``after - before`` of two ComputeStats dicts (numbers only)."""
    return {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
