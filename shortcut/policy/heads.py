"""Exit heads: tuned-lens style affine translators from a shallow layer to the final
distribution, trained on the practised states of the position buffer.

Layer ``l`` means the hidden state after ``l`` decoder layers have run, i.e. the input
of decoder layer ``l`` (``hidden_states[l]`` in Hugging Face's convention); exiting
there costs ``l`` layers plus the head. For each candidate exit layer, a head maps

    h' = h + W h + b          (W, b start at zero: an untrained head is the logit lens)

and scores ``h'`` through the model's own final norm and unembedding, either over the
full vocabulary or over a *shortlist*: the tokens the full model produced during
practice (plus the top-k of its distribution there). The shortlist path reads
``S x d`` unembedding rows instead of ``V x d`` (on SmolLM2-135M the full unembedding
is as large as 8 decoder layers).

Nothing here modifies the base model: the final norm and unembedding are borrowed,
never registered as submodules, so the state dict holds only the translators and the
shortlist (plain tensors, safetensors-friendly).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ModelParts, resolve
from ..capture import StateCapture
from .fit import TranslatorFit, adam

logger = logging.getLogger(__name__)

FitVocab = Literal["shortlist", "full", "auto"]

# Precompute full-vocabulary targets for all buffered tokens when they fit in this
# many bytes; otherwise recompute them per batch.
_TARGET_CACHE_BYTES = 512 * 2**20


class Prediction(NamedTuple):
    """A head's greedy prediction.

    Attributes:
        token_ids: vocabulary ids, shaped like the hidden state without its last dim.
        confidence: max softmax probability over the scored set (the full vocabulary,
            or the shortlist renormalised), same shape.
    """

    token_ids: torch.Tensor
    confidence: torch.Tensor


def _parts_of(model_or_parts: nn.Module | ModelParts) -> ModelParts:
    return model_or_parts if isinstance(model_or_parts, ModelParts) else resolve(model_or_parts)


class ExitHeads(nn.Module):
    """One affine translator per candidate exit layer, scored through the model's own
    final norm and unembedding.

    Args:
        model_or_parts: the causal LM (resolved with :func:`shortcut.arch.resolve`) or
            its :class:`~shortcut.arch.ModelParts`.
        layers: candidate exit layers, each in ``0..num_layers`` (see the module doc).
        shortlist: optional initial vocabulary shortlist (token ids).

    The state dict holds ``translators.<layer>.weight``/``.bias`` and ``shortlist``
    (a LongTensor, possibly empty); load it with :meth:`from_state_dict` or
    ``load_state_dict`` (a shortlist of any length is accepted).
    """

    shortlist: torch.Tensor

    def __init__(
        self,
        model_or_parts: nn.Module | ModelParts,
        layers: Iterable[int],
        *,
        shortlist: torch.Tensor | Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        parts = _parts_of(model_or_parts)
        weight = parts.unembed.weight
        self.vocab_size, self.width = int(weight.shape[0]), int(weight.shape[1])
        self.num_layers = parts.num_layers
        layers = sorted({int(layer) for layer in layers})
        if not layers:
            raise ValueError("ExitHeads needs at least one exit layer")
        bad = [layer for layer in layers if not 0 <= layer <= self.num_layers]
        if bad:
            raise ValueError(
                f"exit layers {bad} are outside 0..{self.num_layers} (the model has {self.num_layers} layers)"
            )
        # Borrowed, not registered: keeps base weights out of state_dict/parameters().
        self._base: tuple[nn.Module, nn.Linear] = (parts.final_norm, parts.unembed)
        self.translators = nn.ModuleDict()
        for layer in layers:
            lin = nn.Linear(self.width, self.width, device=weight.device, dtype=weight.dtype)
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
            self.translators[str(layer)] = lin
        self.register_buffer("shortlist", torch.zeros(0, dtype=torch.long, device=weight.device))
        self._short_cache: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None
        if shortlist is not None:
            self.set_shortlist(shortlist)

    # -- construction / persistence ---------------------------------------------------
    @classmethod
    def from_state_dict(cls, model_or_parts: nn.Module | ModelParts, state: Mapping[str, torch.Tensor]) -> ExitHeads:
        """Rebuild heads saved with ``state_dict()`` (e.g. via safetensors) for ``model``."""
        layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("translators.")})
        if not layers:
            raise ValueError("state dict has no 'translators.<layer>.*' entries")
        heads = cls(model_or_parts, layers)
        heads.load_state_dict(dict(state))
        return heads

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        key = prefix + "shortlist"
        if key in state_dict:
            # Resize first: a saved shortlist has its own length.
            self.shortlist = torch.empty_like(state_dict[key], dtype=torch.long, device=self.shortlist.device)
            self._short_cache = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- introspection ----------------------------------------------------------------
    @property
    def layers(self) -> tuple[int, ...]:
        """The exit layers, ascending."""
        return tuple(sorted(int(k) for k in self.translators))

    @property
    def final_norm(self) -> nn.Module:
        """The base model's final norm (borrowed: not in the heads' parameters)."""
        return self._base[0]

    @property
    def unembed(self) -> nn.Linear:
        """The base model's unembedding (borrowed: not in the heads' parameters)."""
        return self._base[1]

    def _translator(self, layer: int) -> nn.Linear:
        key = str(int(layer))
        if key not in self.translators:
            raise ValueError(f"layer {layer} has no exit head; heads are at layers {list(self.layers)}")
        return self.translators[key]  # type: ignore[return-value]

    def _check_hidden(self, hidden: torch.Tensor, what: str = "hidden") -> None:
        if hidden.dim() == 0 or hidden.shape[-1] != self.width:
            raise ValueError(
                f"{what} width {tuple(hidden.shape)[-1:] or '()'} does not match the model width {self.width}"
            )

    def head_cost(self, layer: int) -> dict[str, int]:
        """Parameters read per token by the head at ``layer``.

        Returns ``{"translator", "full", "shortlist"}``: the translator alone, and the
        whole head (translator + final norm + unembedding rows) for full-vocabulary and
        for shortlist scoring. Multiply by the dtype size for bytes; FLOPs are about
        twice the parameter count.
        """
        lin = self._translator(layer)
        translator = lin.weight.numel() + lin.bias.numel()
        norm = sum(p.numel() for p in self.final_norm.parameters())
        bias = getattr(self.unembed, "bias", None)
        per_row = self.width + (1 if bias is not None else 0)
        return {
            "translator": translator,
            "full": translator + norm + self.vocab_size * per_row,
            "shortlist": translator + norm + int(self.shortlist.numel()) * per_row,
        }

    # -- shortlist --------------------------------------------------------------------
    def set_shortlist(self, token_ids: torch.Tensor | Iterable[int]) -> None:
        """Replace the shortlist with the (deduplicated, sorted) ``token_ids``."""
        ids = torch.as_tensor(list(token_ids) if not isinstance(token_ids, torch.Tensor) else token_ids)
        ids = ids.reshape(-1).to(torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"shortlist token ids must lie in 0..{self.vocab_size - 1}")
        self.shortlist = torch.unique(ids).to(self.shortlist.device)
        self._short_cache = None

    @torch.no_grad()
    def grow_shortlist(
        self,
        token_ids: torch.Tensor | Iterable[int] | None = None,
        *,
        final_hidden: torch.Tensor | None = None,
        top_k: int = 0,
    ) -> int:
        """Add ``token_ids`` (tokens the full model produced) and, given
        ``final_hidden`` [N, d], the ``top_k`` tokens of the full model's distribution
        at each of those positions. Returns how many ids were new."""
        parts = [self.shortlist.cpu()]
        if token_ids is not None:
            ids = torch.as_tensor(token_ids if isinstance(token_ids, torch.Tensor) else list(token_ids))
            parts.append(ids.reshape(-1).long().cpu())
        if final_hidden is not None and top_k > 0:
            self._check_hidden(final_hidden, "final_hidden")
            h = final_hidden.reshape(-1, self.width)
            for chunk in h.split(1024):
                logits = self.unembed(self.final_norm(chunk.to(self.shortlist.device)))
                parts.append(logits.topk(min(top_k, self.vocab_size), dim=-1).indices.reshape(-1).cpu())
        before = int(self.shortlist.numel())
        self.set_shortlist(torch.cat(parts))
        return int(self.shortlist.numel()) - before

    def _shortlist_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Contiguous copy of the shortlisted unembedding rows (and bias), cached until
        the shortlist or the unembedding changes."""
        if self.shortlist.numel() == 0:
            raise ValueError("the shortlist is empty: grow_shortlist() first, or score the full vocabulary")
        weight = self.unembed.weight
        bias = getattr(self.unembed, "bias", None)
        key = (self.shortlist.data_ptr(), self.shortlist._version, self.shortlist.numel(),
               weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._short_cache is None or self._short_cache[0] != key:
            with torch.no_grad():
                rows = weight.detach().index_select(0, self.shortlist).contiguous()
                b = bias.detach().index_select(0, self.shortlist).contiguous() if bias is not None else None
            self._short_cache = (key, rows, b)
        return self._short_cache[1], self._short_cache[2]

    # -- scoring ----------------------------------------------------------------------
    def translate(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``h + W h + b`` for the head at ``layer``."""
        lin = self._translator(layer)
        self._check_hidden(hidden)
        hidden = hidden.to(lin.weight.dtype)  # buffered states are float32, a model may run in bf16/fp16
        return hidden + F.linear(hidden, lin.weight, lin.bias)

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits ``unembed(final_norm(h'))``, shape [..., V]."""
        return self.unembed(self.final_norm(self.translate(layer, hidden)))

    def shortlist_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the shortlist only, shape [..., S]; column ``j`` is vocabulary
        id ``shortlist[j]``."""
        rows, bias = self._shortlist_weights()
        return F.linear(self.final_norm(self.translate(layer, hidden)), rows, bias)

    forward = logits

    @torch.no_grad()
    def predict(self, layer: int, hidden: torch.Tensor, *, use_shortlist: bool = True) -> Prediction:
        """Greedy token and confidence from the head at ``layer``.

        With ``use_shortlist`` the argmax over the shortlist is mapped back to its
        vocabulary id and the confidence is the max probability over the shortlist.
        """
        if use_shortlist:
            logits = self.shortlist_logits(layer, hidden)
        else:
            logits = self.logits(layer, hidden)
        probs = torch.softmax(logits.float(), dim=-1)
        conf, idx = probs.max(dim=-1)
        if use_shortlist:
            idx = self.shortlist[idx]
        return Prediction(idx, conf)

    @torch.no_grad()
    def kl(self, layer: int, hidden: torch.Tensor, final_hidden: torch.Tensor, *,
           vocab: Literal["full", "shortlist"] = "full") -> float:
        """Mean KL(full model || head) per token at ``layer`` over ``vocab``."""
        self._check_hidden(hidden)
        self._check_hidden(final_hidden, "final_hidden")
        total, n = 0.0, 0
        for h, f in zip(hidden.reshape(-1, self.width).split(256), final_hidden.reshape(-1, self.width).split(256)):
            if vocab == "full":
                target = self.unembed(self.final_norm(f))
                logits = self.logits(layer, h)
            else:
                rows, bias = self._shortlist_weights()
                target = F.linear(self.final_norm(f), rows, bias)
                logits = self.shortlist_logits(layer, h)
            total += float(F.kl_div(logits.float().log_softmax(-1), target.float().log_softmax(-1),
                                    log_target=True, reduction="sum"))
            n += h.shape[0]
        return total / max(n, 1)

    # -- training ---------------------------------------------------------------------
    def _validate_fit(self, states: Mapping[int, torch.Tensor], final_hidden: torch.Tensor) -> int:
        if not states:
            raise ValueError("states is empty: pass {layer: Tensor[N, d]} for at least one head")
        if final_hidden.dim() != 2 or final_hidden.shape[1] != self.width:
            raise ValueError(f"final_hidden must be [N, {self.width}] (model width), got {tuple(final_hidden.shape)}")
        n = final_hidden.shape[0]
        if n == 0:
            raise ValueError("final_hidden is empty: no buffered tokens to fit on")
        for layer, h in states.items():
            self._translator(layer)
            if h.dim() != 2 or h.shape[1] != self.width:
                raise ValueError(f"states[{layer}] must be [N, {self.width}] (model width), got {tuple(h.shape)}")
            if h.shape[0] != n:
                raise ValueError(f"states[{layer}] has {h.shape[0]} tokens but final_hidden has {n}")
        return n

    def fit(
        self,
        states: Mapping[int, torch.Tensor],
        final_hidden: torch.Tensor,
        *,
        steps: int = 600,
        lr: float = 3e-3,
        batch_size: int = 128,
        seed: int = 0,
        vocab: FitVocab = "auto",
        weight_decay: float = 0.0,
        schedule: Literal["cosine", "constant"] = "cosine",
        precondition: bool = True,
        hard_weight: float = 1.0,
        progress: bool = True,
    ) -> dict[int, list[float]]:
        """Train the translators at ``states``' layers to match the full model.

        Minimises KL(full model || head) per token, plus ``hard_weight`` times the
        cross-entropy on the full model's argmax (which is what early exit needs: on
        SmolLM2 it takes practised top-1 agreement from ~96% to 100%), with Adam and a
        cosine schedule, one shared seeded batch order for all layers (so each batch's
        target is computed once). The target is ``unembed(final_norm(final_hidden))``,
        computed without gradient. The base model is not touched: its norm and
        unembedding ``requires_grad`` flags are turned off during the fit and
        restored afterwards. Fitting continues from the current translators.

        Cost per step is about ``6 * batch_size * d * (d + S)`` FLOPs per layer with the
        shortlist (``S`` ids) and ``6 * batch_size * d * (d + V)`` with the full
        vocabulary, independent of N. On SmolLM2 (6 layers, S = 756, batch 128,
        1 CPU thread) that is ~30-50 ms a step; the full vocabulary is ~50x slower.

        Args:
            states: ``{layer: Tensor[N, d]}``, hidden states at exit layers (see
                :func:`collect_states`).
            final_hidden: ``Tensor[N, d]``, the last decoder layer's output (before
                the final norm) at the same positions.
            steps: optimiser steps.
            lr: Adam learning rate.
            batch_size: tokens per step (capped at N).
            seed: seeds the batch order.
            vocab: ``"full"`` (KL over the whole vocabulary), ``"shortlist"`` (KL
                between the two distributions restricted to the shortlist and
                renormalised; much cheaper, and exactly what shortlist scoring uses),
                or ``"auto"``: the shortlist when one is set, else full.
            weight_decay: Adam L2 penalty pulling translators toward the logit lens.
            schedule: ``"cosine"`` decay to zero over ``steps``, or ``"constant"``.
            precondition: train in a rescaled parametrisation (per-dimension input
                scaling, step relative to the hidden-state scale); the result is the
                same kind of ``W, b``. Off: plain Adam on ``W, b``.
            hard_weight: weight of the cross-entropy on the target argmax (0: pure KL).
            progress: show a tqdm bar.

        Returns:
            ``{layer: [loss per step]}``: per-token KL (+ weighted cross-entropy) of
            each batch.

        Raises:
            ValueError: empty states, a layer without a head, mismatched widths or
                token counts, or ``vocab="shortlist"`` with an empty shortlist.
        """
        from tqdm.auto import tqdm

        n = self._validate_fit(states, final_hidden)
        if vocab == "auto":
            vocab = "shortlist" if self.shortlist.numel() else "full"
        if vocab not in ("full", "shortlist"):
            raise ValueError(f"vocab must be 'full', 'shortlist' or 'auto', got {vocab!r}")
        if steps < 1 or batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        layers = sorted(int(layer) for layer in states)
        device, dtype = self.unembed.weight.device, self.unembed.weight.dtype
        base_params = [p for m in self._base for p in m.parameters()]
        flags = [p.requires_grad for p in base_params]
        start = time.perf_counter()
        try:
            for p in base_params:
                p.requires_grad_(False)
            with torch.no_grad():
                xs = {layer: _plain(states[layer]).to(device, dtype) for layer in layers}
                normed_final = self.final_norm(_plain(final_hidden).to(device, dtype))
                if vocab == "shortlist":
                    rows, bias = self._shortlist_weights()
                    score = lambda x: F.linear(x, rows, bias)  # noqa: E731
                else:
                    score = self.unembed
                width = self.shortlist.numel() if vocab == "shortlist" else self.vocab_size
                cached_targets = None
                if n * width * 4 <= _TARGET_CACHE_BYTES:
                    cached_targets = torch.cat([score(c).float().log_softmax(-1) for c in normed_final.split(1024)])
            # One parametrisation with shortcut-finetune (policy/fit.py): rescaled so that
            # attention-sink dimensions do not dominate the steps.
            module = TranslatorFit(self, xs, layers=layers, precondition=precondition).to(device)
            opt = adam(list(module.parameters()), lr=lr, weight_decay=weight_decay)
            sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if schedule == "cosine"
                     else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
            gen = torch.Generator().manual_seed(seed)
            bs = min(batch_size, n)
            order, pos = torch.randperm(n, generator=gen), 0
            history: dict[int, list[float]] = {layer: [] for layer in layers}
            with torch.enable_grad():
                for _ in tqdm(range(steps), desc="fit exit heads", disable=not progress, leave=False):
                    if pos + bs > n:
                        order, pos = torch.randperm(n, generator=gen), 0
                    idx = order[pos:pos + bs].to(device)
                    pos += bs
                    if cached_targets is not None:
                        target = cached_targets[idx]
                    else:
                        with torch.no_grad():
                            target = score(normed_final[idx]).float().log_softmax(-1)
                    opt.zero_grad(set_to_none=True)
                    total, losses = module({layer: xs[layer][idx] for layer in layers}, target, score, hard_weight)
                    for layer, loss in losses.items():
                        history[layer].append(float(loss.detach()))
                    total.backward()
                    opt.step()
                    sched.step()
            module.write_to(self)
        finally:
            for p, flag in zip(base_params, flags):
                p.requires_grad_(flag)
        logger.info("fitted exit heads %s on %d tokens (%s vocab, %d steps) in %.1f s; final KL %s",
                    layers, n, vocab, steps, time.perf_counter() - start,
                    {layer: round(h[-1], 3) for layer, h in history.items()})
        return history


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A tensor usable by autograd (inference-mode tensors are not)."""
    return t.detach().clone() if t.is_inference() else t.detach()


@torch.no_grad()
def collect_states(
    model: nn.Module,
    parts: ModelParts | None,
    input_ids: torch.Tensor,
    layers: Iterable[int],
    *,
    attention_mask: torch.Tensor | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Run one full forward of ``model`` on ``input_ids`` and record training data.

    Forward hooks on the decoder layers capture, for each layer ``l`` in ``layers``,
    the hidden state after ``l`` layers (the input of decoder layer ``l``; for
    ``l == num_layers`` the output of the last layer), plus the last layer's output
    before the final norm.

    Args:
        model: the causal LM (wrapped or not; what its layers see is what is recorded).
        parts: its :class:`ModelParts`, or ``None`` to resolve them.
        input_ids: [T] or [B, T].
        layers: layers to record, each in ``0..num_layers``.
        attention_mask: optional [B, T]; padded positions are dropped from the output.

    Returns:
        ``(states, final_hidden, next_tokens)``: ``{layer: Tensor[T', d]}``,
        ``Tensor[T', d]`` and the full model's greedy next token at each position
        (``LongTensor[T']``), with ``T'`` the number of unpadded positions.
    """
    parts = parts or resolve(model)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty")
    # num_layers itself is always captured: the final hidden state is the fit's target.
    with StateCapture(parts, [*layers, parts.num_layers], keep=lambda t: t.detach().clone()) as capture:
        device = next(model.parameters()).device
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}
        out = model(input_ids=input_ids.to(device), use_cache=False, **kwargs)
    captured = capture.states
    layers = sorted({int(layer) for layer in layers})
    missing = [layer for layer in capture.layers if layer not in captured]
    if missing:
        raise RuntimeError(f"no hidden state was captured at layers {missing}; did the forward skip them?")
    final_key = parts.num_layers
    keep = (attention_mask.reshape(-1).bool().to(device) if attention_mask is not None
            else torch.ones(input_ids.numel(), dtype=torch.bool, device=device))
    width = captured[final_key].shape[-1]
    states = {layer: captured[layer].reshape(-1, width)[keep] for layer in layers}
    final_hidden = captured[final_key].reshape(-1, width)[keep]
    next_tokens = out.logits.argmax(-1).reshape(-1)[keep]
    return states, final_hidden, next_tokens
