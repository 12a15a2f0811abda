"""Offline consolidation of practised skills ("sleep"): the ``shortcut-finetune`` command.

Practice re-fits the exit heads for a few hundred steps on whatever the position buffer
holds at that moment. Consolidation starts again from the prompt log of a skills folder
(the token ids of every practised prompt), rebuilds the experience by re-running the
full model on each prompt (greedy, the same number of new tokens as practice), and
trains much longer and more carefully. Two levels:

``heads`` (default)
    The base model is not touched. Hidden states at the exit layers and the final layer
    are collected for every practised position (and for any extra text, teacher-forced);
    the exit heads are re-fitted from the logit lens with a warm-up + cosine schedule,
    first on a training split with early stopping on a held-out split of the positions,
    then on all positions for the number of steps that worked best; the policy statistics are then
    re-learned from the new heads' outcomes (as ``Learner.consolidate`` does). Lossless
    decoding stays exactly lossless: only the drafts change.

``layerskip``
    A LoRA adapter (peft) on the attention (or MLP) projections is trained with the
    LayerSkip recipe (early-exit loss at the exit layers through the model's own final
    norm and unembedding, a rotational or gradual curriculum over the exits, layer
    dropout rising with depth; the final layer kept on the base model's distribution;
    see :mod:`shortcut.layerskip`) on the practised prompts
    with their greedy continuations plus any extra text; then the heads are consolidated
    on the adapted model as above. The adapter is saved in ``<output>/adapter/`` (peft
    ``save_pretrained``); ``shortcut.load(model, output)`` merges it into the model, so
    the wrapped model is the adapted one. The summary reports what the adapter costs:
    teacher-forced perplexity of base vs adapted model on held-out passages.

At both levels every re-generated prompt, with the continuation it was given here, joins
the practised sequences that lossless drafts recall (:mod:`shortcut.learn.sequences`), and
extra prompts join the practised prompts. After a LayerSkip adapter the practised
sequences are only these: the base model's outputs are no longer the wrapped model's.

Usage::

    shortcut-finetune skills/ -o consolidated/                          # heads
    shortcut-finetune skills/ -o adapted/ --level layerskip --extra more.jsonl
    shortcut-finetune skills/ -o consolidated/ --resume                 # after an interruption

The same command runs unchanged on several GPUs (re-generation and every training
batch are split across processes; checkpoints are written once)::

    accelerate launch --multi_gpu --num_processes 4 -m shortcut.finetune skills/ -o out/ --model <model>

Training state is checkpointed every ``--checkpoint-every`` steps into
``<output>/checkpoints/`` (accelerate ``save_state``); ``--resume`` continues from the
latest checkpoint and gives the same result as an uninterrupted run. The result is
built in a temporary folder next to ``<output>`` and renamed into place, so a failed
run leaves at most its checkpoints behind. The summary is printed and written to
``<output>/finetune_summary.json``.

Where things live: reading the skills folder and the greedy re-generation are in
:mod:`shortcut.finetune.regenerate`, the generic training plumbing (accelerate, checkpoints, the
training loop) in :mod:`shortcut.training`, the LoRA stage in :mod:`shortcut.layerskip`;
this module holds the run, the exit-head consolidation and the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ModelParts, resolve
from ..data import DEFAULT_PASSAGES, DataFileError, prompt_input_ids
from ..policy.fit import TranslatorFit, adam
from ..policy.heads import ExitHeads, collect_states
from ..skills import folder as skills
from .regenerate import Example, build_examples, read_extra, read_skills
from .training import Checkpoints, batch_indices, make_accelerator, train_loop

LEVELS = ("heads", "layerskip")
SUMMARY_FILE = "finetune_summary.json"
CHECKPOINTS = "checkpoints"
DEFAULT_QUALITY = DEFAULT_PASSAGES


@dataclass
class HeadsFitConfig:
    """The exit heads' re-fit (both levels).

    Attributes:
        steps: most optimiser steps (early stopping may end sooner).
        batch_size: re-generated positions per step (over all processes).
        lr: peak learning rate (relative step, see ``ExitHeads.fit``).
        warm_start: continue from the practised heads instead of refitting from the
            logit lens (then the held-out positions were seen in practice already, and
            the held-out figures are not independent).
        hard_weight: weight of the cross-entropy on the full model's token (0: pure KL).
        heldout: fraction of re-generated positions held out for early stopping (0: none).
        eval_every: steps between held-out evaluations.
        patience: evaluations without improvement before stopping.
    """

    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-2
    warm_start: bool = False
    hard_weight: float = 1.0
    heldout: float = 0.1
    eval_every: int = 100
    patience: int = 5

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout < 0.5:
            raise ValueError(f"heads.heldout={self.heldout} must be in [0, 0.5)")
        _at_least_one(self, "heads.", ("steps", "batch_size", "eval_every"))


@dataclass
class LayerSkipConfig:
    """The LoRA adapter that level ``layerskip`` trains, and LayerSkip's recipe for it.

    Attributes:
        steps, lr, batch_size, rank, alpha: the adapter's optimiser steps, learning
            rate, sequences per step, LoRA rank and LoRA alpha.
        targets: ``"attention"`` (q/k/v/o projections) or ``"mlp"``.
        final_target: what the final layer learns while the adapter trains: ``"base"``,
            the base model's own distribution (KL; the adapter then changes what the
            early exits read, not what the model says), or ``"tokens"``, the re-generated
            greedy tokens and extra text (cross-entropy, LayerSkip's recipe).
        exit_scale: LayerSkip's ``e_scale``, the weight of early-exit losses.
        curriculum: ``"rotational"`` (one early exit per step, in turn) or
            ``"gradual"`` (exits enabled from the deepest to the shallowest).
        layer_dropout: dropout rate of the last layer; shallower layers get less.
    """

    steps: int = 100
    lr: float = 2e-4
    batch_size: int = 4
    rank: int = 8
    alpha: int = 16
    targets: str = "attention"
    final_target: str = "base"
    exit_scale: float = 1.0
    curriculum: str = "rotational"
    layer_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.curriculum not in ("rotational", "gradual"):
            raise ValueError(f"layerskip.curriculum={self.curriculum!r} must be 'rotational' or 'gradual'")
        if self.targets not in ("attention", "mlp"):
            raise ValueError(f"layerskip.targets={self.targets!r} must be 'attention' or 'mlp'")
        if self.final_target not in ("base", "tokens"):
            raise ValueError(f"layerskip.final_target={self.final_target!r} must be 'base' or 'tokens'")
        _at_least_one(self, "layerskip.", ("steps", "batch_size", "rank"))


@dataclass
class FinetuneConfig:
    """Settings of one consolidation run (everything but ``checkpoint_every`` and
    ``keep_checkpoints`` defines the run: resuming needs the same values).

    Attributes:
        level: ``"heads"`` or ``"layerskip"`` (see the module doc).
        max_new_tokens: greedy continuation length per re-generated prompt (practice's).
        max_length: extra texts are cut to this many tokens.
        warmup: fraction of each training stage's steps with a linear warm-up; cosine
            decay after it (the heads' fit and the adapter's alike).
        seed: seeds splits, batch order and layer dropout.
        checkpoint_every: steps between checkpoints (0: none).
        keep_checkpoints: checkpoints kept per stage.
        heads: the exit heads' re-fit (:class:`HeadsFitConfig`).
        layerskip: the adapter of level ``layerskip`` (:class:`LayerSkipConfig`).
    """

    level: str = "heads"
    max_new_tokens: int = 64
    max_length: int = 512
    warmup: float = 0.05
    seed: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    heads: HeadsFitConfig = dataclasses.field(default_factory=HeadsFitConfig)
    layerskip: LayerSkipConfig = dataclasses.field(default_factory=LayerSkipConfig)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level={self.level!r} is not one of {LEVELS}")
        _at_least_one(self, "", ("max_new_tokens", "max_length"))

    def run_key(self) -> dict[str, Any]:
        """The settings that define the result (checkpoint frequency does not; nor do
        the adapter's at level ``heads``)."""
        key = dataclasses.asdict(self)
        for name in ("checkpoint_every", "keep_checkpoints"):
            key.pop(name)
        if self.level == "heads":
            key.pop("layerskip")
        return key


def _at_least_one(config: Any, prefix: str, names: Sequence[str]) -> None:
    bad = [prefix + name for name in names if getattr(config, name) < 1]
    if bad:
        raise ValueError(f"{', '.join(bad)} must be at least 1")


# -- the output folder ------------------------------------------------------------------
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _files_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and CHECKPOINTS not in p.relative_to(folder).parts):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _flatten(run: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"config": {"heads": {"lr": 1}}}`` as ``{"config.heads.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in run.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_output(output: Path, run: dict[str, Any], *, resume: bool, overwrite: bool) -> str:
    """What to do with ``output``: ``"fresh"``, ``"resume"`` or ``"done"`` (the same run
    finished there already). Refuses a folder holding another run unless ``overwrite``."""
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return "fresh"
    if not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a folder")
    previous = None
    for path in (output / CHECKPOINTS / "run.json", output / SUMMARY_FILE):
        if path.is_file():
            previous = json.loads(path.read_text()).get("run")
            break
    if previous is None and not (output / skills.MANIFEST).is_file():
        raise FileExistsError(
            f"{output} is not empty and is neither a skills folder nor a finetune run; refusing to touch it"
        )
    if overwrite:
        return "fresh"
    if previous is None:
        raise FileExistsError(f"{output} already holds skills; pass --overwrite to replace them")
    if not resume:
        raise FileExistsError(
            f"{output} already holds a finetune run; pass --resume to continue it or --overwrite to replace it"
        )
    if previous != run:
        flat = [_flatten(previous), _flatten(run)]
        diff = sorted(k for k in set(flat[0]) | set(flat[1]) if flat[0].get(k) != flat[1].get(k))
        raise ValueError(f"the run in {output} (checkpoints or result) comes from another configuration "
                         f"(differs in: {', '.join(diff)}); pass --overwrite to start again")
    return "done" if (output / SUMMARY_FILE).is_file() and not (output / CHECKPOINTS).exists() else "resume"


# -- what the exit heads see --------------------------------------------------------------
@torch.no_grad()
def collect(model: nn.Module, parts: ModelParts, examples: list[Example], layers: list[int],
            progress: bool = True) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """States at ``layers``, final-layer states and the full model's next tokens at every
    learned position of ``examples`` (one teacher-forced forward each)."""
    from tqdm.auto import tqdm

    states: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    finals, tokens = [], []
    for example in tqdm(examples, desc="collect states", disable=not progress, leave=False):
        s, f, t = collect_states(model, parts, torch.tensor(example.ids), layers)
        for layer in layers:
            states[layer].append(s[layer][example.start:])
        finals.append(f[example.start:])
        tokens.append(t[example.start:])
    return {layer: torch.cat(v) for layer, v in states.items()}, torch.cat(finals), torch.cat(tokens)


@torch.no_grad()
def agreement(heads: ExitHeads, states: dict[int, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """[N, n_exit] booleans: each exit head's shortlist prediction equals the full model's token."""
    return torch.stack([heads.predict(layer, states[layer]).token_ids == tokens for layer in heads.layers], dim=-1)


def oracle_exit_layer(agrees: torch.Tensor, exit_layers: Sequence[int], num_layers: int) -> torch.Tensor:
    """Per position, the shallowest exit layer whose head agrees with the full model
    (``num_layers`` where none does)."""
    layers = torch.tensor(list(exit_layers) + [num_layers], dtype=torch.float)
    padded = torch.cat([agrees.bool(), torch.ones(agrees.shape[0], 1, dtype=torch.bool, device=agrees.device)], dim=1)
    return layers[padded.float().argmax(dim=1).cpu()]


# -- exit heads -------------------------------------------------------------------------
def fit_heads(heads: ExitHeads, states: dict[int, torch.Tensor], final: torch.Tensor, tokens: torch.Tensor,
              cfg: FinetuneConfig, ckpt: Checkpoints, progress: bool) -> dict[str, Any]:
    """Re-fit ``heads`` on all positions: a select phase on a training split with early
    stopping on the held-out split, then a final phase on everything for the best
    number of steps. Returns what happened in both phases."""
    settings = cfg.heads
    n = int(tokens.shape[0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_held = int(n * settings.heldout) if n >= 20 else 0
    held, train = order[:n_held], order[n_held:]
    rows, bias = heads._shortlist_weights()

    def score(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, rows, bias)

    with torch.no_grad():
        normed = heads.final_norm(final)
        targets = torch.cat([score(c).float().log_softmax(-1) for c in normed.split(1024)])

    def run(stage: str, index: torch.Tensor, steps: int, evaluate: bool) -> tuple[dict[str, Any], TranslatorFit]:
        accelerator = make_accelerator()
        module = TranslatorFit(heads, states).to(accelerator.device)
        optimizer = adam(list(module.parameters()), lr=settings.lr)
        module, optimizer = accelerator.prepare(module, optimizer)

        def loss_fn(step: int) -> torch.Tensor:
            idx = index[batch_indices(len(index), step, settings.batch_size, cfg.seed, accelerator)].to(targets.device)
            batch = {layer: states[layer][idx] for layer in states}
            total, _ = module(batch, targets[idx], score, settings.hard_weight)
            return total

        def eval_fn() -> dict[str, Any]:
            inner = accelerator.unwrap_model(module)
            mine = held[accelerator.process_index::accelerator.num_processes].to(targets.device)
            sums = torch.zeros(2 * len(inner.layers) + 1, device=accelerator.device)
            with torch.no_grad():
                for idx in mine.split(1024):
                    batch = {layer: states[layer][idx] for layer in states}
                    _, losses = inner(batch, targets[idx], score, settings.hard_weight)
                    for j, layer in enumerate(inner.layers):
                        pred = heads.shortlist[inner.logits(layer, states[layer][idx], score).argmax(-1)]
                        sums[j] += losses[layer] * len(idx)
                        sums[len(inner.layers) + j] += (pred == tokens[idx]).sum()
                    sums[-1] += len(idx)
            sums = accelerator.reduce(sums, "sum")
            count = float(sums[-1].clamp_min(1))
            per_loss = {str(layer): float(sums[j]) / count for j, layer in enumerate(inner.layers)}
            return {"loss": sum(per_loss.values()), "per_layer_loss": per_loss,
                    "agreement": {str(layer): float(sums[len(inner.layers) + j]) / count
                                  for j, layer in enumerate(inner.layers)}}

        state = train_loop(stage, accelerator, optimizer, loss_fn, steps=steps, lr=settings.lr, warmup=cfg.warmup,
                           ckpt=ckpt, eval_fn=eval_fn if evaluate else None, eval_every=settings.eval_every,
                           patience=settings.patience, progress=progress)
        return state, accelerator.unwrap_model(module)

    model_params = [p for m in (heads.final_norm, heads.unembed) for p in m.parameters()]
    flags = [p.requires_grad for p in model_params]
    start = time.perf_counter()
    try:
        for p in model_params:
            p.requires_grad_(False)
        select = ckpt.result("heads-select")
        if select is None and n_held:
            state, _ = run("heads-select", train, settings.steps, evaluate=True)
            select = {"best_step": state["best_step"], "steps_run": state["step"], "evals": state["evals"]}
            ckpt.finish("heads-select", select)
        final_steps = max(1, select["best_step"]) if select else settings.steps
        state, module = run("heads-final", order, final_steps, evaluate=False)
        module.write_to(heads)
    finally:
        for p, flag in zip(model_params, flags):
            p.requires_grad_(flag)
    best = max(select["evals"], key=lambda e: -e["loss"]) if select else None
    return {
        "positions": n, "train_positions": n - n_held, "heldout_positions": n_held,
        "select_steps_run": select["steps_run"] if select else 0, "best_step": final_steps,
        "heldout_best": best, "final_steps": state["step"],
        "heldout_evals": [{k: e[k] for k in ("step", "loss", "agreement")} for e in select["evals"]] if select else [],
        "loss_first": state["losses"][0] if state["losses"] else None,
        "loss_last": state["losses"][-1] if state["losses"] else None,
        "losses": state["losses"], "seconds": time.perf_counter() - start,
    }


def relearn_policy(observer: Any, policy: Any, sig_states: torch.Tensor, agrees: torch.Tensor) -> None:
    """Forget the policy's statistics and learn them again from the new heads' outcomes
    on every re-generated position (delta rule + familiarity memory), as practice does."""
    from ..observe import Signature

    parts = [observer.encode(chunk) for chunk in sig_states.split(1024)]
    sig = Signature(torch.cat([s.indices for s in parts]).cpu(), torch.cat([s.values for s in parts]).cpu())
    policy.reset()
    policy.update(sig, agrees.cpu())
    policy.remember(sig)


def consolidate_heads(model: nn.Module, parts: ModelParts, learned: skills.Skills, examples: list[Example],
                      cfg: FinetuneConfig, ckpt: Checkpoints, progress: bool) -> dict[str, Any]:
    """Collect states over ``examples``, re-fit the heads, re-learn the policy (in place)."""
    observer, heads, policy = learned.observer, learned.heads, learned.policy
    sig_layer = observer.layer + 1
    layers = sorted(set(heads.layers) | {sig_layer})
    states, final, tokens = collect(model, parts, examples, layers, progress)
    if tokens.numel() == 0:
        raise ValueError("the re-generation gives no position to learn from (empty dataset)")
    before = agreement(heads, states, tokens)
    heads.grow_shortlist(tokens)
    if not cfg.heads.warm_start:  # refit from the logit lens: the held-out split stays unseen
        with torch.no_grad():
            for lin in heads.translators.values():
                lin.weight.zero_()
                lin.bias.zero_()
    fit = fit_heads(heads, {layer: states[layer] for layer in heads.layers}, final, tokens, cfg, ckpt, progress)
    after = agreement(heads, states, tokens)
    relearn_policy(observer, policy, states[sig_layer], after)
    exits = list(heads.layers)
    names = [str(e) for e in exits]
    return {
        "exit_layers": exits,
        "agreement_before": dict(zip(names, before.float().mean(0).tolist())),
        "agreement_after": dict(zip(names, after.float().mean(0).tolist())),
        "oracle_exit_layer_before": float(oracle_exit_layer(before, exits, parts.num_layers).mean()),
        "oracle_exit_layer_after": float(oracle_exit_layer(after, exits, parts.num_layers).mean()),
        "shortlist": int(heads.shortlist.numel()),
        "policy_memory": policy.memory_len,
        "fit": fit,
    }


# -- the run ----------------------------------------------------------------------------
def finetune(model: nn.Module, skills_folder: str | Path, output: str | Path, *, tokenizer: Any = None,
             extra: str | Path | Sequence[dict[str, Any]] | None = None, quality_texts: Sequence[str] | None = None,
             config: FinetuneConfig | None = None, resume: bool = False, overwrite: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Consolidate the skills in ``skills_folder`` for ``model`` into ``output``.

    Args:
        model: the base causal LM the skills were learned on (moved to the
            accelerator's device; its weights are never changed).
        skills_folder: a skills folder with a prompt log (``Shortcut.save_pretrained``).
        output: the new skills folder; ``output/checkpoints/`` holds checkpoints while
            the run is under way.
        tokenizer: needed for text in ``extra`` and for ``quality_texts``.
        extra: JSONL path or records: ``{"text"}`` passages (teacher-forced) or prompts.
        quality_texts: held-out passages for the layerskip perplexity report.
        config: the run's settings (:class:`FinetuneConfig`).
        resume: continue from the latest checkpoint in ``output`` (same settings only).
        overwrite: replace whatever run or skills ``output`` holds.
        progress: show progress bars.

    Returns:
        The summary (also written to ``output/finetune_summary.json``).

    Raises:
        FileNotFoundError: not a skills folder, or no prompt log.
        skills.SkillsMismatchError: skills of another base model.
        ValueError: nothing to learn from, checkpoints of another configuration, bad settings.
        FileExistsError: ``output`` holds another run (without ``overwrite``).
    """
    cfg = config or FinetuneConfig()
    skills_folder, output = Path(skills_folder), Path(output)
    start = time.perf_counter()
    manifest, prompts = read_skills(skills_folder)
    parts = resolve(model)
    fingerprint = skills.fingerprint(model, parts)
    skills.check_fingerprint(manifest["base_model"], fingerprint, skills_folder)
    records = read_extra(extra)
    if records and tokenizer is None:
        raise ValueError("extra text needs a tokenizer")
    limit = min(cfg.max_length, getattr(model.config, "max_position_embeddings", cfg.max_length) or cfg.max_length)
    extra_prompts = [prompt_input_ids(tokenizer, r)[0].tolist() for r in records if "text" not in r]
    texts = [ids for ids in (tokenizer(r["text"])["input_ids"][:limit] for r in records if "text" in r) if len(ids) > 1]
    if not prompts and not extra_prompts and not texts:
        raise ValueError(
            f"empty dataset: the prompt log of {skills_folder} lists no prompts and there is no extra text"
        )
    learned = skills.load_learned(skills_folder, manifest, parts, fingerprint)  # every file checked before any work
    assert learned is not None  # read_skills refused a folder without learned skills
    run = {"config": cfg.run_key(), "base_model": fingerprint, "skills": _files_digest(skills_folder),
           "extra": _digest([extra_prompts, texts])}
    accelerator = make_accelerator()
    action = check_output(output, run, resume=resume, overwrite=overwrite)
    if action == "done":
        return json.loads((output / SUMMARY_FILE).read_text())
    accelerator.wait_for_everyone()
    if action == "fresh" and accelerator.is_main_process:
        shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
    accelerator.wait_for_everyone()
    ckpt = Checkpoints(output / CHECKPOINTS, run, cfg.checkpoint_every, cfg.keep_checkpoints, accelerator)
    model.to(accelerator.device)
    # The log holds one entry per practised generate call; greedy re-generation of a repeat adds nothing.
    unique = [list(p) for p in dict.fromkeys(tuple(p) for p in prompts)]
    to_regenerate = unique + extra_prompts
    summary: dict[str, Any] = {"level": cfg.level, "skills": str(skills_folder), "output": str(output),
                               "prompt_log_entries": len(prompts), "regenerated_prompts": len(unique),
                               "extra_prompts": len(extra_prompts),
                               "extra_texts": len(texts), "config": dataclasses.asdict(cfg), "run": run}
    t = time.perf_counter()
    examples = build_examples(model, to_regenerate, texts, cfg.max_new_tokens, accelerator, ckpt, "regenerate",
                              progress)
    summary["regenerate_seconds"] = time.perf_counter() - t
    peft_model = None
    try:
        if cfg.level == "layerskip":
            from .layerskip import train_adapter

            peft_model, summary["layerskip"] = train_adapter(model, parts, learned.heads.layers, examples, cfg, ckpt,
                                                             tokenizer=tokenizer, quality_texts=quality_texts,
                                                             progress=progress)
            examples = build_examples(model, to_regenerate, texts, cfg.max_new_tokens, accelerator, ckpt,
                                      "regenerate-adapted", progress)
        summary["heads"] = consolidate_heads(model, parts, learned, examples, cfg, ckpt, progress)
        log = practised_log(learned, to_regenerate, examples, extra_prompts, adapted=peft_model is not None)
        summary["practised_sequences"] = len(log["sequences"])
        summary["seconds"] = time.perf_counter() - start
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_output(output, skills_folder, manifest, learned, log, summary, peft_model)
        accelerator.wait_for_everyone()
    finally:
        if peft_model is not None:
            from .layerskip import remove_adapter

            remove_adapter(peft_model)
    return summary


def practised_log(learned: skills.Skills, regenerated: list[list[int]], examples: list[Example],
                  extra_prompts: list[list[int]], adapted: bool) -> dict[str, list[list[int]]]:
    """The consolidated folder's prompt log. Its practised sequences (what lossless
    drafts recall, :mod:`shortcut.learn.sequences`) gain every re-generated prompt with the
    continuation the model gave it here, extra prompts included; after a LayerSkip
    adapter only those: the base model's outputs are no longer the wrapped model's.
    Extra prompts count as practised prompts from now on."""
    from ..learn.sequences import SequenceMemory

    memory = SequenceMemory()
    if not adapted:
        memory.extend(learned.sequences)
    memory.extend(example.ids for example in examples[:len(regenerated)])  # prompts first, texts after
    return {"prompts": [list(p) for p in learned.practised] + extra_prompts, "sequences": memory.sequences}


def write_output(output: Path, source: Path, manifest: dict[str, Any], learned: skills.Skills, log: dict[str, Any],
                 summary: dict[str, Any], peft_model: Any = None) -> None:
    """Write the consolidated skills folder atomically; finished checkpoints are dropped."""
    from safetensors.torch import save_file

    heads, policy = learned.heads, learned.policy
    contents = dict(manifest["contents"])
    brief = {k: summary[k] for k in ("level", "regenerated_prompts", "extra_prompts", "extra_texts", "seconds")}
    brief["heads"] = {k: v for k, v in summary["heads"].items() if k != "fit"}
    if "layerskip" in summary:
        brief["layerskip"] = {k: v for k, v in summary["layerskip"].items() if k != "losses"}

    def fill(tmp: Path) -> None:
        shutil.copytree(source / contents["observer"], tmp / contents["observer"])
        shutil.copy(source / "config.json", tmp / "config.json")
        (tmp / skills.PROMPT_LOG).write_text(json.dumps(log) + "\n")
        heads_state = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
        save_file(heads_state, str(tmp / skills.HEADS_FILE))
        save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, str(tmp / skills.POLICY_FILE))
        contents.update(heads=skills.HEADS_FILE, policy=skills.POLICY_FILE, replay_log=skills.PROMPT_LOG,
                        consolidation=brief)
        contents.pop("adapter", None)
        contents.pop("draft_odds", None)  # the shallow ones belong to the heads before: relearned
        if peft_model is not None:
            peft_model.save_pretrained(str(tmp / skills.ADAPTER_DIR))
            contents["adapter"] = skills.ADAPTER_DIR
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=float) + "\n")
        skills.write_manifest(tmp, manifest["base_model"], contents)

    # The output was checked before training (a folder of this run, or --overwrite); it
    # may hold this run's checkpoints, which go with it.
    skills.write_atomically(output, fill, checked=True)


# -- command line -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``shortcut-finetune`` argument parser (defaults from :class:`FinetuneConfig`)."""
    d = FinetuneConfig()
    h, ls = d.heads, d.layerskip
    from ..cli import Parser, integer, real

    p = Parser(prog="shortcut-finetune", description=__doc__.splitlines()[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("skills", help="skills folder with a prompt log (shortcut practice / save_pretrained)")
    p.add_argument("-o", "--output", required=True, help="the consolidated skills folder to write")
    p.add_argument("--model", default="smollm2", help="base model: alias, local folder, .gguf file or hub id")
    p.add_argument("--level", choices=LEVELS, default=d.level)
    p.add_argument("--extra", default=None, help="JSONL of extra {'text'} passages or {'prompt'} prompts")
    p.add_argument("--new-tokens", type=integer(1), default=d.max_new_tokens, help="greedy tokens per logged prompt")
    p.add_argument("--steps", type=integer(1), default=h.steps, help="most exit-head steps")
    p.add_argument("--batch-size", type=integer(1), default=h.batch_size)
    p.add_argument("--lr", type=real(0, include_low=False), default=h.lr)
    p.add_argument("--heldout", type=real(0, 0.5), default=h.heldout,
                   help="fraction of positions held out for early stopping")
    p.add_argument("--eval-every", type=integer(1), default=h.eval_every)
    p.add_argument("--patience", type=integer(0), default=h.patience)
    p.add_argument("--lora-steps", type=integer(1), default=ls.steps)
    p.add_argument("--lora-lr", type=real(0, include_low=False), default=ls.lr)
    p.add_argument("--lora-batch-size", type=integer(1), default=ls.batch_size)
    p.add_argument("--lora-rank", type=integer(1), default=ls.rank, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--lora-targets", choices=("attention", "mlp"), default=ls.targets)
    p.add_argument("--lora-final-target", choices=("base", "tokens"), default=ls.final_target,
                   help="final layer's target while the adapter trains: the base model's distribution (KL) "
                        "or the re-generated tokens (cross-entropy, LayerSkip's recipe)")
    p.add_argument("--exit-scale", type=real(0), default=ls.exit_scale)
    p.add_argument("--curriculum", choices=("rotational", "gradual"), default=ls.curriculum)
    p.add_argument("--layer-dropout", type=real(0, 1), default=ls.layer_dropout)
    p.add_argument("--quality", default=str(DEFAULT_QUALITY),
                   help="JSONL of {'text'} passages for the perplexity report")
    p.add_argument("--quality-split", default="heldout", help="split of --quality to use ('' for all records)")
    p.add_argument("--quality-passages", type=integer(1), default=70)
    p.add_argument("--checkpoint-every", type=integer(0), default=d.checkpoint_every)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a run or skills already in the output folder")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--summary", default=None, help="also write the summary JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    return p


def _config(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        level=args.level, max_new_tokens=args.new_tokens, seed=args.seed, checkpoint_every=args.checkpoint_every,
        heads=HeadsFitConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, heldout=args.heldout,
                             eval_every=args.eval_every, patience=args.patience),
        layerskip=LayerSkipConfig(steps=args.lora_steps, lr=args.lora_lr, batch_size=args.lora_batch_size,
                                  rank=args.lora_rank, alpha=2 * args.lora_rank, targets=args.lora_targets,
                                  final_target=args.lora_final_target, exit_scale=args.exit_scale,
                                  curriculum=args.curriculum, layer_dropout=args.layer_dropout))


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    h = summary["heads"]
    fit = h["fit"]
    exits = [str(e) for e in h["exit_layers"]]
    lines = [(f"level {summary['level']}: {summary['regenerated_prompts']} re-generated prompts "
              f"(of {summary['prompt_log_entries']} log entries), {summary['extra_prompts']} extra "
              f"prompts, {summary['extra_texts']} extra texts; {fit['positions']} positions "
              f"({fit['heldout_positions']} held out); re-generation {summary['regenerate_seconds']:.0f} s, "
              f"total {summary['seconds']:.0f} s"),
             f"{'exit layer':<22}" + "".join(f"{e:>8}" for e in exits),
             f"{'agreement before':<22}" + "".join(f"{100 * h['agreement_before'][e]:>7.1f}%" for e in exits),
             f"{'agreement after':<22}" + "".join(f"{100 * h['agreement_after'][e]:>7.1f}%" for e in exits)]
    if fit["heldout_best"]:
        best = fit["heldout_best"]["agreement"]
        lines.append(f"{'held-out (best step)':<22}" + "".join(f"{100 * best[e]:>7.1f}%" for e in exits))
    lines.append(f"oracle exit layer {h['oracle_exit_layer_before']:.2f} -> {h['oracle_exit_layer_after']:.2f}; heads "
                 f"{fit['select_steps_run']} select + {fit['final_steps']} final steps in {fit['seconds']:.0f} s; "
                 f"loss {fit['loss_first']:.4f} -> {fit['loss_last']:.4f}")
    if "practised_sequences" in summary:  # absent in summaries written before sequences were consolidated
        lines.append(f"practised sequences (recalled by lossless drafts): {summary['practised_sequences']}")
    if "layerskip" in summary:
        ls = summary["layerskip"]
        lines.append(f"layerskip: {ls['steps']} LoRA steps, objective {ls['objective_before']:.4f} -> "
                     f"{ls['objective_after']:.4f}")
        if ls.get("perplexity_base") is not None:
            lines.append(f"held-out perplexity base {ls['perplexity_base']:.3f}, "
                         f"adapted {ls['perplexity_adapted']:.3f} "
                         f"({100 * (ls['perplexity_adapted'] / ls['perplexity_base'] - 1):+.2f}%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The ``shortcut-finetune`` command; bad input exits with code 2 and one line.

    Options, files and the output path are checked before the model loads; prompt
    lengths against the model's context right after."""
    from ..cli import INPUT_ERRORS, check_output_folder, report_error
    from ..data import check_prompt, check_prompt_lengths, context_length, read_passages

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        cfg = _config(args)
        _, logged = read_skills(args.skills)  # cheap checks before the slow model load
        extra = read_extra(args.extra)
        for number, record in enumerate(extra, start=1):
            where = f"{args.extra}, record {number}"
            if "text" in record:
                if not isinstance(record["text"], str):
                    raise DataFileError(f"{where}: 'text' must be a string, got {type(record['text']).__name__}")
            else:
                check_prompt(record, where)
        output = check_output_folder(args.output, "-o/--output")
        if output.exists() and any(output.iterdir()) and not (args.resume or args.overwrite):
            check_output(output, {}, resume=False, overwrite=False)
        if args.summary:
            summary_path = Path(args.summary)
            if summary_path.is_dir():
                raise IsADirectoryError(f"--summary {summary_path} is a folder; give a file name")
            check_output_folder(summary_path, "--summary")
        quality = None
        if cfg.level == "layerskip" and args.quality:
            records = read_passages(args.quality)
            quality = [r["text"] for r in records if not args.quality_split or r.get("split") == args.quality_split]
            if not quality:
                raise DataFileError(f"{args.quality}: no records with split={args.quality_split!r} "
                                    "(--quality-split '' uses all)")
            quality = quality[:args.quality_passages]
        from ..models import load_model

        model, tokenizer = load_model(args.model)
        context = context_length(model, tokenizer)
        check_prompt_lengths(tokenizer, [r for r in extra if "text" not in r], max_new_tokens=cfg.max_new_tokens,
                             context=context, source=str(args.extra))
        longest = max((len(p) for p in logged), default=0)
        if context is not None and longest + cfg.max_new_tokens > context:
            room = (f"--new-tokens may be at most {context - longest}" if longest < context
                    else "it does not fit at all")
            raise ValueError(f"{args.skills}: a prompt in the prompt log has {longest} tokens and the model's context "
                             f"is {context} tokens, so {room} (got --new-tokens {cfg.max_new_tokens})")
        summary = finetune(model, args.skills, output, tokenizer=tokenizer, extra=extra, quality_texts=quality,
                           config=cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    except INPUT_ERRORS as err:
        return report_error("shortcut-finetune", err)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    print(format_summary(summary))
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(f"consolidated skills written to {output} (summary: {output / SUMMARY_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
