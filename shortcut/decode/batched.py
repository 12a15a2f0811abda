"""Lossless drafting for padded batches: every row drafts from the practised sequences,
one full forward per step verifies all rows, and each row gets exactly the tokens the
unwrapped model's batched ``generate`` gives it.

:func:`decode_batch` is what the lossless loop (``lossless.make_decoder``) runs for a
call of more than one row. Transformers has prepared the call as for a single row
(processors, stopping criteria, a dynamic cache, the left-padded attention mask and the
position ids it derives from it). Then

1. the prefill carries, after each row's prompt, that row's draft, padded to a common
   width: a greedy row whose prompt was practised verbatim proposes its whole practised
   answer (``SequenceMemory.answer``), so a batch of exact repeats is verified by the
   forward that reads its prompts;
2. each step, every unfinished row proposes what followed the end of its text in a
   practised sequence (``SequenceMemory.lookup``; no layer runs), as many tokens as the
   lengths learned from verification outcomes give its situation (the drafter's
   ``DraftLengths``, shared with single-row calls; a row whose drafts keep failing also
   backs off as the single-row loop does), and one forward over ``[newest token,
   drafts...]`` of every row (shorter rows padded at the end) verifies them all;
3. each row picks its next tokens from the full model's logits as plain decoding does,
   and accepts its drafts while they match.

A forward (the prefill included) carries drafts only when every unfinished row has one.
Its width is that of its widest row for every row, and what drafting saves is forwards:
while one row has nothing to propose the batch needs its next forward anyway, and the
other rows' accepted drafts only move tokens they would have produced one a step into a
wider forward, while the padding of the rows without a draft is work for nothing (on a
CPU, where each token of a forward costs compute, that made mixed batches slower than
plain decoding).

How rows accept (:func:`row_wise`):

- *row by row* for greedy calls with no logits processor and stopping criteria that
  judge each row on its own text (length, end of sequence, stop strings): each
  row accepts its own matching prefix. The cache keeps one length for all rows: a row
  that accepted fewer tokens than the furthest one has its cache entries and mask moved
  right by the difference, so its rejected drafts fall off the end and it gains that many
  masked slots on the left (more left padding). Its position ids are its own (plain
  ``generate``'s: the prompt's, counting on from its last), so every row's keys and
  queries are those of plain decoding, and sliding windows see the same keys;
- *in lockstep* otherwise (sampling, logits processors, other stopping criteria,
  streamers, models without position ids): every step takes, position by position, one
  token for every row from the processors applied to the whole batch and one
  ``argmax`` or one ``multinomial`` draw over all rows, as plain decoding's step does, and
  goes on only while every unfinished row's token matched its draft. Rows stay aligned,
  processors and criteria see exactly what they see in plain decoding, and a seeded
  call consumes the random stream as plain sampling does (same tokens). Drafts are only
  fed when every unfinished row has one (a row without one stops the step after its
  first position anyway).

Fast mode (:class:`Commits`, from ``shortcut/decode/fast.py``): in row-by-row calls, a
row allowed to commit whose practised answer is complete (its stopping criteria end the
row within it: an end of sequence, a stop string or the length limit) takes no draft
in the prefill; when the prefill's logits pick the answer's first token, the rest of the
answer is appended with no layer run and the row is finished. Its prompt is read by the
prefill, its answer by no layer. Other rows (an incomplete answer, a first token that
differs, a prompt not allowed to commit) decode losslessly as above.

A row that is finished (its stopping criteria say so, and the call has an end-of-sequence
criterion, so plain decoding pads it) leaves the cache and costs nothing more; its
output is padded with the pad token as plain ``generate`` pads it. Without an
end-of-sequence criterion plain decoding goes on producing real tokens for finished rows
until every row is finished, and so does this loop.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StopStringCriteria,
)

from .lossless import SequenceInputs, can_extend_prefill, crop_all, prefill, unpadded
from .stats import DecodeStats

# Stopping criteria whose verdict on a row depends on that row's own text only.
ROW_CRITERIA = (EosTokenCriteria, MaxLengthCriteria, StopStringCriteria)


class Commits:
    """Fast mode's part in a padded batch: ``allowed[r]`` says whether row ``r`` may commit
    its practised answer with no layer (see the module doc); :func:`decode_batch` fills
    ``tokens[r]`` with the tokens it committed so (the answer after its first token,
    which the prefill picked) and ``start[r]`` with the position of the first of them in
    the returned row."""

    def __init__(self, allowed: list[bool]) -> None:
        self.allowed = allowed
        self.tokens: dict[int, list[int]] = {}
        self.start: dict[int, int] = {}


def row_wise(do_sample: bool, logits_processor: Any, stopping_criteria: Any, model_kwargs: dict[str, Any],
             streamer: Any) -> bool:
    """Whether rows may accept different numbers of tokens per step (see the module doc):
    greedy, no logits processor, per-row stopping criteria (with an end-of-sequence one,
    or only the length limit, so no finished row must go on), position ids given (a row's
    positions are then its own, however its cache is shifted), no streamer (it expects one
    column of tokens per step)."""
    criteria = list(stopping_criteria)
    if do_sample or len(logits_processor) or streamer is not None or model_kwargs.get("position_ids") is None:
        return False
    if not all(isinstance(c, ROW_CRITERIA) for c in criteria):
        return False
    has_eos = any(hasattr(c, "eos_token_id") for c in criteria)
    return has_eos or all(isinstance(c, MaxLengthCriteria) for c in criteria)


class Backoff:
    """Per-row back-off of recalled drafts: after a draft of which nothing was accepted,
    the row skips the next ``pause`` steps (doubling up to 8), as the single-row drafter
    does: in a batch a rejected draft widens the forward of every row."""

    def __init__(self, rows: int) -> None:
        self.pause = [0] * rows
        self.skip = [0] * rows

    def ready(self, row: int) -> bool:
        """Whether ``row`` may draft this step (counts down a skip)."""
        if self.skip[row] > 0:
            self.skip[row] -= 1
            return False
        return True

    def record(self, row: int, drafted: int, accepted: int) -> None:
        """Adapt ``row``'s pause to its latest draft."""
        if drafted and accepted == 0:
            self.pause[row] = min(8, max(1, 2 * self.pause[row]))
            self.skip[row] = self.pause[row]
        elif accepted > 0:
            self.pause[row] = 0


def shift_rows(cache: Any, mask: torch.Tensor, shifts: list[int]) -> None:
    """Move row ``r``'s cache entries and mask right by ``shifts[r]`` slots (in place),
    with masked, zeroed slots coming in on the left. Every layer stores the last slots
    up to the cache's length, so a shift of the stored tensor is a shift in sequence
    positions; what a sliding-window layer drops on the left was out of the window."""
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        for r, d in enumerate(shifts):
            if d <= 0:
                continue
            for states in (layer.keys, layer.values):
                stored = states.shape[-2]
                if d >= stored:
                    states[r].zero_()
                    continue
                states[r, :, d:] = states[r, :, :stored - d].clone()
                states[r, :, :d] = 0
    for r, d in enumerate(shifts):
        if d > 0:
            mask[r, d:] = mask[r, :-d].clone()
            mask[r, :d] = 0


def select_rows(cache: Any, keep: torch.Tensor) -> None:
    """Keep only the batch rows ``keep`` in every layer of ``cache``."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.batch_select_indices(keep)


def complete_answer(answer: list[int], row: list[int], stopping_criteria: Any) -> list[int]:
    """The prefix of ``answer`` after which ``stopping_criteria`` end the row whose ids are
    ``row``, or ``[]`` where they do not end it within ``answer``."""
    ids = list(row)
    for i, token in enumerate(answer):
        ids.append(token)
        if bool(stopping_criteria(torch.tensor([ids]), None)[0]):
            return answer[:i + 1]
    return []


def cut_at_stop(tokens: list[int], stop_ids: frozenset[int]) -> list[int]:
    """``tokens`` up to and including the first end of sequence (nothing after it is
    ever accepted)."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i + 1]
    return tokens


def recall(drafter: Any, text: list[int], limit: int, stop_ids: frozenset[int],
           opening: bool) -> tuple[list[int], tuple[str, bool, int] | None]:
    """What followed the end of ``text`` in a practised sequence, as many tokens (at most
    ``limit``) as the drafter's learned lengths give its situation (``opening``: right
    after the prompt), and that situation, for :meth:`DraftLengths.update`; ``([], None)``
    without a match or without a memory."""
    if drafter.sequences is None or limit <= 0:
        return [], None
    tokens, agreement = drafter.sequences.lookup(text, limit)
    if not tokens:
        return [], None
    tokens = tokens[:drafter.lengths.length("memory", opening, agreement)]
    if not tokens:
        return [], None
    return cut_at_stop(tokens, stop_ids), ("memory", opening, agreement)


@torch.no_grad()
def decode_batch(model: Any, drafter: Any, stats: DecodeStats, input_ids: torch.Tensor, logits_processor: Any,
                 stopping_criteria: Any, generation_config: Any, streamer: Any,
                 model_kwargs: dict[str, Any], commits: Commits | None = None) -> torch.Tensor:
    """Decode the batch ``input_ids`` [B, T] (left padded, ``model_kwargs`` as
    ``generate`` prepared them, cache included) with recalled drafts; returns the ids
    [B, T + N] plain ``generate`` returns (see the module doc). With ``commits`` (fast
    mode) the rows it allows commit complete practised answers with no layer, in
    row-by-row calls only; it records what they committed."""
    device = input_ids.device
    batch, width = input_ids.shape
    do_sample = bool(generation_config.do_sample)
    independent = row_wise(do_sample, logits_processor, stopping_criteria, model_kwargs, streamer)
    # Plain decoding pads finished rows only with an end-of-sequence criterion; without
    # one a finished row goes on producing tokens until every row is finished.
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    pad = generation_config._pad_token_tensor
    pad_id = int(pad) if pad is not None else 0
    eos = generation_config.eos_token_id
    stop_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else [int(e) for e in eos])
    max_length = generation_config.max_length
    max_draft = drafter.max_draft
    inputs = SequenceInputs(model_kwargs)
    # Each row's real text (prompt without its padding, then new tokens): what practised
    # sequences are matched against; and its ids as plain decoding lays them out.
    texts = unpadded(input_ids, inputs.mask)
    seqs = input_ids.tolist()
    # Plain decoding's position of every slot of every row (None: the model counts from its cache).
    positions = inputs.positions_of(0, max_length + max_draft + 1, device) if inputs.positions is not None else None
    cache = model_kwargs["cache"]
    cache.activate_past_recording()  # sliding-window layers must be able to roll back
    unfinished = [True] * batch  # plain decoding's unfinished_sequences
    backoff = Backoff(batch)
    ids = input_ids  # lockstep: the batch as plain decoding holds it
    active = list(range(batch))  # the batch row of each cache row

    extend_prefill = can_extend_prefill(generation_config, model_kwargs)

    situations: list[tuple[str, bool, int] | None] = [None] * batch  # of each row's lookup draft

    # Fast mode: each allowed row's complete practised answer, committed below if the
    # prefill picks its first token.
    answers: dict[int, list[int]] = {}
    if commits is not None and independent and drafter.sequences is not None:
        for r in range(batch):
            if commits.allowed[r]:
                answer = drafter.sequences.answer(texts[r], max_length - len(seqs[r]))
                answer = complete_answer(answer, seqs[r], stopping_criteria)
                if answer:
                    answers[r] = answer

    def propose(first: bool) -> list[list[int]]:
        """Each row's draft (see the module doc), or none for any row unless every
        unfinished row has one (lockstep: all cut to the shortest)."""
        drafts: list[list[int]] = [[] for _ in range(batch)]
        for r in active if extend_prefill or not first else []:
            situations[r] = None
            if first and r in answers:
                continue  # committed after the prefill, with no layer: nothing to verify
            limit = max_length - len(seqs[r]) - 1
            if first and not do_sample and drafter.sequences is not None:
                # A greedy prompt practised verbatim: its whole practised answer.
                drafts[r] = cut_at_stop(drafter.sequences.answer(texts[r], limit), stop_ids)
            if not drafts[r] and (first or backoff.ready(r)):
                drafts[r], situations[r] = recall(drafter, texts[r], min(limit, max_draft), stop_ids, first)
        # A forward is as wide as its widest row for every row, and it is saved only when
        # every row moves on: a row with nothing to propose needs the step anyway, so
        # the others' drafts would only add width (they go on one token a step as cheaply).
        # (A row that commits its answer after the prefill needs no later forward.)
        if not all(drafts[r] for r in active if not (first and r in answers)):
            drafts = [[] for _ in range(batch)]
        elif not independent:
            k = min(len(drafts[r]) for r in active)
            drafts = [d[:k] for d in drafts]
        count = sum(len(d) for d in drafts)
        stats.drafted += count
        stats.recalled += count
        return drafts

    # -- the prefill carries each row's draft (see propose) ------------------------------------
    drafts = propose(first=True)
    width_k = max(len(d) for d in drafts)
    padded = torch.tensor([d + [pad_id] * (width_k - len(d)) for d in drafts], dtype=input_ids.dtype, device=device)
    pending = prefill(model, input_ids, padded, generation_config, model_kwargs, inputs)
    length = width + width_k  # cache slots, the same for every row
    mask = inputs.mask_to(length)  # None: no padding (yet)
    first = True  # pending holds the prefill's logits
    while True:
        # -- accept: pending [A, 1 + width_k, V] picks each row's next tokens -------------
        accepted = [0] * len(active)  # matched drafts of each row
        appended = [0] * len(active)  # new tokens of each row
        rejected = [False] * len(active)  # whether a row's draft met a token it did not propose
        if independent:
            choice = pending.float().argmax(dim=-1).tolist()
            for a, r in enumerate(active):
                draft = drafts[r]
                for i in range(len(draft) + 1):
                    token = choice[a][i]
                    seqs[r].append(token)
                    texts[r].append(token)
                    appended[a] += 1
                    row = torch.tensor([seqs[r]], dtype=input_ids.dtype, device=device)
                    unfinished[r] = not bool(stopping_criteria(row, None)[0])
                    matched = i < len(draft) and token == draft[i]
                    accepted[a] += matched
                    rejected[a] = i < len(draft) and not matched
                    if not unfinished[r] or not matched:
                        break
                answer = answers.get(r) if first else None
                if answer is not None and unfinished[r] and seqs[r][-1] == answer[0]:
                    # The prefill picked the answer's first token: commit the rest (no layer).
                    assert commits is not None  # answers come from it
                    commits.start[r], commits.tokens[r] = len(seqs[r]), answer[1:]
                    stats.recall_committed += len(answer) - 1
                    seqs[r].extend(answer[1:])
                    texts[r].extend(answer[1:])
                    unfinished[r] = False  # complete_answer: the criteria end the row here
        else:
            rows = torch.tensor(active, device=device)
            full = torch.zeros(batch, pending.shape[-1], dtype=torch.float32, device=device)
            for i in range(pending.shape[1]):
                full[rows] = pending[:, i].to(torch.float32)  # rows no longer run: zeros, then padded
                scores = logits_processor(ids, full.clone())
                if do_sample:
                    tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
                else:
                    tokens = scores.argmax(dim=-1)
                if has_eos:
                    running = torch.tensor(unfinished, dtype=tokens.dtype, device=device)
                    tokens = tokens * running + pad_id * (1 - running)
                ids = torch.cat([ids, tokens[:, None]], dim=-1)
                if streamer is not None:
                    streamer.put(tokens.cpu())
                values = tokens.tolist()
                go_on = True
                for a, r in enumerate(active):
                    if unfinished[r] or not has_eos:  # a padded row takes no part
                        seqs[r].append(values[r])
                        texts[r].append(values[r])
                        appended[a] += 1
                        matched = i < len(drafts[r]) and values[r] == drafts[r][i]
                        accepted[a] += matched
                        rejected[a] = rejected[a] or (i < len(drafts[r]) and not matched)
                        go_on = go_on and matched
                done = stopping_criteria(ids, None).tolist()
                unfinished = [u and not d for u, d in zip(unfinished, done)]
                if not go_on or not any(unfinished):
                    break
        for a, r in enumerate(active):
            if drafts[r]:
                stats.accepted += accepted[a]
                stats.recall_accepted += accepted[a]
                backoff.record(r, len(drafts[r]), accepted[a])
                situation = situations[r]
                if situation is not None:
                    drafter.lengths.update(*situation, accepted=accepted[a], rejected=rejected[a])
        first = False
        if not any(unfinished):
            break
        # -- drop finished rows, realign the others ----------------------------------------
        # Each row's cache must hold its text up to, not including, its newest token: the
        # fed last token (slot length - 1 - width_k) and every new token but the newest
        # (lockstep may stop on a matched draft: that one is fed again).
        valid = [length - width_k - 1 + appended[a] for a in range(len(active))]
        running_rows = [a for a, r in enumerate(active) if unfinished[r] or not (has_eos or independent)]
        if len(running_rows) < len(active):
            keep = torch.tensor(running_rows, device=device)
            select_rows(cache, keep)
            if mask is not None:
                mask = mask[keep]
            active = [active[a] for a in running_rows]
            valid = [valid[a] for a in running_rows]
        length = max(valid)
        shifts = [length - v for v in valid]  # lockstep: all zero
        if any(shifts):
            if mask is None:
                mask = torch.ones(len(active), cache.get_seq_length(), dtype=torch.long, device=device)
            shift_rows(cache, mask, shifts)
        crop_all(cache, length)
        if mask is not None:
            mask = mask[:, :length]
        # -- draft and verify: one forward over every row's newest token and drafts --------
        drafts = propose(first=False)
        width_k = max(len(drafts[r]) for r in active)
        feed = torch.tensor([[seqs[r][-1]] + drafts[r] + [pad_id] * (width_k - len(drafts[r])) for r in active],
                            dtype=input_ids.dtype, device=device)
        kwargs = dict(inputs.extra)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(active), feed.shape[1])], dim=-1)
            kwargs["attention_mask"] = mask
        if positions is not None:
            # Every row's own positions: its slots counted in its own layout, not the cache's.
            slots = torch.tensor([len(seqs[r]) - 1 for r in active], device=device)
            index = slots[:, None] + torch.arange(feed.shape[1], device=device)
            kwargs["position_ids"] = positions[torch.tensor(active, device=device)[:, None], index]
        else:
            kwargs["position_ids"] = torch.arange(length, length + feed.shape[1], device=device).unsqueeze(0)
        stats.verify_forwards += 1
        pending = model(input_ids=feed, cache=cache, use_cache=True, **kwargs).logits
        length += feed.shape[1]
    if streamer is not None:
        streamer.end()
    if not independent:
        return ids
    total = max(len(s) for s in seqs)
    return torch.tensor([s + [pad_id] * (total - len(s)) for s in seqs], dtype=input_ids.dtype, device=device)
