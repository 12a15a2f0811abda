"""Skill folders: everything a wrapped model learned, as safetensors + json.

Layout::

    skills/
      shortcut.json          format version, base-model fingerprint, what is inside
      config.json            the ShortcutConfig
      observers/layer_N/     one sae-lens SAE folder per observed layer
      *.safetensors          learned tensors (exit heads, policy statistics; before an
                             observer exists, the residuals collected to train one)
      replay_log.json        practised prompts and sequences (token ids)
      draft_odds.json        draft chances learned from verification outcomes

No pickles and no base-model weights. Folders are written with
:func:`shortcut.atomic.replace_folder`: a failed or killed save leaves the old folder or
the new one complete, never a mix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import ModelParts
from ..atomic import recover, replace_folder
from ..config import ShortcutConfig
from .validate import (
    SkillsFileError,
    check_adapter,
    check_heads,
    check_policy,
    expect_object,
    inside,
    read_json,
    read_tensors,
    regular_file,
    token_lists,
)
from .validate import tensor as checked_tensor

HEADS_FILE = "heads.safetensors"
POLICY_FILE = "policy.safetensors"
PROMPT_LOG = "replay_log.json"
DRAFT_ODDS = "draft_odds.json"  # learned chances of drafts, per situation
OBSERVER_BUFFER = "observer_buffer.safetensors"  # residuals an auto observer collected, not yet trained on
ADAPTER_DIR = "adapter"  # a peft (LoRA) adapter from ``shortcut-finetune --level layerskip``

FORMAT_VERSION = 1
MANIFEST = "shortcut.json"
# Manifest entries that name a file or folder inside the skills folder.
PATH_FIELDS = ("config", "observer", "heads", "policy", "replay_log", "adapter", "observer_buffer", "draft_odds")


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
    """Raise :class:`SkillsMismatchError` naming the differences if the fingerprints differ."""
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
    recover(folder)
    if folder.exists() and not checked:
        if not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder")
        if any(folder.iterdir()):
            if not (folder / MANIFEST).exists():
                raise FileExistsError(
                    f"{folder} is not empty and is not a shortcut skills folder; refusing to overwrite it"
                )
            if not overwrite:
                raise FileExistsError(f"{folder} already holds skills; pass overwrite=True to replace them")
    return replace_folder(folder, fill)


def write_manifest(folder: Path, fingerprint_: dict[str, Any], contents: dict[str, Any]) -> None:
    """Write the folder's ``manifest.json``: format version, base model fingerprint, contents."""
    manifest = {"format_version": FORMAT_VERSION, "base_model": fingerprint_, "contents": contents}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The folder's manifest, checked: a json object with this format version, a
    ``base_model`` fingerprint object and ``contents`` naming files inside the folder."""
    folder = Path(folder)
    recover(folder)  # an interrupted save leaves the old folder complete beside this name
    path = folder / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a shortcut skills folder: {MANIFEST} is missing")
    try:
        manifest = expect_object(read_json(path, "manifest"), path, "the manifest")
    except SkillsFileError as err:
        raise SkillsFileError(f"{err} (the manifest is corrupted)") from err
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise SkillsFileError(f"{path}: format_version {version!r}; this shortcut reads {FORMAT_VERSION}")
    expect_object(manifest.get("base_model"), path, "field 'base_model'")
    contents = expect_object(manifest.get("contents", {}), path, "field 'contents'")
    for key in PATH_FIELDS:
        if key in contents:
            inside(folder, contents[key], f"contents.{key}")
    return manifest


def merge_adapter(model: nn.Module, folder: Path) -> None:
    """Merge the peft adapter saved in ``folder`` into ``model``'s weights, in place
    (``requires_grad`` flags are kept as they were). The adapter is checked against the
    model first (:func:`validate.check_adapter`), so a bad one leaves the model as it was."""
    from peft import PeftModel

    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"{folder} is not a peft adapter folder: adapter_config.json is missing")
    check_adapter(folder, model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    for name, param in model.named_parameters():
        param.requires_grad_(flags.get(name, True))


def save_learned(folder: Path, learner: Any, fingerprint_: dict[str, Any]) -> dict[str, Any]:
    """Write observer, exit heads, policy and prompt log (practised prompts and
    sequences) of ``learner`` into ``folder``."""
    from safetensors.torch import save_file

    from ..observe import save_observer

    observer = learner.observer
    rel = f"observers/layer_{observer.layer}"
    save_observer(observer.sae, folder / rel, layer=observer.layer, fingerprint=fingerprint_, quality=observer.quality)
    save_file({k: v.contiguous() for k, v in learner.heads.state_dict().items()}, str(folder / HEADS_FILE))
    save_file({k: v.contiguous() for k, v in learner.policy.state_dict().items()}, str(folder / POLICY_FILE))
    return {"observer": rel, "heads": HEADS_FILE, "policy": POLICY_FILE, **save_prompt_log(folder, learner.experience)}


def save_prompt_log(folder: Path, experience: Any) -> dict[str, Any]:
    """Write the prompt log (practised prompts) and practised sequences of
    ``experience`` (:class:`shortcut.learn.practice.Experience`) into ``folder``; all a
    handle without an observer has learned."""
    (folder / PROMPT_LOG).write_text(json.dumps({"prompts": experience.practised,
                                                  "sequences": experience.sequences.sequences}) + "\n")
    return {"replay_log": PROMPT_LOG}


def load_prompt_log(folder: Path, manifest: dict[str, Any],
                    vocab_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """The practised prompts and sequences :func:`save_prompt_log` wrote, checked
    (token ids below ``vocab_size``); empty lists when the folder has no prompt log."""
    contents = manifest.get("contents", {})
    log_path = inside(folder, contents.get("replay_log", PROMPT_LOG), "contents.replay_log")
    log = expect_object(read_json(log_path, "prompt log"), log_path, "the prompt log") if log_path.exists() else {}
    practised = token_lists(log.get("prompts", []), vocab_size, log_path, "field 'prompts'")
    sequences = token_lists(log.get("sequences", []), vocab_size, log_path, "field 'sequences'")
    return practised, sequences


def save_draft_odds(folder: Path, lengths: Any, odds: Any = None) -> dict[str, Any]:
    """Write what verification taught about drafts: the lookup drafts' continuation
    counts (a :class:`~shortcut.decode.draft_length.DraftLengths`) and, when given, the
    shallow drafts' (a :class:`~shortcut.decode.draft_length.ShallowOdds`, which belong
    to the exit heads saved beside them). Nothing is written before anything was learned."""
    data = {"lookup": lengths.to_dict(), "shallow": odds.to_dict() if odds is not None else {}}
    if not data["lookup"] and not data["shallow"]:
        return {}
    (folder / DRAFT_ODDS).write_text(json.dumps(data) + "\n")
    return {"draft_odds": DRAFT_ODDS}


def load_draft_odds(folder: Path, manifest: dict[str, Any], lengths: Any, odds: Any, num_layers: int) -> None:
    """Fill ``lengths`` (and ``odds`` unless ``None``) from what :func:`save_draft_odds`
    wrote, checked; nothing when the folder has none (an older folder, a merge or a
    consolidation: the chances start again from their priors)."""
    name = manifest.get("contents", {}).get("draft_odds")
    if name is None:
        return
    path = inside(folder, name, "contents.draft_odds")
    data = expect_object(read_json(path, "draft odds"), path, "the draft odds")
    try:
        lengths.load_dict(data.get("lookup", {}))
    except ValueError as err:
        raise SkillsFileError(f"{path}: field 'lookup': {err}") from err
    if odds is not None:
        try:
            odds.load_dict(data.get("shallow", {}), num_layers)
        except ValueError as err:
            raise SkillsFileError(f"{path}: field 'shallow': {err}") from err


def save_observer_buffer(folder: Path, residuals: torch.Tensor, layer: int) -> dict[str, Any]:
    """Write the residuals an :class:`~shortcut.observe.auto.AutoObserver` collected at
    decoder layer ``layer`` (``[n, width]``, float16) into ``folder``."""
    from safetensors.torch import save_file

    save_file({"residuals": residuals.to(torch.float16).contiguous(), "layer": torch.tensor([layer])},
              str(folder / OBSERVER_BUFFER))
    return {"observer_buffer": OBSERVER_BUFFER}


def load_observer_buffer(folder: Path, manifest: dict[str, Any], *, width: int, layer: int) -> torch.Tensor | None:
    """The residuals :func:`save_observer_buffer` wrote, checked: float16 ``[n, width]``,
    finite, collected at ``layer`` (the config's observer layer); ``None`` when the
    folder has none."""
    relative = manifest.get("contents", {}).get("observer_buffer")
    if relative is None:
        return None
    path = inside(folder, relative, "contents.observer_buffer")
    state = read_tensors(path, "observer buffer")
    saved_layer = checked_tensor(state, "layer", path, shape=(1,), floating=False)
    if int(saved_layer[0]) != layer:
        raise SkillsFileError(f"{path}: residuals collected at layer {int(saved_layer[0])}, but the config's "
                              f"observer layer is {layer}")
    residuals = checked_tensor(state, "residuals", path, shape=(None, width), floating=True)
    if residuals.dtype != torch.float16:
        raise SkillsFileError(f"{path}: field 'residuals' must be float16, got {residuals.dtype}")
    return residuals


@dataclass
class Skills:
    """What a skills folder holds besides its config, checked and built, attached to
    no model yet."""

    observer: Any
    heads: Any
    policy: Any
    practised: list[list[int]] = field(default_factory=list)  # the prompt log's prompts
    sequences: list[list[int]] = field(default_factory=list)  # practised sequences


def load_config(folder: Path, manifest: dict[str, Any]) -> ShortcutConfig:
    """The :class:`ShortcutConfig` saved in a skills folder (defaults if it has none)."""
    relative = manifest.get("contents", {}).get("config", "config.json")
    path = inside(folder, relative, "contents.config")
    if not path.exists():
        return ShortcutConfig()
    data = expect_object(read_json(path, "config"), path, "the config")
    try:
        return ShortcutConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise SkillsFileError(f"{path}: {err}") from err


def load_learned(folder: Path, manifest: dict[str, Any], parts: ModelParts, fingerprint_: dict[str, Any],
                 config: ShortcutConfig | None = None) -> Skills | None:
    """Read and check what :func:`save_learned` wrote; ``None`` when the folder holds no
    observer (config, perhaps a prompt log: :func:`load_prompt_log` reads that). Every
    file is validated against ``parts`` (widths, depth, vocabulary) before anything is
    built from it.

    The policy's settings that are not learned tensors (its exit threshold) come from
    ``config``, by default the folder's own ``config.json``."""
    from safetensors import SafetensorError

    from ..observe import load_observer
    from ..policy.exits import ExitPolicy
    from ..policy.heads import ExitHeads

    contents = manifest.get("contents", {})
    if "observer" not in contents:
        return None
    width = int(parts.unembed.weight.shape[1])
    vocab_size = int(parts.unembed.weight.shape[0])
    observer_dir = inside(folder, contents["observer"], "contents.observer")
    for name in ("cfg.json", "sae_weights.safetensors", "shortcut_observer.json"):
        regular_file(observer_dir / name, f"observer file {name}")
    try:
        observer = load_observer(observer_dir, d_model=width, n_layers=parts.num_layers,
                                 expected_fingerprint=fingerprint_)
    except SkillsMismatchError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as err:
        raise SkillsFileError(f"{observer_dir}: the observer is malformed ({type(err).__name__}: {err})") from err
    heads_path = inside(folder, contents.get("heads", HEADS_FILE), "contents.heads")
    heads_state = read_tensors(heads_path, "exit heads")
    check_heads(heads_state, heads_path, width=width, vocab_size=vocab_size, num_layers=parts.num_layers)
    policy_path = inside(folder, contents.get("policy", POLICY_FILE), "contents.policy")
    policy_state = read_tensors(policy_path, "policy")
    layers = check_policy(policy_state, policy_path, d_sae=observer.d_sae, num_layers=parts.num_layers)
    heads = ExitHeads.from_state_dict(parts, heads_state)
    if sorted(heads.layers) != layers:
        raise SkillsFileError(
            f"{heads_path}: heads at layers {list(heads.layers)} but the policy decides over {layers}"
        )
    if config is None:
        config = load_config(folder, manifest)
    policy = ExitPolicy(layers, observer.d_sae, threshold=config.learning.policy_threshold)
    policy.load_state_dict(policy_state)
    practised, sequences = load_prompt_log(folder, manifest, vocab_size)
    return Skills(observer, heads, policy, practised, sequences)
