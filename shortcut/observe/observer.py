"""The observer: an SAE that turns the residual stream after one decoder layer into a
sparse signature of the situation (its strongest features), read by the exit policy."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ..capture import layer_output

if TYPE_CHECKING:  # sae-lens takes seconds to import: import it lazily, only when used.
    from sae_lens import SAE

logger = logging.getLogger(__name__)

class Signature(NamedTuple):
    """Sparse signature of a residual state: top-k SAE features, strongest first.

    ``indices``: int64 ``[batch, k]`` feature ids. ``values``: ``[batch, k]`` feature
    activations (non-negative; trailing zeros when fewer than k features fire).
    """

    indices: torch.Tensor
    values: torch.Tensor


class Observer:
    """An SAE reading the residual stream after one decoder layer.

    ``attach(layer_module)`` registers a forward hook that, on every forward, encodes
    the residual at the LAST position of each batch row and stores the signature in
    :attr:`last_signature` (and passes it to ``callback`` if given). The hook never
    changes the layer's output, so the model's logits stay bit-identical.

    For TopK SAEs (the kind :func:`train_sae` makes) the encode is one matmul plus a
    top-k, with exactly sae-lens's arithmetic; other sae-lens architectures go through
    ``sae.encode`` and keep the ``signature_k`` strongest features.

    Attributes:
        sae: the sae-lens SAE.
        layer: index of the observed decoder layer.
        meta: the contents of shortcut_observer.json (fingerprint, quality, ...), if any.
        last_signature: the latest :class:`Signature`, or None.
    """

    def __init__(
        self,
        sae: SAE[Any],
        layer: int,
        *,
        signature_k: int | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise ValueError(f"layer must be a non-negative int, got {layer!r}")
        self.sae = sae
        self.layer = layer
        self.meta: dict[str, Any] = dict(meta or {})
        self.last_signature: Signature | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._callback: Callable[[Signature], None] | None = None
        sae.eval()
        cfg = sae.cfg
        self._fast = (
            cfg.architecture() == "topk"
            and getattr(cfg, "normalize_activations", "none") == "none"
            and getattr(cfg, "reshape_activations", "none") == "none"
            and not getattr(sae, "use_error_term", False)
        )
        default_k = int(getattr(cfg, "k", 0) or 32)
        self.k = min(int(signature_k or default_k), int(cfg.d_sae))
        self._dec_norm: torch.Tensor | None = None
        if self._fast and getattr(cfg, "rescale_acts_by_decoder_norm", False):
            with torch.no_grad():
                self._dec_norm = sae.W_dec.norm(dim=-1)

    @property
    def d_model(self) -> int:
        """Width of the residual stream the SAE reads."""
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        """Number of SAE features."""
        return int(self.sae.cfg.d_sae)

    @property
    def quality(self) -> dict[str, Any] | None:
        """Quality figures saved with the observer, if known."""
        q = self.meta.get("quality")
        return dict(q) if isinstance(q, Mapping) else None

    @property
    def attached(self) -> bool:
        """Whether a hook is currently registered."""
        return self._handle is not None

    @torch.no_grad()
    def encode(self, residual: torch.Tensor) -> Signature:
        """Signature of residual vectors ``[..., d_model]``: top-k indices and values
        ``[..., k]``, sorted by value, strongest first."""
        sae = self.sae
        if residual.shape[-1] != sae.cfg.d_in:
            raise ValueError(
                f"residual width {residual.shape[-1]} != SAE d_in {sae.cfg.d_in}"
            )
        x = residual.detach().to(sae.device, sae.dtype)
        if self._fast:
            pre = (x - sae.b_dec * sae.cfg.apply_b_dec_to_input) @ sae.W_enc + sae.b_enc
            if self._dec_norm is not None:
                pre = pre * self._dec_norm
            values, indices = pre.topk(self.k, dim=-1, sorted=True)
            values = values.relu()
        else:
            acts = sae.encode(x)
            if acts.is_sparse:
                acts = acts.to_dense()
            values, indices = acts.topk(self.k, dim=-1, sorted=True)
        return Signature(indices=indices, values=values)

    def _hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        # Returns None: PyTorch then keeps the layer's output untouched.
        h = layer_output(output)
        sig = self.encode(h[..., -1, :] if h.ndim >= 3 else h)
        self.last_signature = sig
        if self._callback is not None:
            self._callback(sig)

    def attach(
        self,
        layer_module: torch.nn.Module,
        callback: Callable[[Signature], None] | None = None,
    ) -> Observer:
        """Hook ``layer_module`` (re-attaching moves the hook). Returns self."""
        self.detach()
        self._callback = callback
        self._handle = layer_module.register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        """Remove the hook; safe to call more than once."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._callback = None

    def __repr__(self) -> str:
        return (
            f"Observer(layer={self.layer}, d_model={self.d_model}, d_sae={self.d_sae}, "
            f"k={self.k}, attached={self.attached})"
        )
