"""Fast mode: shallow paths commit, a bounded error rate is measured and kept.

Each decoding step runs the token through the layers up to the observer; the policy
reads its SAE signature and either picks an exit layer (a familiar situation) or the
full path. An exited token runs no deeper layer: its keys and values for the deeper
layers are propagated from the exit state (runtime.py), so later full-path tokens see
an aligned cache, and its next token comes from the exit head over the practised
shortlist. A seeded random ``audit_fraction`` of exited steps is redone on the full
path instead: the full path's token is the one kept, the comparison with the shallow
token is counted, the outcome trains the policy (the learner's hooks see a full
forward), and when the measured error rate exceeds ``target_error_rate`` the
familiarity bar is raised (lowered slowly again while the rate is under target).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .heads import ExitHeads
from .speculate import DraftStep, choose_next


class FastStep(DraftStep):
    """Like a draft step, but an unfamiliar token runs the full path, and every skipped
    layer gets propagated keys/values: the token is committed and later tokens attend
    to it in every layer."""

    def __init__(self, observer: Any, policy: Any) -> None:
        super().__init__(observer, policy)
        self.propagate_kv = True  # committed tokens need keys/values in every layer
        self.unfamiliar_runs_full = True


class FastController:
    """Holds fast mode's audit statistics and calibration across generate calls."""

    def __init__(self, policy: Any, *, target_error_rate: float, audit_fraction: float, seed: int) -> None:
        self.policy = policy
        self.target_error_rate = target_error_rate
        self.audit_fraction = audit_fraction
        self.generator = torch.Generator().manual_seed(seed)
        self.audits = 0
        self.errors = 0
        self.exits = 0
        self.full_steps = 0

    @property
    def error_rate(self) -> float:
        """Measured fraction of audited exits whose shallow token differed from the full path's."""
        return self.errors / self.audits if self.audits else 0.0

    def audit_now(self) -> bool:
        return bool(torch.rand((), generator=self.generator) < self.audit_fraction)

    def record_audit(self, agreed: bool) -> None:
        self.audits += 1
        self.errors += int(not agreed)
        if self.error_rate > self.target_error_rate:
            self.policy.min_familiarity = min(0.999, self.policy.min_familiarity + 0.005)
        elif agreed:
            self.policy.min_familiarity = max(0.5, self.policy.min_familiarity - 0.0005)

    def report(self) -> dict[str, float]:
        return {"exits": self.exits, "full_steps": self.full_steps, "audits": self.audits,
                "audit_errors": self.errors, "measured_error_rate": self.error_rate,
                "min_familiarity": self.policy.min_familiarity}


def make_fast_decoder(runtime: Any, step: FastStep, heads: ExitHeads, controller: FastController,
                      counters: dict[str, float]) -> Callable[..., torch.Tensor]:
    """The fast-mode decoding loop for ``generate(custom_generate=...)``."""

    @torch.no_grad()
    def fast_decode(model: nn.Module, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                    generation_config: Any, synced_gpus: bool = False, streamer: Any = None,
                    **model_kwargs: Any) -> torch.Tensor:
        base = getattr(model, model.base_model_prefix)
        cache = model_kwargs["cache"]
        cache.activate_past_recording()  # audits roll a token back
        outputs = model._prefill(input_ids, generation_config, model_kwargs)
        logits = outputs.logits[:, -1]
        vocab = logits.shape[-1]
        while True:
            input_ids, token, finished = choose_next(input_ids, logits, logits_processor, stopping_criteria,
                                                     bool(generation_config.do_sample), streamer)
            if finished:
                break
            length = cache.get_seq_length()  # every layer holds the same length in fast mode
            position = torch.tensor([[input_ids.shape[1] - 1]])
            previous, runtime.policy = runtime.policy, step
            try:
                hidden = base(input_ids=token, cache=cache, use_cache=True, position_ids=position).last_hidden_state
            finally:
                runtime.policy = previous
            counters["observer_encodes"] += 1
            if step.exit_layer is None:  # unfamiliar: the full path already ran
                controller.full_steps += 1
                logits = model.get_output_embeddings()(hidden[:, -1])
                continue
            shallow = heads.predict(step.exit_layer, step.exit_hidden[:, -1])
            counters["head_params"] += heads.head_cost(step.exit_layer)["shortlist"]
            if controller.audit_now():
                cache.crop(length - cache.get_seq_length())  # redo this token on the full path
                logits = model(input_ids=token, cache=cache, use_cache=True, position_ids=position).logits[:, -1]
                controller.record_audit(int(shallow.token_ids) == int(logits.argmax(-1)))
                continue
            controller.exits += 1
            counters[f"exit_{step.exit_layer}"] += 1
            logits = torch.full((1, vocab), float("-inf"))
            logits[:, heads.shortlist] = heads.shortlist_logits(step.exit_layer, step.exit_hidden[:, -1]).float()
        if streamer is not None:
            streamer.end()
        return input_ids

    return fast_decode
