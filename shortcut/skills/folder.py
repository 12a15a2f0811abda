"""Skill folders: everything a wrapped model learned, as safetensors + json.

Layout::

    skills/
      shortcut.json          format version, base-model fingerprint, what is inside
      config.json            the ShortcutConfig
      observers/layer_N/     one sae-lens SAE folder per observed layer
      *.safetensors          learned tensors (exit heads, policy statistics)

No pickles and no base-model weights. A folder is written next to its destination and
renamed into place, so a failed save leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..arch import ModelParts
from ..config import ShortcutConfig

HEADS_FILE = "heads.safetensors"
POLICY_FILE = "policy.safetensors"
REPLAY_LOG = "replay_log.json"
ADAPTER_DIR = "adapter"  # a peft (LoRA) adapter from ``shortcut-finetune --level layerskip``

FORMAT_VERSION = 1
MANIFEST = "shortcut.json"


class SkillsMismatchError(ValueError):
    """Skills were learned on a different base model than the one they are loaded onto."""


def fingerprint(model: nn.Module, parts: ModelParts) -> dict[str, Any]:
    """Identify the base model by shape and a hash of a sample of its weights.

    Weights are rounded to bfloat16 before hashing so the same checkpoint matches in
    float32, float16 and bfloat16.
    """
    cfg = model.config
    digest = hashlib.sha256()
    samples = [parts.unembed.weight] + [next(layer.parameters()) for layer in parts.layers]
    for tensor in samples:
        flat = tensor.detach().reshape(-1)[:4096].to("cpu", torch.bfloat16).float()
        digest.update(flat.numpy().tobytes())
    return {
        "model_type": parts.model_type,
        "num_layers": parts.num_layers,
        "hidden_size": getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "weights_sha256": digest.hexdigest(),
    }


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    if saved != current:
        diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
        raise SkillsMismatchError(
            f"the skills in {folder} were learned on another base model; differences "
            f"(saved, this model): {diff}"
        )


def write_atomically(folder: str | Path, fill: Callable[[Path], None], *, overwrite: bool = True,
                     checked: bool = False) -> Path:
    """Create ``folder`` by calling ``fill(tmp)`` on a sibling temporary folder, then
    renaming it into place. An existing folder is replaced only if it is a skills folder
    (has a manifest) and ``overwrite`` is true; anything else there is refused, unless
    the caller already ``checked`` that replacing it is what the user asked for."""
    folder = Path(folder)
    if folder.exists() and not checked:
        if not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder")
        if any(folder.iterdir()):
            if not (folder / MANIFEST).exists():
                raise FileExistsError(f"{folder} is not empty and is not a shortcut skills folder; refusing to overwrite it")
            if not overwrite:
                raise FileExistsError(f"{folder} already holds skills; pass overwrite=True to replace them")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        fill(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_manifest(folder: Path, fingerprint_: dict[str, Any], contents: dict[str, Any]) -> None:
    manifest = {"format_version": FORMAT_VERSION, "base_model": fingerprint_, "contents": contents}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a shortcut skills folder: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupted: {err}") from err
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this shortcut reads {FORMAT_VERSION}")
    return manifest


def merge_adapter(model: nn.Module, folder: Path) -> None:
    """Merge the peft adapter saved in ``folder`` into ``model``'s weights, in place
    (``requires_grad`` flags are kept as they were)."""
    from peft import PeftModel

    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a peft adapter folder: adapter_config.json is missing")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    for name, param in model.named_parameters():
        param.requires_grad_(flags.get(name, True))


def save_learned(folder: Path, learner: Any, fingerprint_: dict[str, Any]) -> dict[str, Any]:
    """Write observer, exit heads, policy and replay log (practised prompts and
    sequences) of ``learner`` into ``folder``."""
    from safetensors.torch import save_file

    from ..observe import save_observer

    observer = learner.observer
    rel = f"observers/layer_{observer.layer}"
    save_observer(observer.sae, folder / rel, layer=observer.layer, fingerprint=fingerprint_, quality=observer.quality)
    save_file({k: v.contiguous() for k, v in learner.heads.state_dict().items()}, str(folder / HEADS_FILE))
    save_file({k: v.contiguous() for k, v in learner.policy.state_dict().items()}, str(folder / POLICY_FILE))
    (folder / REPLAY_LOG).write_text(json.dumps({"prompts": learner.practised,
                                                  "sequences": learner.sequences.sequences}) + "\n")
    return {"observer": rel, "heads": HEADS_FILE, "policy": POLICY_FILE, "replay_log": REPLAY_LOG}


def load_config(folder: Path, manifest: dict[str, Any]) -> ShortcutConfig:
    """The :class:`ShortcutConfig` saved in a skills folder (defaults if it has none)."""
    path = folder / manifest.get("contents", {}).get("config", "config.json")
    return ShortcutConfig.load(path) if path.is_file() else ShortcutConfig()


def load_learned(folder: Path, manifest: dict[str, Any], parts: ModelParts, fingerprint_: dict[str, Any],
                 config: ShortcutConfig | None = None):
    """Read what :func:`save_learned` wrote; ``None`` when the folder holds config only.

    The policy's settings that are not learned tensors (its exit threshold) come from
    ``config``, by default the folder's own ``config.json``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..policy.heads import ExitHeads
    from ..observe import load_observer
    from ..policy.exits import ExitPolicy

    contents = manifest.get("contents", {})
    if "observer" not in contents:
        return None
    width = int(parts.unembed.weight.shape[1])
    observer = load_observer(folder / contents["observer"], d_model=width, n_layers=parts.num_layers,
                             expected_fingerprint=fingerprint_)
    try:
        heads_state = load_file(str(folder / contents["heads"]))
        policy_state = load_file(str(folder / contents["policy"]))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{folder}: cannot read learned tensors ({err})") from err
    heads = ExitHeads.from_state_dict(parts, heads_state)
    if config is None:
        config = load_config(folder, manifest)
    policy = ExitPolicy([int(x) for x in policy_state["exit_layers"].tolist()], observer.d_sae,
                        threshold=config.policy_threshold)
    policy.load_state_dict(policy_state)
    log_path = folder / contents.get("replay_log", REPLAY_LOG)
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    return observer, heads, policy, log.get("prompts", []), log.get("sequences", [])
