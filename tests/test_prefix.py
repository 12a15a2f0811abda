"""Kept keys and values of text read before (shortcut/decode/prefix.py): a prompt that
begins the way earlier text did skips the prefill of that beginning, with the same
tokens as the unwrapped model."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import shortcut
from shortcut.decode.prefix import BLOCK, PrefixCache

from .conftest import make_tiny

SHARED = list(range(3, 38))  # 35 tokens every prompt here begins with: two whole blocks
NEW = 8


def _prompt(tail: list[int]) -> torch.Tensor:
    return torch.tensor([SHARED + tail])


def _layers_run(handle, prompt: torch.Tensor, **kw) -> tuple[torch.Tensor, int]:
    before = handle.stats.total.layers_run
    out = handle.model.generate(input_ids=prompt, max_new_tokens=NEW, **kw)
    return out, handle.stats.total.layers_run - before


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_a_beginning_read_before_is_not_read_again_and_tokens_stay_identical(arch):
    model = make_tiny(arch)
    tails = [[50, 51, 52], [60, 61, 62, 63], [50, 51, 52]]
    plain = [model.generate(input_ids=_prompt(t), max_new_tokens=NEW, do_sample=False) for t in tails]
    handle = shortcut.wrap(model)
    reused = []
    for tail, expected in zip(tails, plain):
        before = handle.decode_stats.prompt_reused
        out = model.generate(input_ids=_prompt(tail), max_new_tokens=NEW, do_sample=False)
        assert torch.equal(out, expected)
        reused.append(handle.decode_stats.prompt_reused - before)
    # first call: nothing kept; second: the shared two blocks; third: its whole prompt
    # but the last token is kept, in whole blocks (the repeat's answer rides as a draft)
    assert reused == [0, 2 * BLOCK, 2 * BLOCK]


def test_a_conversation_reads_only_its_new_turn():
    """Lossless mode keeps the whole text its cache holds (prompt and verified answer):
    the next turn, which repeats both, reads from the last whole block on."""
    model = make_tiny("llama")
    handle = shortcut.wrap(model)
    first = model.generate(input_ids=_prompt([50]), max_new_tokens=16, do_sample=False)
    second_turn = torch.cat([first, torch.tensor([[60, 61, 62]])], dim=-1)
    with handle.disabled():
        expected = model.generate(input_ids=second_turn, max_new_tokens=NEW, do_sample=False)
    before = handle.decode_stats.prompt_reused
    out = model.generate(input_ids=second_turn, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out, expected)
    # the first call's text (36 + 16 tokens, its last token never fed) holds three whole blocks
    assert handle.decode_stats.prompt_reused - before == 3 * BLOCK


def test_the_prefill_skips_real_compute():
    """Layers actually run: a call whose beginning was kept runs each layer over
    exactly the kept positions fewer than the same call with nothing kept."""
    model = make_tiny("llama")
    tail = [60, 61, 62, 63]
    kept = shortcut.wrap(model)
    kept.config.lossless.copy_drafts = False  # copied drafts would differ with what was read
    model.generate(input_ids=_prompt([50, 51]), max_new_tokens=NEW, do_sample=False)
    with_kept, ran_kept = _layers_run(kept, _prompt(tail), do_sample=False)
    kept.remove()
    bare = shortcut.wrap(model, shortcut.ShortcutConfig(prefix_cache_mb=0))
    bare.config.lossless.copy_drafts = False
    model.generate(input_ids=_prompt([50, 51]), max_new_tokens=NEW, do_sample=False)
    without, ran_all = _layers_run(bare, _prompt(tail), do_sample=False)
    assert torch.equal(with_kept, without)
    assert bare.decode_stats.prompt_reused == 0 and len(bare.prefixes) == 0
    assert ran_all - ran_kept == 2 * BLOCK * handle_layers(model)


def handle_layers(model) -> int:
    return shortcut.arch.resolve(model).num_layers


def test_seeded_sampling_after_a_kept_beginning_draws_the_same_tokens():
    model = make_tiny("llama")
    kw = dict(do_sample=True, temperature=0.9, top_k=20)
    torch.manual_seed(3)
    expected = model.generate(input_ids=_prompt([70, 71]), max_new_tokens=NEW, **kw)
    handle = shortcut.wrap(model)
    model.generate(input_ids=_prompt([50]), max_new_tokens=NEW, do_sample=False)
    torch.manual_seed(3)
    out = model.generate(input_ids=_prompt([70, 71]), max_new_tokens=NEW, **kw)
    assert handle.decode_stats.prompt_reused == 2 * BLOCK
    assert torch.equal(out, expected)


def test_a_changed_model_forgets_what_it_read():
    """Keys and values belong to the weights that made them: an in-place change (an
    optimiser step, load_state_dict) empties the store, and tokens follow the new weights."""
    model = make_tiny("llama")
    handle = shortcut.wrap(model)
    model.generate(input_ids=_prompt([50]), max_new_tokens=NEW, do_sample=False)
    assert len(handle.prefixes) > 0
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)
    with handle.disabled():
        expected = model.generate(input_ids=_prompt([51]), max_new_tokens=NEW, do_sample=False)
    before = handle.decode_stats.prompt_reused
    out = model.generate(input_ids=_prompt([51]), max_new_tokens=NEW, do_sample=False)
    assert handle.decode_stats.prompt_reused == before
    assert torch.equal(out, expected)


def test_removing_the_handle_frees_what_it_kept():
    model = make_tiny("llama")
    handle = shortcut.wrap(model)
    model.generate(input_ids=_prompt([50]), max_new_tokens=NEW, do_sample=False)
    assert handle.prefixes.nbytes > 0
    handle.remove()
    assert handle.prefixes.nbytes == 0 and len(handle.prefixes) == 0


def test_only_text_read_while_learning_is_kept():
    model = make_tiny("llama")
    handle = shortcut.wrap(model)
    handle.set_learning(False)
    model.generate(input_ids=_prompt([50]), max_new_tokens=NEW, do_sample=False)
    assert len(handle.prefixes) == 0
    handle.set_learning(True)
    model.generate(input_ids=_prompt([50]), max_new_tokens=NEW, do_sample=False)
    handle.set_learning(False)
    kept = len(handle.prefixes)
    model.generate(input_ids=_prompt([52]), max_new_tokens=NEW, do_sample=False)
    assert len(handle.prefixes) == kept and handle.decode_stats.prompt_reused == 2 * BLOCK


def test_a_prompt_generate_pads_reads_whole_and_is_not_kept():
    """generate infers a mask from pad tokens inside a prompt (positions then skip
    them): such keys and values are neither read from the store nor kept."""
    model = make_tiny("llama")
    handle = shortcut.wrap(model)
    padded_inside = SHARED[:20] + [0] + SHARED[21:] + [50]  # 0 is the pad token
    for tail in ([50], [51]):
        prompt = torch.tensor([padded_inside[:-1] + tail])
        with handle.disabled():
            expected = model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False)
        assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False), expected)
    assert handle.decode_stats.prompt_reused == 0 and len(handle.prefixes) == 0


def test_padded_and_batched_calls_read_their_whole_prompt():
    model = make_tiny("llama")
    handle = shortcut.wrap(model)
    model.generate(input_ids=_prompt([50]), max_new_tokens=NEW, do_sample=False)
    padded = torch.tensor([[0] + SHARED + [51], SHARED + [52, 53]])
    mask = torch.tensor([[0] + [1] * (len(SHARED) + 1), [1] * (len(SHARED) + 2)])
    with handle.disabled():
        expected = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    out = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out, expected) and handle.decode_stats.prompt_reused == 0


def _kv(model, tokens: list[int]):
    """A cache holding the full model's keys and values of ``tokens``."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([tokens]), cache=cache, use_cache=True)
    return cache


def _reused(store: PrefixCache, model, tokens: list[int]) -> int:
    return store.fill(model, tokens, DynamicCache(config=model.config))


def test_the_least_used_block_goes_first_and_new_text_does_not_push_out_what_is_read_again():
    model = make_tiny("llama")
    a, b, c = ([t] * BLOCK + [90] for t in (10, 20, 30))
    probe = PrefixCache(1 << 30)
    probe.keep(model, a, _kv(model, a), BLOCK)
    store = PrefixCache(2 * probe.nbytes)  # room for two blocks
    for text in (a, b):
        store.keep(model, text, _kv(model, text), BLOCK)
    assert _reused(store, model, a) == BLOCK  # a is read again
    store.keep(model, c, _kv(model, c), BLOCK)  # b (used once, longest ago) makes room
    assert [_reused(store, model, t) for t in (a, b, c)] == [BLOCK, 0, BLOCK]
    _reused(store, model, a)
    _reused(store, model, c)  # a and c are both read again: a new block is worth less
    store.keep(model, b, _kv(model, b), BLOCK)
    assert [_reused(store, model, t) for t in (a, b, c)] == [BLOCK, 0, BLOCK]
    assert store.nbytes == 2 * probe.nbytes


def test_a_text_that_goes_on_never_pushes_out_its_own_beginning():
    model = make_tiny("llama")
    text = list(range(3, 3 + 2 * BLOCK + 1))
    probe = PrefixCache(1 << 30)
    probe.keep(model, text, _kv(model, text), BLOCK)
    store = PrefixCache(probe.nbytes)  # room for one block
    store.keep(model, text, _kv(model, text), BLOCK)
    store.keep(model, text, _kv(model, text), 2 * BLOCK)  # the second block has no room
    assert len(store) == 1 and _reused(store, model, text) == BLOCK


def test_kept_blocks_are_copies_and_a_block_is_found_by_all_text_before_it():
    model = make_tiny("llama")
    text = list(range(3, 3 + 2 * BLOCK + 1))
    cache = _kv(model, text)
    store = PrefixCache(1 << 30)
    store.keep(model, text, cache, len(text))
    assert len(store) == 2
    kept = DynamicCache(config=model.config)
    assert store.fill(model, text, kept) == 2 * BLOCK
    expected = _kv(model, text)
    for layer, reference in zip(kept.layers, expected.layers):
        assert torch.equal(layer.keys, reference.keys[:, :, : 2 * BLOCK])
    cache.layers[0].keys.zero_()  # the call's cache goes on changing: the store does not
    again = DynamicCache(config=model.config)
    store.fill(model, text, again)
    assert torch.equal(again.layers[0].keys, expected.layers[0].keys[:, :, : 2 * BLOCK])
    other_start = [99] + text[1:]  # the second block's tokens after another first block
    assert _reused(store, model, other_start) == 0
    assert store.fill(model, text, _kv(model, text[:3])) == 0  # only an empty cache is filled


def test_a_model_whose_cache_keeps_a_window_reads_every_prompt():
    model = make_tiny("gemma3_text")  # sliding-window layers keep only their last keys
    handle = shortcut.wrap(model)
    for tail in ([50], [51]):
        with handle.disabled():
            expected = model.generate(input_ids=_prompt(tail), max_new_tokens=NEW, do_sample=False)
        assert torch.equal(model.generate(input_ids=_prompt(tail), max_new_tokens=NEW, do_sample=False), expected)
    assert handle.decode_stats.prompt_reused == 0 and len(handle.prefixes) == 0


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="prefix_cache_mb=-1"):
        shortcut.ShortcutConfig(prefix_cache_mb=-1)
    with pytest.raises(TypeError, match="prefix_cache_mb='big'"):
        shortcut.ShortcutConfig(prefix_cache_mb="big")
    with pytest.raises(ValueError, match="budget_bytes=-5"):
        PrefixCache(-5)
    model = make_tiny("llama")
    assert _reused(PrefixCache(0), model, SHARED) == 0
