"""Architecture registry: where a model keeps its decoder layers, final norm and
unembedding, and how to write the keys/values of a layer that was skipped.

Architectures are data (an :class:`ArchSpec` per ``model_type``), registered by the
small modules in ``shortcut.plugins`` or by third parties with
:func:`register_architecture`. Models that no plugin names fall back to a generic
llama-like lookup; if that fails too, :class:`UnsupportedArchitectureError` says which
``model_type`` is missing and how to register it.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# (layer, hidden state entering the layer, position embeddings) -> (keys, values), shaped
# [batch, kv_heads, seq, head_dim] exactly as the layer's attention passes them to
# ``cache.update``: rotary embeddings applied, any key norm applied.
KVProjector = Callable[[nn.Module, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not registered and the generic fallback does not fit."""


@dataclass(frozen=True)
class ArchSpec:
    """Where shortcut finds the parts of one architecture.

    Paths are dotted attribute paths from the ``*ForCausalLM`` module.

    Attributes:
        model_types: ``config.model_type`` values this spec serves.
        layers: path to the ``nn.ModuleList`` of decoder layers.
        final_norm: path to the norm applied after the last layer.
        unembed: path to the output projection onto the vocabulary; ``None`` asks the
            model (``get_output_embeddings()``).
        project_kv: writes nothing; returns the keys/values a layer would cache for a
            hidden state, so a skipped layer's cache stays aligned (see runtime.py).
        cache_kwarg: name of the decoder layer's cache argument.
        cache_position: positional index of that argument when the model passes it
            positionally (gpt2 does), else ``None``.
        attention: attribute name of the attention module inside a decoder layer.
    """

    model_types: tuple[str, ...]
    layers: str
    final_norm: str
    project_kv: KVProjector
    unembed: str | None = None
    cache_kwarg: str = "cache"
    cache_position: int | None = None
    attention: str = "self_attn"


@dataclass(frozen=True)
class ModelParts:
    """An :class:`ArchSpec` bound to one model instance."""

    spec: ArchSpec
    model_type: str
    layers: nn.ModuleList
    final_norm: nn.Module
    unembed: nn.Linear  # [vocab, d] weight, optional bias: the model's lm_head

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.layers)


_REGISTRY: dict[str, ArchSpec] = {}
_plugins_loaded = False


def register_architecture(spec: ArchSpec, *, overwrite: bool = False) -> None:
    """Register ``spec`` for each of its ``model_types``.

    Third parties call this (for example from their package's import) to teach
    shortcut a new architecture::

        from shortcut.arch import ArchSpec, llama_like_kv, register_architecture
        register_architecture(ArchSpec(model_types=("my_llama",), layers="model.layers",
                                       final_norm="model.norm", project_kv=llama_like_kv))
    """
    for model_type in spec.model_types:
        if model_type in _REGISTRY and not overwrite and _REGISTRY[model_type] != spec:
            raise ValueError(
                f"model_type {model_type!r} is already registered; pass overwrite=True to replace it"
            )
        _REGISTRY[model_type] = spec


def registered_model_types() -> list[str]:
    """The model types with a registered :class:`ArchSpec`, sorted."""
    _load_plugins()
    return sorted(_REGISTRY)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import shortcut.plugins as plugins

    for info in pkgutil.iter_modules(plugins.__path__):
        if not info.name.startswith("_") and not info.ispkg:  # sub-packages hold integrations
            importlib.import_module(f"shortcut.plugins.{info.name}")


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def resolve(model: nn.Module) -> ModelParts:
    """Find the decoder layers, final norm and unembedding of ``model``.

    Raises:
        UnsupportedArchitectureError: neither a registered spec nor the generic
            llama-like fallback fits; the message names the ``model_type``.
    """
    _load_plugins()
    model_type = getattr(getattr(model, "config", None), "model_type", None) or "<none>"
    spec = _REGISTRY.get(model_type)
    if spec is not None:
        parts = _bind(model, spec, model_type)
        if parts is None:
            raise UnsupportedArchitectureError(
                f"the plugin for model_type {model_type!r} expects layers at {spec.layers!r}, "
                f"final norm at {spec.final_norm!r} and unembedding at {spec.unembed or 'get_output_embeddings()'!r}, "
                f"but {type(model).__name__} does not have them"
            )
        return parts
    parts = _generic_llama_like(model, model_type)
    if parts is None:
        raise UnsupportedArchitectureError(
            f"no shortcut plugin knows model_type {model_type!r} ({type(model).__name__}), and it "
            "is not llama-like enough for the generic fallback. Register one with "
            "shortcut.register_architecture(ArchSpec(model_types=(...,), layers=..., "
            "final_norm=..., project_kv=...)); see plugins/ for examples. Known model types: "
            + ", ".join(sorted(_REGISTRY))
        )
    return parts


def _bind(model: nn.Module, spec: ArchSpec, model_type: str) -> ModelParts | None:
    layers = _get_path(model, spec.layers)
    norm = _get_path(model, spec.final_norm)
    if spec.unembed:
        unembed = _get_path(model, spec.unembed)
    else:
        unembed = cast("PreTrainedModel", model).get_output_embeddings()
    if not isinstance(layers, nn.ModuleList) or norm is None or unembed is None:
        return None
    return ModelParts(spec, model_type, layers, norm, cast(nn.Linear, unembed))


def _generic_llama_like(model: nn.Module, model_type: str) -> ModelParts | None:
    """The one ModuleList as long as ``num_hidden_layers`` whose layers look like llama's."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers
    ]
    if len(found) != 1:
        return None
    name, layers = found[0]
    first = layers[0]
    attn = getattr(first, "self_attn", None)
    if attn is None or not all(hasattr(attn, p) for p in ("k_proj", "v_proj")):
        return None
    if not hasattr(first, "input_layernorm"):
        return None
    parent = name.rpartition(".")[0]
    spec = ArchSpec(
        model_types=(model_type,),
        layers=name,
        final_norm=f"{parent}.norm" if parent else "norm",
        project_kv=llama_like_kv,
    )
    return _bind(model, spec, model_type)


def rotary_of(module: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The ``apply_rotary_pos_emb`` of the modelling file that defines ``module``.

    Using the model's own function keeps partial-rotary and interleaving variants right.
    """
    return sys.modules[type(module).__module__].apply_rotary_pos_emb


def rotate_keys(attn: nn.Module, keys: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
    """Apply ``attn``'s rotary embedding (``position_embeddings`` = cos, sin) to ``keys``."""
    cos, sin = position_embeddings
    _, rotated = rotary_of(attn)(keys, keys, cos, sin)
    return rotated


def llama_like_kv(layer: Any, hidden: torch.Tensor, position_embeddings: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values of llama, mistral, qwen2, qwen3 and gemma3 style layers
    (pre-norm ``input_layernorm``, ``self_attn.k_proj``/``v_proj``, optional ``k_norm``)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    keys = attn.k_proj(x).view(shape)
    if hasattr(attn, "k_norm"):
        keys = attn.k_norm(keys)
    keys = keys.transpose(1, 2)
    values = attn.v_proj(x).view(shape).transpose(1, 2)
    return rotate_keys(attn, keys, position_embeddings), values
