"""Fitting exit heads: one trainable parametrisation shared by online practice
(:meth:`ExitHeads.fit`, re-fits after practice rounds) and offline consolidation
(``shortcut-finetune``, which trains it under accelerate with early stopping).

Each translator ``h -> h + W h + b`` is trained as ``W = r V diag(1/s)``, ``b = r c`` on
inputs ``h / s``, where ``s`` is the per-dimension RMS of the buffered states and ``r``
their median per-token RMS. A few residual dimensions are 10-100x larger than the rest
(attention sinks), which makes plain Adam on ``W`` slow and unstable; ``r`` makes the
learning rate a relative step size whatever the model's hidden-state scale. The
objective per exit is KL(full model || head) plus ``hard_weight`` times the
cross-entropy on the full model's argmax, over the scores ``score`` gives (the
shortlist or the whole vocabulary), through the model's own final norm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .heads import ExitHeads

Score = Callable[[torch.Tensor], torch.Tensor]


class TranslatorFit(nn.Module):
    """The translators of ``heads`` at ``layers`` as trainable parameters ``V``, ``c``
    in the preconditioned parametrisation (module doc), initialised from the current
    translators. ``states`` (``{layer: Tensor[N, d]}``) set the scales; with
    ``precondition=False`` both scales are 1 (plain Adam on ``W, b``).
    :meth:`write_to` puts the result back into the heads."""

    def __init__(self, heads: ExitHeads, states: Mapping[int, torch.Tensor], *, layers: list[int] | None = None,
                 precondition: bool = True) -> None:
        super().__init__()
        self.layers = sorted(int(layer) for layer in (layers if layers is not None else states))
        self.V, self.c = nn.ParameterDict(), nn.ParameterDict()
        with torch.no_grad():
            for layer in self.layers:
                lin = heads._translator(layer)
                x = states[layer].float()
                if precondition:
                    s = x.pow(2).mean(0).sqrt().clamp_min(1e-8)
                    r = x.pow(2).mean(1).sqrt().median().clamp_min(1e-8)
                else:
                    s, r = torch.ones(x.shape[1], device=x.device), torch.ones((), device=x.device)
                self.register_buffer(f"s{layer}", s)
                self.register_buffer(f"r{layer}", r)
                self.V[str(layer)] = nn.Parameter(lin.weight.detach().float() * s / r)
                self.c[str(layer)] = nn.Parameter(lin.bias.detach().float() / r)
        self._norm = (heads.final_norm,)  # borrowed from the model, not registered: never trained

    def translated(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``h + W h + b`` for states ``h`` [n, d] at ``layer`` (in ``h``'s dtype)."""
        s, r = getattr(self, f"s{layer}"), getattr(self, f"r{layer}")
        delta = F.linear(h.float() / s, self.V[str(layer)], self.c[str(layer)]) * r
        return h + delta.to(h.dtype)

    def logits(self, layer: int, h: torch.Tensor, score: Score) -> torch.Tensor:
        """Float32 scores of the head at ``layer`` for states ``h``."""
        return score(self._norm[0](self.translated(layer, h))).float()

    def forward(self, xs: Mapping[int, torch.Tensor], target: torch.Tensor, score: Score,
                hard_weight: float) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Summed loss over the exits and the loss of each, for states ``xs[layer]``
        [n, d] against target log-probabilities ``target`` [n, S]."""
        hard = target.argmax(-1) if hard_weight else None
        losses = {}
        for layer in self.layers:
            logp = self.logits(layer, xs[layer], score).log_softmax(-1)
            loss = F.kl_div(logp, target, log_target=True, reduction="batchmean")
            losses[layer] = loss + hard_weight * F.nll_loss(logp, hard) if hard is not None else loss
        total = torch.stack(list(losses.values())).sum()
        return total, losses

    @torch.no_grad()
    def write_to(self, heads: ExitHeads) -> None:
        """Copy the trained translators back into ``heads`` (in their own dtype)."""
        for layer in self.layers:
            s, r = getattr(self, f"s{layer}"), getattr(self, f"r{layer}")
            lin = heads._translator(layer)
            lin.weight.copy_(self.V[str(layer)] * r / s)
            lin.bias.copy_(self.c[str(layer)] * r)


def adam(params: list[torch.Tensor], **kwargs: float) -> torch.optim.Optimizer:
    """Fused Adam where the device supports it (about 4x faster per step on a CPU: the
    unfused update dominated a fit step), else the default implementation."""
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)  # type: ignore[arg-type]
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, **kwargs)  # type: ignore[arg-type]
