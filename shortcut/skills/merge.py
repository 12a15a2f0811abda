"""``shortcut merge``: several workers' practice on one base model, added up.

Policies merge by evidence (see ExitPolicy.merge); exit-head translators are averaged,
weighted by the tokens each worker practised; shortlists and prompt logs (prompts and
practised sequences) are united. Draft chances (``draft_odds.json``) are left out: the
shallow ones belong to each folder's own heads, and all of them are relearned within a
few calls from their priors.
All inputs must share the base model and the very same observer (identical SAE
weights): signatures of different SAEs do not mean the same thing. Folders holding a
LoRA adapter (``shortcut-finetune --level layerskip``) are refused: their heads and
policy belong to the adapted model, and adapters do not average; merge the practised
folders first, then consolidate the merged one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..learn.sequences import SequenceMemory
from ..policy.exits import ExitPolicy
from .folder import HEADS_FILE, MANIFEST, POLICY_FILE, PROMPT_LOG, read_manifest, write_atomically, write_manifest
from .validate import (
    base_sizes,
    check_heads,
    check_policy,
    expect_object,
    inside,
    read_json,
    read_tensors,
    sae_width,
    token_lists,
)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def merge_skills(folders: list[Path], output: Path, *, overwrite: bool = False) -> Path:
    """Merge the skills ``folders`` into ``output`` (written atomically).

    Raises:
        ValueError: fewer than two folders, another base model or observer, a folder
            without learned skills, or a folder holding a LoRA adapter.
    """
    if len(folders) < 2:
        raise ValueError(f"merge needs at least two skills folders, got {len(folders)}")
    manifests = [read_manifest(f) for f in folders]
    for folder, manifest in zip(folders, manifests):
        adapter = manifest.get("contents", {}).get("adapter")
        if adapter:
            raise ValueError(
                f"{folder} holds a LoRA adapter ({adapter}/, from shortcut-finetune --level layerskip): "
                "its heads and policy belong to the adapted model, and adapters cannot be merged by averaging; "
                "merge the practised folders (before consolidation) and run shortcut-finetune on the result")
    base = manifests[0]["base_model"]
    for folder, manifest in zip(folders[1:], manifests[1:]):
        if manifest["base_model"] != base:
            raise ValueError(f"{folder} was learned on another base model than {folders[0]}")
    if any("observer" not in m.get("contents", {}) for m in manifests):
        raise ValueError("every folder to merge must hold learned skills (an observer, heads and a policy)")
    observer_rel = manifests[0]["contents"]["observer"]
    weights = [f / m["contents"]["observer"] / "sae_weights.safetensors" for f, m in zip(folders, manifests)]
    if len({_digest(w) for w in weights}) != 1:
        raise ValueError("the folders use different observers (SAE weights differ): their signatures do not mix")

    policies, heads_states, practised, sequences = [], [], [], SequenceMemory()  # it drops duplicates
    sizes = base_sizes(base, folders[0] / MANIFEST)
    for folder, manifest in zip(folders, manifests):
        contents = manifest["contents"]
        d_sae = sae_width(inside(folder, contents["observer"], "contents.observer"))
        policy_path = inside(folder, contents.get("policy", POLICY_FILE), "contents.policy")
        state = read_tensors(policy_path, "policy")
        layers = check_policy(state, policy_path, d_sae=d_sae, num_layers=sizes["num_layers"])
        policy = ExitPolicy(layers, d_sae)
        policy.load_state_dict(state)
        policies.append(policy)
        heads_path = inside(folder, contents.get("heads", HEADS_FILE), "contents.heads")
        heads_state = read_tensors(heads_path, "exit heads")
        check_heads(heads_state, heads_path, width=sizes["hidden_size"], vocab_size=sizes["vocab_size"],
                    num_layers=sizes["num_layers"])
        heads_states.append(heads_state)
        log_path = inside(folder, contents.get("replay_log", PROMPT_LOG), "contents.replay_log")
        log = expect_object(read_json(log_path, "prompt log"), log_path, "the prompt log") if log_path.exists() else {}
        practised.extend(token_lists(log.get("prompts", []), sizes["vocab_size"], log_path, "field 'prompts'"))
        sequences.extend(token_lists(log.get("sequences", []), sizes["vocab_size"], log_path, "field 'sequences'"))
    tokens = torch.tensor([float(p.trials.max()) for p in policies])
    share = tokens / tokens.sum() if tokens.sum() > 0 else torch.full_like(tokens, 1 / len(tokens))
    merged_heads = {}
    for key in heads_states[0]:
        if key == "shortlist":
            merged_heads[key] = torch.unique(torch.cat([s[key] for s in heads_states]))
        else:
            if any(key not in s or s[key].shape != heads_states[0][key].shape for s in heads_states):
                raise ValueError(f"exit heads differ in shape at {key}; were the exit layers the same?")
            merged_heads[key] = sum(w * s[key] for w, s in zip(share.tolist(), heads_states))
    merged_policy = policies[0]
    for other in policies[1:]:
        merged_policy.merge(other)

    def fill(tmp: Path) -> None:
        shutil.copytree(folders[0] / observer_rel, tmp / observer_rel)
        shutil.copy(folders[0] / "config.json", tmp / "config.json")
        save_file({k: v.contiguous() for k, v in merged_heads.items()}, str(tmp / HEADS_FILE))
        save_file({k: v.contiguous() for k, v in merged_policy.state_dict().items()}, str(tmp / POLICY_FILE))
        (tmp / PROMPT_LOG).write_text(json.dumps({"prompts": practised, "sequences": sequences.sequences}) + "\n")
        # Draft chances are left out: the shallow ones belong to each folder's heads.
        contents = {k: v for k, v in manifests[0]["contents"].items() if k != "draft_odds"}
        write_manifest(tmp, base, dict(contents, merged_from=[str(f) for f in folders]))

    return write_atomically(output, fill, overwrite=overwrite)
