"""LayerSkip-style LoRA training: ``shortcut-finetune --level layerskip``.

LayerSkip (Elhoushi et al., 2024) trains a model so that the states of its early layers
can be read out directly through the final norm and the unembedding. Here the base
weights stay frozen and a LoRA adapter (peft) on the attention or MLP projections of
every decoder layer learns it, with the recipe's three parts:

- early-exit loss: cross-entropy of ``unembed(final_norm(h_l))`` at the candidate exit
  layers, added to the final layer's loss with LayerSkip's weights
  ``e(l) = e_scale * sum_{i<=l} i`` (deeper exits weigh more; the last layer gets
  ``L - 1 + e_scale * sum_{i<=L-2} i``), normalised over the exits active in a step;
- a curriculum over the exits: ``rotational`` (one early exit per step, in turn) or
  ``gradual`` (the deepest exit first, shallower ones enabled as training proceeds);
- layer dropout whose rate rises with depth, ``p_l = p_max * (exp(l ln 2 / (L-1)) - 1)``
  (whole batches step over a dropped layer, through :class:`shortcut.decode.runtime.LayerRuntime`).

One departure, by default (``LayerSkipConfig(final_target="base")``): the final layer's term is the
KL divergence from the base model's own distribution (adapter off, every layer) instead
of the cross-entropy on the re-generated greedy tokens, which sharpens the model on its own
answers, and costs general quality (``docs/findings.md``).

Exit ``l`` means "after ``l`` layers" as everywhere in shortcut, i.e. LayerSkip's layer
``l - 1``. Training data: re-generated prompts with the model's greedy continuations (loss on
the continuation) and extra text (loss everywhere).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ModelParts
from ..capture import StateCapture
from ..decode.runtime import FixedPlan, LayerRuntime
from .training import batch_indices, make_accelerator, train_loop

ADAPTER_CHECKPOINT = "lora-adapter"


def lora_target_modules(parts: ModelParts, which: str) -> list[str]:
    """Module name suffixes (``self_attn.q_proj``, ...) of the linear projections of a
    decoder layer that lie inside its attention (``which="attention"``) or outside it
    (``"mlp"``); peft matches them in every layer."""
    from transformers.pytorch_utils import Conv1D

    attention = parts.spec.attention
    names = []
    for name, module in parts.layers[0].named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            inside = name.split(".")[0] == attention
            if inside == (which == "attention"):
                names.append(name)
    if not names:
        raise ValueError(f"no {which} projections found in the decoder layers of this {parts.model_type} model")
    return sorted(names)


def exit_weights(active: Sequence[int], num_layers: int, scale: float) -> dict[int, float]:
    """LayerSkip's normalised loss weights for the ``active`` exits plus the final layer."""
    def e(exit_layer: int) -> float:
        layer = exit_layer - 1  # LayerSkip numbers the layer whose output is read
        if exit_layer == num_layers:
            return layer + scale * (layer - 1) * layer / 2
        return scale * layer * (layer + 1) / 2

    raw = {layer: e(layer) for layer in [*active, num_layers]}
    total = sum(raw.values()) or 1.0
    return {layer: w / total for layer, w in raw.items()}


def active_exits(step: int, steps: int, exits: Sequence[int], curriculum: str) -> list[int]:
    """The early exits trained at ``step``."""
    exits = sorted(exits)
    if curriculum == "rotational":
        return [exits[step % len(exits)]]
    enabled = min(len(exits), 1 + step * len(exits) // max(1, steps))
    return exits[len(exits) - enabled:]


def dropout_rates(num_layers: int, p_max: float) -> list[float]:
    """Per-layer dropout rate rising from 0 (first layer) to ``p_max`` (last)."""
    if num_layers < 2:
        return [0.0] * num_layers
    return [p_max * (math.exp(i * math.log(2) / (num_layers - 1)) - 1) for i in range(num_layers)]


def make_batch(examples: Sequence[Any], index: Sequence[int],
               device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and next-token ``labels`` (-100
    where no loss is taken: before an example's ``start`` and at padding)."""
    seqs = [examples[i] for i in index]
    width = max(len(ex.ids) for ex in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, ex in enumerate(seqs):
        n = len(ex.ids)
        ids[row, :n] = torch.tensor(ex.ids)
        mask[row, :n] = 1
        labels[row, ex.start:n - 1] = ids[row, ex.start + 1:n]
    return ids.to(device), mask.to(device), labels.to(device)


@torch.no_grad()
def base_logits(peft_model: Any, batch: tuple) -> torch.Tensor:
    """The base model's logits on ``batch`` (adapter off; call with layer dropout off)."""
    ids, mask, _ = batch
    with peft_model.disable_adapter():
        return peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


def objective(model: nn.Module, parts: ModelParts, capture: StateCapture, batch: tuple, active: Sequence[int],
              scale: float, base: torch.Tensor | None = None) -> torch.Tensor:
    """The LayerSkip loss of one batch: weighted cross-entropy at the ``active`` early
    exits (read through the model's final norm and unembedding) and at the final layer;
    with ``base`` (the base model's logits on the batch) the final layer's term is the KL
    divergence from the base model's distribution instead, at the same positions."""
    ids, mask, labels = batch
    capture.states.clear()
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    weights = exit_weights(active, parts.num_layers, scale)
    flat = labels.reshape(-1)
    final = out.logits.float().reshape(flat.shape[0], -1)
    if base is None:
        final_loss = F.cross_entropy(final, flat, ignore_index=-100)
    else:
        keep = flat != -100
        final_loss = F.kl_div(final[keep].log_softmax(-1), base.reshape(flat.shape[0], -1)[keep].log_softmax(-1),
                              log_target=True, reduction="batchmean")
    loss = weights[parts.num_layers] * final_loss
    for layer in active:
        logits = parts.unembed(parts.final_norm(capture.states[layer])).float()
        loss = loss + weights[layer] * F.cross_entropy(logits.reshape(flat.shape[0], -1), flat, ignore_index=-100)
    return loss


@torch.no_grad()
def perplexity(model: nn.Module, sequences: Sequence[Sequence[int]], accelerator: Any) -> float:
    """Teacher-forced perplexity over ``sequences`` (token-weighted), split across processes."""
    sums = torch.zeros(2, device=accelerator.device)
    for ids in list(sequences)[accelerator.process_index::accelerator.num_processes]:
        x = torch.tensor([list(ids)], device=accelerator.device)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        sums[0] += F.cross_entropy(logits, x[0, 1:], reduction="sum")
        sums[1] += x.shape[1] - 1
    sums = accelerator.reduce(sums, "sum")
    return math.exp(float(sums[0] / sums[1].clamp_min(1)))


def remove_adapter(peft_model: Any) -> nn.Module:
    """Take the LoRA layers out again (the base weights were never changed) and restore
    the base model's ``requires_grad`` flags."""
    base = peft_model.unload()
    for name, param in base.named_parameters():
        param.requires_grad_(peft_model.shortcut_requires_grad.get(name, True))
    return base


def train_adapter(model: nn.Module, parts: ModelParts, exits: Sequence[int], examples: Sequence[Any], cfg: Any,
                  ckpt: Any, *, tokenizer: Any = None, quality_texts: Sequence[str] | None = None,
                  progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Inject a LoRA adapter into ``model`` (in place) and train it with the LayerSkip
    recipe. Returns the peft model (adapter active; :func:`remove_adapter` undoes it)
    and a summary with the objective before/after and the held-out perplexity of the
    base and the adapted model. A finished stage found in the checkpoints is reloaded."""
    from peft import LoraConfig, PeftModel, get_peft_model

    start = time.perf_counter()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    targets = lora_target_modules(parts, cfg.layerskip.targets)
    done = ckpt.result("lora")
    if done is not None:
        peft_model = PeftModel.from_pretrained(model, str(ckpt.folder / ADAPTER_CHECKPOINT))
        peft_model.shortcut_requires_grad = flags  # type: ignore[assignment]  # read back by remove_adapter
        return peft_model, done
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(model, LoraConfig(r=cfg.layerskip.rank, lora_alpha=cfg.layerskip.alpha,
                                                      lora_dropout=0.0, target_modules=targets))
    peft_model.shortcut_requires_grad = flags  # type: ignore[assignment]  # read back by remove_adapter
    accelerator = make_accelerator()
    device = accelerator.device
    probe = make_batch(examples, range(min(len(examples), 16)), device)
    rates = dropout_rates(parts.num_layers, cfg.layerskip.layer_dropout)
    runtime = LayerRuntime(model, parts)
    capture = StateCapture(parts, exits, keep=lambda t: t)  # with gradient: the early-exit loss trains through it
    try:
        runtime.install()
        anchored = cfg.layerskip.final_target == "base"
        probe_base = base_logits(peft_model, probe) if anchored else None
        with torch.no_grad():
            before = float(objective(peft_model, parts, capture, probe, exits, cfg.layerskip.exit_scale, probe_base))
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.layerskip.lr, weight_decay=0.0)
        prepared, optimizer = accelerator.prepare(peft_model, optimizer)

        def loss_fn(step: int) -> torch.Tensor:
            index = batch_indices(len(examples), step, cfg.layerskip.batch_size, cfg.seed, accelerator).tolist()
            batch = make_batch(examples, index, device)
            base = base_logits(peft_model, batch) if anchored else None  # every layer, adapter off
            draw = torch.rand(parts.num_layers, generator=torch.Generator().manual_seed(cfg.seed * 7919 + step))
            skip = frozenset(i for i, p in enumerate(rates) if float(draw[i]) < p)
            runtime.policy = FixedPlan(skip=skip, propagate_kv=False) if skip else None
            try:
                active = active_exits(step, cfg.layerskip.steps, exits, cfg.layerskip.curriculum)
                return objective(prepared, parts, capture, batch, active, cfg.layerskip.exit_scale, base)
            finally:
                runtime.policy = None

        state = train_loop("lora", accelerator, optimizer, loss_fn, steps=cfg.layerskip.steps, lr=cfg.layerskip.lr,
                           warmup=cfg.warmup, ckpt=ckpt, progress=progress)
        with torch.no_grad():
            after = float(objective(peft_model, parts, capture, probe, exits, cfg.layerskip.exit_scale, probe_base))
    except BaseException:
        remove_adapter(peft_model)
        raise
    finally:
        capture.remove()
        runtime.uninstall()
    summary: dict[str, Any] = {
        "steps": state["step"], "targets": targets, "rank": cfg.layerskip.rank,
        "trainable_parameters": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "objective_before": before, "objective_after": after, "losses": state["losses"],
        "perplexity_base": None, "perplexity_adapted": None, "quality_texts": 0,
    }
    if quality_texts and tokenizer is not None:
        limit = min(cfg.max_length, getattr(model.config, "max_position_embeddings", cfg.max_length) or cfg.max_length)
        seqs = [ids for ids in (tokenizer(t)["input_ids"][:limit] for t in quality_texts) if len(ids) > 1]
        with peft_model.disable_adapter():
            summary["perplexity_base"] = perplexity(model, seqs, accelerator)
        summary["perplexity_adapted"] = perplexity(model, seqs, accelerator)
        summary["quality_texts"] = len(seqs)
    summary["seconds"] = time.perf_counter() - start
    if ckpt.every and accelerator.is_main_process:
        ckpt.ready()
        peft_model.save_pretrained(str(ckpt.folder / ADAPTER_CHECKPOINT))
    ckpt.finish("lora", summary)
    return peft_model, summary

