"""Fast mode on padded batches (``FastBatchDecoder`` in ``shortcut/decode/fast.py``):
a row whose prompt was practised verbatim commits its complete practised answer with
no layer, every other row gets plain batched ``generate``'s tokens, and audited rows
feed the controller's error rate."""

from __future__ import annotations

import pytest
import torch

import shortcut
from shortcut.learn.sequences import SequenceMemory

from .conftest import make_tiny
from .test_batched import EOS, NOVEL, PAD, PRACTISED, PRACTISED_NEW, compare, left_padded
from .test_fuzz import char_tokenizer
from .test_practice import _observer


@pytest.fixture(scope="module", params=("llama", "gemma3_text", "gpt2"))
def fast_batch(request):
    """A tiny model of each architecture with an observer, practised once on
    ``PRACTISED`` (so those prompts count as practised verbatim), in fast mode, with
    learning off (no call below changes the skills) and no audits unless a test asks."""
    model = make_tiny(request.param)
    config = shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2],
                                     fast=shortcut.FastConfig(audit_fraction=0.0),
                                     learning=shortcut.LearningConfig(policy_threshold=0.3, fit_steps=10))
    handle = shortcut.wrap(model, config)
    handle.attach_observer(_observer(model))
    handle.practice([torch.tensor([p]) for p in PRACTISED], rounds=1, max_new_tokens=PRACTISED_NEW,
                    shuffle=False, progress=False)
    assert all(handle.learner.was_practised(p) for p in PRACTISED)
    handle.set_learning(False)
    handle.config.mode = "fast"
    yield request.param, model, handle
    handle.remove()


def answer(handle, r: int, limit: int = PRACTISED_NEW) -> list[int]:
    return handle.experience.sequences.answer(PRACTISED[r], limit)


def forward_widths(model, **options):
    """``model.generate(**options)``, and the width of every model forward it ran."""
    widths = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: widths.append(kwargs["input_ids"].shape[1]),
                                       with_kwargs=True)
    try:
        out = model.generate(**options)
    finally:
        hook.remove()
    return out, widths


def test_practised_batch_commits_every_answer_after_the_prefill(fast_batch):
    arch, model, handle = fast_batch
    for rows in ([0, 1], [2, 0, 3], [3, 2, 1, 0]):
        ids, mask = left_padded([PRACTISED[r] for r in rows])
        options = dict(attention_mask=mask, max_new_tokens=PRACTISED_NEW, do_sample=False, pad_token_id=PAD)
        with handle.disabled():
            ref = model.generate(input_ids=ids, **options)
        before, lossless_calls = handle.decode_stats.copy(), handle.fast.lossless_calls
        handle.stats.reset()
        out, widths = forward_widths(model, input_ids=ids, **options)
        assert out.tolist() == ref.tolist(), arch
        delta = handle.decode_stats - before
        # The prefill reads the prompts, no layer reads the answers: one forward, as wide as the prompts.
        assert widths == [ids.shape[1]], (arch, widths)
        assert handle.stats.total.per_layer_runs[-1] == ids.numel(), arch
        assert delta.recall_committed == sum(len(answer(handle, r)) - 1 for r in rows), arch
        assert delta.drafted == delta.verify_forwards == 0, arch
        assert handle.fast.lossless_calls == lossless_calls
        width = ids.shape[1]
        for i, r in enumerate(rows):
            a = answer(handle, r)  # ends at the limit or at an end of sequence (then padded)
            assert out[i, width:].tolist() == a + [PAD] * (out.shape[1] - width - len(a)), arch
            assert handle.fast.committed_rows[i] == list(range(width + 1, width + len(a))), arch


def test_mixed_batches_equal_plain_batched_generate(fast_batch):
    """Novel rows, practised rows whose answer ends before the call does, and rows ended
    early by an end of sequence or a stop string: each row gets plain batched
    ``generate``'s tokens; the rows with a complete answer commit it."""
    arch, model, handle = fast_batch
    for rows, new in (([0, None], PRACTISED_NEW), ([None, 2, None], 20), ([3, None, 1], PRACTISED_NEW),
                      ([2, 0, 3], 20)):
        prompts = [NOVEL[i] if r is None else PRACTISED[r] for i, r in enumerate(rows)]
        delta = compare(model, handle, prompts, max_new_tokens=new, do_sample=False)
        # Complete answers (ending at the limit or at an end of sequence) are committed.
        answers = [answer(handle, r, new) for r in rows if r is not None]
        assert delta.recall_committed == sum(len(a) - 1 for a in answers if len(a) == new or a[-1] == EOS), arch
        if rows == [2, 0, 3] and not delta.recall_committed:  # the incomplete answers ride as drafts
            assert delta.accepted > 0, arch
    # A practised answer with a token first met at its third position or later, as end
    # of sequence: that row ends there (complete however long the call); another
    # practised row only if its answer has that token too.
    r, i = next((r, i) for r in (1, 3, 2, 0) for i in range(2, PRACTISED_NEW)
                if answer(handle, r)[i] not in answer(handle, r)[:i])
    eos, other = answer(handle, r)[i], (r + 1) % 4
    ends = {k: answer(handle, k).index(eos) for k in (other, r) if eos in answer(handle, k)}
    delta = compare(model, handle, [PRACTISED[other], PRACTISED[r], NOVEL[0]], max_new_tokens=20, do_sample=False,
                    eos_token_id=eos)
    assert delta.recall_committed == sum(ends.values()) > 0, arch
    assert [bool(rows) for rows in handle.fast.committed_rows] == [bool(ends.get(other)), True, False], arch
    tokenizer = char_tokenizer()
    stop = tokenizer.decode(answer(handle, 3)[5:7])
    delta = compare(model, handle, [PRACTISED[3], NOVEL[1]], max_new_tokens=20, do_sample=False,
                    stop_strings=[stop], tokenizer=tokenizer)
    assert 0 < delta.recall_committed <= 6 and handle.fast.committed_rows[1] == [], arch


def test_unpractised_sampled_and_processed_batches_decode_losslessly(fast_batch):
    arch, model, handle = fast_batch
    calls = handle.fast.lossless_calls
    delta = compare(model, handle, [NOVEL[0], NOVEL[2]], max_new_tokens=10, do_sample=False)
    assert delta.recall_committed == 0 and handle.fast.lossless_calls == calls + 1, arch
    for seed in range(3):
        delta = compare(model, handle, [PRACTISED[0], PRACTISED[2], NOVEL[seed]], seed=seed,
                        max_new_tokens=PRACTISED_NEW, do_sample=True, temperature=0.05 + 0.4 * (seed % 2))
        assert delta.recall_committed == 0, arch
    delta = compare(model, handle, [PRACTISED[0], PRACTISED[2]], max_new_tokens=PRACTISED_NEW, do_sample=False,
                    repetition_penalty=1.3)
    assert delta.recall_committed == 0, arch


def test_audits_compare_committed_rows_with_the_full_model(fast_batch):
    arch, model, handle = fast_batch
    controller = handle.fast
    ids, mask = left_padded([PRACTISED[0], NOVEL[0], PRACTISED[2]])
    options = dict(attention_mask=mask, max_new_tokens=PRACTISED_NEW, do_sample=False, pad_token_id=PAD)
    with handle.disabled():
        ref = model.generate(input_ids=ids, **options)
    memory = handle.experience.sequences
    try:
        controller.audit_fraction = 1.0
        audits, errors, catch_ups = controller.audits, controller.errors, controller.catch_ups
        assert model.generate(input_ids=ids, **options).tolist() == ref.tolist()
        # Both committed rows audited, every committed token agreed (the answers are the model's).
        assert controller.catch_ups - catch_ups == 2, arch
        committed = len(answer(handle, 0)) + len(answer(handle, 2)) - 2
        assert controller.audits - audits == committed and controller.errors == errors, arch

        # A practised answer that is not the model's (a token in its middle changed):
        # committed as it is, and the audit counts the error and stops there.
        wrong = answer(handle, 0)
        j = len(wrong) // 2
        wrong[j] = 3 + (wrong[j] - 2) % 93
        handle.experience.sequences = SequenceMemory()
        handle.experience.sequences.add(PRACTISED[0] + wrong, start=len(PRACTISED[0]))
        audits, errors = controller.audits, controller.errors
        out = model.generate(input_ids=ids, **options)
        width = ids.shape[1]
        assert out[0, width:width + len(wrong)].tolist() == wrong and out[1:].tolist() == ref[1:].tolist(), arch
        assert controller.errors - errors == 1 and controller.audits - audits == j, arch

        # A practised answer whose first token the prefill does not pick: that row decodes losslessly.
        wrong = memory.answer(PRACTISED[0], PRACTISED_NEW)
        wrong[0] = 3 + (wrong[0] - 2) % 93
        handle.experience.sequences = SequenceMemory()
        handle.experience.sequences.add(PRACTISED[0] + wrong, start=len(PRACTISED[0]))
        before = handle.decode_stats.copy()
        assert model.generate(input_ids=ids, **options).tolist() == ref.tolist(), arch
        assert (handle.decode_stats - before).recall_committed == 0, arch
    finally:
        handle.experience.sequences = memory
        controller.audit_fraction = 0.0
