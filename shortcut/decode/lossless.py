"""Lossless mode: the shallow path drafts, the full path verifies.

``model.generate`` on a wrapped model passes :func:`make_decoder`'s loop to
transformers as ``custom_generate``: transformers still prepares the generation config,
logits processors, stopping criteria and cache, and the prefill runs as plain decoding
runs it, except that where the prompt ends the way a practised sequence went on, what
followed there rides along in the prefill forward as a draft
(:meth:`ShallowDrafter.prompt_draft`): an exact repeat's answer is verified by the
forward that reads its prompt. Each step of the loop then

1. drafts: where the text ends the way a practised sequence went on (the prompt and
   output of an earlier lossless call, ``shortcut/learn/sequences.py``), the drafter proposes
   what followed there and runs no layer at all (all a wrapped model without an
   observer drafts). Otherwise, once an observer is attached,
   :class:`ShallowDrafter` feeds the last token through the model's own layers
   up to the observer, asks the policy for an exit layer from the SAE signature, runs
   up to that layer and lets the exit head name the next token (scored on the practised
   shortlist); it repeats until the policy sends a token to the full path, the head is
   unsure, or the adaptive draft length is reached. Draft keys/values are cropped from
   the cache before verification, so the cache verification extends is the full model's.
   When the very first token is unfamiliar, or its head unsure, that forward simply
   continues through every layer: it is plain decoding's step for that token, so its
   logits are used directly (no layer runs twice, nothing to verify) and it is learned
   from like any full forward;
2. verifies: one full forward over the last token and the drafts;
3. accepts: position by position it picks the next token from the full model's logits
   exactly as plain decoding does (same processors, ``argmax`` or one ``multinomial``
   draw per token), keeps going while that token equals the draft, and crops the rest.

So greedy output equals plain greedy output, and sampling draws every token from the
full model's distribution with the random stream plain sampling would use (a seeded
call gives the same tokens).

Every forward the loop makes (the prefill with its draft, shallow draft forwards,
verifications) gets what plain decoding's forward for those positions gets
(:class:`SequenceInputs`): the attention mask over every key so far (left padding stays
masked) and the position ids plain ``generate`` derives from that mask, plus any other
model keyword the call passed. Streamers receive the prompt, then each chosen token as
plain decoding puts it, then ``end()`` once; ``stop_strings`` work with ``tokenizer=``
(:func:`custom_generate_kwargs`). Calls the loop cannot decode exactly (no cache, a
cache it cannot crop, extra per-token model inputs, requested scores or other per-step
outputs, beam search, ...) run plain decoding instead: same tokens, no drafting, a
warning once per reason. Batches of more than one row draft from the practised sequences
row by row and verify all rows with one forward per step (``batched.py``).

What "identical" means: the same token ids as the unwrapped model's ``generate`` with
the same arguments and random state, as long as the logits that pick each token are the
same. A verified position's logits come from a forward over several tokens where plain
decoding runs one, so the kernels reduce in another order; in float32 that moves logits
in their last bits only. In reduced precision (bfloat16, float16) the same reordering
can move a logit by an ulp of that format, so a greedy choice between two logits within
that rounding of each other, or a sampled draw at the edge of such a token's
probability mass, may go the other way. The contract is then: every token is chosen by
the full model's own processors and sampling rule from the full model's logits for the
text before it, exact up to that rounding; bit-identical ids across precisions are not
promised.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria
from transformers.generation.streamers import BaseStreamer

from ..capture import layer_input
from ..learn.sequences import SequenceMemory, TextIndex
from ..observe import Observer, Signature
from ..policy.exits import ExitPolicy, PolicyDecision
from ..policy.heads import ExitHeads, Prediction
from .draft_length import DraftLengths, ShallowOdds
from .prefix import PromptReuse
from .stats import DecodeStats

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .skip_draft import SkipDrafter

logger = logging.getLogger(__name__)


# Model keywords the decoding loops set themselves for each forward.
MANAGED_INPUTS = frozenset({"cache", "use_cache", "logits_to_keep", "attention_mask", "position_ids"})


def unpadded(input_ids: torch.Tensor, mask: Any = None) -> list[list[int]]:
    """Each row of ``input_ids`` [B, T] as a list of ids without the positions that the
    attention ``mask`` (same shape; ``None``: no padding) leaves out."""
    rows = input_ids.tolist()
    if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
        return rows
    return [[t for t, keep in zip(row, keeps) if keep] for row, keeps in zip(rows, mask.tolist())]


class SequenceInputs:
    """What plain decoding hands each forward besides the tokens, for any span of the
    sequence (prompt and generated tokens, indexed as in ``input_ids``).

    Plain ``generate`` derives position ids from the 2-D attention mask (with left
    padding the first real token is position 0) or takes the caller's, keeps the mask
    only when it has padding, and grows both by one per generated token
    (``_update_model_kwargs_for_generation``: mask ones, positions counting on from the
    prompt's last). :meth:`__call__` gives the same for a forward over positions
    ``start..end-1`` whose cache holds exactly the tokens before ``start``: the mask over
    all ``end`` keys and the positions of the fed tokens, plus every other model keyword
    of the call (forwarded as plain decoding forwards them).
    """

    def __init__(self, model_kwargs: dict[str, Any]) -> None:
        self.mask: torch.Tensor | None = model_kwargs.get("attention_mask")
        self.positions: torch.Tensor | None = model_kwargs.get("position_ids")
        self.extra = {k: v for k, v in model_kwargs.items() if k not in MANAGED_INPUTS}

    def mask_to(self, end: int) -> torch.Tensor | None:
        """The 2-D mask over the first ``end`` tokens (``None``: no padding, no mask)."""
        mask = self.mask
        if mask is None:
            return None
        grown = end - mask.shape[-1]
        if grown > 0:
            return torch.cat([mask, mask.new_ones(mask.shape[0], grown)], dim=-1)
        return mask[:, :end]

    def positions_of(self, start: int, end: int, device: torch.device) -> torch.Tensor:
        """Position ids of the tokens ``start..end-1``."""
        positions = self.positions
        if positions is None:  # the model would count from its cache length, which is ``start``
            return torch.arange(start, end, device=device).unsqueeze(0)
        grown = end - positions.shape[-1]
        if grown > 0:
            shape = [1] * (positions.dim() - 1) + [-1]
            after = positions[..., -1:] + torch.arange(1, grown + 1, dtype=positions.dtype,
                                                       device=positions.device).view(*shape)
            positions = torch.cat([positions, after], dim=-1)
        return positions[..., start:end]

    def __call__(self, start: int, end: int, device: torch.device) -> dict[str, Any]:
        """Model keywords for a forward over positions ``start..end-1``."""
        kwargs = dict(self.extra)
        mask = self.mask_to(end)
        if mask is not None:
            kwargs["attention_mask"] = mask
        kwargs["position_ids"] = self.positions_of(start, end, device)
        return kwargs


class Trail:
    """The memory rows matched by each recent position's signature, so the policy can
    judge a token as the continuation of a practised sequence (``ExitPolicy.decide``'s
    ``after``).

    Decisions taken while drafting record their rows. A position that only a full
    forward saw (a prompt's last token, the last token of a fully accepted draft, a
    token decoded on the full path or caught up in fast mode) is encoded on demand from
    the signature-layer input of the latest full forward, which a pre-hook keeps (a
    reference, nothing computed) when the decoding loop announces that forward with
    :meth:`expect`.
    """

    def __init__(self, observer: Observer, policy: ExitPolicy, layer: nn.Module, stats: DecodeStats) -> None:
        self.observer, self.policy, self.stats = observer, policy, stats
        self.rows: dict[int, torch.Tensor] = {}
        self._hidden: torch.Tensor | None = None  # [seq, d] signature-layer input of a full forward
        self._start = 0  # position of its first row
        self._armed: int | None = None
        self._handle = layer.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._armed is not None:
            hidden = layer_input(args, kwargs)
            self._hidden, self._start, self._armed = hidden[0].detach(), self._armed, None

    def expect(self, start: int) -> None:
        """The next model forward is a full one over positions from ``start`` on."""
        self._armed = start

    def record(self, position: int, rows: torch.Tensor) -> None:
        """Keep the memory rows matched by the token at ``position``."""
        self.rows[position] = rows

    def truncate(self, length: int) -> None:
        """Forget positions from ``length`` on (rejected drafts) and those before
        ``length - 1`` (the next decision asks only for the token before the newest)."""
        self.rows = {p: rows for p, rows in self.rows.items() if length - 1 <= p < length}
        if self._hidden is not None and self._start + self._hidden.shape[0] > length:
            self._hidden = self._hidden[: max(0, length - self._start)]

    def before(self, position: int) -> torch.Tensor | None:
        """Rows matched by the token at ``position - 1``; ``None`` when it was never seen."""
        previous = position - 1
        if previous in self.rows:
            return self.rows[previous]
        if self._hidden is None or not 0 <= previous - self._start < self._hidden.shape[0]:
            return None
        sig = self.observer.encode(self._hidden[previous - self._start])
        self.stats.observer_encodes += 1
        rows = self.policy.matches(self.policy.similarities(sig)[0])
        self.rows[previous] = rows
        return rows

    def close(self) -> None:
        """Remove the pre-hook."""
        self._handle.remove()


class DraftStep:
    """Layer policy of one drafted token: run through the observer layer, decide, exit.

    After the forward, ``exit_layer`` is the chosen exit (``None``: not familiar, stop
    drafting) and ``exit_hidden`` the residual stream there.

    Skipped layers write no keys/values (the drafter crops everything it added before
    verification). That is only consistent if no later draft token runs a layer an
    earlier one skipped, so the first token's exit becomes the ``ceiling`` of the draft:
    a later token that would need a deeper exit ends the draft instead.
    """

    def __init__(self, observer: Observer, policy: ExitPolicy, trail: Trail, *,
                 heads: ExitHeads | None = None, min_confidence: float = 0.0,
                 odds: ShallowOdds | None = None) -> None:
        self.observer = observer
        self.policy = policy
        self.trail = trail  # where the previous token's memory matches come from
        # With heads, the exit head is asked at the exit inside the forward; when the
        # first token's head is unsure that forward goes on through every layer (the
        # step verification would run anyway) instead of stopping and running again.
        self.draft_heads = heads
        self.min_confidence = min_confidence
        # With odds, a token is proposed only while the chance of reaching it stays at
        # the bar: ``reach`` is the product of the draft's earlier tokens' chances.
        self.odds = odds
        self.reach = 1.0
        self.situation: tuple[int, float] | None = None  # exit layer and head confidence
        self.prediction: Prediction | None = None
        self.unsure = False
        self.declined = False  # the head was sure enough, the odds not worth a proposal
        self.position = 0  # of the token the next forward feeds
        self.signature_layer = observer.layer + 1
        self.exit_layer: int | None = None
        self.exit_hidden: torch.Tensor | None = None
        self.signature: Signature | None = None
        self.decision: PolicyDecision | None = None
        self.ceiling: int | None = None
        self.propagate_kv = False
        self.unfamiliar_runs_full = False  # a draft stops on an unfamiliar token instead

    def begin(self, input_ids: torch.Tensor | None) -> None:
        """Start a forward: forget the previous token's decision."""
        self.exit_layer, self.exit_hidden, self.signature, self.decision = None, None, None, None
        self.prediction, self.unsure, self.declined, self.situation = None, False, False, None

    def should_run(self, layer_idx: int, hidden: torch.Tensor) -> bool:
        """Run up to the signature layer, decide the exit there, and stop after it."""
        if layer_idx < self.signature_layer:
            return True
        if layer_idx == self.signature_layer:
            self.signature = self.observer.encode(hidden[:, -1])
            self.decision = self.policy.decide(self.signature, after=self.trail.before(self.position))
            self.trail.record(self.position, self.decision.rows)
            self.exit_layer = self.decision.exit_layer
            if self.exit_layer is not None and self.ceiling is not None and self.exit_layer > self.ceiling:
                self.exit_layer = None
        if self.exit_layer is None:
            return self.unfamiliar_runs_full
        if layer_idx == self.exit_layer:
            self.exit_hidden = hidden
            if self.draft_heads is not None:
                self.prediction = self.draft_heads.predict(layer_idx, hidden[:, -1])
                confidence = float(self.prediction.confidence)
                self.situation = (layer_idx, confidence)
                self.unsure = confidence < self.min_confidence
                if not self.unsure and self.odds is not None:
                    self.declined = not self.odds.worth(layer_idx, confidence, self.reach)
                    self.unsure = self.declined
                if self.unsure and self.unfamiliar_runs_full:
                    self.exit_layer = None
                    return True
        return layer_idx < self.exit_layer


@dataclass
class BackOff:
    """After an attempt that got nothing accepted, sit out the next ``pause`` steps
    (1, then doubling up to 8 while attempts keep failing); an accepted token ends it."""

    pause: int = 0
    left: int = 0

    def waiting(self) -> bool:
        """Whether this step is sat out (counts it off)."""
        if self.left > 0:
            self.left -= 1
            return True
        return False

    def record(self, accepted: int) -> None:
        """The outcome of an attempt: ``accepted`` tokens."""
        if accepted == 0:
            self.pause = min(8, max(1, 2 * self.pause))
            self.left = self.pause
        else:
            self.pause = 0


class ShallowDrafter:
    """Drafts tokens with the shallow path of the model itself, and recalls practised
    sequences.

    Without an observer (``observer``, ``heads``, ``policy`` and ``trail`` all ``None``)
    it drafts from the practised ``sequences`` only: a wrapped model recalls what it
    practised before any observer was trained. With ``skips``, drafts the sequences do
    not supply come from the model with learned layers stepped over instead of the
    shallow path (``shortcut/decode/skip_draft.py``).
    """

    def __init__(self, model: PreTrainedModel, runtime: Any, observer: Observer | None, heads: ExitHeads | None,
                 policy: ExitPolicy | None, trail: Trail | None, *, max_draft: int, min_confidence: float,
                 stats: DecodeStats, on_full_path: Callable[[torch.Tensor], None] | None = None,
                 num_draft: int | None = None, sequences: SequenceMemory | None = None,
                 shallow: bool = True, lengths: DraftLengths | None = None, copy_text: bool = False,
                 odds: ShallowOdds | None = None, skips: SkipDrafter | None = None) -> None:
        self.base = getattr(model, model.base_model_prefix)
        self.model = model
        self.on_full_path = on_full_path  # gets the logits of a token that took the full path
        self.runtime = runtime
        self.heads = heads
        self.trail = trail
        self.step: DraftStep | None = None
        if observer is not None:
            if heads is None or policy is None or trail is None:
                raise ValueError("a drafter with an observer needs its exit heads, policy and trail too")
            self.step = DraftStep(observer, policy, trail, heads=heads, min_confidence=min_confidence, odds=odds)
        self.odds = odds  # learned chances of shallow tokens (the caller's persist); None: no gate
        self.max_draft = max_draft
        # Doubles while every drafted token is accepted; the caller carries it from one
        # generate call to the next (a practised workload keeps its long drafts).
        self.num_draft = min(num_draft or 4, max_draft)
        self.stats = stats
        self.sequences = sequences  # practised sequences: drafts that need no layer at all
        self.shallow = shallow  # whether the shallow path drafts where the sequences do not
        self.skips = skips  # drafts with skipped layers instead of the shallow path, if given
        self.skip_drafted = False  # whether the latest draft came from skips
        self.lengths = lengths or DraftLengths()  # learned lookup-draft lengths (the caller's persist)
        self.text = TextIndex() if copy_text else None  # this call's own text, to copy from
        self.recalled = False  # whether the latest draft came from the practised sequences
        self.copied = False  # whether it came from the text itself
        self._situation: tuple[str, bool, int] | None = None  # the latest lookup draft's, for record()
        self._shallow_situations: list[tuple[int, float]] = []  # the latest shallow draft's tokens'
        # Back-offs, one per kind of draft, so that one kind failing does not silence the
        # other: a drafting forward (shallow or skip) that got nothing accepted pauses
        # the next forwards (asking costs an SAE encode and a policy decision, a rejected
        # draft its layers, and unfamiliar text mostly answers "full path"); a lookup
        # draft that got nothing accepted pauses the next lookups (each rejected token
        # costs a verification position).
        self.forward_backoff = BackOff()
        self.lookup_backoff = BackOff()
        self.attempted = False  # whether the latest draft() ran a drafting forward
        # Logits [1, 1, V] of the newest token when draft() ran it on the full path (its
        # first token was unfamiliar): the decoding loop then needs no verification.
        self.full_logits: torch.Tensor | None = None
        self.plain_greedy = False  # whether the latest call's output is the model's plain greedy answer

    @torch.no_grad()
    def draft(self, input_ids: torch.Tensor, cache: Any, limit: int, stop_ids: frozenset[int] = frozenset(),
              inputs: SequenceInputs | None = None) -> torch.Tensor:
        """Up to ``min(limit, adaptive length)`` draft tokens after ``input_ids`` [1, T],
        whose last token is not in ``cache`` yet; a drafted token in ``stop_ids`` (end of
        sequence) is the last. ``inputs`` gives each draft forward its mask and positions
        (default: no padding). Returns [1, k] (k may be 0); the cache is left as it was."""
        inputs = inputs or SequenceInputs({})
        self.attempted, self.recalled, self.copied, self.skip_drafted = False, False, False, False
        self._situation = None
        self._shallow_situations = []
        self.full_logits = None
        if limit <= 0:
            return input_ids[:, :0]
        if not self.lookup_backoff.waiting():
            looked_up = self.lookup(input_ids, min(limit, self.max_draft), stop_ids, opening=False)
            if looked_up.shape[1]:
                return looked_up
        if self.forward_backoff.waiting():
            self.stats.draft_paused += 1
            return input_ids[:, :0]
        budget = min(limit, self.num_draft)
        if self.skips is not None:
            skipped = self.skips.draft(input_ids, cache, budget, stop_ids, inputs)
            # A declined first token was plain decoding's step: while the plan warms up
            # that is the point (it measures the layers), afterwards asking again costs
            # an SAE encode per token, so the back-off applies as to the shallow path.
            self.attempted = bool(skipped) or self.skips.plan.warm
            self.skip_drafted = True
            self.full_logits = self.skips.full_logits
            self.stats.drafted += len(skipped)
            return torch.cat(skipped, dim=-1) if skipped else input_ids[:, :0]
        heads = self.heads
        if not self.shallow or self.step is None or heads is None or heads.shortlist.numel() == 0:
            return input_ids[:, :0]
        drafted: list[torch.Tensor] = []
        token = input_ids[:, -1:]
        position = input_ids.shape[1] - 1
        self.attempted = True
        self.step.ceiling = None
        self.step.reach = 1.0
        # The first token is the one verification would run anyway: when it is
        # unfamiliar it simply continues through every layer (plain decoding's step).
        self.step.unfamiliar_runs_full = True
        with drafting(self.runtime, self.step, cache) as keep:
            for index in range(budget):
                self.step.position = position
                self.step.prediction, self.step.unsure = None, False
                hidden = self.base(input_ids=token, cache=cache, use_cache=True,
                                   **inputs(position, position + 1, token.device)).last_hidden_state
                self.stats.draft_forwards += 1
                self.stats.observer_encodes += 1
                self.step.unfamiliar_runs_full = False
                if self.step.exit_layer is None and index == 0:
                    self.stats.full_path_steps += 1
                    if self.step.declined:
                        self.stats.draft_declined += 1
                    elif self.step.unsure:
                        self.stats.draft_unsure += 1
                    else:
                        self.stats.draft_unfamiliar += 1
                    self.full_logits = full_logits(self.model, hidden[:, -1:])
                    keep()
                    if self.on_full_path is not None:
                        self.on_full_path(self.full_logits)
                    break
                if self.step.exit_layer is None:
                    self.stats.draft_refusals += 1
                    break
                self.step.ceiling = self.step.exit_layer
                self.stats.exited(self.step.exit_layer)
                self.stats.head_params += heads.head_cost(self.step.exit_layer)["shortlist"]
                pred = self.step.prediction
                if self.step.unsure:
                    if self.step.declined:
                        self.stats.draft_declined += 1
                    else:
                        self.stats.draft_unsure += 1
                    break
                assert pred is not None and self.step.situation is not None  # heads predict at every exit
                token = pred.token_ids.view(1, 1)
                drafted.append(token)
                self._shallow_situations.append(self.step.situation)
                if self.odds is not None:
                    self.step.reach *= self.odds.probability(*self.step.situation)
                if int(token) in stop_ids:  # nothing after the end is ever accepted
                    break
                position += 1
        self.stats.drafted += len(drafted)
        return torch.cat(drafted, dim=-1) if drafted else input_ids[:, :0]

    def prompt_draft(self, input_ids: torch.Tensor, limit: int, stop_ids: frozenset[int],
                     sampled: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The draft the prefill forward carries after the prompt [1, T] (``mask``: its
        attention mask, if any). A greedy call whose prompt (without its padding) was
        practised verbatim recalls the whole practised answer (the full model's own
        greedy answer to it; no layer runs to make it); any other prompt gets a lookup
        draft (:meth:`lookup`) of at most ``max_draft`` tokens."""
        self.recalled, self.copied, self._situation = False, False, None
        if not sampled and self.sequences is not None:
            answer = self.sequences.answer(unpadded(input_ids, mask)[0], limit)
            if answer:
                return self._proposed(input_ids, answer, stop_ids, "memory")
        return self.lookup(input_ids, min(limit, self.max_draft), stop_ids, opening=True)

    def lookup(self, input_ids: torch.Tensor, limit: int, stop_ids: frozenset[int],
               opening: bool = False) -> torch.Tensor:
        """A draft that needs no layer: what followed where the text [1, T] ends the way a
        practised sequence or (with ``copy_text``) an earlier part of the text itself went
        on; [1, 0] when neither has it. Each candidate proposes, by the learned ``lengths``,
        as many tokens as its situation (source, ``opening`` = right after the prompt,
        agreement) earns, and the one likelier to be accepted wins."""
        ids = input_ids[0].tolist()
        candidates = []
        if self.sequences is not None:
            candidates.append(("memory", *self.sequences.lookup(ids, limit)))
        if self.text is not None:
            candidates.append(("context", *self.text.lookup(ids, limit)))
        best: tuple[float, str, list[int], int] | None = None
        for source, tokens, agreement in candidates:
            if not tokens:
                continue
            tokens = tokens[:self.lengths.length(source, opening, agreement)]
            p = self.lengths.probability(source, opening, agreement)
            if tokens and (best is None or (p, len(tokens)) > (best[0], len(best[2]))):
                best = (p, source, tokens, agreement)
        if best is None:
            return input_ids[:, :0]
        _, source, tokens, agreement = best
        self._situation = (source, opening, agreement)
        return self._proposed(input_ids, tokens, stop_ids, source)

    def _proposed(self, input_ids: torch.Tensor, tokens: list[int], stop_ids: frozenset[int],
                  source: str) -> torch.Tensor:
        """``tokens`` as the draft [1, k] (cut after an end of sequence), counted as
        drafted from ``source``."""
        for i, token in enumerate(tokens):
            if token in stop_ids:  # nothing after the end is ever accepted
                tokens = tokens[:i + 1]
                break
        self.stats.drafted += len(tokens)
        if source == "memory":
            self.recalled = True
            self.stats.recalled += len(tokens)
        else:
            self.copied = True
            self.stats.copied += len(tokens)
        return torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device)

    def record(self, drafted: int, accepted: int, rejected: bool | None = None) -> None:
        """Adapt the draft lengths and the back-off to the verification of the latest
        draft: ``accepted`` of ``drafted`` tokens, then a ``rejected`` one or not (default:
        whether fewer than all were accepted; a call that ended on an accepted token
        rejected nothing)."""
        if rejected is None:
            rejected = accepted < drafted
        if self.recalled or self.copied:
            self.lookup_backoff.record(accepted)
        elif self.attempted:
            self.forward_backoff.record(accepted)
        if drafted == 0:
            return
        self.stats.accepted += accepted
        if self.recalled or self.copied:  # the shallow path's draft length adapts to its own drafts only
            if self.recalled:
                self.stats.recall_accepted += accepted
            else:
                self.stats.copy_accepted += accepted
            if self._situation is not None:
                self.lengths.update(*self._situation, accepted=accepted, rejected=rejected)
            return
        if self.skip_drafted:
            assert self.skips is not None
            self.skips.record(accepted, rejected)
        elif self.odds is not None:
            self.odds.update(self._shallow_situations, accepted, rejected)
        if accepted == drafted:
            self.num_draft = min(self.max_draft, 2 * self.num_draft)
        else:  # the next draft proposes one more than this one got accepted
            self.num_draft = max(1, min(self.num_draft - 1, accepted + 1))


def full_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM's logits for the last layer's (normed) ``hidden``: its unembedding, then
    logit soft-capping where the model has it (Gemma 2 style; the LM's forward applies
    it after lm_head)."""
    logits = model.get_output_embeddings()(hidden)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def layer_lengths(cache: Any) -> list[int]:
    """Tokens held by each layer of ``cache`` (drafts leave deep layers shorter)."""
    return [layer.get_seq_length() if layer.is_initialized else 0 for layer in cache.layers]


def crop_all(cache: Any, length: int) -> None:
    """Crop every layer of ``cache`` to at most ``length`` tokens."""
    crop_to(cache, [length] * len(cache.layers))


def crop_to(cache: Any, lengths: list[int]) -> None:
    """Crop each cache layer to its length in ``lengths`` (layers already shorter are left)."""
    for layer, length in zip(cache.layers, lengths):
        extra = (layer.get_seq_length() if layer.is_initialized else 0) - length
        if extra > 0:
            layer.crop(-extra)


@contextlib.contextmanager
def drafting(runtime: Any, policy: Any, cache: Any) -> Iterator[Callable[[], None]]:
    """Run the body's draft forwards under the layer ``policy``. Afterwards the runtime's
    own policy is back and the cache is cropped to where it was, or to where it was when
    the body last called the yielded ``keep()`` (a first token that took the full path
    stays: it is plain decoding's step)."""
    lengths = layer_lengths(cache)

    def keep() -> None:
        lengths[:] = layer_lengths(cache)

    previous = runtime.policy
    runtime.policy = policy
    try:
        yield keep
    finally:
        runtime.policy = previous
        crop_to(cache, lengths)


def choose_next(input_ids: torch.Tensor, logits: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                do_sample: bool, streamer: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Pick the next token from full-vocabulary ``logits`` [1, V] exactly as plain
    decoding does (processors, then ``argmax`` or one ``multinomial`` draw; the stopping
    criteria get no scores and the streamer the token ids [1], as in ``_sample``);
    returns the extended ids, the token [1, 1] and whether generation is finished."""
    scores = logits_processor(input_ids, logits.to(dtype=torch.float32, copy=True))
    if do_sample:
        token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
    else:
        token = scores.argmax(dim=-1, keepdim=True)
    input_ids = torch.cat([input_ids, token], dim=-1)
    finished = bool(stopping_criteria(input_ids, None).all())
    if streamer is not None:
        streamer.put(token[:, 0].cpu())
    return input_ids, token, finished


def plain_greedy(generation_config: Any, logits_processor: Any, model_kwargs: dict[str, Any]) -> bool:
    """Whether a call's tokens are the model's plain greedy answer to its prompt: no
    sampling, no logits processor (repetition penalty, minimum length, ...), no padding.
    Only such answers are a function of the prompt alone (what practised sequences keep,
    and what fast mode may commit)."""
    mask = model_kwargs.get("attention_mask")
    return not generation_config.do_sample and len(logits_processor) == 0 and (mask is None or bool(mask.all()))


def can_extend_prefill(generation_config: Any, model_kwargs: dict[str, Any]) -> bool:
    """Whether the prefill forward can also verify a draft: the prompt is the only
    per-token input besides its attention mask and positions, and it is not prefilled in
    chunks."""
    extendable = ("attention_mask", "position_ids")
    per_token = [k for k, v in model_kwargs.items() if isinstance(v, torch.Tensor) and k not in extendable]
    return not per_token and generation_config.prefill_chunk_size is None


CROPPABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)
PER_STEP_OUTPUTS = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                    "output_hidden_states")


def cannot_decode(model: nn.Module, input_ids: torch.Tensor, generation_config: Any, model_kwargs: dict[str, Any],
                  synced_gpus: bool) -> str | None:
    """Why the drafting loops cannot reproduce plain decoding for this prepared call
    (``None``: they can). Checked on what ``generate`` prepared, so options set through a
    ``GenerationConfig`` or the model's defaults count as well as keyword arguments."""
    if input_ids.device != model.device:  # generate moves such inputs per forward; the loops do not
        return f"input_ids on {input_ids.device} while the model is on {model.device}"
    for name in PER_STEP_OUTPUTS:
        if getattr(generation_config, name, False):
            return f"{name}=True"
    if synced_gpus:
        return "synced_gpus=True"
    cache = model_kwargs.get("cache")
    if not model_kwargs.get("use_cache", True) or cache is None:
        return "use_cache=False"
    if not all(type(layer) in CROPPABLE_LAYERS for layer in getattr(cache, "layers", [None])):
        return f"a {type(cache).__name__} (drafts need a dynamic cache they can crop)"
    tensors = sorted(k for k, v in model_kwargs.items() if isinstance(v, torch.Tensor) and k not in MANAGED_INPUTS)
    if tensors:  # per-token inputs such as token_type_ids would have to grow with every draft
        return f"model input {', '.join(tensors)}"
    return None


# The decoding loops, plain_decode and prefill take the model ``generate`` hands them as
# ``Any``: they call its private generation steps (``_sample``, ``_prefill``), which
# transformers types against its own internal protocol, not against its model classes.
def plain_if_undecodable(model: Any, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                         generation_config: Any, synced_gpus: bool, streamer: Any, model_kwargs: dict[str, Any],
                         on_fallback: Callable[[str], None] | None) -> Any:
    """Plain decoding's output when a decoding loop cannot decode this call exactly
    (:func:`cannot_decode`; the reason goes to ``on_fallback``), else ``None``."""
    reason = cannot_decode(model, input_ids, generation_config, model_kwargs, synced_gpus)
    if reason is None:
        return None
    if on_fallback is not None:
        on_fallback(reason)
    return plain_decode(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus,
                        streamer, model_kwargs)


def plain_decode(model: Any, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                 generation_config: Any, synced_gpus: bool, streamer: Any, model_kwargs: dict[str, Any]) -> Any:
    """The decoding ``generate`` itself runs for greedy and sampled calls (its
    ``_sample``), on what it prepared: the full path, same tokens."""
    return type(model)._sample(model, input_ids, logits_processor=logits_processor,
                               stopping_criteria=stopping_criteria, generation_config=generation_config,
                               synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)


def prefill(model: Any, input_ids: torch.Tensor, drafts: torch.Tensor, generation_config: Any,
            model_kwargs: dict[str, Any], inputs: SequenceInputs | None = None) -> torch.Tensor:
    """Run the prompt [1, T] through the full model as plain decoding's prefill does,
    with ``drafts`` [1, k] after it in the same forward (the prompt's recalled
    continuation: an exact repeat verifies its answer with the forward that reads the
    prompt), their mask and positions extended as ``inputs`` extends them. Returns the
    logits [1, k + 1, V] that pick the first k + 1 new tokens.

    Where the cache already holds the prompt's first positions (kept from earlier text,
    ``prefix.py``), the forward reads only the rest, as a verification forward reads
    the tokens after its cache."""
    k = drafts.shape[1]
    cache = model_kwargs.get("cache")
    start = cache.get_seq_length() if cache is not None else 0
    if start:
        inputs = inputs or SequenceInputs(model_kwargs)
        ids = torch.cat([input_ids, drafts], dim=-1)
        keep = {"logits_to_keep": k + 1} if "logits_to_keep" in model_kwargs else {}
        return model(input_ids=ids[:, start:], cache=cache, use_cache=True, **keep,
                     **inputs(start, ids.shape[1], ids.device)).logits[:, -(k + 1):]
    if k:
        inputs = inputs or SequenceInputs(model_kwargs)
        end = input_ids.shape[1] + k
        model_kwargs = dict(model_kwargs)
        if model_kwargs.get("attention_mask") is not None:
            model_kwargs["attention_mask"] = inputs.mask_to(end)
        if model_kwargs.get("position_ids") is not None:
            model_kwargs["position_ids"] = inputs.positions_of(0, end, input_ids.device)
        if "logits_to_keep" in model_kwargs:
            model_kwargs["logits_to_keep"] = k + 1
        input_ids = torch.cat([input_ids, drafts], dim=-1)
    return model._prefill(input_ids, generation_config, model_kwargs).logits[:, -(k + 1):]


def make_decoder(drafter: ShallowDrafter, stats: DecodeStats, *, streamer: Any = None,
                 on_fallback: Callable[[str], None] | None = None,
                 reuse: PromptReuse | None = None) -> Callable[..., torch.Tensor]:
    """The decoding loop handed to ``generate(custom_generate=...)`` (see the module doc).

    ``generate`` hands a callable ``custom_generate`` no ``streamer``: the caller passes
    it here (the same object it gives ``generate``, which puts the prompt). A call the
    loop cannot decode exactly (:func:`cannot_decode`) runs plain decoding; its reason
    goes to ``on_fallback``. ``reuse``: the kept keys and values a batch-1 prompt may
    begin with, and whether to keep this call's (``prefix.py``)."""

    @torch.no_grad()
    def speculative_decode(model: Any, input_ids: torch.Tensor, logits_processor: Any,
                           stopping_criteria: Any, generation_config: Any, synced_gpus: bool = False,
                           **model_kwargs: Any) -> torch.Tensor:
        output = plain_if_undecodable(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                      synced_gpus, streamer, model_kwargs, on_fallback)
        if output is not None:
            drafter.plain_greedy = False
            return output
        if input_ids.shape[0] > 1:  # a padded batch: practised sequences draft for every row
            from .batched import decode_batch  # it builds on this module

            drafter.plain_greedy = False
            return decode_batch(model, drafter, stats, input_ids, logits_processor, stopping_criteria,
                                generation_config, streamer, model_kwargs)
        do_sample = bool(generation_config.do_sample)
        drafter.plain_greedy = plain_greedy(generation_config, logits_processor, model_kwargs)
        inputs = SequenceInputs(model_kwargs)
        cache = model_kwargs["cache"]
        cache.activate_past_recording()  # sliding-window layers must be able to roll back
        if reuse is not None:
            reuse.fill(model, input_ids, model_kwargs, chunked=generation_config.prefill_chunk_size is not None)
        eos = generation_config.eos_token_id
        stop_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else [int(e) for e in eos])
        trail = drafter.trail  # None without an observer: nothing to encode
        if trail is not None:
            trail.expect(cache.get_seq_length())  # a kept prefix (prefix.py) is not read again
        limit = generation_config.max_length - input_ids.shape[1] - 1
        drafts = drafter.prompt_draft(input_ids, limit, stop_ids, do_sample, inputs.mask_to(input_ids.shape[1])) \
            if can_extend_prefill(generation_config, model_kwargs) else input_ids[:, :0]
        pending = prefill(model, input_ids, drafts, generation_config, model_kwargs, inputs)
        while True:
            accepted, finished, rejected = 0, False, False
            for i in range(pending.shape[1]):
                input_ids, token, finished = choose_next(input_ids, pending[:, i], logits_processor,
                                                         stopping_criteria, do_sample, streamer)
                matched = i < drafts.shape[1] and int(token) == int(drafts[0, i])
                accepted += matched  # a drafted end-of-sequence that matched counts too
                rejected = i < drafts.shape[1] and not matched
                if finished or not matched:
                    break
            drafter.record(drafts.shape[1], accepted, rejected)
            # The cache may hold only tokens before the newest one.
            valid = input_ids.shape[1] - 1
            crop_all(cache, valid)
            if trail is not None:
                trail.truncate(valid)
            if finished:
                break
            limit = generation_config.max_length - input_ids.shape[1] - 1
            drafts = drafter.draft(input_ids, cache, limit, stop_ids, inputs)
            if drafter.full_logits is not None:  # the newest token already took the full path
                pending = drafter.full_logits
                continue
            verify = torch.cat([input_ids[:, -1:], drafts], dim=-1)
            stats.verify_forwards += 1
            if trail is not None:
                trail.expect(valid)
            pending = model(input_ids=verify, cache=cache, use_cache=True,
                            **inputs(valid, valid + verify.shape[1], verify.device)).logits
        if reuse is not None:  # every position the cache holds is the full model's (drafts were cropped)
            reuse.kept(model, input_ids, cache, input_ids.shape[1])
        if streamer is not None:
            streamer.end()
        return input_ids

    return speculative_decode


class EndOnce(BaseStreamer):
    """A streamer seen through a guard that passes on ``end()`` once: the decoding loop
    ends the stream when it finishes, the caller again (a no-op then) when anything on
    the way raised, so a consumer of ``TextIteratorStreamer`` is never left waiting."""

    def __init__(self, streamer: Any) -> None:
        self.streamer = streamer
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        """Pass ``value`` on to the streamer."""
        self.streamer.put(value)

    def end(self) -> None:
        """End the stream, the first time only."""
        if not self.ended:
            self.ended = True
            self.streamer.end()


def generation_option(model: nn.Module, kwargs: dict[str, Any], name: str) -> Any:
    """The value ``generate`` will use for generation option ``name``: the keyword
    argument, else the passed ``generation_config``'s value, else the model's default."""
    if name in kwargs:
        return kwargs[name]
    given = kwargs.get("generation_config")
    value = getattr(given, name, None) if given is not None else None
    return value if value is not None else getattr(model.generation_config, name, None)


def custom_generate_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> tuple[dict[str, Any], EndOnce | None]:
    """The keyword arguments for ``generate(custom_generate=...)`` that give the same
    call as ``kwargs`` to plain ``generate``, and the guarded streamer (``None`` without
    one) to hand the decoding loop.

    ``generate`` passes a callable ``custom_generate`` neither ``streamer`` nor
    ``tokenizer``: the streamer is guarded (:class:`EndOnce`) and handed on by the
    caller, and ``stop_strings`` become the ``StopStringCriteria`` plain ``generate``
    would build from the tokenizer (without a tokenizer, ``generate`` raises as it does
    unwrapped)."""
    kwargs = dict(kwargs)
    stream = None
    if kwargs.get("streamer") is not None:
        stream = kwargs["streamer"] = EndOnce(kwargs["streamer"])
    stop_strings = generation_option(model, kwargs, "stop_strings")
    tokenizer = kwargs.get("tokenizer")
    if stop_strings is not None and tokenizer is not None:
        given = list(kwargs.get("stopping_criteria") or [])
        if not any(isinstance(c, StopStringCriteria) for c in given):  # a caller's own one takes precedence
            given.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
        kwargs["stopping_criteria"] = StoppingCriteriaList(given)
        if "stop_strings" not in kwargs and kwargs.get("generation_config") is not None:
            kwargs["generation_config"] = copy.deepcopy(kwargs["generation_config"])
            kwargs["generation_config"].stop_strings = None
        else:  # a keyword argument overrides the config's value (and the model's default)
            kwargs["stop_strings"] = None
    return kwargs, stream


UNSUPPORTED = {
    "num_beams": lambda v: v not in (None, 1),
    "num_return_sequences": lambda v: v not in (None, 1),
    "assistant_model": lambda v: v is not None,
    "prompt_lookup_num_tokens": lambda v: v is not None,
    "assistant_early_exit": lambda v: v is not None,
    "use_mtp": bool,
    # Decoding methods other than greedy/sampling (beam variants, contrastive, DoLa).
    "constraints": lambda v: v is not None,
    "force_words_ids": lambda v: v is not None,
    "penalty_alpha": lambda v: v is not None and v > 0,
    "dola_layers": lambda v: v is not None,
    "custom_generate": lambda v: v is not None,
    "inputs_embeds": lambda v: v is not None,
    "return_dict_in_generate": bool,
    "output_scores": bool,
    "output_logits": bool,
    "output_attentions": bool,
    "output_hidden_states": bool,
    "use_cache": lambda v: v is False,
    "past_key_values": lambda v: v is not None,
    "cache": lambda v: v is not None,
    "token_healing": bool,  # needs the tokenizer, which generate does not hand on
}


def unsupported_options(model: nn.Module, kwargs: dict[str, Any], input_ids: Any) -> list[str]:
    """Generate options lossless drafting cannot honour; the call then takes the full
    path (same tokens as the unwrapped model, no drafting). Options are read as
    ``generate`` resolves them (keyword, then ``generation_config``, then the model's
    defaults)."""
    bad = [f"{name}={value!r}" for name, test in UNSUPPORTED.items()
           if test(value := generation_option(model, kwargs, name))]
    if not isinstance(input_ids, torch.Tensor):
        bad.append("input_ids not given as a tensor")
    return bad
