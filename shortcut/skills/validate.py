"""Checks on skills folders, which travel between machines and are untrusted input.

Every file is checked before anything is built from it or changes a model: paths stay
inside the folder (no ``..``, no absolute paths, no symlinks out), files are regular
files (a FIFO or device is refused without opening it), json has the expected types,
tensors have the expected names, shapes, dtypes, finite values and index ranges. A
problem raises :class:`SkillsFileError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

MAX_JSON_BYTES = 1 << 30  # a prompt log of 10,000 long prompts stays far below this


class SkillsFileError(ValueError):
    """A file of a skills folder is missing a field, malformed or out of range; the
    message names the file and the field."""


def inside(folder: Path, relative: Any, what: str) -> Path:
    """``folder / relative`` for a path taken from a manifest, refused unless it is a
    relative path that stays inside ``folder`` once symlinks are resolved."""
    if not isinstance(relative, str) or not relative:
        raise SkillsFileError(f"{folder}: {what} must be a relative path inside the folder, got {relative!r}")
    if os.path.isabs(relative) or ".." in Path(relative).parts:
        raise SkillsFileError(f"{folder}: {what} {relative!r} leaves the folder (absolute or '..')")
    path = folder / relative
    root = folder.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise SkillsFileError(f"{folder}: {what} {relative!r} resolves to {resolved}, outside the folder")
    return path


def regular_file(path: Path, what: str) -> Path:
    """``path`` if it is a readable regular file; checked with ``stat`` before any open,
    so a FIFO or device in its place cannot block the load."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: the {what} is missing") from None
    except OSError as err:
        raise SkillsFileError(f"{path}: the {what} cannot be read ({err.strerror})") from err
    if not stat.S_ISREG(info.st_mode):
        raise SkillsFileError(f"{path}: the {what} is not a regular file")
    if not os.access(path, os.R_OK):
        raise SkillsFileError(f"{path}: the {what} is not readable")
    return path


def read_json(path: Path, what: str) -> Any:
    """The json value in ``path`` (a regular file of at most ``MAX_JSON_BYTES``)."""
    regular_file(path, what)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise SkillsFileError(f"{path}: the {what} is larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SkillsFileError(f"{path}: the {what} is not valid json ({err})") from err
    except OSError as err:
        raise SkillsFileError(f"{path}: the {what} cannot be read ({err.strerror})") from err


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (which holds no code, unlike a pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    regular_file(path, what)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SkillsFileError(f"{path}: the {what} is not a readable safetensors file ({err})") from err


def expect_object(value: Any, path: Path, what: str) -> dict[str, Any]:
    """``value`` if it is a json object; ``SkillsFileError`` naming ``path`` and ``what`` if not."""
    if not isinstance(value, dict):
        raise SkillsFileError(f"{path}: {what} must be a json object, not {type(value).__name__}")
    return value


def tensor(state: Mapping[str, torch.Tensor], name: str, path: Path, *, shape: tuple[int | None, ...] | None = None,
           floating: bool | None = None) -> torch.Tensor:
    """``state[name]``, checked for presence, shape (``None`` dims are free), kind and
    finite values."""
    if name not in state:
        raise SkillsFileError(f"{path}: field {name!r} is missing")
    value = state[name]
    if shape is not None and (value.dim() != len(shape)
                              or any(want is not None and got != want for got, want in zip(value.shape, shape))):
        raise SkillsFileError(f"{path}: field {name!r} has shape {tuple(value.shape)}, expected "
                              f"{tuple('*' if s is None else s for s in shape)}")
    if floating is True and not value.is_floating_point():
        raise SkillsFileError(f"{path}: field {name!r} must be floating point, got {value.dtype}")
    if floating is False and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise SkillsFileError(f"{path}: field {name!r} must hold integers, got {value.dtype}")
    if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
        raise SkillsFileError(f"{path}: field {name!r} holds NaN or infinite values")
    return value


def in_range(value: torch.Tensor, low: int, high: int, name: str, path: Path) -> None:
    """Every entry of an integer tensor in ``low..high - 1``."""
    if value.numel() and (int(value.min()) < low or int(value.max()) >= high):
        raise SkillsFileError(f"{path}: field {name!r} holds values outside {low}..{high - 1} "
                              f"(min {int(value.min())}, max {int(value.max())})")


def token_lists(value: Any, vocab_size: int, path: Path, what: str) -> list[list[int]]:
    """A json list of token-id lists, each id an int in ``0..vocab_size - 1``."""
    if not isinstance(value, list):
        raise SkillsFileError(f"{path}: {what} must be a list of token-id lists, not {type(value).__name__}")
    for index, ids in enumerate(value):
        if not isinstance(ids, list) or not all(type(t) is int for t in ids):
            raise SkillsFileError(f"{path}: {what}[{index}] must be a list of integer token ids")
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            raise SkillsFileError(f"{path}: {what}[{index}] holds token ids outside 0..{vocab_size - 1}")
    return value


def base_sizes(base: Mapping[str, Any], path: Path) -> dict[str, int]:
    """``hidden_size``, ``vocab_size`` and ``num_layers`` of a manifest's base-model
    fingerprint, each a positive integer (what files are checked against without a model)."""
    sizes = {k: base.get(k) for k in ("hidden_size", "vocab_size", "num_layers")}
    if not all(type(v) is int and v > 0 for v in sizes.values()):
        raise SkillsFileError(f"{path}: field 'base_model' lacks positive integer sizes: {sizes}")
    return sizes  # type: ignore[return-value]  # checked ints above


def sae_width(observer_dir: Path) -> int:
    """The observer's number of SAE features, from its sae-lens ``cfg.json``."""
    cfg_path = observer_dir / "cfg.json"
    d_sae = expect_object(read_json(cfg_path, "SAE config"), cfg_path, "the SAE config").get("d_sae")
    if type(d_sae) is not int or d_sae < 1:
        raise SkillsFileError(f"{cfg_path}: field 'd_sae' must be a positive integer, got {d_sae!r}")
    return d_sae


def check_heads(state: Mapping[str, torch.Tensor], path: Path, *, width: int, vocab_size: int,
                num_layers: int) -> None:
    """Exit heads' tensors: ``translators.<l>.weight`` [d, d] and ``.bias`` [d] for
    layers in range, finite; ``shortlist`` ids inside the vocabulary."""
    layers = set()
    for key in state:
        parts = key.split(".")
        if parts[0] == "translators":
            if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in ("weight", "bias"):
                raise SkillsFileError(f"{path}: unexpected field {key!r}")
            layers.add(int(parts[1]))
        elif key != "shortlist":
            raise SkillsFileError(f"{path}: unexpected field {key!r}")
    if not layers:
        raise SkillsFileError(f"{path}: no 'translators.<layer>.weight' fields")
    for layer in sorted(layers):
        if not 0 <= layer <= num_layers:
            raise SkillsFileError(f"{path}: translator layer {layer} outside 0..{num_layers}")
        tensor(state, f"translators.{layer}.weight", path, shape=(width, width), floating=True)
        tensor(state, f"translators.{layer}.bias", path, shape=(width,), floating=True)
    if "shortlist" in state:
        shortlist = tensor(state, "shortlist", path, shape=(None,), floating=False)
        in_range(shortlist, 0, vocab_size, "shortlist", path)


def check_policy(state: Mapping[str, torch.Tensor], path: Path, *, d_sae: int, num_layers: int) -> list[int]:
    """Policy tensors against the observer's width ``d_sae``; returns the exit layers."""
    layers_t = tensor(state, "exit_layers", path, shape=(None,), floating=False)
    layers = [int(x) for x in layers_t.tolist()]
    if not layers or any(not 1 <= layer < num_layers for layer in layers) or layers != sorted(set(layers)):
        raise SkillsFileError(f"{path}: field 'exit_layers' must be increasing layers in 1..{num_layers - 1}, "
                              f"got {layers}")
    n = len(layers)
    tensor(state, "weights", path, shape=(n, d_sae), floating=True)
    for name in ("bias", "trials", "agreements"):
        tensor(state, name, path, shape=(n,), floating=None)
    tensor(state, "feature_counts", path, shape=(d_sae,), floating=None)
    if "decisions" in state:
        tensor(state, "decisions", path, shape=(n + 1,), floating=None)
    if "memory_indices" in state:
        indices = tensor(state, "memory_indices", path, shape=(None, None), floating=False)
        in_range(indices, 0, d_sae, "memory_indices", path)
        tensor(state, "memory_values", path, shape=tuple(indices.shape), floating=True)
    for name in ("trials", "agreements", "feature_counts"):
        if bool((state[name] < 0).any()):
            raise SkillsFileError(f"{path}: field {name!r} holds negative counts")
    return layers


def check_adapter(folder: Path, model: torch.nn.Module) -> None:
    """A LoRA adapter folder whose config and tensors fit ``model``: checked before peft
    merges anything into the model."""
    config = expect_object(read_json(regular_file(folder / "adapter_config.json", "adapter config"),
                                     "adapter config"), folder / "adapter_config.json", "the adapter config")
    path = folder / "adapter_config.json"
    if config.get("peft_type") != "LORA":
        raise SkillsFileError(f"{path}: field 'peft_type' must be 'LORA', got {config.get('peft_type')!r}")
    rank = config.get("r")
    if type(rank) is not int or rank < 1:
        raise SkillsFileError(f"{path}: field 'r' must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise SkillsFileError(f"{path}: field 'lora_alpha' must be a number, got {alpha!r}")
    weights = folder / "adapter_model.safetensors"
    state = read_tensors(weights, "adapter weights")
    modules = dict(model.named_modules())
    for key in state:
        if ".lora_A." not in key and ".lora_B." not in key:
            raise SkillsFileError(f"{weights}: unexpected field {key!r}")
        name = key.split(".lora_")[0]
        target = next((modules[m] for m in _candidates(name) if m in modules), None)
        if not isinstance(target, torch.nn.Linear):
            raise SkillsFileError(f"{weights}: field {key!r} names no linear layer of this model")
        shape = (rank, target.in_features) if ".lora_A." in key else (target.out_features, rank)
        tensor(state, key, weights, shape=shape, floating=True)


def _candidates(name: str) -> Iterable[str]:
    """Module names a peft key may refer to (peft prefixes ``base_model.model.``)."""
    yield name
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            yield name[len(prefix):]
