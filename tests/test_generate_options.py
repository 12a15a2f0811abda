"""``generate`` options on wrapped models with skills that draft: left padding in a
batch of one, streamers, stop strings, options given through a ``GenerationConfig``,
and calls the drafting loops hand back to plain decoding. Each gives the unwrapped
model's tokens."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, TextStreamer

import shortcut
from shortcut.learn.sequences import SequenceMemory

from .conftest import make_tiny
from .test_fuzz import FUZZ_ARCHS, Recorder, char_tokenizer, fuzz_handle
from .test_practice import PROMPTS, _observer

_HANDLES: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def handles():
    yield _HANDLES
    for _, handle in _HANDLES.values():
        handle.remove()
    _HANDLES.clear()


def _get(handles, arch):
    if arch not in handles:
        handles[arch] = fuzz_handle(arch)
    return handles[arch]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _padded(prompt: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), prompt], dim=-1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(prompt)], dim=-1)
    return ids, mask


def _delta(handle, before):
    return (handle.decode_stats - before).as_dict()


# -- 1. left padding in a batch of one ---------------------------------------------------

@pytest.mark.parametrize("arch", FUZZ_ARCHS)
def test_left_padded_batch_of_one_decodes_like_plain(handles, arch):
    """Prefill with a recalled draft, shallow draft forwards and verifications all carry
    the padding mask and the positions generate derives from it (gemma3's sliding window
    is 6: the padded prompts outgrow it)."""
    model, handle = _get(handles, arch)
    for replay in (True, False):  # practised sequences draft, or the shallow path does
        handle.config.lossless.recall_sequences = replay
        before = handle.decode_stats.copy()
        try:
            for prompt in PROMPTS + [torch.tensor([[40, 41, 42, 43, 44, 45, 46]])]:
                for pad in (1, 3):
                    ids, mask = _padded(prompt, pad)
                    for kw in (dict(do_sample=False), dict(do_sample=True, top_k=8)):
                        with handle.disabled():
                            torch.manual_seed(5)
                            ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, **kw)
                        torch.manual_seed(5)
                        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, **kw)
                        assert torch.equal(out, ref), (arch, replay, prompt.tolist(), pad, kw)
        finally:
            handle.config.lossless.recall_sequences = True
        delta = _delta(handle, before)
        assert delta["verify_forwards"] > 0 and delta["accepted"] > 0, (arch, replay, delta)
        if not replay:
            assert delta["draft_forwards"] > 0, delta


def test_padded_fast_mode_full_path_tokens_see_the_full_models_cache():
    """Fast mode on a left-padded practised prompt: committed tokens are pending, and
    every token that did not come from a shallow path (catch-ups included) is the full
    model's greedy choice after the padded text so far."""
    model = make_tiny("llama")
    config = shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2],
                                     lossless=shortcut.LosslessConfig(draft_confidence=0.0),
                                     fast=shortcut.FastConfig(confidence=0.15, audit_fraction=1.0),
                                     learning=shortcut.LearningConfig(policy_threshold=0.3, fit_steps=30))
    handle = shortcut.wrap(model, config)
    handle.attach_observer(_observer(model))
    handle.practice(PROMPTS, rounds=2, max_new_tokens=16, progress=False)
    handle.config.mode = "fast"
    mixed = 0
    try:
        for prompt in PROMPTS:
            ids, mask = _padded(prompt, 3)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16,
                                 do_sample=False)
            committed = set(handle.fast.committed)
            full_mask = torch.cat([mask, torch.ones(1, out.shape[1] - ids.shape[1], dtype=torch.long)], dim=-1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            with handle.disabled():
                full = model(input_ids=out, attention_mask=full_mask, position_ids=positions).logits[0].argmax(-1)
            start = ids.shape[1]
            for i in range(start, out.shape[1]):
                if i not in committed:
                    assert int(out[0, i]) == int(full[i - 1]), f"full-path token at {i} differs"
            mixed += any(i not in committed and min(committed, default=i) < i for i in range(start, out.shape[1]))
        assert mixed > 0  # full-path tokens after commits were checked
        assert handle.fast.report()["catch_ups"] > 0
    finally:
        handle.remove()


# -- 2. streamers ------------------------------------------------------------------------

def test_streamers_get_every_token_in_order_and_one_end(handles, tokenizer, capsys):
    model, handle = _get(handles, "llama")
    for kw in (dict(do_sample=False), dict(do_sample=True, top_k=10), dict(do_sample=False, use_cache=False)):
        seen = []
        for disabled in (True, False):
            recorder = Recorder()
            torch.manual_seed(2)
            if disabled:
                with handle.disabled():
                    out = model.generate(input_ids=PROMPTS[0], max_new_tokens=12, streamer=recorder, **kw)
            else:
                out = model.generate(input_ids=PROMPTS[0], max_new_tokens=12, streamer=recorder, **kw)
            seen.append((out.tolist(), recorder.puts, recorder.ends))
        assert seen[0] == seen[1], kw
        assert seen[1][2] == 1 and len(seen[1][1]) == 1 + 12  # the prompt, then each token

    # TextStreamer prints what plain generate prints.
    with handle.disabled():
        model.generate(input_ids=PROMPTS[1], max_new_tokens=10, do_sample=False, streamer=TextStreamer(tokenizer))
    plain = capsys.readouterr().out
    model.generate(input_ids=PROMPTS[1], max_new_tokens=10, do_sample=False, streamer=TextStreamer(tokenizer))
    assert capsys.readouterr().out == plain and plain

    # TextIteratorStreamer consumed while generate runs in another thread.
    with handle.disabled():
        ref = model.generate(input_ids=PROMPTS[2], max_new_tokens=10, do_sample=False)
    streamer = TextIteratorStreamer(tokenizer, timeout=10.0, skip_prompt=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(input_ids=PROMPTS[2], max_new_tokens=10,
                                                                 do_sample=False, streamer=streamer))
    thread.start()
    text = "".join(streamer)  # raises queue.Empty if end() never comes
    thread.join()
    assert text == tokenizer.decode(ref[0, PROMPTS[2].shape[1]:])


class _Fails(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.shape[1] >= 8:
            raise RuntimeError("criterion failed")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_streamer_is_ended_once_when_generate_raises(handles):
    model, handle = _get(handles, "llama")
    recorder = Recorder()
    with pytest.raises(RuntimeError, match="criterion failed"):
        model.generate(input_ids=PROMPTS[0], max_new_tokens=12, do_sample=False, streamer=recorder,
                       stopping_criteria=StoppingCriteriaList([_Fails()]))
    assert recorder.ends == 1


# -- 3. stop strings ---------------------------------------------------------------------

def test_stop_strings_with_a_tokenizer(handles, tokenizer):
    model, handle = _get(handles, "qwen3")
    with handle.disabled():
        full = model.generate(input_ids=PROMPTS[0], max_new_tokens=16, do_sample=False)
    stop = tokenizer.decode(full[0, PROMPTS[0].shape[1] + 4:PROMPTS[0].shape[1] + 6])
    calls = [dict(stop_strings=[stop], tokenizer=tokenizer),
             dict(generation_config=GenerationConfig(max_new_tokens=16, stop_strings=stop), tokenizer=tokenizer)]
    for kw in calls:
        kw = dict(dict(max_new_tokens=16, do_sample=False), **kw) if "generation_config" not in kw else kw
        with handle.disabled():
            ref = model.generate(input_ids=PROMPTS[0], **kw)
        out = model.generate(input_ids=PROMPTS[0], **kw)
        assert torch.equal(out, ref) and out.shape[1] < full.shape[1]
    # Stop strings in the model's own generation config count as well.
    model.generation_config.stop_strings = [stop]
    try:
        with handle.disabled():
            ref = model.generate(input_ids=PROMPTS[0], max_new_tokens=16, do_sample=False, tokenizer=tokenizer)
        out = model.generate(input_ids=PROMPTS[0], max_new_tokens=16, do_sample=False, tokenizer=tokenizer)
        assert torch.equal(out, ref) and out.shape[1] < full.shape[1]
        # Without a tokenizer generate refuses, wrapped or not.
        with pytest.raises(ValueError, match="tokenizer"):
            model.generate(input_ids=PROMPTS[0], max_new_tokens=16, do_sample=False)
    finally:
        model.generation_config.stop_strings = None


# -- options through a GenerationConfig, and full-path fallbacks -------------------------

def test_options_resolved_as_generate_resolves_them(handles, caplog):
    """A ``GenerationConfig`` that leaves ``num_beams`` unset takes the model's default;
    beam search there is taken on the full path (a warning once), not drafted greedily."""
    model, handle = _get(handles, "gpt2")
    model.generation_config.num_beams = 2
    try:
        config = GenerationConfig(max_new_tokens=8, do_sample=False)
        with handle.disabled():
            ref = model.generate(input_ids=PROMPTS[0], generation_config=config)
        with caplog.at_level(logging.WARNING, logger="shortcut"):
            for _ in range(2):
                assert torch.equal(model.generate(input_ids=PROMPTS[0], generation_config=config), ref)
        assert caplog.text.count("num_beams=2") == 1
    finally:
        model.generation_config.num_beams = 1


def test_a_cache_drafts_cannot_crop_takes_the_full_path(handles, caplog):
    """A static cache is only known once generate prepared the call: the decoding loop
    itself hands it to plain decoding (same tokens, a warning once)."""
    model, handle = _get(handles, "llama")
    kw = dict(max_new_tokens=8, do_sample=False, cache_implementation="static")
    with handle.disabled():
        ref = model.generate(input_ids=PROMPTS[0], **kw)
    before = handle.decode_stats.copy()
    with caplog.at_level(logging.WARNING, logger="shortcut"):
        for _ in range(2):
            assert torch.equal(model.generate(input_ids=PROMPTS[0], **kw), ref)
    assert caplog.text.count("StaticCache") == 1
    assert _delta(handle, before).get("verify_forwards", 0) == 0


def test_fast_mode_replays_no_answer_from_a_longer_practised_prompt(handles):
    """A practised sequence whose prompt extended this one holds prompt tokens, not the
    model's answer, after it: fast mode must not commit them as the answer."""
    model, handle = _get(handles, "llama")
    prompt = PROMPTS[0]
    longer = torch.cat([prompt, torch.tensor([[77, 78, 79]])], dim=-1)
    with handle.disabled():
        ref = model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
        answer_to_longer = model.generate(input_ids=longer, max_new_tokens=8, do_sample=False)
    memory = handle.learner.sequences
    handle.learner.sequences = SequenceMemory()
    handle.learner.sequences.add(answer_to_longer[0].tolist(), start=longer.shape[1])
    handle.config.mode = "fast"
    handle.set_learning(False)
    try:
        assert handle.learner.sequences.answer(prompt[0].tolist(), 12) == []
        assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False), ref)
    finally:
        handle.learner.sequences = memory
        handle.config.mode = "lossless"
        handle.set_learning(True)
