"""The experience ``shortcut-finetune`` learns from, rebuilt from a skills folder.

A skills folder's prompt log lists the token ids of every practised prompt. Each prompt
is re-generated with the full model (greedy, as ``model.generate`` does at batch 1) and
becomes an :class:`Example` learned from its last prompt token on; extra text is
teacher-forced and learned from everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..data import DataFileError, read_jsonl
from ..skills import folder as skills
from ..skills.validate import expect_object, inside, read_json
from .training import Checkpoints

if TYPE_CHECKING:
    from transformers import GenerationMixin


@dataclass
class Example:
    """One training sequence: token ids and the first position learned from (the last
    prompt token for a re-generated prompt, 0 for teacher-forced text)."""

    ids: list[int]
    start: int


def read_skills(folder: str | Path) -> tuple[dict[str, Any], list[list[int]]]:
    """The manifest and prompt log of a skills folder; errors name what is missing."""
    folder = Path(folder)
    manifest = skills.read_manifest(folder)
    contents = manifest.get("contents", {})
    if "observer" not in contents:
        raise ValueError(f"{folder} holds a config only (no observer, heads or policy): practise first")
    log = inside(folder, contents.get("replay_log", skills.PROMPT_LOG), "contents.replay_log")
    if not log.exists():
        raise FileNotFoundError(
            f"{folder} has no prompt log ({log.name}): consolidation re-generates the practised prompts it lists"
        )
    prompts = expect_object(read_json(log, "prompt log"), log, "the prompt log").get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p)
                                                for p in prompts):
        raise ValueError(f"{log}: 'prompts' must be a list of non-empty lists of token ids")
    return manifest, prompts


def read_extra(extra: str | Path | Sequence[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Extra records: ``{"text"}`` passages (teacher-forced) or ``{"prompt"}`` /
    ``{"messages"}`` prompts (re-generated with a greedy continuation)."""
    if extra is None:
        return []
    records = read_jsonl(extra) if isinstance(extra, (str, Path)) else list(extra)
    for number, record in enumerate(records, start=1):
        if not any(key in record for key in ("text", "prompt", "messages")):
            raise DataFileError(f"{extra}, record {number}: needs a 'text', 'prompt' or 'messages' key")
    return records



@torch.no_grad()
def greedy_continuations(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, accelerator: Any,
                         progress: bool = True) -> list[list[int]]:
    """Prompt + greedy continuation of each prompt (exactly as ``model.generate`` does
    it at batch 1), split across processes."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    mine = list(range(accelerator.process_index, len(prompts), accelerator.num_processes))
    done = []
    show = progress and accelerator.is_local_main_process
    generate = cast("GenerationMixin", model).generate
    for index in tqdm(mine, desc="regenerate (greedy)", disable=not show, leave=False):
        ids = torch.tensor([prompts[index]], device=accelerator.device)
        out = generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                       do_sample=False)
        done.append((index, out[0].tolist()))
    return [seq for _, seq in sorted(gather_object(done))]


def build_examples(model: nn.Module, prompts: list[list[int]], texts: list[list[int]], max_new_tokens: int,
                   accelerator: Any, ckpt: Checkpoints, name: str, progress: bool) -> list[Example]:
    """Re-generated prompts with their greedy continuations (cached in the checkpoints as
    ``name``), plus teacher-forced texts."""
    sequences = ckpt.data(name)
    if sequences is None:
        sequences = greedy_continuations(model, prompts, max_new_tokens, accelerator, progress)
        ckpt.save_data(name, sequences)
    examples = [Example(seq, len(prompt) - 1) for prompt, seq in zip(prompts, sequences)]
    return examples + [Example(ids, 0) for ids in texts]
