"""Fast mode: shallow paths commit, a bounded error rate is measured and kept.

Each decoding step runs the token through the layers up to the observer; the policy
reads its SAE signature and picks an exit layer (a familiar situation) or the full
path. At the exit the head scores the practised shortlist, and the token it names is
committed when the head is confident (at least ``min_confidence``). A committed token
runs no deeper layer and writes no deeper keys/values: it is *pending*.

The next token that needs the full path (unfamiliar, unsure, or wanting an exit deeper
than a pending token's) first catches up: the cache is cropped to the last exact
position and one batched full forward runs over the pending tokens and the new one.
So every full-path token attends to the full model's keys and values, and the
deviations from the full model are exactly the committed tokens that differed (why
not CALM-style propagated keys/values: ``docs/findings.md``). The catch-up forward
also tells, for free, which pending tokens the full model would have picked: every
comparison is an audit. Pending tokens at the end of a call are the saving; a seeded
random ``audit_fraction`` of calls catches up at the end too, so the error rate is
measured even where nothing needed the full path.

Audits calibrate two bars: the head's confidence and the signature's familiarity
(cosine similarity to the nearest practised signature; the policy's own bar is the
floor). Each error raises both a step, each agreement lowers them by
``target_error_rate / (1 - target_error_rate)`` of a step, so they settle where about
that share of audited tokens differ. Why both: on practised answers the heads are right
at nearly every position, but one wrong token moves the text off the practised
trajectory, where the shallow signature still looks familiar and the heads would keep
committing memorised tokens. The wrong first token is usually one the head is unsure of
(confidence); on text that only resembles the practised one, the wrong heads are
confident and the signatures a little less familiar. And once a catch-up shows that a
committed token differed, the text has left the practised trajectory: the rest of that
call takes the full path.

Forks: practised answers can share their start and part at a detail the shallow path
cannot see (two trivia answers "The 1982 ..." and "The 1997 ..." part at a digit). Where
the text agrees with a practised sequence (``shortcut/learn/sequences.py``) for
``SHORT_MATCH`` tokens or more and the head names another token than the one that
followed there, the token takes the full path (``vetoes``).

Practised answers: in a plain greedy call (no sampling, no logits processor, no padding)
whose prompt begins a practised sequence exactly, the sequence's continuation is the
full model's own greedy answer to that prompt (``shortcut/learn/sequences.py`` keeps only
those), so it is committed token by token with no layer at all: the top rung of the
skill ladder. Those tokens are pending in every layer; where the answer ends before the
call does, the next token catches up (one batched full forward, which audits them).

Padded batches (:class:`FastBatchDecoder`): each row whose prompt (padding stripped)
was practised verbatim commits its practised answer with no layer, when the answer is
complete (the row's stopping criteria end it within the answer) and the prefill picks
its first token; every other row decodes losslessly in the same batch (its answer, if
any, rides as a verified draft: ``shortcut/decode/batched.py``). Only greedy calls with
per-row stopping criteria and no logits processor or streamer commit; others decode the
whole batch losslessly. Shallow tokens are not committed in batches. A seeded
``audit_fraction`` of committed rows is audited after the call (a full forward over
the row's prompt and answer), as a single call's pending tokens are at its end.

Which calls commit at all: only those whose prompt was practised verbatim (in the prompt
log before the heads' latest re-fit; ``FastConfig.practised_prompts_only``).
Every deep layer reads every prompt token, so a reworded prompt (another opening, one
changed detail) moves the answer in ways the shallow path cannot see, and no bar on the
early-layer signals separates those tokens (measured in ``docs/findings.md``). Other
calls decode losslessly with the same skills (``lossless_calls``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..learn.sequences import SHORT_MATCH, SequenceMemory
from ..policy.heads import ExitHeads
from .batched import Commits, decode_batch
from .lossless import (
    DraftStep,
    SequenceInputs,
    ShallowDrafter,
    Trail,
    choose_next,
    crop_all,
    full_logits,
    plain_greedy,
    plain_if_undecodable,
    prefill,
    unpadded,
)
from .prefix import PromptReuse
from .stats import DecodeStats

CONFIDENCE_STEP = 0.05  # how far one audited error raises the confidence bar
MAX_CONFIDENCE = 0.99  # above this a head hardly ever commits; errors there are not about confidence
FAMILIARITY_STEP = 0.01  # how far one audited error raises the familiarity bar
MAX_FAMILIARITY = 0.999  # exact repeats sit at ~1.0: they keep committing


class FastController:
    """Fast mode's two bars, audit statistics and calibration, kept across generate
    calls."""

    def __init__(self, *, min_confidence: float, target_error_rate: float, audit_fraction: float,
                 seed: int, min_familiarity: float = 0.0) -> None:
        self.base_confidence = min_confidence
        self.min_confidence = min_confidence
        self.base_familiarity = min_familiarity
        self.min_familiarity = min_familiarity
        self.target_error_rate = target_error_rate
        self.audit_fraction = audit_fraction
        self.generator = torch.Generator().manual_seed(seed)
        self.audits = 0
        self.errors = 0
        self.exits = 0
        self.unsure = 0
        self.full_steps = 0
        self.catch_ups = 0
        self.lossless_calls = 0  # calls decoded losslessly (prompt not practised verbatim)
        self.vetoes = 0  # confident heads overruled by a practised sequence that goes on otherwise
        self.recalled = 0  # tokens committed from the prompt's practised answer (no layer ran)
        self.committed: list[int] = []  # positions (in the returned ids) of the latest call's committed tokens
        self.committed_rows: list[list[int]] = []  # the same per row, for the latest call when it was a batch
        self.calibrated_for = 0  # the skills' consolidation count the bars were measured on

    def recalibrate(self, consolidations: int) -> None:
        """Start the bars again from their floors for re-fitted skills: audits of the
        earlier heads say nothing about the new ones (errors of a first practice round
        would otherwise keep the bars high for hundreds of audits). Counts are kept."""
        self.min_confidence, self.min_familiarity = self.base_confidence, self.base_familiarity
        self.calibrated_for = consolidations

    @property
    def error_rate(self) -> float:
        """Measured fraction of audited committed tokens that differed from the full path's."""
        return self.errors / self.audits if self.audits else 0.0

    def audit_now(self) -> bool:
        """Whether to audit the next committed token (true with probability ``audit_fraction``)."""
        return bool(torch.rand((), generator=self.generator) < self.audit_fraction)

    def record_audit(self, agreed: bool) -> None:
        """Count one audited token and move both bars (head confidence, signature
        familiarity): up a step on an error, down by ``target / (1 - target)`` of a step
        on an agreement, so that they settle where about ``target_error_rate`` of audited
        tokens differ. Confidence catches the unsure heads of practised text; familiarity
        the confidently wrong heads on text that only resembles it."""
        self.audits += 1
        self.errors += int(not agreed)
        if not agreed:
            self.min_confidence = min(MAX_CONFIDENCE, self.min_confidence + CONFIDENCE_STEP)
            self.min_familiarity = min(MAX_FAMILIARITY, self.min_familiarity + FAMILIARITY_STEP)
        else:
            share = self.target_error_rate / (1.0 - self.target_error_rate)
            self.min_confidence = max(self.base_confidence, self.min_confidence - share * CONFIDENCE_STEP)
            self.min_familiarity = max(self.base_familiarity, self.min_familiarity - share * FAMILIARITY_STEP)

    def report(self) -> dict[str, float]:
        """The counters and current bars, by name."""
        return {"exits": self.exits, "recalled": self.recalled, "unsure": self.unsure, "vetoes": self.vetoes,
                "full_steps": self.full_steps,
                "catch_ups": self.catch_ups, "lossless_calls": self.lossless_calls, "audits": self.audits,
                "audit_errors": self.errors, "measured_error_rate": self.error_rate,
                "min_confidence": self.min_confidence, "min_familiarity": self.min_familiarity}


class FastStep(DraftStep):
    """Layer policy of one fast-mode token: run through the observer layer, decide, and
    at the exit keep the head's shortlist logits if it is confident. A token that needs
    the full path continues through every layer in the same forward when nothing is
    pending (``unfamiliar_runs_full``), and stops otherwise (the loop catches up)."""

    def __init__(self, observer: Any, policy: Any, heads: ExitHeads, controller: FastController,
                 trail: Trail, sequences: SequenceMemory | None = None) -> None:
        super().__init__(observer, policy, trail)
        self.heads = heads
        self.controller = controller
        self.sequences = sequences
        self.checked_layer: int | None = None  # exit whose head was asked this step
        self.shortlist_logits: torch.Tensor | None = None  # [1, S] of a committed exit
        self.expected: int | None = None  # the practised sequences' next token here, if they know it

    def begin(self, input_ids: torch.Tensor | None) -> None:
        """Start a forward: forget the previous token's exit and shortlist."""
        super().begin(input_ids)
        self.checked_layer, self.shortlist_logits = None, None

    def should_run(self, layer_idx: int, hidden: torch.Tensor) -> bool:
        """As :meth:`DraftStep.should_run`, but commit an exit only when familiar and confident enough."""
        run = super().should_run(layer_idx, hidden)
        if (layer_idx == self.signature_layer and self.exit_layer is not None and self.decision is not None
                and self.decision.familiarity < self.controller.min_familiarity):
            self.exit_layer = None  # familiar enough to draft, not to commit
            return self.unfamiliar_runs_full
        if layer_idx == self.exit_layer:
            self.checked_layer = layer_idx
            logits = self.heads.shortlist_logits(layer_idx, hidden[:, -1])
            if float(torch.softmax(logits.float(), dim=-1).max()) < self.controller.min_confidence:
                self.exit_layer = None  # unsure: the full path, as for an unfamiliar token
                return self.unfamiliar_runs_full
            if self.expected is not None and int(self.heads.shortlist[logits.argmax(-1)]) != self.expected:
                self.controller.vetoes += 1
                self.exit_layer = None  # a fork between practised answers: the full path decides
                return self.unfamiliar_runs_full
            self.shortlist_logits = logits
        return run

    def expect(self, input_ids: torch.Tensor) -> None:
        """Before feeding the newest token of ``input_ids`` [1, T]: the token that followed
        this text in a practised sequence that agrees with at least ``SHORT_MATCH`` tokens
        of it, or ``None``."""
        self.expected = None
        if self.sequences is not None:
            tokens, agreement = self.sequences.continuation(input_ids[0].tolist(), 1)
            if tokens and agreement >= SHORT_MATCH:
                self.expected = tokens[0]


class FastDecoder:
    """The fast-mode decoding loop, passed to ``generate(custom_generate=...)``: each call
    decodes one batch-1 sequence, committing shallow tokens (pending until a catch-up)
    and taking the full path where the step does not commit. Every forward carries the
    mask and positions plain decoding gives those positions (``SequenceInputs``);
    ``streamer`` and ``on_fallback`` as in ``lossless.make_decoder``.

    State of the call under way: ``exact`` (every layer's cache is the full model's up
    to this position), ``pending`` (the shallow path's token after each pending
    position, in order: what a catch-up audits), ``unfed`` (pending tokens from the
    practised answer have keys/values in no layer) and ``off_track`` (a committed token
    differed from the full model's: the rest of the call takes the full path)."""

    def __init__(self, runtime: Any, step: FastStep, controller: FastController, stats: DecodeStats, *,
                 streamer: Any = None, on_fallback: Callable[[str], None] | None = None,
                 reuse: PromptReuse | None = None) -> None:
        self.runtime, self.step, self.controller, self.stats = runtime, step, controller, stats
        self.reuse = reuse
        self.heads = step.heads
        self.streamer, self.on_fallback = streamer, on_fallback
        self.model: Any = None
        self.base: Any = None  # the model's decoder stack, which the step's layer policy steers
        self.cache: Any = None
        self.vocab = 0
        self.inputs: SequenceInputs | None = None
        self.exact = 0
        self.pending: list[int] = []
        self.unfed = False
        self.off_track = False

    @torch.no_grad()
    def __call__(self, model: Any, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                 generation_config: Any, synced_gpus: bool = False, **model_kwargs: Any) -> torch.Tensor:
        """Decode like ``model.generate``'s loop; returns the ids, prompt included."""
        controller, step = self.controller, self.step
        controller.committed = []
        output = plain_if_undecodable(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                      synced_gpus, self.streamer, model_kwargs, self.on_fallback)
        if output is not None:
            return output
        self.model, self.base = model, getattr(model, model.base_model_prefix)
        self.inputs, self.cache = SequenceInputs(model_kwargs), model_kwargs["cache"]
        self.cache.activate_past_recording()  # catching up crops pending tokens
        if self.reuse is not None:
            self.reuse.fill(model, input_ids, model_kwargs, chunked=generation_config.prefill_chunk_size is not None)
        step.trail.expect(self.cache.get_seq_length())  # a kept prefix is not read again
        logits = prefill(model, input_ids, input_ids[:, :0], generation_config, model_kwargs, self.inputs)[:, -1]
        self.vocab = logits.shape[-1]
        self.exact, self.pending, self.unfed, self.off_track = input_ids.shape[1], [], False, False
        prompt_length = input_ids.shape[1]
        # The practised answer to exactly this prompt (the full model's own greedy tokens,
        # see sequences.py) is committed with no layer at all while the text follows it.
        answer: list[int] = []
        if step.sequences is not None and plain_greedy(generation_config, logits_processor, model_kwargs):
            answer = step.sequences.answer(input_ids[0].tolist(), generation_config.max_length - prompt_length)
        following = bool(answer)
        while True:
            input_ids, token, finished = choose_next(input_ids, logits, logits_processor, stopping_criteria,
                                                     bool(generation_config.do_sample), self.streamer)
            if finished:
                break
            if self.off_track:
                logits = self._full_step(input_ids, token)
                continue
            generated = input_ids.shape[1] - prompt_length
            following = following and generated <= len(answer) and int(token) == answer[generated - 1]
            if following and generated < len(answer):  # pending: the answer names the next token
                logits = self._commit_answer(input_ids, answer[generated])
                continue
            if self.unfed:  # no layer holds the recalled tokens' keys/values: catch up first
                controller.full_steps += 1
                logits = self._catch_up(input_ids)
                continue
            logits = self._shallow_step(input_ids, token)
        if self.pending and controller.audit_now():
            self._catch_up(input_ids[:, :-1])  # the last token was never fed
        if self.reuse is not None:  # the prompt's keys and values are the full model's; committed ones need not be
            self.reuse.kept(model, input_ids, self.cache, prompt_length)
        if self.streamer is not None:
            self.streamer.end()
        return input_ids

    def _forward_inputs(self, start: int, end: int, device: torch.device) -> dict[str, Any]:
        assert self.inputs is not None  # set when a call starts
        return self.inputs(start, end, device)

    def _full_step(self, input_ids: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """Off the practised trajectory: the newest token through every layer."""
        self.controller.full_steps += 1
        newest = input_ids.shape[1] - 1
        logits = self.model(input_ids=token, cache=self.cache, use_cache=True,
                            **self._forward_inputs(newest, newest + 1, token.device)).logits[:, -1]
        self.exact = input_ids.shape[1]
        return logits

    def _pend(self, input_ids: torch.Tensor, shallow_token: int) -> None:
        """Commit the shallow path's ``shallow_token`` as the next token: pending until a
        catch-up audits it."""
        self.pending.append(shallow_token)
        self.controller.committed.append(input_ids.shape[1])  # where the next token lands

    def _commit_answer(self, input_ids: torch.Tensor, next_token: int) -> torch.Tensor:
        """Commit the practised answer's ``next_token`` (no layer runs); returns logits
        that choose it."""
        self.controller.recalled += 1
        self.stats.recall_committed += 1
        self._pend(input_ids, next_token)
        logits = torch.full((1, self.vocab), float("-inf"), device=input_ids.device)
        logits[0, next_token] = 0.0
        self.unfed = True
        return logits

    def _shallow_step(self, input_ids: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """Feed the newest token through the layers the step runs; commit its exit, or
        finish it on the full path (catching up first when something is pending)."""
        step, controller, stats = self.step, self.controller, self.stats
        if not self.pending:  # nothing pending: any exit is fine, the full path goes on
            step.ceiling = None
        step.unfamiliar_runs_full = not self.pending
        newest = input_ids.shape[1] - 1
        step.position = newest
        step.expect(input_ids)
        previous, self.runtime.policy = self.runtime.policy, step
        try:
            hidden = self.base(input_ids=token, cache=self.cache, use_cache=True,
                          **self._forward_inputs(newest, newest + 1, token.device)).last_hidden_state
        finally:
            self.runtime.policy = previous
        stats.observer_encodes += 1
        if step.checked_layer is not None:
            stats.head_params += self.heads.head_cost(step.checked_layer)["shortlist"]
        if step.exit_layer is not None:  # committed: pending until something catches up
            committed = step.shortlist_logits
            assert committed is not None  # a committed exit keeps its head's shortlist logits
            controller.exits += 1
            stats.exited(step.exit_layer)
            if step.ceiling is None:  # later exits must not need layers this one skipped
                step.ceiling = step.exit_layer
            self._pend(input_ids, int(self.heads.shortlist[committed.argmax(-1)]))
            logits = torch.full((1, self.vocab), float("-inf"), device=input_ids.device)
            logits[:, self.heads.shortlist] = committed.float()
            return logits
        controller.full_steps += 1
        controller.unsure += int(step.checked_layer is not None)
        if self.pending:
            return self._catch_up(input_ids)
        self.exact = input_ids.shape[1]  # nothing pending: the forward already ran every layer
        return full_logits(self.model, hidden[:, -1])

    def _catch_up(self, ids: torch.Tensor) -> torch.Tensor:
        """Full forward over the pending tokens and the newest one of ``ids``; audits the
        pending ones; returns the logits after the newest token."""
        self.controller.catch_ups += 1
        crop_all(self.cache, self.exact)
        self.step.trail.expect(self.exact)
        out = self.model(input_ids=ids[:, self.exact:], cache=self.cache, use_cache=True,
                         **self._forward_inputs(self.exact, ids.shape[1], ids.device)).logits
        self._audit(out)
        self.exact, self.unfed = ids.shape[1], False
        return out[:, -1]

    def _audit(self, logits: torch.Tensor) -> None:
        """Compare each pending token with the full model's choice in ``logits`` [1, P, V]
        (the catch-up's, position by position) and clear them; the first disagreement
        sets ``off_track``."""
        for i, top in enumerate(self.pending):
            agreed = top == int(logits[0, i].argmax())
            self.controller.record_audit(agreed)
            if not agreed:  # later pending tokens followed the error: not independent samples
                self.off_track = True
                break
        self.pending.clear()


class FastBatchDecoder:
    """The fast-mode loop for a padded batch, passed to ``generate(custom_generate=...)``:
    the lossless batched loop (``decode_batch``) in which the rows ``allowed`` (their
    prompt practised verbatim) commit complete practised answers with no layer (see the
    module doc). Every other row gets exactly plain batched ``generate``'s tokens.

    After the call a seeded ``audit_fraction`` of committed rows (one draw per row with
    pending tokens, as a single call draws once) is audited: one full forward over the
    row's prompt and answer, without padding or cache, compares each committed token
    with the full model's choice and feeds ``FastController``'s error rate. An audit
    measures; it does not change the returned tokens (as a single call's final
    catch-up). ``controller.committed_rows`` lists each row's committed positions."""

    def __init__(self, drafter: ShallowDrafter, controller: FastController, stats: DecodeStats,
                 allowed: list[bool], *, streamer: Any = None,
                 on_fallback: Callable[[str], None] | None = None) -> None:
        self.drafter, self.controller, self.stats, self.allowed = drafter, controller, stats, allowed
        self.streamer, self.on_fallback = streamer, on_fallback

    @torch.no_grad()
    def __call__(self, model: Any, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
                 generation_config: Any, synced_gpus: bool = False, **model_kwargs: Any) -> torch.Tensor:
        """Decode like ``model.generate``'s loop; returns the ids, prompts included."""
        controller = self.controller
        controller.committed, controller.committed_rows = [], [[] for _ in range(input_ids.shape[0])]
        self.drafter.plain_greedy = False  # a batch's rows are not logged as practised answers
        output = plain_if_undecodable(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                      synced_gpus, self.streamer, model_kwargs, self.on_fallback)
        if output is not None:
            return output
        prompts = unpadded(input_ids, model_kwargs.get("attention_mask"))
        commits = Commits(self.allowed)
        out = decode_batch(model, self.drafter, self.stats, input_ids, logits_processor, stopping_criteria,
                           generation_config, self.streamer, model_kwargs, commits=commits)
        for r, tokens in sorted(commits.tokens.items()):
            controller.recalled += len(tokens)
            start = commits.start[r]
            controller.committed_rows[r] = list(range(start, start + len(tokens)))
            if tokens and controller.audit_now():
                first = int(out[r, start - 1])  # the answer's first token, picked by the prefill
                self._audit(model, prompts[r] + [first], tokens)
        return out

    def _audit(self, model: Any, text: list[int], committed: list[int]) -> None:
        """Audit ``committed``, the tokens that followed ``text``: one full forward over
        ``text`` and all but the last of them; the first disagreement ends the audit (the
        tokens after it followed the error: not independent samples)."""
        self.controller.catch_ups += 1
        ids = torch.tensor([text + committed[:-1]], device=model.device)
        logits = model(input_ids=ids, use_cache=False).logits[0, len(text) - 1:]
        for i, token in enumerate(committed):
            agreed = token == int(logits[i].argmax())
            self.controller.record_audit(agreed)
            if not agreed:
                break
