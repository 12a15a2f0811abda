"""Skip drafts (``lossless.skip_drafts``): the model with learned layers stepped over
drafts, the full model verifies; output identical, layers really stepped over, and the
plan learns from verification outcomes."""

from __future__ import annotations

import pytest
import torch

import shortcut
from shortcut.decode.skip_draft import ALL, EXPLORE, WARMUP_TOKENS, SkipPlan

from .conftest import ARCHS, make_tiny
from .test_practice import PROMPTS, practised, practised_folder  # noqa: F401  (fixtures)


def _measured(plan: SkipPlan, influence: list[float]) -> None:
    """Give ``plan`` a warm-up's worth of tokens whose layers have these influences."""
    plan.influence = torch.tensor(influence) * WARMUP_TOKENS
    plan.measured = WARMUP_TOKENS
    plan._sets.clear()


def test_plan_steps_over_the_least_influential_eligible_layers():
    plan = SkipPlan(num_layers=10, first_layer=2)
    assert plan.eligible == list(range(2, 9))  # never before the signature layer, never the last
    assert plan.depths == [2, 3, 4, 5]
    _measured(plan, [0.0, 0.0, 0.5, 0.1, 0.4, 0.05, 0.3, 0.2, 0.6, 0.0])
    assert plan.skip_set(2) == {5, 3}
    assert plan.skip_set(4) == {5, 3, 7, 6}


def test_plan_measures_influence_from_residuals():
    plan = SkipPlan(num_layers=3, first_layer=1)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    plan.measure([a, a, b])  # layer 0 changes nothing, layer 1 turns the residual by 90 degrees
    assert plan.measured == 1
    assert plan.influence.tolist() == pytest.approx([0.0, 1.0, 0.0])
    plan.measure([a, b])  # a forward that did not run every layer is not a measurement
    assert plan.measured == 1


def test_plan_chooses_by_expected_saving_and_learns_from_outcomes():
    plan = SkipPlan(num_layers=10, first_layer=1)
    assert plan.choose(situation=7) is None  # no influences measured yet: every layer runs
    _measured(plan, [0.1] * 10)
    assert plan.choose(7) == 5  # optimistic prior: the deepest skip saves most
    for _ in range(30):  # situation 7 keeps rejecting the first token at depth 5
        plan.update([(7, 5)], accepted=0, rejected=True)
    assert plan.probability(7, 5) < 0.2
    assert plan.choose(7) == 4  # the next depth is still trusted
    assert plan.probability(3, 5) < plan.probability(3, 4)  # other situations share the evidence
    # A draft's later token needs its chance of being reached: a low reach ends the draft.
    assert plan.choose(7, reach=0.5) is None
    for depth in plan.depths:
        for _ in range(30):
            plan.update([(7, depth)], accepted=0, rejected=True)
    tried = [plan.choose(7) for _ in range(2 * EXPLORE)]
    assert tried.count(None) == 2 * EXPLORE - 2  # explored every EXPLORE-th time
    plan.forget_situations()
    assert all(key[0] == ALL for key in plan.counts)


def test_plan_rejects_a_first_layer_outside_the_model():
    with pytest.raises(ValueError, match="first_layer=4"):
        SkipPlan(num_layers=4, first_layer=4)


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(do_sample=True, top_k=5, temperature=0.7)])
def test_skip_drafts_are_verified_and_step_over_real_layers(practised, kw):  # noqa: F811
    """With the sequences off, the skip path drafts: the output is the unwrapped model's,
    drafted tokens ran with layers stepped over, and the outcomes were learned."""
    model, handle, _ = practised
    handle.config.lossless.skip_drafts = True
    handle.config.lossless.recall_sequences = handle.config.lossless.copy_drafts = False
    handle.stats.reset()
    before = handle.decode_stats.copy()
    for prompt in PROMPTS * 2:
        with handle.disabled():
            torch.manual_seed(5)
            ref = model.generate(input_ids=prompt, max_new_tokens=24, **kw)
        torch.manual_seed(5)
        out = model.generate(input_ids=prompt, max_new_tokens=24, **kw)
        assert torch.equal(out, ref), (kw, prompt)
    delta = handle.decode_stats - before
    assert delta.skip_drafted > 0
    assert delta.skip_drafted == delta.drafted  # the exit heads drafted nothing
    assert handle.stats.total.layers_skipped > 0
    assert handle.stats.total.kv_projections > 0  # stepped-over layers got their keys/values
    plan = handle._skip_plan
    assert plan is not None and plan.measured >= WARMUP_TOKENS
    assert any(key[0] != ALL for key in plan.counts)  # per-situation outcomes (SAE features)


def test_declined_skip_drafts_run_each_layer_once(practised):  # noqa: F811
    """Where every depth was rejected, the first token goes on through every layer (plain
    decoding's step, used as is) and nothing else runs."""
    model, handle, _ = practised
    handle.config.lossless.skip_drafts = True
    handle.config.lossless.recall_sequences = handle.config.lossless.copy_drafts = False
    with handle.disabled():
        ref = model.generate(input_ids=PROMPTS[0], max_new_tokens=24, do_sample=False)
    model.generate(input_ids=PROMPTS[0], max_new_tokens=24, do_sample=False)  # warms the plan up
    plan = handle._skip_plan
    assert plan is not None
    for depth in plan.depths:
        plan.counts[(ALL, depth)] = [0.0, 1000.0]
    handle.stats.reset()
    before = handle.decode_stats.copy()
    out = model.generate(input_ids=PROMPTS[0], max_new_tokens=24, do_sample=False)
    assert torch.equal(out, ref)
    delta = handle.decode_stats - before
    assert delta.draft_declined > 0
    assert delta.skip_drafted <= 24 // EXPLORE + 1  # the exploring proposals only
    runs = handle.stats.total.per_layer_runs
    assert max(runs) - min(runs) <= 2 * (24 // EXPLORE + 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_skip_drafts_without_an_observer_are_lossless(arch):
    """A freshly wrapped model (no observer, one situation) drafts with skips after its
    warm-up and still returns the unwrapped model's tokens."""
    model = make_tiny(arch)
    config = shortcut.ShortcutConfig(lossless=shortcut.LosslessConfig(skip_drafts=True, copy_drafts=False),
                                     learning=shortcut.LearningConfig(enabled=False))
    handle = shortcut.wrap(model, config)
    try:
        for prompt in PROMPTS:
            with handle.disabled():
                ref = model.generate(input_ids=prompt, max_new_tokens=30, do_sample=False)
            out = model.generate(input_ids=prompt, max_new_tokens=30, do_sample=False)
            assert torch.equal(out, ref), (arch, prompt)
        assert handle.decode_stats.skip_drafted > 0
    finally:
        handle.remove()


def test_a_skip_draft_is_the_model_with_those_layers_stepped_over():
    """The first drafted token is the argmax of the model run with exactly the plan's
    layers stepped over (``FixedPlan``) after the same cache."""
    from transformers import DynamicCache

    from shortcut.decode.lossless import SequenceInputs
    from shortcut.decode.skip_draft import SkipDrafter
    from shortcut.decode.stats import DecodeStats

    model = make_tiny("llama")
    handle = shortcut.wrap(model, shortcut.ShortcutConfig(learning=shortcut.LearningConfig(enabled=False)))
    try:
        plan = SkipPlan(num_layers=4, first_layer=1)
        _measured(plan, [0.5, 0.4, 0.1, 0.0])
        plan.counts[(ALL, 2)] = [100.0, 0.0]  # sure to draft at depth 2
        drafter = SkipDrafter(model, handle._runtime, plan, None, DecodeStats())
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        with handle.disabled():
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        drafted = drafter.draft(ids, cache, budget=1, stop_ids=frozenset(), inputs=SequenceInputs({}))
        assert cache.get_seq_length() == 5  # the draft's keys/values were cropped
        with handle.disabled():
            full = DynamicCache(config=model.config)
            model(input_ids=ids[:, :-1], past_key_values=full, use_cache=True)
        handle.set_policy(shortcut.FixedPlan(skip=plan.skip_set(2)))
        logits = model(input_ids=ids[:, -1:], past_key_values=full, use_cache=True).logits
        handle.set_policy(None)
        assert plan.skip_set(2) == {1, 2}
        assert [int(t) for t in drafted] == [int(logits[0, -1].argmax())]
    finally:
        handle.remove()
