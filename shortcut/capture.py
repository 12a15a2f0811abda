"""Reading hidden states out of a model's forward with hooks: the one place that knows
how a decoder layer receives and returns its residual stream.

Layer numbering as everywhere in shortcut: the state "after ``l`` layers" is the input
of decoder layer ``l``; ``l == num_layers`` is the last layer's output (before the
final norm).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .arch import ModelParts


def layer_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a decoder layer was called with (positional or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor, or a tuple/list whose first
    element is one)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        "a decoder layer must return a tensor or a tuple whose first element is the "
        f"hidden-state tensor; got {type(output).__name__}"
    )


class StateCapture:
    """Hooks that keep the state after ``l`` layers, for each ``l`` in ``layers``, of
    every forward while installed (``states[l]``, overwritten by the next forward).

    ``keep`` turns each captured tensor into what is stored: ``detach`` by default;
    ``clone`` it to survive in-place changes, pass ``lambda t: t`` to keep the graph
    (training through the states), or return ``None`` to store nothing. Remove with
    :meth:`remove` or use as a context manager.
    """

    def __init__(self, parts: ModelParts, layers: Iterable[int], *,
                 keep: Callable[[torch.Tensor], torch.Tensor | None] = torch.Tensor.detach) -> None:
        self.layers = sorted({int(layer) for layer in layers})
        bad = [layer for layer in self.layers if not 0 <= layer <= parts.num_layers]
        if bad:
            raise ValueError(
                f"layers {bad} are outside 0..{parts.num_layers} (the model has {parts.num_layers} layers)"
            )
        self.states: dict[int, torch.Tensor] = {}
        self._keep = keep
        self._handles: list[Any] = []
        for layer in self.layers:
            if layer < parts.num_layers:
                handle = parts.layers[layer].register_forward_pre_hook(self._before(layer), with_kwargs=True)
                self._handles.append(handle)
            else:
                self._handles.append(parts.layers[-1].register_forward_hook(self._after(layer)))

    def _store(self, layer: int, hidden: torch.Tensor) -> None:
        kept = self._keep(hidden)
        if kept is not None:
            self.states[layer] = kept

    def _before(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            self._store(layer, layer_input(args, kwargs))
        return hook

    def _after(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._store(layer, layer_output(output))
        return hook

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> StateCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
