"""The hooked forward: run layers until the policy says stop, step over what it says to
skip, keep the KV cache consistent, and count what ran.

Each decoder layer's ``forward`` is wrapped (the original, possibly already wrapped by
accelerate, is kept and restored exactly). Before layer ``i`` runs, the active policy is
asked ``should_run(i, hidden)``. A layer that does not run returns its input unchanged,
so neither its attention nor its MLP executes.

KV cache consistency (CALM-style state propagation): a token that steps over layer ``i``
still needs keys and values there, or later tokens would attend to a shorter cache at
that layer and every layer's cache length would drift apart. A skipped layer therefore
projects the hidden state that reached it through its own input norm and K/V
projections (plus rotary embedding) and appends the result with ``cache.update``. The
cost is the K and V projections only: for SmolLM2-135M 2 x 576 x 192 weights, about 6%
of a decoder layer's parameters. A policy that will crop the cache afterwards anyway
(speculative drafting) can turn this off with ``propagate_kv = False``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..arch import ModelParts
from ..capture import layer_input


@runtime_checkable
class LayerPolicy(Protocol):
    """Decides, per forward pass, which decoder layers run.

    ``begin`` is called once at the start of each model forward; ``should_run`` before
    each decoder layer with the hidden state that reaches it (shape [batch, seq, d]).
    ``propagate_kv`` is read right after ``should_run`` returned False, so a policy may
    set it per layer.
    """

    propagate_kv: bool

    def begin(self, input_ids: torch.Tensor | None) -> None:
        """Start a model forward over ``input_ids``."""

    def should_run(self, layer_idx: int, hidden: torch.Tensor) -> bool:
        """Whether decoder layer ``layer_idx`` runs on ``hidden``."""


@dataclass
class FixedPlan:
    """A policy that applies the same plan to every forward: exit after layer
    ``exit_after`` (that layer is the last to run) and step over the layers in ``skip``.
    """

    exit_after: int | None = None
    skip: frozenset[int] = frozenset()
    propagate_kv: bool = True

    def __post_init__(self) -> None:
        self.skip = frozenset(self.skip)

    def validate(self, num_layers: int) -> None:
        """Raise ``ValueError`` if ``exit_after`` or a ``skip`` layer is not a layer of the model."""
        if self.exit_after is not None and not 0 <= self.exit_after < num_layers:
            raise ValueError(
                f"exit_after={self.exit_after} is out of range: the model has layers 0..{num_layers - 1}"
            )
        bad = sorted(i for i in self.skip if not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"skip layers {bad} are out of range: the model has layers 0..{num_layers - 1}")

    def begin(self, input_ids: torch.Tensor | None) -> None:
        """Nothing to reset: the plan is the same for every forward."""
        pass

    def should_run(self, layer_idx: int, hidden: torch.Tensor) -> bool:
        """Whether the plan runs layer ``layer_idx``."""
        if self.exit_after is not None and layer_idx > self.exit_after:
            return False
        return layer_idx not in self.skip


@dataclass
class ComputeStats:
    """Counts of what ran. A "token" is one position of one row in one forward pass;
    ``layers_per_token`` is decoder layers executed per token (skipped ones excluded)."""

    forwards: int = 0
    tokens: int = 0
    layers_run: int = 0
    layers_skipped: int = 0
    per_layer_runs: list[int] = field(default_factory=list)
    # Weight reads: a layer or the unembedding reads its weights once per call,
    # whatever the number of tokens in it (decoding is memory-bandwidth bound).
    layer_calls: int = 0
    kv_projections: int = 0  # tokens whose keys/values were propagated into a skipped layer
    kv_projection_calls: int = 0
    unembed_calls: int = 0
    unembed_tokens: int = 0

    @property
    def layers_per_token(self) -> float:
        """Mean number of decoder layers run per token."""
        return self.layers_run / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The counters (and ``layers_per_token``) by name."""
        return {
            "forwards": self.forwards,
            "tokens": self.tokens,
            "layers_run": self.layers_run,
            "layers_skipped": self.layers_skipped,
            "layers_per_token": self.layers_per_token,
            "per_layer_runs": list(self.per_layer_runs),
            "layer_calls": self.layer_calls,
            "kv_projections": self.kv_projections,
            "kv_projection_calls": self.kv_projection_calls,
            "unembed_calls": self.unembed_calls,
            "unembed_tokens": self.unembed_tokens,
        }


class Stats:
    """``last`` covers the most recent model forward, ``total`` everything since
    :meth:`reset`."""

    def __init__(self, num_layers: int) -> None:
        self._num_layers = num_layers
        self.reset()

    def reset(self) -> None:
        """Zero both ``last`` and ``total``."""
        self.total = ComputeStats(per_layer_runs=[0] * self._num_layers)
        self.last = ComputeStats(per_layer_runs=[0] * self._num_layers)

    def _begin_forward(self) -> None:
        self.last = ComputeStats(forwards=1, per_layer_runs=[0] * self._num_layers)
        self.total.forwards += 1

    def _count(self, layer_idx: int, n_tokens: int, ran: bool) -> None:
        for s in (self.last, self.total):
            if layer_idx == 0:
                s.tokens += n_tokens
            if ran:
                s.layers_run += n_tokens
                s.layer_calls += 1
                s.per_layer_runs[layer_idx] += n_tokens
            else:
                s.layers_skipped += n_tokens

    def _count_kv(self, n_tokens: int) -> None:
        for s in (self.last, self.total):
            s.kv_projections += n_tokens
            s.kv_projection_calls += 1

    def _count_unembed(self, n_tokens: int) -> None:
        for s in (self.last, self.total):
            s.unembed_calls += 1
            s.unembed_tokens += n_tokens

    def as_dict(self) -> dict[str, Any]:
        """``last`` and ``total`` as dicts."""
        return {"last": self.last.as_dict(), "total": self.total.as_dict()}


def _find_cache(spec_kwarg: str, position: int | None, args: tuple, kwargs: dict) -> Cache | None:
    cache = kwargs.get(spec_kwarg)
    if cache is None and position is not None and len(args) > position:
        cache = args[position]
    if cache is None:
        cache = kwargs.get("past_key_values")
    if cache is not None and hasattr(cache, "self_attention_cache"):
        cache = cache.self_attention_cache  # EncoderDecoderCache (gpt2)
    return cache if isinstance(cache, Cache) else None


class LayerRuntime:
    """Installs and removes the layer wrappers of one model and runs the policy."""

    def __init__(self, model: nn.Module, parts: ModelParts) -> None:
        self.model = model
        self.parts = parts
        self.stats = Stats(parts.num_layers)
        self.policy: LayerPolicy | None = None
        self.bypass = False
        self._saved_forwards: list[tuple[nn.Module, bool, Any]] = []
        self._hook_handles: list[Any] = []

    # -- installation -------------------------------------------------------------
    def install(self) -> None:
        """Wrap each decoder layer's forward and hook the model and unembedding; undone on failure."""
        try:
            for idx, layer in enumerate(self.parts.layers):
                had_own = "forward" in layer.__dict__
                original = layer.forward
                self._saved_forwards.append((layer, had_own, layer.__dict__.get("forward")))
                layer.forward = self._make_wrapper(idx, layer, original)
            self._hook_handles.append(
                self.model.register_forward_pre_hook(self._begin_forward, with_kwargs=True)
            )
            self._hook_handles.append(self.parts.unembed.register_forward_hook(self._count_unembed))
        except BaseException:
            self.uninstall()
            raise

    def uninstall(self) -> None:
        """Remove the hooks and restore each layer's own forward."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        for layer, had_own, own in reversed(self._saved_forwards):
            if had_own:
                layer.forward = own
            else:
                layer.__dict__.pop("forward", None)
        self._saved_forwards.clear()

    # -- the hooked forward ---------------------------------------------------------
    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.bypass:
            return
        self.stats._begin_forward()
        if self.policy is not None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            self.policy.begin(input_ids if isinstance(input_ids, torch.Tensor) else None)

    def _count_unembed(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.bypass:
            self.stats._count_unembed(output.shape[0] * output.shape[1] if output.dim() == 3 else output.shape[0])

    def _make_wrapper(self, idx: int, layer: nn.Module, original: Any) -> Any:
        spec = self.parts.spec

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.bypass:
                return original(*args, **kwargs)
            hidden = layer_input(args, kwargs)
            n_tokens = hidden.shape[0] * hidden.shape[1]
            policy = self.policy
            if policy is None or policy.should_run(idx, hidden):
                self.stats._count(idx, n_tokens, ran=True)
                return original(*args, **kwargs)
            self.stats._count(idx, n_tokens, ran=False)
            if policy.propagate_kv:
                cache = _find_cache(spec.cache_kwarg, spec.cache_position, args, kwargs)
                if cache is not None:
                    keys, values = spec.project_kv(layer, hidden, kwargs.get("position_embeddings"))
                    cache.update(keys, values, idx)
                    self.stats._count_kv(n_tokens)
            return hidden

        functools.update_wrapper(forward, original)
        forward.__shortcut_wrapper__ = True  # type: ignore[attr-defined]
        return forward
