"""``shortcut.wrap``: attach shortcut to a loaded causal LM and get a removable handle."""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path
from typing import Iterator

from torch import nn
from transformers import PreTrainedModel

from . import skills
from .arch import ModelParts, resolve
from .config import ShortcutConfig
from .runtime import FixedPlan, LayerPolicy, LayerRuntime, Stats

_HANDLES: "weakref.WeakKeyDictionary[nn.Module, Shortcut]" = weakref.WeakKeyDictionary()


class Shortcut:
    """Handle on a wrapped model. Create it with :func:`wrap` or :func:`load`.

    The model keeps its own API (``model(...)``, ``model.generate(...)``); the handle
    holds what shortcut adds: the policy that decides which layers run, the compute
    statistics, and saving of what was learned.
    """

    def __init__(self, model: PreTrainedModel, parts: ModelParts, config: ShortcutConfig) -> None:
        self.model = model
        self.parts = parts
        self.config = config
        self.fingerprint = skills.fingerprint(model, parts)
        self._runtime = LayerRuntime(model, parts)
        self._removed = False

    # -- compute ------------------------------------------------------------------
    @property
    def stats(self) -> Stats:
        """Layers executed per token: ``stats.last`` (latest forward) and ``stats.total``."""
        return self._runtime.stats

    @property
    def num_layers(self) -> int:
        return self.parts.num_layers

    @property
    def policy(self) -> LayerPolicy | None:
        """The policy consulted before each decoder layer; ``None`` runs every layer."""
        return self._runtime.policy

    def set_policy(self, policy: LayerPolicy | None) -> None:
        """Install ``policy`` (``None`` for the full path). A :class:`FixedPlan` is
        checked against the model's depth first."""
        self._check_live()
        if isinstance(policy, FixedPlan):
            policy.validate(self.num_layers)
        elif policy is not None and not isinstance(policy, LayerPolicy):
            raise TypeError(f"policy must implement begin/should_run/propagate_kv, got {type(policy).__name__}")
        self._runtime.policy = policy

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the untouched model inside the block (nothing counted, no policy)."""
        self._check_live()
        previous = self._runtime.bypass
        self._runtime.bypass = True
        try:
            yield
        finally:
            self._runtime.bypass = previous

    # -- lifecycle ----------------------------------------------------------------
    def remove(self) -> PreTrainedModel:
        """Detach shortcut; the model is returned exactly as it was. Idempotent."""
        if not self._removed:
            self._runtime.uninstall()
            _HANDLES.pop(self.model, None)
            self._removed = True
        return self.model

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this shortcut handle was removed; call shortcut.wrap(model) again")

    # -- persistence ----------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, *, overwrite: bool = True) -> Path:
        """Write config and learned skills to ``folder`` (safetensors + json)."""

        def fill(tmp: Path) -> None:
            self.config.save(tmp / "config.json")
            skills.write_manifest(tmp, self.fingerprint, {"config": "config.json"})

        return skills.write_atomically(folder, fill, overwrite=overwrite)

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{self.parts.model_type}, {self.num_layers} layers"
        return f"Shortcut({state}, mode={self.config.mode!r})"


def _check_model(model: object) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"shortcut.wrap needs a transformers PreTrainedModel, got {type(model).__name__}")
    if (
        model.get_output_embeddings() is None
        or not model.can_generate()
        or getattr(model.config, "is_encoder_decoder", False)
    ):
        raise TypeError(
            f"shortcut.wrap needs a causal language model (a *ForCausalLM with an output "
            f"embedding that can generate), got {type(model).__name__}"
        )
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            f"{type(model).__name__} has parameters on the meta device; load its weights "
            "(for example with from_pretrained) before wrapping"
        )
    if model in _HANDLES or any(
        getattr(m.__dict__.get("forward"), "__shortcut_wrapper__", False) for m in model.modules()
    ):
        raise RuntimeError(
            f"{type(model).__name__} is already wrapped by shortcut; call handle.remove() first"
        )


def wrap(model: PreTrainedModel, config: ShortcutConfig | None = None) -> Shortcut:
    """Attach shortcut to ``model`` in place and return its handle.

    With no learned policy the wrapped model computes exactly what the model computed
    before (bit-identical logits); ``handle.remove()`` restores it completely.

    Raises:
        TypeError: ``model`` is not a causal LM.
        ValueError: parameters on the meta device, or config layers out of range.
        UnsupportedArchitectureError: no plugin knows the model's ``model_type``.
        RuntimeError: the model is already wrapped.
    """
    _check_model(model)
    parts = resolve(model)
    config = (config or ShortcutConfig()).resolved(parts.num_layers)
    handle = Shortcut(model, parts, config)
    handle._runtime.install()
    _HANDLES[model] = handle
    return handle


def load(model: PreTrainedModel, folder: str | Path) -> Shortcut:
    """Wrap ``model`` with the config and skills saved in ``folder`` by
    :meth:`Shortcut.save_pretrained`. Skills learned on another base model are refused
    before anything is attached."""
    folder = Path(folder)
    manifest = skills.read_manifest(folder)
    _check_model(model)
    parts = resolve(model)
    skills.check_fingerprint(manifest["base_model"], skills.fingerprint(model, parts), folder)
    config = ShortcutConfig.load(folder / "config.json")
    return wrap(model, config)
