"""A handle that never breaks: threads, torch.inference_mode, reduced precision,
bounded memory."""

from __future__ import annotations

import threading

import pytest
import torch

import shortcut

from .conftest import make_tiny
from .test_practice import PROMPTS, _observer, _practised


def _plain_outputs(model, handle, kw):
    with handle.disabled():
        return [model.generate(input_ids=p, max_new_tokens=12, **kw) for p in PROMPTS]


def test_threads_calling_generate_get_their_own_tokens_and_leave_nothing_installed():
    """Three threads share one practised, still-learning handle: every call returns what
    it returns alone, and afterwards no draft policy stays installed."""
    model, handle, _ = _practised(rounds=1)
    refs = _plain_outputs(model, handle, dict(do_sample=False))
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for round_ in range(3):
                for index, prompt in enumerate(PROMPTS):
                    results[thread, round_ * len(PROMPTS) + index] = model.generate(
                        input_ids=prompt, max_new_tokens=12, do_sample=False)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (thread, index), out in results.items():
        assert torch.equal(out, refs[index % len(PROMPTS)]), (thread, index)
    assert handle.policy is None  # no draft policy left behind
    assert torch.equal(model.generate(input_ids=PROMPTS[0], max_new_tokens=12, do_sample=False), refs[0])


def test_inference_mode_generate_learns_and_later_calls_work():
    model, handle, _ = _practised(rounds=1)
    refs = _plain_outputs(model, handle, dict(do_sample=False))
    learned = handle.learner.stats.tokens_learned
    with torch.inference_mode():
        for prompt, ref in zip(PROMPTS, refs):
            assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False), ref)
        handle.learner.consolidate(steps=3)
    assert handle.learner.stats.tokens_learned > learned  # it practised inside the context
    handle.learner.consolidate(steps=3)
    for prompt, ref in zip(PROMPTS, refs):
        assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_practises_consolidates_saves_and_loads(dtype, tmp_path):
    model = make_tiny("llama").to(dtype)
    config = shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2],
                                     lossless=shortcut.LosslessConfig(draft_confidence=0.0),
                                     learning=shortcut.LearningConfig(policy_threshold=0.3, fit_steps=10))
    handle = shortcut.wrap(model, config)
    handle.attach_observer(_observer(model))
    rows = handle.practice(PROMPTS, rounds=2, max_new_tokens=8, progress=False)
    assert rows[-1]["head_agreement"]  # consolidated
    refs = _plain_outputs(model, handle, dict(do_sample=False))
    for prompt, ref in zip(PROMPTS, refs):
        assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False), ref)
    folder = handle.save_pretrained(tmp_path / "skills")
    handle.remove()
    loaded = shortcut.load(make_tiny("llama").to(dtype), folder)
    assert loaded.heads.translators["1"].weight.dtype == dtype
    for prompt, ref in zip(PROMPTS, refs):
        assert torch.equal(loaded.model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False), ref)


def test_handle_memory_stays_bounded_over_ten_thousand_calls():
    """The prompt log keeps the latest ``log_capacity`` prompts (10,000 logged here, as
    10,000 generate calls would), and recent prompts still count as practised after a
    re-fit; generate calls keep every other structure at its bound."""
    model, handle, _ = _practised(rounds=1)
    learner = handle.learner
    learner.log_capacity = 500
    for i in range(10_000):
        learner.log_prompt([3 + i % 90, 4 + i % 7, 5 + i % 11])
    assert len(learner.practised) == 500
    assert learner.fitted_log <= 500
    learner.consolidate(steps=2)
    assert learner.fitted_log == 500 and learner.was_practised([3 + 9_999 % 90, 4 + 9_999 % 7, 5 + 9_999 % 11])
    for _ in range(20):
        model.generate(input_ids=PROMPTS[0], max_new_tokens=4, do_sample=False)
    assert len(learner.practised) == 500
    assert len(learner.positions) <= learner.positions.capacity + 64
    assert learner.policy.memory_len <= learner.policy.memory_size
    assert len(handle._warned) <= 256
