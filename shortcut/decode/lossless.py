"""Lossless mode: the shallow path drafts, the full path verifies.

``model.generate`` on a wrapped model with skills passes :func:`make_decoder`'s loop to
transformers as ``custom_generate``: transformers still prepares the generation config,
logits processors, stopping criteria and cache, and the prefill runs as plain decoding
runs it, except that where the prompt ends the way a practised sequence went on, what
followed there rides along in the prefill forward as a draft
(:meth:`ShallowDrafter.prompt_draft`): an exact repeat's answer is verified by the
forward that reads its prompt. Each step of the loop then

1. drafts: where the text ends the way a practised sequence went on (the prompt and
   output of an earlier lossless call, ``shortcut/sequences.py``), the drafter proposes
   what followed there and runs no layer at all. Otherwise
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
call gives the same tokens). Numerically, a verified position's logits come from a
several-token forward instead of a one-token forward; in float32 this changes logits by
about 1e-6, which flips an argmax only at an exact near-tie.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from ..policy.heads import ExitHeads, Prediction
from ..observe.observer import Observer, Signature
from ..policy.exits import ExitPolicy, PolicyDecision
from ..learn.sequences import SequenceMemory
from .stats import DecodeStats

logger = logging.getLogger(__name__)


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
            hidden = args[0] if args else kwargs["hidden_states"]
            self._hidden, self._start, self._armed = hidden[0].detach(), self._armed, None

    def expect(self, start: int) -> None:
        """The next model forward is a full one over positions from ``start`` on."""
        self._armed = start

    def record(self, position: int, rows: torch.Tensor) -> None:
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
                 heads: ExitHeads | None = None, min_confidence: float = 0.0) -> None:
        self.observer = observer
        self.policy = policy
        self.trail = trail  # where the previous token's memory matches come from
        # With heads, the exit head is asked at the exit inside the forward; when the
        # first token's head is unsure that forward goes on through every layer (the
        # step verification would run anyway) instead of stopping and running again.
        self.draft_heads = heads
        self.min_confidence = min_confidence
        self.prediction: Prediction | None = None
        self.unsure = False
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
        self.exit_layer, self.exit_hidden, self.signature, self.decision = None, None, None, None
        self.prediction, self.unsure = None, False

    def should_run(self, layer_idx: int, hidden: torch.Tensor) -> bool:
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
                self.unsure = float(self.prediction.confidence) < self.min_confidence
                if self.unsure and self.unfamiliar_runs_full:
                    self.exit_layer = None
                    return True
        return layer_idx < self.exit_layer


class ShallowDrafter:
    """Drafts tokens with the shallow path of the model itself."""

    def __init__(self, model: nn.Module, runtime: Any, observer: Observer, heads: ExitHeads,
                 policy: ExitPolicy, trail: Trail, *, max_draft: int, min_confidence: float,
                 stats: DecodeStats, on_full_path: Callable[[torch.Tensor], None] | None = None,
                 num_draft: int | None = None, sequences: SequenceMemory | None = None) -> None:
        self.base = getattr(model, model.base_model_prefix)
        self.model = model
        self.on_full_path = on_full_path  # gets the logits of a token that took the full path
        self.runtime = runtime
        self.heads = heads
        self.step = DraftStep(observer, policy, trail, heads=heads, min_confidence=min_confidence)
        self.max_draft = max_draft
        # Doubles while every drafted token is accepted; the caller carries it from one
        # generate call to the next (a practised workload keeps its long drafts).
        self.num_draft = min(num_draft or 4, max_draft)
        self.stats = stats
        self.sequences = sequences  # practised sequences: drafts that need no layer at all
        self.replayed = False  # whether the latest draft came from them
        # Back-off: after a draft attempt that produced nothing accepted, skip the next
        # `_pause` steps (doubling up to 8): asking costs an SAE encode and a policy
        # decision, a rejected draft its layers and a wider verification, and unfamiliar
        # text mostly answers "full path".
        self._pause = 0
        self._skip = 0
        self.attempted = False  # whether the latest draft() ran any forward
        # Logits [1, 1, V] of the newest token when draft() ran it on the full path (its
        # first token was unfamiliar): the decoding loop then needs no verification.
        self.full_logits: torch.Tensor | None = None
        self.plain_greedy = False  # whether the latest call's output is the model's plain greedy answer

    @torch.no_grad()
    def draft(self, input_ids: torch.Tensor, cache: Any, limit: int, stop_ids: frozenset[int] = frozenset()) -> torch.Tensor:
        """Up to ``min(limit, adaptive length)`` draft tokens after ``input_ids`` [1, T],
        whose last token is not in ``cache`` yet; a drafted token in ``stop_ids`` (end of
        sequence) is the last. Returns [1, k] (k may be 0); the cache is left as it was."""
        self.attempted, self.replayed = False, False
        self.full_logits = None
        if limit <= 0:
            return input_ids[:, :0]
        if self._skip > 0:
            self._skip -= 1
            self.stats.draft_paused += 1
            return input_ids[:, :0]
        replay = self.replay(input_ids, min(limit, self.max_draft), stop_ids)
        if replay.shape[1]:
            return replay
        budget = min(limit, self.num_draft)
        if self.heads.shortlist.numel() == 0:
            return input_ids[:, :0]
        lengths = layer_lengths(cache)
        drafted: list[torch.Tensor] = []
        token = input_ids[:, -1:]
        position = input_ids.shape[1] - 1
        previous = self.runtime.policy
        self.runtime.policy = self.step
        self.attempted = True
        self.step.ceiling = None
        # The first token is the one verification would run anyway: when it is
        # unfamiliar it simply continues through every layer (plain decoding's step).
        self.step.unfamiliar_runs_full = True
        try:
            for index in range(budget):
                self.step.position = position
                self.step.prediction, self.step.unsure = None, False
                hidden = self.base(input_ids=token, cache=cache, use_cache=True,
                                   position_ids=torch.tensor([[position]], device=token.device)).last_hidden_state
                self.stats.draft_forwards += 1
                self.stats.observer_encodes += 1
                self.step.unfamiliar_runs_full = False
                if self.step.exit_layer is None and index == 0:
                    self.stats.full_path_steps += 1
                    if self.step.unsure:
                        self.stats.draft_unsure += 1
                    else:
                        self.stats.draft_unfamiliar += 1
                    self.full_logits = full_logits(self.model, hidden[:, -1:])
                    lengths = layer_lengths(cache)
                    if self.on_full_path is not None:
                        self.on_full_path(self.full_logits)
                    break
                if self.step.exit_layer is None:
                    self.stats.draft_refusals += 1
                    break
                self.step.ceiling = self.step.exit_layer
                self.stats.exited(self.step.exit_layer)
                self.stats.head_params += self.heads.head_cost(self.step.exit_layer)["shortlist"]
                pred = self.step.prediction
                if self.step.unsure:
                    self.stats.draft_unsure += 1
                    break
                token = pred.token_ids.view(1, 1)
                drafted.append(token)
                if int(token) in stop_ids:  # nothing after the end is ever accepted
                    break
                position += 1
        finally:
            self.runtime.policy = previous
            self.step.unfamiliar_runs_full = False
            crop_to(cache, lengths)
        self.stats.drafted += len(drafted)
        return torch.cat(drafted, dim=-1) if drafted else input_ids[:, :0]

    def prompt_draft(self, input_ids: torch.Tensor, limit: int, stop_ids: frozenset[int],
                     sampled: bool) -> torch.Tensor:
        """The draft the prefill forward carries after the prompt [1, T]: its practised
        continuation. A greedy call replays the whole practised answer (bounded by the
        memory's agreement rule, not ``max_draft``: no layer runs to make it); a sampled
        answer soon leaves the practised greedy one, so it risks no more than any draft."""
        return self.replay(input_ids, min(limit, self.max_draft) if sampled else limit, stop_ids)

    def replay(self, input_ids: torch.Tensor, limit: int, stop_ids: frozenset[int]) -> torch.Tensor:
        """The continuation of a practised sequence that the text [1, T] ends like (no
        layer runs); [1, 0] when there is none or no memory."""
        if self.sequences is None:
            return input_ids[:, :0]
        tokens, _ = self.sequences.continuation(input_ids[0].tolist(), limit)
        for i, token in enumerate(tokens):
            if token in stop_ids:  # nothing after the end is ever accepted
                tokens = tokens[:i + 1]
                break
        if not tokens:
            return input_ids[:, :0]
        self.attempted, self.replayed = True, True
        self.stats.drafted += len(tokens)
        self.stats.replayed += len(tokens)
        return torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device)

    def record(self, drafted: int, accepted: int) -> None:
        """Adapt the draft length and the back-off to the measured acceptance of the
        latest draft."""
        if self.attempted and accepted == 0:
            self._pause = min(8, max(1, 2 * self._pause))
            self._skip = self._pause
        elif accepted > 0:
            self._pause = 0
        if drafted == 0:
            return
        self.stats.accepted += accepted
        if self.replayed:  # the shallow path's draft length adapts to its own drafts only
            self.stats.replay_accepted += accepted
            return
        if accepted == drafted:
            self.num_draft = min(self.max_draft, 2 * self.num_draft)
        else:  # the next draft proposes one more than this one got accepted
            self.num_draft = max(1, min(self.num_draft - 1, accepted + 1))


def full_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
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
    for layer, length in zip(cache.layers, lengths):
        extra = (layer.get_seq_length() if layer.is_initialized else 0) - length
        if extra > 0:
            layer.crop(-extra)


def choose_next(input_ids: torch.Tensor, logits: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                do_sample: bool, streamer: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Pick the next token from full-vocabulary ``logits`` [1, V] exactly as plain
    decoding does (processors, then ``argmax`` or one ``multinomial`` draw); returns the
    extended ids, the token [1, 1] and whether generation is finished."""
    scores = logits_processor(input_ids, logits.to(dtype=torch.float32, copy=True))
    if do_sample:
        token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
    else:
        token = scores.argmax(dim=-1, keepdim=True)
    input_ids = torch.cat([input_ids, token], dim=-1)
    if streamer is not None:
        streamer.put(token.cpu())
    return input_ids, token, bool(stopping_criteria(input_ids, scores).all())


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


def prefill(model: nn.Module, input_ids: torch.Tensor, drafts: torch.Tensor, generation_config: Any,
            model_kwargs: dict[str, Any]) -> torch.Tensor:
    """Run the prompt [1, T] through the full model as plain decoding's prefill does,
    with ``drafts`` [1, k] after it in the same forward (the prompt's replayed
    continuation: an exact repeat verifies its answer with the forward that reads the
    prompt). Returns the logits [1, k + 1, V] that pick the first k + 1 new tokens."""
    k = drafts.shape[1]
    if k:
        model_kwargs = dict(model_kwargs)
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], k)], dim=-1)
        positions = model_kwargs.get("position_ids")
        if positions is not None:
            after = positions[:, -1:] + torch.arange(1, k + 1, device=positions.device)
            model_kwargs["position_ids"] = torch.cat([positions, after], dim=-1)
        if "logits_to_keep" in model_kwargs:
            model_kwargs["logits_to_keep"] = k + 1
        input_ids = torch.cat([input_ids, drafts], dim=-1)
    return model._prefill(input_ids, generation_config, model_kwargs).logits[:, -(k + 1):]


def make_decoder(drafter: ShallowDrafter, stats: DecodeStats) -> Callable[..., torch.Tensor]:
    """The decoding loop handed to ``generate(custom_generate=...)`` (see the module doc)."""

    @torch.no_grad()
    def speculative_decode(model: nn.Module, input_ids: torch.Tensor, logits_processor: Any,
                           stopping_criteria: Any, generation_config: Any, synced_gpus: bool = False,
                           streamer: Any = None, **model_kwargs: Any) -> torch.Tensor:
        do_sample = bool(generation_config.do_sample)
        drafter.plain_greedy = plain_greedy(generation_config, logits_processor, model_kwargs)
        cache = model_kwargs["cache"]
        cache.activate_past_recording()  # sliding-window layers must be able to roll back
        eos = generation_config.eos_token_id
        stop_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else [int(e) for e in eos])
        trail = drafter.step.trail
        trail.expect(0)
        limit = generation_config.max_length - input_ids.shape[1] - 1
        drafts = drafter.prompt_draft(input_ids, limit, stop_ids, do_sample) \
            if can_extend_prefill(generation_config, model_kwargs) else input_ids[:, :0]
        pending = prefill(model, input_ids, drafts, generation_config, model_kwargs)
        while True:
            accepted, finished = 0, False
            for i in range(pending.shape[1]):
                input_ids, token, finished = choose_next(input_ids, pending[:, i], logits_processor,
                                                         stopping_criteria, do_sample, streamer)
                matched = i < drafts.shape[1] and int(token) == int(drafts[0, i])
                accepted += matched  # a drafted end-of-sequence that matched counts too
                if finished or not matched:
                    break
            drafter.record(drafts.shape[1], accepted)
            # The cache may hold only tokens before the newest one.
            valid = input_ids.shape[1] - 1
            crop_all(cache, valid)
            trail.truncate(valid)
            if finished:
                break
            limit = generation_config.max_length - input_ids.shape[1] - 1
            drafts = drafter.draft(input_ids, cache, limit, stop_ids)
            if drafter.full_logits is not None:  # the newest token already took the full path
                pending = drafter.full_logits
                continue
            verify = torch.cat([input_ids[:, -1:], drafts], dim=-1)
            stats.verify_forwards += 1
            trail.expect(valid)
            pending = model(input_ids=verify, cache=cache, use_cache=True).logits
        if streamer is not None:
            streamer.end()
        return input_ids

    return speculative_decode


UNSUPPORTED = {
    "num_beams": lambda v: v not in (None, 1),
    "num_return_sequences": lambda v: v not in (None, 1),
    "assistant_model": lambda v: v is not None,
    "prompt_lookup_num_tokens": lambda v: v is not None,
    "assistant_early_exit": lambda v: v is not None,
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
}


def unsupported_options(model: nn.Module, kwargs: dict[str, Any], input_ids: Any) -> list[str]:
    """Generate options lossless drafting cannot honour; the call then takes the full
    path (same tokens as the unwrapped model, no drafting)."""
    config = kwargs.get("generation_config") or model.generation_config
    bad = [f"{name}={kwargs.get(name, getattr(config, name, None))!r}" for name, test in UNSUPPORTED.items()
           if test(kwargs.get(name, getattr(config, name, None)))]
    if not isinstance(input_ids, torch.Tensor):
        bad.append("input_ids not given as a tensor")
    elif input_ids.shape[0] != 1:
        bad.append(f"batch size {input_ids.shape[0]} (drafts are verified one sequence at a time)")
    return bad
