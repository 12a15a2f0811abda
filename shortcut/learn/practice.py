"""Learning while used: every full-path forward is a lesson.

Hooks record, during each full forward of batch size 1, the residual stream at the
observer layer and at every candidate exit layer, and the full model's next token at
each position. From that the learner

1. reads the SAE signature of every position,
2. asks each exit head what it would have said and compares with the full model,
3. moves the exit policy by its local delta rule (see policy.py),
4. grows the exit heads' vocabulary shortlist and fills the position buffer.

``consolidate()`` re-fits the exit heads on every buffered position and re-learns the
policy from the new heads' outcomes there. It runs after
each practice round and whenever enough new tokens have arrived.

Layer numbering follows heads.py: a state "at layer l" is the input of decoder layer
``l`` (``l`` layers have run); ``num_layers`` is the last layer's output.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..arch import ModelParts
from ..capture import StateCapture
from ..observe import Observer, Signature
from ..policy.exits import ExitPolicy
from ..policy.heads import ExitHeads
from .sequences import SequenceMemory

logger = logging.getLogger(__name__)


class PositionBuffer:
    """Bounded store of practised positions (oldest dropped first), float16 states."""

    def __init__(self, exit_layers: list[int], capacity: int = 16384) -> None:
        self.exit_layers = list(exit_layers)
        self.capacity = capacity
        self._chunks: list[dict[str, Any]] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, states: dict[int, torch.Tensor], final: torch.Tensor, sig: Signature, tokens: torch.Tensor) -> None:
        """Store one forward's positions, dropping the oldest chunks beyond ``capacity``."""
        chunk = {
            "states": {l: states[l].detach().to(torch.float16) for l in self.exit_layers},
            "final": final.detach().to(torch.float16),
            "indices": sig.indices.detach(),
            "values": sig.values.detach().to(torch.float16),
            "tokens": tokens.detach(),
        }
        self._chunks.append(chunk)
        self._size += int(tokens.shape[0])
        while self._size - int(self._chunks[0]["tokens"].shape[0]) >= self.capacity:
            self._size -= int(self._chunks.pop(0)["tokens"].shape[0])

    def tensors(self) -> tuple[dict[int, torch.Tensor], torch.Tensor, Signature, torch.Tensor]:
        """Everything stored, concatenated: states (float32), final, signatures, tokens."""
        if not self._chunks:
            raise ValueError("the position buffer is empty: practise first")
        states = {l: torch.cat([c["states"][l] for c in self._chunks]).float() for l in self.exit_layers}
        final = torch.cat([c["final"] for c in self._chunks]).float()
        sig = Signature(torch.cat([c["indices"] for c in self._chunks]),
                        torch.cat([c["values"] for c in self._chunks]).float())
        tokens = torch.cat([c["tokens"] for c in self._chunks])
        return states, final, sig, tokens


class Experience:
    """What a wrapped model practised, with or without an observer: the prompt log
    (token ids of the prompt of every generate call made while learning; a prompt
    practised in 3 rounds is there 3 times) and the practised sequences (prompt and
    output of every plain greedy lossless call, which lossless drafts recall).

    The handle owns it from ``wrap()`` on; a :class:`Learner` attached later shares it,
    so what was practised before the observer came is kept.
    """

    def __init__(self, log_capacity: int = 10_000) -> None:
        # The latest ``log_capacity`` prompts (oldest dropped).
        self.practised: list[list[int]] = []
        self.log_capacity = log_capacity
        self.sequences = SequenceMemory()
        # How many log entries the exit heads had been fitted on at their latest
        # consolidation (0 without heads: no prompt counts as practised for fast mode).
        self.fitted_log = 0
        self._practised_keys: set[tuple[int, ...]] = set()  # the log's first _keyed entries, as a set
        self._keyed = 0

    def log_prompt(self, prompt: list[int]) -> None:
        """Add a generate call's prompt to the prompt log, forgetting the oldest entries
        beyond ``log_capacity`` (the log then stays bounded however long the handle runs)."""
        self.practised.append(prompt)
        excess = len(self.practised) - self.log_capacity
        if excess > 0:
            del self.practised[:excess]
            self.fitted_log = max(0, self.fitted_log - excess)
            self._practised_keys, self._keyed = set(), 0  # rebuilt from the log on the next ask

    def was_practised(self, prompt: list[int]) -> bool:
        """Whether a generate call with exactly this prompt (token ids) is in the prompt
        log, and was already there when the heads were last re-fitted."""
        fitted = min(self.fitted_log, len(self.practised))
        if self._keyed > fitted:  # the log was replaced or cut: start again
            self._practised_keys, self._keyed = set(), 0
        self._practised_keys.update(tuple(ids) for ids in self.practised[self._keyed:fitted])
        self._keyed = fitted
        return tuple(prompt) in self._practised_keys


@dataclass
class LearnStats:
    """What practice cost and saw."""

    tokens_learned: int = 0
    learn_seconds: float = 0.0
    consolidations: int = 0
    consolidate_seconds: float = 0.0
    last_fit: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The fields by name."""
        return dict(self.__dict__)


class Learner:
    """Records full-path forwards and turns them into skill (see the module doc).

    Args:
        model: the wrapped causal LM.
        parts: its resolved parts.
        observer: the SAE observer (reads the output of decoder layer ``observer.layer``).
        heads: exit heads at the candidate exit layers.
        policy: the exit policy over the same layers.
        consolidate_every: re-fit after this many newly learned tokens (0: only when asked).
        fit_steps: optimiser steps of each head re-fit.
        position_capacity: practised positions the position buffer keeps (oldest dropped).
        experience: the prompt log and practised sequences to share (the handle's);
            a new, empty one by default (its log keeps the latest ``log_capacity``
            prompts).

    Memory is bounded: the position buffer holds at most ``position_capacity`` positions
    (float16 states at every exit), the log ``log_capacity`` prompts, the sequence memory
    its own token capacity, the policy's signature memory its own row capacity.
    """

    def __init__(self, model: nn.Module, parts: ModelParts, observer: Observer, heads: ExitHeads,
                 policy: ExitPolicy, *, consolidate_every: int = 0, fit_steps: int = 300,
                 position_capacity: int = 16384, seed: int = 0, experience: Experience | None = None) -> None:
        if list(heads.layers) != policy.exit_layers:
            raise ValueError(f"heads at {list(heads.layers)} but policy over {policy.exit_layers}")
        self.model, self.parts = model, parts
        self.observer, self.heads, self.policy = observer, heads, policy
        self.signature_layer = observer.layer + 1  # input of the next layer = observer's output
        self.recorded_layers = sorted(set(policy.exit_layers) | {self.signature_layer, parts.num_layers})
        self.positions = PositionBuffer(policy.exit_layers, position_capacity)
        self.stats = LearnStats()
        self.consolidate_every = consolidate_every
        self.fit_steps = fit_steps
        self.seed = seed
        self.enabled = True
        # The prompt log and practised sequences, shared with the handle that owns them.
        self.experience = experience if experience is not None else Experience()
        self._since_consolidation = 0
        self._capture: StateCapture | None = None
        self._handles: list[Any] = []
        self._gate: Any = None

    # The prompt log and the practised sequences live in ``experience`` (see there).
    @property
    def practised(self) -> list[list[int]]:
        """The prompt log's prompts (token ids), oldest first."""
        return self.experience.practised

    @practised.setter
    def practised(self, value: list[list[int]]) -> None:
        self.experience.practised = value

    @property
    def sequences(self) -> SequenceMemory:
        """The practised sequences lossless drafts recall."""
        return self.experience.sequences

    @sequences.setter
    def sequences(self, value: SequenceMemory) -> None:
        self.experience.sequences = value

    @property
    def fitted_log(self) -> int:
        """How many log entries the heads were fitted on at their latest consolidation."""
        return self.experience.fitted_log

    @fitted_log.setter
    def fitted_log(self, value: int) -> None:
        self.experience.fitted_log = value

    @property
    def log_capacity(self) -> int:
        """Most prompts the prompt log keeps."""
        return self.experience.log_capacity

    @log_capacity.setter
    def log_capacity(self, value: int) -> None:
        self.experience.log_capacity = value

    def log_prompt(self, prompt: list[int]) -> None:
        """See :meth:`Experience.log_prompt`."""
        self.experience.log_prompt(prompt)

    def was_practised(self, prompt: list[int]) -> bool:
        """See :meth:`Experience.was_practised`."""
        return self.experience.was_practised(prompt)

    # -- hooks --------------------------------------------------------------------
    def install(self, gate: Any) -> None:
        """Register the recording hooks. ``gate()`` says whether the current forward is
        a full-path forward worth learning from."""
        self._gate = gate
        # States are kept (as references) on every forward while learning is on; whether
        # the forward was a full path worth learning from is decided once it has finished.
        self._capture = StateCapture(self.parts, self.recorded_layers,
                                     keep=lambda t: t.detach() if self.enabled else None)
        self._handles.append(self.model.register_forward_hook(self._after_forward))

    def uninstall(self) -> None:
        """Remove the recording hooks."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def _recorded(self) -> dict[int, torch.Tensor]:
        return self._capture.states if self._capture is not None else {}

    def _recording(self) -> bool:
        return self.enabled and self._gate is not None and self._gate()

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._recording():
            self.learn_recorded(getattr(output, "logits", None))
        self._recorded.clear()

    def learn_recorded(self, logits: torch.Tensor | None) -> None:
        """Learn from the forward that just ran every layer, given its logits [1, n, V]
        (n last positions). Also called by the drafter when a token it was asked to
        draft turned out unfamiliar and took the full path."""
        recorded = dict(self._recorded)
        self._recorded.clear()
        if not self.enabled or logits is None or logits.shape[0] != 1:
            return
        if len(recorded) < len(self.recorded_layers):
            return  # a forward that did not run every layer (for example a skipped one)
        n = logits.shape[1]  # generate keeps only the last positions' logits
        # Skills outlive the call: a forward under torch.inference_mode() hands over
        # inference tensors, which learning must not keep, so it works on normal copies.
        with torch.inference_mode(False):
            states = {l: h[0, -n:].clone() for l, h in recorded.items()}
            self.learn(states, logits[0].argmax(-1).clone())

    # -- learning -------------------------------------------------------------------
    @torch.no_grad()
    def outcomes(self, states: dict[int, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """[T, n_exit] booleans: whether each exit head (shortlist scoring) agrees with the full model."""
        columns = []
        for layer in self.policy.exit_layers:
            if self.heads.shortlist.numel() == 0:
                columns.append(torch.zeros_like(tokens, dtype=torch.bool))
            else:
                columns.append(self.heads.predict(layer, states[layer]).token_ids == tokens)
        return torch.stack(columns, dim=-1)

    @torch.no_grad()
    def learn(self, states: dict[int, torch.Tensor], tokens: torch.Tensor) -> None:
        """Learn from T positions: ``states[l]`` [T, d] for every exit layer, the
        signature layer and ``num_layers``; ``tokens`` [T] the full model's next tokens."""
        start = time.perf_counter()
        sig = self.observer.encode(states[self.signature_layer])
        self.policy.update(sig, self.outcomes(states, tokens))
        self.policy.remember(sig)
        self.heads.grow_shortlist(tokens)
        self.positions.add(states, states[self.parts.num_layers], sig, tokens)
        n = int(tokens.shape[0])
        self.stats.tokens_learned += n
        self._since_consolidation += n
        self.stats.learn_seconds += time.perf_counter() - start
        if self.consolidate_every and self._since_consolidation >= self.consolidate_every:
            self.consolidate()

    def consolidate(self, steps: int | None = None, progress: bool = False) -> dict[str, Any]:
        """Re-fit the exit heads on the whole position buffer, then re-learn the policy
        from the new heads' outcomes on it."""
        if len(self.positions) == 0:
            return {}
        with torch.inference_mode(False):  # also when called inside torch.inference_mode()
            return self._consolidate(steps, progress)

    def _consolidate(self, steps: int | None, progress: bool) -> dict[str, Any]:
        start = time.perf_counter()
        states, final, sig, tokens = self.positions.tensors()
        with torch.enable_grad():
            losses = self.heads.fit(states, final, steps=steps or self.fit_steps, seed=self.seed, progress=progress)
        self.policy.reset()
        self.policy.update(sig, self.outcomes(states, tokens))
        self.policy.remember(sig)
        self._since_consolidation = 0
        self.fitted_log = len(self.practised)
        took = time.perf_counter() - start
        self.stats.consolidations += 1
        self.stats.consolidate_seconds += took
        self.stats.last_fit = {
            "tokens": int(tokens.shape[0]),
            "seconds": took,
            "final_loss": {int(l): float(v[-1]) for l, v in losses.items() if v},
            "agreement": {l: float(a) for l, a in zip(self.policy.exit_layers,
                                                      self.policy.agreements / self.policy.trials.clamp_min(1))},
        }
        logger.info("consolidated %d tokens in %.1fs: %s", tokens.shape[0], took, self.stats.last_fit["agreement"])
        return self.stats.last_fit


def run_rounds(handle: Any, prompts: list[Any], *, rounds: int, max_new_tokens: int, tokenizer: Any,
               shuffle: bool, progress: bool) -> list[dict[str, Any]]:
    """The practice loop behind :meth:`shortcut.Shortcut.practice`."""
    from tqdm.auto import tqdm

    from ..data import prompt_input_ids

    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be at least 1")
    if not prompts:
        raise ValueError("no prompts to practise")
    inputs = []
    for prompt in prompts:
        if isinstance(prompt, torch.Tensor):
            inputs.append(prompt.reshape(1, -1))
        elif tokenizer is None:
            raise ValueError("text prompts need a tokenizer: practice(prompts, tokenizer=...)")
        else:
            inputs.append(prompt_input_ids(tokenizer, prompt))
    learner: Learner | None = handle.learner  # None: the practised sequences are all there is to learn
    generator = torch.Generator().manual_seed(handle.config.seed)
    rows = []
    for round_index in range(rounds):
        order = torch.randperm(len(inputs), generator=generator).tolist() if shuffle else list(range(len(inputs)))
        before = handle.decode_stats.copy()
        calls_before = handle.stats.total.layer_calls
        learn_before = learner.stats.learn_seconds if learner else 0.0
        generated, start = 0, time.perf_counter()
        for index in tqdm(order, desc=f"practice round {round_index + 1}/{rounds}", disable=not progress, leave=False):
            ids = inputs[index]
            out = handle.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=max_new_tokens, do_sample=False)
            generated += out.shape[1] - ids.shape[1]
        seconds = time.perf_counter() - start
        fit = learner.consolidate() if learner else {}
        delta = handle.decode_stats - before
        rows.append({
            "round": round_index + 1,
            "generated_tokens": generated,
            "seconds": seconds,
            "tokens_per_second": generated / seconds if seconds else 0.0,
            # Decoder-layer calls (each reads the layer's weights once) per generated token:
            # plain decoding makes num_layers of them; drafts make fewer, verification
            # makes num_layers per draft it checks.
            "layer_calls_per_token": (handle.stats.total.layer_calls - calls_before) / max(generated, 1),
            "drafted": delta.drafted,
            "accepted": delta.accepted,
            "acceptance": delta.accepted / delta.drafted if delta.drafted else 0.0,
            "recalled": delta.recall_accepted,  # accepted tokens from practised sequences
            "learn_seconds": (learner.stats.learn_seconds if learner else 0.0) - learn_before,
            "consolidate_seconds": fit.get("seconds", 0.0),
            "head_agreement": fit.get("agreement", {}),
        })
        logger.info("practice round %d: %s", round_index + 1, rows[-1])
    return rows
