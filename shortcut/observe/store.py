"""Saving and loading an observer: a sae-lens folder (``SAE.load_from_disk`` reads it)
plus shortcut's own metadata.

Layout of one observer folder (e.g. ``skills/observers/layer_2``)::

    cfg.json                  sae-lens inference config
    sae_weights.safetensors   sae-lens inference weights (normalisation folded in)
    shortcut_observer.json    layer, d_model, base-model fingerprint, quality figures"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # sae-lens takes seconds to import: import it lazily, only when used.
    from sae_lens import SAE

from ..atomic import replace_folder
from .observer import Observer

logger = logging.getLogger(__name__)

OBSERVER_META_FILENAME = "shortcut_observer.json"
_SAE_CFG_FILENAME = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
_SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
_META_FORMAT = "shortcut-observer"
_META_VERSION = 1


def save_observer(
    sae: SAE[Any] | Observer,
    folder: str | os.PathLike[str],
    *,
    layer: int,
    fingerprint: Mapping[str, Any],
    quality: Mapping[str, Any] | None = None,
) -> Path:
    """Save an observer into ``folder`` (sae-lens inference format + metadata json).

    The SAE is written with sae-lens's ``save_inference_model`` (training SAEs) or
    ``save_model`` (inference SAEs) into a temporary sibling folder that is renamed to
    ``folder`` at the end, so a failed save leaves nothing behind; an existing
    ``folder`` is replaced only once the new one is complete.

    Args:
        sae: a sae-lens SAE (or an :class:`Observer`).
        folder: target folder, e.g. ``skill_dir/observers/layer_6``.
        layer: index of the observed decoder layer.
        fingerprint: JSON-serialisable description of the base model.
        quality: figures from :func:`sae_quality`, if known.

    Returns:
        the folder's path.
    """
    from sae_lens.saes.sae import TrainingSAE

    if isinstance(sae, Observer):
        if quality is None:
            quality = sae.quality
        sae = sae.sae
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    meta = {
        "format": _META_FORMAT,
        "version": _META_VERSION,
        "layer": layer,
        "d_model": int(sae.cfg.d_in),
        "d_sae": int(sae.cfg.d_sae),
        "k": int(getattr(sae.cfg, "k", 0) or 0) or None,
        "architecture": sae.cfg.architecture(),
        "fingerprint": dict(fingerprint),
        "quality": dict(quality) if quality is not None else None,
    }
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"observer metadata is not JSON-serialisable: {e}") from e

    def fill(tmp: Path) -> None:
        tmp.rmdir()  # sae-lens creates the folder itself
        if isinstance(sae, TrainingSAE):
            sae.save_inference_model(tmp)
        else:
            sae.save_model(tmp)
        (tmp / OBSERVER_META_FILENAME).write_text(meta_text + "\n", encoding="utf-8")

    folder = replace_folder(folder, fill)
    logger.info("saved observer for layer %d to %s", layer, folder)
    return folder


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} is missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} is corrupted (not valid JSON): {path}: {e}") from e


def load_observer(
    folder: str | os.PathLike[str],
    *,
    d_model: int,
    n_layers: int,
    expected_fingerprint: Mapping[str, Any] | None = None,
    layer: int | None = None,
    device: str = "cpu",
) -> Observer:
    """Load an observer saved by :func:`save_observer`, or a plain sae-lens SAE folder.

    A plain sae-lens folder (``cfg.json`` + ``sae_weights.safetensors``, no
    ``shortcut_observer.json``, e.g. a published SAE copied in) needs ``layer``.

    Args:
        folder: the observer folder.
        d_model: residual width of the model it will observe (must equal the SAE d_in).
        n_layers: the model's number of decoder layers (layer must be in range).
        expected_fingerprint: if given, every key in it must match the saved
            fingerprint.
        layer: the observed layer; required for plain sae-lens folders, checked
            against the saved one otherwise.
        device: where to load the SAE.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: a corrupted file, a width / layer / fingerprint mismatch.
    """
    from sae_lens import SAE
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"observer folder not found: {folder}")
    cfg_path = folder / _SAE_CFG_FILENAME
    weights_path = folder / _SAE_WEIGHTS_FILENAME
    meta_path = folder / OBSERVER_META_FILENAME

    cfg = _read_json(cfg_path, "SAE config")
    if not isinstance(cfg, dict) or not {"d_in", "d_sae"} <= cfg.keys():
        raise ValueError(f"SAE config {cfg_path} lacks d_in/d_sae: not a sae-lens config")
    if not weights_path.is_file():
        raise FileNotFoundError(f"SAE weights are missing: {weights_path}")

    meta: dict[str, Any] = {}
    if meta_path.exists():
        meta = _read_json(meta_path, "observer metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("layer"), int):
            raise ValueError(f"observer metadata {meta_path} has no integer 'layer'")
        if layer is not None and layer != meta["layer"]:
            raise ValueError(
                f"{meta_path} says layer {meta['layer']}, but layer={layer} was requested"
            )
        layer = meta["layer"]
    elif layer is None:
        raise ValueError(
            f"{folder} has no {OBSERVER_META_FILENAME}: for a plain sae-lens SAE folder "
            "pass the observed layer explicitly (layer=...)"
        )

    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise ValueError(
            f"observer layer {layer} is out of range for a model with {n_layers} layers "
            f"(valid: 0..{n_layers - 1})"
        )
    if int(cfg["d_in"]) != d_model:
        raise ValueError(
            f"SAE width mismatch: {cfg_path} has d_in={cfg['d_in']}, the model's "
            f"residual width is d_model={d_model}"
        )
    if expected_fingerprint is not None:
        saved = meta.get("fingerprint") or {}
        diff = {
            key: (saved.get(key), val)
            for key, val in expected_fingerprint.items()
            if saved.get(key) != val
        }
        if diff:
            detail = ", ".join(f"{k}: saved {s!r} != expected {e!r}"
                               for k, (s, e) in diff.items())
            raise ValueError(
                f"observer {folder} was trained on another base model ({detail})"
            )

    try:  # validate the safetensors file before sae-lens touches it
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118
                f.get_slice(name)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(
            f"SAE weights are corrupted or truncated: {weights_path}: {e}"
        ) from e

    try:
        sae = SAE.load_from_disk(folder, device=device)
    except Exception as e:
        raise ValueError(f"could not load the SAE in {folder}: {type(e).__name__}: {e}") from e
    if int(sae.cfg.d_in) != d_model:
        raise ValueError(
            f"SAE width mismatch: {folder} loads with d_in={sae.cfg.d_in}, expected {d_model}"
        )
    return Observer(sae, layer, meta=meta)
