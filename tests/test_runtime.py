"""The shared test body, run on a tiny random model of every registered architecture:
exactness with no policy, exactness after remove, skipped layers really not running,
and KV-cache consistency after early exits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import shortcut
from shortcut import FixedPlan
from shortcut.arch import resolve

from .conftest import ARCHS, VOCAB, make_tiny


def _inputs(batch: int, length: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:  # left padding of different lengths, as generate expects
        for row, pad in enumerate([0, 2, 4][:batch]):
            ids[row, :pad] = 0
            mask[row, :pad] = 0
    return ids, mask


def _module_state(model):
    """Everything a wrapper could leave behind: instance forwards and hook dicts."""
    return [
        (name, "forward" in m.__dict__, len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    ]


def _generate(model, ids, mask, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **kw)


GEN_SETTINGS = [
    dict(do_sample=False, use_cache=True),
    dict(do_sample=False, use_cache=False),
    dict(do_sample=True, use_cache=True, top_k=0),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_empty_policy_and_remove_are_bit_identical(arch, batch):
    model = make_tiny(arch)
    ids, mask = _inputs(batch)
    before_state = _module_state(model)
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
    ref_gen = []
    for kw in GEN_SETTINGS:
        torch.manual_seed(1)
        ref_gen.append(_generate(model, ids, mask, **kw))

    handle = shortcut.wrap(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref_logits)
    for kw, ref in zip(GEN_SETTINGS, ref_gen):
        torch.manual_seed(1)
        assert torch.equal(_generate(model, ids, mask, **kw), ref), kw
    assert handle.stats.total.layers_per_token == model.config.num_hidden_layers

    handle.remove()
    handle.remove()  # idempotent
    assert _module_state(model) == before_state
    assert not any(getattr(m, "__shortcut_wrapper__", False) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref_logits)
    for kw, ref in zip(GEN_SETTINGS, ref_gen):
        torch.manual_seed(1)
        assert torch.equal(_generate(model, ids, mask, **kw), ref), kw


def _count_blocks(model):
    """Forward hooks counting calls of every layer's attention and MLP modules."""
    parts = resolve(model)
    counts = {"attn": [0] * parts.num_layers, "mlp": [0] * parts.num_layers}
    handles = []
    for i, layer in enumerate(parts.layers):
        for kind, child in (("attn", getattr(layer, parts.spec.attention)), ("mlp", layer.mlp)):
            def hook(*_, kind=kind, i=i):
                counts[kind][i] += 1
            handles.append(child.register_forward_hook(hook))
    return counts, handles


@pytest.mark.parametrize("arch", ARCHS)
def test_exit_and_skip_really_skip(arch):
    model = make_tiny(arch)
    handle = shortcut.wrap(model)
    counts, hooks = _count_blocks(model)
    ids, mask = _inputs(1)
    handle.set_policy(FixedPlan(exit_after=1))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert counts["attn"] == [1, 1, 0, 0] and counts["mlp"] == [1, 1, 0, 0]
    assert handle.stats.last.layers_per_token == 2
    assert handle.stats.last.per_layer_runs == [7, 7, 0, 0]

    handle.set_policy(FixedPlan(skip={1, 2}))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert counts["attn"] == [2, 1, 0, 1] and counts["mlp"] == [2, 1, 0, 1]
    assert handle.stats.last.layers_skipped == 2 * 7
    for h in hooks:
        h.remove()
    handle.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_after_forced_exits_keeps_cache_aligned(arch):
    model = make_tiny(arch)
    handle = shortcut.wrap(model)
    handle.set_policy(FixedPlan(exit_after=1))
    ids, mask = _inputs(3)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, min_new_tokens=9,
                         pad_token_id=0, return_dict_in_generate=True)
    assert out.sequences.shape == (3, ids.shape[1] + 9)
    cache = out.past_key_values
    cache = getattr(cache, "self_attention_cache", cache)
    lengths = {layer.keys.shape[-2] for layer in cache.layers}
    expected = ids.shape[1] + 8  # the last generated token is never fed back
    window = getattr(model.config, "sliding_window", None) or expected
    assert lengths <= {expected, min(expected, window), min(expected, window - 1)}, lengths
    handle.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_full_step_after_exit_matches_hand_propagated_cache(arch):
    """Step 1 exits after layer 1; step 2 runs the full path. Its logits must equal the
    unwrapped model's logits over a cache built independently: for each skipped layer,
    the K/V that the layer's own attention writes when fed the exit hidden state."""
    exit_after = 1
    model = make_tiny(arch)
    parts = resolve(model)
    ids, _ = _inputs(1, length=5)
    t1, t2 = torch.tensor([[5]]), torch.tensor([[9]])
    with torch.no_grad():
        prompt_cache = model(input_ids=ids, use_cache=True).past_key_values

        # Reference: hidden state after layer `exit_after` for t1, then each skipped
        # layer's own K/V for that hidden state, written by the model's own code.
        captured = {}
        grab = parts.layers[exit_after].register_forward_hook(
            lambda m, a, out: captured.setdefault("h", out[0] if isinstance(out, tuple) else out)
        )
        full_t1_cache = copy.deepcopy(prompt_cache)
        model(input_ids=t1, past_key_values=full_t1_cache, use_cache=True)
        grab.remove()
        ref_cache = copy.deepcopy(full_t1_cache)
        for j in range(exit_after + 1, parts.num_layers):
            def feed_exit_state(module, args, kwargs):
                return (captured["h"], *args[1:]), kwargs
            pre = parts.layers[j].register_forward_pre_hook(feed_exit_state, with_kwargs=True)
            scratch = copy.deepcopy(prompt_cache)
            model(input_ids=t1, past_key_values=scratch, use_cache=True)
            pre.remove()
            ref_cache.layers[j].keys = scratch.layers[j].keys.clone()
            ref_cache.layers[j].values = scratch.layers[j].values.clone()
        ref_logits = model(input_ids=t2, past_key_values=ref_cache, use_cache=True).logits

        handle = shortcut.wrap(model)
        cache = copy.deepcopy(prompt_cache)
        handle.set_policy(FixedPlan(exit_after=exit_after))
        model(input_ids=t1, past_key_values=cache, use_cache=True)
        handle.set_policy(None)
        logits = model(input_ids=t2, past_key_values=cache, use_cache=True).logits
        handle.remove()
    assert isinstance(cache, DynamicCache) or hasattr(cache, "self_attention_cache")
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
