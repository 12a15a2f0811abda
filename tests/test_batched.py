"""Lossless decoding of padded batches (``shortcut/decode/batched.py``): every row
drafts from the practised sequences, and the output equals the unwrapped model's
batched ``generate`` row by row (greedy and seeded sampling), while drafting really
happens (the decode statistics count it)."""

from __future__ import annotations

import logging

import pytest
import torch

import shortcut
from shortcut.decode import batched

from .conftest import make_tiny
from .test_fuzz import char_tokenizer

BATCH_ARCHS = ("llama", "gemma3_text", "gpt2", "qwen3")
PAD, EOS = 0, 2
# Practised prompts of different lengths (ids 3..95: no pad, bos or eos), at least the
# memory's SHORT_MATCH long, so an exact repeat replays its whole answer at once.
_g = torch.Generator().manual_seed(0)
PRACTISED = [torch.randint(3, 96, (n,), generator=_g).tolist() for n in (12, 15, 13, 18)]
NOVEL = [[70, 12, 88, 3], [44, 45], [90, 91, 92, 93, 94, 95, 3, 4, 5, 6, 7, 8, 9, 10]]
PRACTISED_NEW = 12  # tokens generated per practised prompt


@pytest.fixture(scope="module", params=BATCH_ARCHS)
def practised_batch(request):
    """A tiny model of each architecture, wrapped without an observer (drafts come from
    the practised sequences only) and practised on ``PRACTISED``."""
    model = make_tiny(request.param)
    handle = shortcut.wrap(model, observer=None)
    handle.practice([torch.tensor([p]) for p in PRACTISED], rounds=1, max_new_tokens=PRACTISED_NEW,
                    shuffle=False, progress=False)
    yield request.param, model, handle
    handle.remove()


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` as a left-padded batch and its attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def compare(model, handle, prompts, *, seed: int = 0, **options):
    """Generate ``prompts`` as a padded batch plain and wrapped (same seed); assert the
    same ids; return the wrapped call's decode statistics."""
    ids, mask = left_padded(prompts)
    options.setdefault("pad_token_id", PAD)
    with handle.disabled():
        torch.manual_seed(seed)
        ref = model.generate(input_ids=ids, attention_mask=mask, **options)
    before = handle.decode_stats.copy()
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, **options)
    assert out.tolist() == ref.tolist()
    return handle.decode_stats - before


def test_exact_repeats_are_verified_by_the_prefill(practised_batch):
    arch, model, handle = practised_batch
    for rows in ([0, 1], [2, 0, 3], [3, 2, 1, 0]):
        delta = compare(model, handle, [PRACTISED[r] for r in rows], max_new_tokens=PRACTISED_NEW, do_sample=False)
        # Every row replays its whole practised answer in the prefill: no step follows.
        answers = [handle.experience.sequences.answer(PRACTISED[r], PRACTISED_NEW) for r in rows]
        # All but the last token of each answer (that one the prefill's logits pick), or
        # all of it when it ends the sequence.
        assert delta.accepted == delta.drafted == sum(len(a) - (a[-1] != EOS) for a in answers), arch
        assert delta.verify_forwards == 0, arch


def test_mixed_practised_and_novel_rows_greedy(practised_batch):
    arch, model, handle = practised_batch
    for prompts, new in (([PRACTISED[0], NOVEL[0]], 16), ([NOVEL[1], PRACTISED[2], NOVEL[2], PRACTISED[1]], 20),
                         ([NOVEL[2], NOVEL[0], PRACTISED[3]], PRACTISED_NEW)):
        compare(model, handle, prompts, max_new_tokens=new, do_sample=False)


def test_a_row_without_a_draft_keeps_the_forward_narrow(practised_batch):
    """The practised row's answer does not ride in the prefill while the other row has
    nothing to propose (two tokens: too short for any lookup): it would only widen the
    forward of both rows."""
    arch, model, handle = practised_batch
    ids, mask = left_padded([PRACTISED[0], NOVEL[1]])
    options = dict(attention_mask=mask, max_new_tokens=PRACTISED_NEW, do_sample=False, pad_token_id=PAD)
    with handle.disabled():
        ref = model.generate(input_ids=ids, **options)
    widths = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: widths.append(kwargs["input_ids"].shape[1]),
                                       with_kwargs=True)
    try:
        out = model.generate(input_ids=ids, **options)
    finally:
        hook.remove()
    assert out.tolist() == ref.tolist()
    assert widths[0] == ids.shape[1], (arch, widths)


def test_rows_that_accept_differently_are_realigned(practised_batch, monkeypatch):
    """Every row drafts (one its whole practised answer, one the rest of an answer it
    began), they accept different numbers of tokens, and the lagging row's cache moves
    right."""
    arch, model, handle = practised_batch
    shifts = []
    shift_rows = batched.shift_rows
    monkeypatch.setattr(batched, "shift_rows", lambda cache, mask, s: (shifts.append(list(s)),
                                                                      shift_rows(cache, mask, s)))
    began = handle.experience.sequences.sequences[1][:len(PRACTISED[1]) + 5]
    delta = compare(model, handle, [PRACTISED[0], began, PRACTISED[2]], max_new_tokens=16, do_sample=False)
    assert delta.accepted > 0, arch
    assert shifts, arch


def test_end_of_sequence_mid_batch(practised_batch):
    """A row that ends early is padded, leaves the batch, and the others go on."""
    arch, model, handle = practised_batch
    answer = handle.experience.sequences.sequences[1][len(PRACTISED[1]):]
    eos = answer[4]  # the second row's practised answer ends at its fifth token
    for prompts in ([PRACTISED[0], PRACTISED[1], PRACTISED[2]], [PRACTISED[3], PRACTISED[1]]):
        delta = compare(model, handle, prompts, max_new_tokens=16, do_sample=False, eos_token_id=eos)
        assert delta.accepted > 0, arch
    for prompts in ([PRACTISED[0], PRACTISED[1], NOVEL[0]], [NOVEL[1], PRACTISED[1]]):
        compare(model, handle, prompts, max_new_tokens=16, do_sample=False, eos_token_id=eos)
    compare(model, handle, [PRACTISED[1], PRACTISED[0]], max_new_tokens=16, do_sample=False,
            eos_token_id=[eos, answer[7]])


def test_max_length_and_unpadded_batches(practised_batch):
    arch, model, handle = practised_batch
    for second, drafts in ((PRACTISED[0], True), (list(range(70, 82)), False)):  # 12 tokens each: no padding
        ids = torch.tensor([PRACTISED[0], second])
        with handle.disabled():
            ref = model.generate(input_ids=ids, max_length=30, do_sample=False, pad_token_id=PAD)
        before = handle.decode_stats.copy()
        out = model.generate(input_ids=ids, max_length=30, do_sample=False, pad_token_id=PAD)
        assert out.tolist() == ref.tolist()
        if drafts:
            assert (handle.decode_stats - before).accepted > 0, arch


def test_seeded_sampling_matches_plain(practised_batch):
    """Sampled rows move in lockstep: every draw is plain sampling's draw."""
    arch, model, handle = practised_batch
    drafted = 0
    for seed in range(4):
        delta = compare(model, handle, [PRACTISED[0], PRACTISED[2], NOVEL[seed % 3]], seed=seed,
                        max_new_tokens=10, do_sample=True, temperature=0.05 + 0.4 * (seed % 2))
        drafted += delta.drafted
        delta = compare(model, handle, [PRACTISED[3], PRACTISED[1]], seed=seed, max_new_tokens=10,
                        do_sample=True, top_k=5, temperature=0.1)
        drafted += delta.drafted
    assert drafted > 0, arch


def test_low_temperature_exact_repeats_accept_in_lockstep(practised_batch):
    arch, model, handle = practised_batch
    delta = compare(model, handle, [PRACTISED[0], PRACTISED[3]], seed=3, max_new_tokens=PRACTISED_NEW,
                    do_sample=True, temperature=1e-4)
    assert delta.accepted > 0, arch


def test_processors_and_stop_strings(practised_batch):
    arch, model, handle = practised_batch
    compare(model, handle, [PRACTISED[0], NOVEL[0], PRACTISED[2]], max_new_tokens=14, do_sample=False,
            repetition_penalty=1.3)
    delta = compare(model, handle, [PRACTISED[0], PRACTISED[2]], max_new_tokens=PRACTISED_NEW, do_sample=False,
                    min_new_tokens=4)
    assert delta.accepted > 0, arch
    tokenizer = char_tokenizer()
    answer = handle.experience.sequences.sequences[0][len(PRACTISED[0]):]
    stop = tokenizer.decode(answer[5:7])
    compare(model, handle, [PRACTISED[0], NOVEL[1], PRACTISED[3]], max_new_tokens=16, do_sample=False,
            stop_strings=[stop], tokenizer=tokenizer)


def test_fast_mode_batches_without_an_observer_decode_losslessly(practised_batch, caplog):
    """Fast mode commits nothing without an observer's skills: a batch drafts and
    verifies as in lossless mode (fast-mode batches that commit: tests/test_fast_batched.py)."""
    arch, model, handle = practised_batch
    handle.config.mode = "fast"
    try:
        with caplog.at_level(logging.WARNING):
            delta = compare(model, handle, [PRACTISED[0], PRACTISED[1]], max_new_tokens=8, do_sample=False)
    finally:
        handle.config.mode = "lossless"
    assert delta.accepted > 0 and delta.recall_committed == 0, arch
    assert "full path" not in caplog.text
