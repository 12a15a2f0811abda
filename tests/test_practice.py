"""Practice and lossless drafting on tiny random models: identical tokens, real
savings in layers run, skills that persist."""

from __future__ import annotations

import logging

import pytest
import torch

import shortcut
from shortcut.decode import lossless
from shortcut.decode.draft_length import ShallowOdds
from shortcut.observe import Observer, collect_activations, train_sae

from .conftest import make_tiny

PROMPTS = [torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[9, 10, 11]]), torch.tensor([[30, 31, 4, 40]])]


def _observer(model, layer: int = 0) -> Observer:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 96, (40,), generator=g) for _ in range(20)]
    parts = shortcut.arch.resolve(model)
    acts = collect_activations(model, parts.layers[layer], seqs, max_tokens=600, progress=False)
    return Observer(train_sae(acts, d_sae=128, k=8, steps=40, batch_size=64, progress=False), layer)


def _practised(arch: str = "llama", rounds: int = 3):
    model = make_tiny(arch)
    # Low thresholds: a random tiny model is never confident, but drafting must be exercised.
    config = shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2],
                                     lossless=shortcut.LosslessConfig(draft_confidence=0.0),
                                     learning=shortcut.LearningConfig(policy_threshold=0.3, fit_steps=30))
    handle = shortcut.wrap(model, config)
    handle.attach_observer(_observer(model))
    rows = handle.practice(PROMPTS, rounds=rounds, max_new_tokens=16, progress=False)
    return model, handle, rows


@pytest.fixture(scope="module")
def practised_folder(tmp_path_factory):
    """A tiny llama's practised skills, saved once per module: ``(folder, rows)``."""
    model, handle, rows = _practised()
    folder = handle.save_pretrained(tmp_path_factory.mktemp("practised") / "skills")
    handle.remove()
    return folder, rows


@pytest.fixture
def practised(practised_folder):
    """A fresh model and handle loaded from the practised skills for each test, so no
    test sees another's changes: ``(model, handle, rows of the practice rounds)``."""
    folder, rows = practised_folder
    model = make_tiny("llama")
    handle = shortcut.load(model, folder)
    yield model, handle, rows
    handle.remove()


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(do_sample=True),
                                dict(do_sample=True, top_k=5, temperature=0.7)])
def test_lossless_identical_to_unwrapped(practised, kw):
    model, handle, _ = practised
    accepted = 0.0
    for prompt in PROMPTS:
        with handle.disabled():
            torch.manual_seed(3)
            ref = model.generate(input_ids=prompt, max_new_tokens=20, **kw)
        before = handle.decode_stats.accepted
        torch.manual_seed(3)
        out = model.generate(input_ids=prompt, max_new_tokens=20, **kw)
        assert torch.equal(out, ref), (kw, prompt)
        accepted += handle.decode_stats.accepted - before
    if not kw["do_sample"]:
        assert accepted > 0, "practised greedy prompts must accept drafts"


def test_drafted_tokens_skip_real_compute(practised, monkeypatch):
    model, handle, _ = practised
    # a tiny model's draft step costs most of a plain step (its unembedding is small), so
    # the learned odds would rarely find a shallow token worth it: count drafts as free
    monkeypatch.setattr(handle, "_fresh_shallow_odds", lambda learner: ShallowOdds(0.3))
    handle.stats.reset()
    before = handle.decode_stats.copy()
    handle.config.lossless.recall_sequences = handle.config.lossless.copy_drafts = False  # the shallow path drafts
    try:
        model.generate(input_ids=PROMPTS[0], max_new_tokens=20, do_sample=False)
    finally:
        handle.config.lossless.recall_sequences = handle.config.lossless.copy_drafts = True
    drafted = handle.decode_stats.draft_forwards - before.draft_forwards
    assert drafted > 0
    runs = handle.stats.total.per_layer_runs
    # Draft forwards exit after at most 2 of 4 layers: the deep layers run on fewer tokens.
    assert runs[3] < runs[0] and runs[3] == runs[2]


def test_an_unsure_first_draft_token_runs_each_layer_once(practised):
    """When the exit head is unsure of the first token of a draft, that forward goes on
    through every layer (it is plain decoding's step); no layer runs twice for it."""
    model, handle, _ = practised
    with handle.disabled():
        ref = model.generate(input_ids=PROMPTS[1], max_new_tokens=10, do_sample=False)
    before = handle.decode_stats.copy()
    handle.stats.reset()
    handle.config.lossless.recall_sequences, handle.config.lossless.draft_confidence = False, 1.01  # never sure
    handle.config.lossless.copy_drafts = False
    try:
        out = model.generate(input_ids=PROMPTS[1], max_new_tokens=10, do_sample=False)
    finally:
        handle.config.lossless.recall_sequences, handle.config.lossless.draft_confidence = True, 0.0
        handle.config.lossless.copy_drafts = True
    assert torch.equal(out, ref)
    assert handle.decode_stats.draft_unsure - before.draft_unsure > 0
    assert handle.decode_stats.drafted == before.drafted
    runs = handle.stats.total.per_layer_runs
    assert runs == [runs[0]] * len(runs)  # every token through every layer, once


def test_shallow_tokens_whose_learned_odds_are_low_are_not_drafted(practised):
    """Where verification kept rejecting the shallow path's tokens, the learned odds
    decline them: the first token goes on through every layer (as plain decoding), no
    shallow token is proposed, and the output is the unwrapped model's."""
    model, handle, _ = practised
    with handle.disabled():
        ref = model.generate(input_ids=PROMPTS[1], max_new_tokens=10, do_sample=False)
    handle.config.lossless.recall_sequences = handle.config.lossless.copy_drafts = False  # the shallow path drafts
    try:
        model.generate(input_ids=PROMPTS[1], max_new_tokens=10, do_sample=False)  # learns the situations
        odds = handle._shallow_odds
        assert odds.counts, "the shallow drafts' outcomes must be recorded"
        for counts in odds.counts.values():  # as if every shallow token had been rejected
            counts[0], counts[1] = 0.0, 50.0
        before = handle.decode_stats.copy()
        handle.stats.reset()
        out = model.generate(input_ids=PROMPTS[1], max_new_tokens=10, do_sample=False)
    finally:
        handle.config.lossless.recall_sequences = handle.config.lossless.copy_drafts = True
    assert torch.equal(out, ref)
    delta = handle.decode_stats - before
    assert delta.draft_declined > 0
    assert delta.drafted <= 1  # at most the one exploring proposal
    runs = handle.stats.total.per_layer_runs
    assert min(runs) >= runs[0] - 1  # nearly every token through every layer, once


def test_practised_sequences_are_recalled_as_drafts_without_running_layers(practised):
    """A practised prompt's answer is in the sequence memory (lossless output, learning
    on): the next call drafts it from there, runs no draft forward, verifies in few
    forwards, and returns the unwrapped model's tokens."""
    model, handle, _ = practised
    prompt = PROMPTS[0][0].tolist()
    assert any(seq[:len(prompt)] == prompt for seq in handle.learner.sequences.sequences)
    with handle.disabled():
        ref = model.generate(input_ids=PROMPTS[0], max_new_tokens=16, do_sample=False)
    handle.stats.reset()
    before = handle.decode_stats.copy()
    out = model.generate(input_ids=PROMPTS[0], max_new_tokens=16, do_sample=False)
    delta = handle.decode_stats - before
    assert torch.equal(out, ref)
    # Each of the 15 tokens after the prefill's came from the memory or was a
    # verification's own next token: two-token probes while fewer than 12 tokens agree
    # (this prompt has 5), then one long draft.
    assert delta.recall_accepted + delta.verify_forwards == 15 and delta.verify_forwards <= 4
    assert delta.draft_forwards == 0
    runs = handle.stats.total.per_layer_runs
    assert runs[0] == runs[3]  # no layer ran for a draft: every layer saw the same tokens

    handle.set_learning(False)  # frozen skills add no sequence
    try:
        count = len(handle.learner.sequences)
        model.generate(input_ids=torch.tensor([[50, 51, 52, 53]]), max_new_tokens=6, do_sample=False)
        assert len(handle.learner.sequences) == count
    finally:
        handle.set_learning(True)


def test_shallow_drafts_off_leaves_the_sequence_memory_alone(practised):
    """``shallow_drafts=False`` (the memory-only ablation): practised answers are still
    recalled, no shallow draft forward runs, and the tokens are the unwrapped model's."""
    model, handle, _ = practised
    handle.set_learning(False)
    handle.config.lossless.shallow_drafts = False
    try:
        for prompt in PROMPTS:
            with handle.disabled():
                ref = model.generate(input_ids=prompt, max_new_tokens=20, do_sample=False)
            before = handle.decode_stats.copy()
            out = model.generate(input_ids=prompt, max_new_tokens=20, do_sample=False)
            assert torch.equal(out, ref)
            delta = handle.decode_stats - before
            assert delta.draft_forwards == 0 and delta.drafted == delta.recalled + delta.copied
        assert handle.decode_stats.recall_accepted > 0
        handle.config.lossless.recall_sequences = False  # no source: every token takes the full path
        handle.config.lossless.copy_drafts = False
        with handle.disabled():
            ref = model.generate(input_ids=PROMPTS[0], max_new_tokens=20, do_sample=False)
        before = handle.decode_stats.copy()
        assert torch.equal(model.generate(input_ids=PROMPTS[0], max_new_tokens=20, do_sample=False), ref)
        assert (handle.decode_stats - before).drafted == 0
    finally:
        handle.config.lossless.shallow_drafts, handle.config.lossless.recall_sequences = True, True
        handle.config.lossless.copy_drafts = True
        handle.set_learning(True)


def test_generate_leaves_no_hook_and_carries_the_draft_length(practised):
    model, handle, _ = practised
    layer = handle.parts.layers[handle.learner.signature_layer]
    hooks = len(layer._forward_pre_hooks)
    handle._draft_length = None
    model.generate(input_ids=PROMPTS[0], max_new_tokens=20, do_sample=False)
    assert len(layer._forward_pre_hooks) == hooks  # the trail's capture hook is gone
    carried = handle._draft_length
    assert carried is not None and 1 <= carried <= handle.config.lossless.max_draft
    # The next call starts from the length the last one reached.
    drafter_lengths = []
    original = lossless.ShallowDrafter.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        drafter_lengths.append(self.num_draft)

    lossless.ShallowDrafter.__init__ = spy
    try:
        model.generate(input_ids=PROMPTS[0], max_new_tokens=20, do_sample=False)
    finally:
        lossless.ShallowDrafter.__init__ = original
    assert drafter_lengths == [carried]


def test_acceptance_counts_every_matching_draft_token_including_the_end(practised):
    """``accepted`` is the length of each draft's prefix that equals the output, also
    when the last accepted token ends the sequence (a shortfall there would also shrink
    the draft length carried into the next call)."""
    model, handle, _ = practised
    drafts, records = [], []
    draft, record = lossless.ShallowDrafter.draft, lossless.ShallowDrafter.record
    prompt_draft = lossless.ShallowDrafter.prompt_draft

    def spy_draft(self, input_ids, *args, **kwargs):
        out = draft(self, input_ids, *args, **kwargs)
        drafts.append((input_ids.shape[1], out[0].tolist()))
        return out

    def spy_prompt_draft(self, input_ids, *args, **kwargs):
        out = prompt_draft(self, input_ids, *args, **kwargs)
        drafts.append((input_ids.shape[1], out[0].tolist()))
        return out

    def spy_record(self, drafted, accepted, *rest):
        records.append((drafted, accepted))
        return record(self, drafted, accepted, *rest)

    ended = 0
    lossless.ShallowDrafter.draft, lossless.ShallowDrafter.record = spy_draft, spy_record
    lossless.ShallowDrafter.prompt_draft = spy_prompt_draft
    try:
        for prompt in PROMPTS:
            with handle.disabled():
                ref = model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1]:]
            for eos in dict.fromkeys(ref[2:].tolist()):  # end-of-sequence tokens the practised answer reaches
                drafts.clear(), records.clear()
                out = model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False, eos_token_id=eos)[0]
                with handle.disabled():
                    assert torch.equal(out, model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False,
                                                           eos_token_id=eos)[0])
                assert len(drafts) == len(records)  # the prefill's draft, then the loop's
                for (start, tokens), (drafted, accepted) in zip(drafts, records):
                    assert drafted == len(tokens)
                    matching = 0
                    while (matching < len(tokens) and start + matching < len(out)
                           and tokens[matching] == int(out[start + matching])):
                        matching += 1
                    assert accepted == matching
                    ended += bool(tokens) and tokens[-1] == eos and matching == len(tokens)
    finally:
        lossless.ShallowDrafter.draft, lossless.ShallowDrafter.record = draft, record
        lossless.ShallowDrafter.prompt_draft = prompt_draft
    assert ended, "some practised answer should be drafted up to its end"


def test_fast_mode_unpractised_batch_and_unsupported_options(practised, caplog):
    """A batch whose prompts were not practised decodes losslessly in fast mode; beam
    search takes the full path."""
    model, handle, _ = practised
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with handle.disabled():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        ref_beam = model.generate(input_ids=PROMPTS[0], max_new_tokens=8, num_beams=2, do_sample=False)
    handle.config.mode = "fast"  # practised rows of a batch commit: tests/test_fast_batched.py
    calls = handle.fast.lossless_calls
    try:
        with caplog.at_level(logging.WARNING):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                 pad_token_id=0)
    finally:
        handle.config.mode = "lossless"
    assert torch.equal(out, ref)
    assert handle.fast.lossless_calls == calls + 1 and "full path" not in caplog.text
    with caplog.at_level(logging.WARNING):
        out_beam = model.generate(input_ids=PROMPTS[0], max_new_tokens=8, num_beams=2, do_sample=False)
        assert torch.equal(out_beam, ref_beam)
    assert "num_beams=2" in caplog.text


def test_practice_rounds_report_and_learning_switch(practised):
    model, handle, rows = practised
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["accepted"] > 0
    assert rows[0]["recalled"] == 0 < rows[-1]["recalled"]  # round 3 recalls what rounds 1-2 produced
    assert all(r["learn_seconds"] >= 0 and r["consolidate_seconds"] > 0 for r in rows)
    handle.set_learning(False)
    learned = handle.learner.stats.tokens_learned
    model.generate(input_ids=PROMPTS[1], max_new_tokens=5, do_sample=False)
    assert handle.learner.stats.tokens_learned == learned
    handle.set_learning(True)


def test_save_load_same_decisions_and_tokens(practised, tmp_path):
    model, handle, _ = practised
    folder = handle.save_pretrained(tmp_path / "skills")
    probe = handle.observer.encode(torch.randn(3, 64))
    decisions = handle.exit_policy.probabilities(probe)
    hidden = torch.randn(2, 64)
    head_out = handle.heads.logits(1, hidden)
    with handle.disabled():
        ref = model.generate(input_ids=PROMPTS[2], max_new_tokens=12, do_sample=False)

    other_model = make_tiny("llama")  # same seed: same weights, same fingerprint
    loaded = shortcut.load(other_model, folder)
    try:
        assert torch.equal(loaded.exit_policy.probabilities(probe), decisions)
        assert torch.equal(loaded.heads.logits(1, hidden), head_out)
        assert torch.equal(loaded.heads.shortlist, handle.heads.shortlist)
        assert loaded.learner.practised == handle.learner.practised
        assert loaded.learner.sequences.sequences == handle.learner.sequences.sequences
        assert torch.equal(other_model.generate(input_ids=PROMPTS[2], max_new_tokens=12, do_sample=False), ref)
    finally:
        loaded.remove()


def test_draft_chances_learned_by_verification_survive_save_and_load(practised, tmp_path):
    model, handle, _ = practised
    generator = torch.Generator().manual_seed(5)
    for prompt in [*PROMPTS, *(torch.randint(3, 96, (1, 9), generator=generator) for _ in range(4))]:
        model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False)
    lookups, shallow = dict(handle._lookup_lengths.counts), dict(handle._current_shallow_odds().counts)
    assert lookups and shallow  # this practice drafts both ways
    folder = handle.save_pretrained(tmp_path / "skills")
    loaded = shortcut.load(make_tiny("llama"), folder)
    try:
        assert loaded._lookup_lengths.counts == lookups
        assert loaded._current_shallow_odds().counts == shallow
    finally:
        loaded.remove()
    handle.learner.consolidate()  # new heads: their chances start again, and are not saved as theirs
    assert handle._current_shallow_odds() is None
    again = shortcut.load(make_tiny("llama"), handle.save_pretrained(tmp_path / "after"))
    try:
        assert again._lookup_lengths.counts == lookups and again._current_shallow_odds() is None
    finally:
        again.remove()


def test_practice_bad_input(practised):
    _, handle, _ = practised
    with pytest.raises(ValueError, match="tokenizer"):
        handle.practice(["text prompt"], rounds=1)
    with pytest.raises(ValueError, match="rounds=0"):
        handle.practice(PROMPTS, rounds=0)


@pytest.mark.parametrize("arch", ["gpt2", "gemma3_text"])
def test_lossless_on_other_architectures(arch):
    model, handle, rows = _practised(arch, rounds=2)
    try:
        for prompt in PROMPTS:
            with handle.disabled():
                ref = model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False)
            assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False), ref)
        # Fast mode commits a practised answer longer than gemma3's sliding window (6) and
        # catches it up where the call goes on past it: still the model's own tokens.
        handle.config.mode = "fast"
        handle.fast.min_confidence = handle.fast.base_confidence = 1.01  # the heads never commit
        with handle.disabled():
            ref = model.generate(input_ids=PROMPTS[0], max_new_tokens=24, do_sample=False)
        assert torch.equal(model.generate(input_ids=PROMPTS[0], max_new_tokens=24, do_sample=False), ref)
        assert handle.fast.recalled == 15 and handle.fast.catch_ups == 1
        handle.config.mode = "lossless"
        # A practised answer in the prefill forward, longer than gemma3's sliding window (6):
        # the rejected part after a fork is cropped from those layers too.
        _check_prefill_recall(model, handle, dict(do_sample=False))
    finally:
        handle.remove()


def test_fast_mode_commits_exits_and_audits():
    model = make_tiny("llama")
    config = shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2],
                                     lossless=shortcut.LosslessConfig(draft_confidence=0.0),
                                     fast=shortcut.FastConfig(confidence=0.0, audit_fraction=1.0),
                                     learning=shortcut.LearningConfig(policy_threshold=0.3, fit_steps=30))
    handle = shortcut.wrap(model, config)
    handle.attach_observer(_observer(model))
    handle.practice(PROMPTS, rounds=2, max_new_tokens=16, progress=False)
    handle.config.mode = "fast"
    handle.stats.reset()
    try:
        out = model.generate(input_ids=PROMPTS[0], max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert out.shape[1] == PROMPTS[0].shape[1] + 16
        report = handle.fast.report()
        assert report["exits"] > 0 and report["audits"] > 0
        runs = handle.stats.total.per_layer_runs
        assert runs[3] < runs[0]  # committed exits really skip the deep layers
        # A forced policy still rules each forward in fast mode.
        handle.set_policy(shortcut.FixedPlan(exit_after=0))
        handle.stats.reset()
        model.generate(input_ids=PROMPTS[1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert handle.stats.total.layers_per_token == 1
    finally:
        handle.remove()


def test_loaded_policy_uses_the_saved_threshold(tmp_path):
    """The policy's exit threshold is not a learned tensor: it must come back from the
    saved config, not from ExitPolicy's default."""
    from shortcut.skills import folder as skills

    model = make_tiny("llama")
    config = shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2],
                                     learning=shortcut.LearningConfig(policy_threshold=0.55))
    handle = shortcut.wrap(model, config)
    handle.attach_observer(_observer(model))
    assert handle.exit_policy.threshold == 0.55
    folder = handle.save_pretrained(tmp_path / "skills")
    handle.remove()

    loaded = shortcut.load(make_tiny("llama"), folder)
    try:
        assert loaded.config.learning.policy_threshold == 0.55
        assert loaded.exit_policy.threshold == 0.55
    finally:
        loaded.remove()
    manifest = skills.read_manifest(folder)
    parts = shortcut.arch.resolve(model)
    policy = skills.load_learned(folder, manifest, parts, manifest["base_model"]).policy
    assert policy.threshold == 0.55
    other = shortcut.ShortcutConfig(learning=shortcut.LearningConfig(policy_threshold=0.7))
    policy = skills.load_learned(folder, manifest, parts, manifest["base_model"], config=other).policy
    assert policy.threshold == 0.7


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(do_sample=True)])
def test_practised_answer_is_verified_by_the_prefill(practised, kw):
    """A prompt that agrees with a practised sequence for SHORT_MATCH tokens or more has
    its answer drafted before the prefill, which verifies it: an exact repeat needs no
    other forward, a practised answer that forks costs only the forwards after the fork,
    and the output (greedy or seeded sampling) is the unwrapped model's."""
    model, handle, _ = practised
    _check_prefill_recall(model, handle, kw)


def test_prefill_recall_with_a_left_padded_prompt(practised):
    """A single prompt with left padding: the prefill still carries and verifies the
    recalled answer (mask and positions extended) and the output is the unwrapped model's."""
    from shortcut.learn.sequences import SHORT_MATCH, SequenceMemory

    model, handle, _ = practised
    prompt = torch.arange(20, 20 + SHORT_MATCH + 2).view(1, -1)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=-1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(prompt)], dim=-1)
    with handle.disabled():
        ref = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=16, do_sample=False)
    memory = handle.learner.sequences
    handle.set_learning(False)
    try:
        handle.learner.sequences = SequenceMemory()
        handle.learner.sequences.add(prompt[0].tolist() + ref[0, padded.shape[1]:].tolist())
        before = handle.decode_stats.copy()
        out = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=16, do_sample=False)
        delta = handle.decode_stats - before
    finally:
        handle.learner.sequences = memory
        handle.set_learning(True)
    assert torch.equal(out, ref)
    assert delta.recall_accepted == 15 and delta.verify_forwards == 0


def _check_prefill_recall(model, handle, kw):
    from shortcut.learn.sequences import SHORT_MATCH, SequenceMemory

    prompt = torch.arange(20, 20 + SHORT_MATCH + 2).view(1, -1)
    with handle.disabled():
        torch.manual_seed(0)
        ref = model.generate(input_ids=prompt, max_new_tokens=16, **kw)
    answer = ref[0].tolist()
    fork = prompt.shape[1] + 9  # the 10th new token
    memory = handle.learner.sequences
    handle.set_learning(False)
    try:
        forked = answer[:fork] + [(answer[fork] + 1) % 96] + answer[fork + 1:]
        for practised_seq, most_verifies in ((answer, 0), (forked, 6)):
            handle.learner.sequences = SequenceMemory()
            handle.learner.sequences.add(practised_seq)
            before = handle.decode_stats.copy()
            handle.stats.reset()
            torch.manual_seed(0)
            out = model.generate(input_ids=prompt, max_new_tokens=16, **kw)
            delta = handle.decode_stats - before
            assert torch.equal(out, ref)
            if not kw["do_sample"]:  # sampling may leave the practised answer anywhere
                assert delta.verify_forwards + delta.full_path_steps <= most_verifies
                assert delta.recall_accepted >= min(15, fork - prompt.shape[1])
            runs = handle.stats.total.per_layer_runs
            assert runs[0] == runs[-1]  # no draft ran a layer: the memory made them
    finally:
        handle.learner.sequences = memory
        handle.set_learning(True)


def test_unfamiliar_token_takes_full_path_once_and_is_learned(practised):
    """A token the policy does not know runs through every layer in the draft attempt
    itself: no layer runs twice, no verification forward, the lesson is still learned."""
    model, handle, _ = practised
    novel = torch.tensor([[50, 61, 72, 83, 94, 17]])
    with handle.disabled():
        ref = model.generate(input_ids=novel, max_new_tokens=10, do_sample=False)
    policy = handle.exit_policy
    saved = policy.min_familiarity
    policy.min_familiarity = 1.01  # nothing is familiar
    try:
        before, learned = handle.decode_stats.copy(), handle.learner.stats.tokens_learned
        handle.stats.reset()
        out = model.generate(input_ids=novel, max_new_tokens=10, do_sample=False)
    finally:
        policy.min_familiarity = saved
    delta = handle.decode_stats - before
    assert torch.equal(out, ref)
    # 9 steps after the prefill: attempts that met an unfamiliar token ran it on the full
    # path; the steps in between (back-off after a refusal) were plain forwards.
    assert delta.full_path_steps >= 2 and delta.drafted == 0
    assert delta.full_path_steps + delta.verify_forwards == 9
    # Prefill (6 tokens) + 9 single-token steps, each layer once per token.
    assert handle.stats.total.per_layer_runs == [15] * 4
    assert handle.learner.stats.tokens_learned == learned + 1 + 9  # prefill's last position + each step


def test_fast_mode_full_path_tokens_see_the_full_models_cache():
    """Committed tokens write no deep keys/values; the next full-path token catches them
    up first, so every token that did not come from a shallow path is exactly the full
    model's greedy choice after the text so far."""
    model = make_tiny("llama")
    config = shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2],
                                     lossless=shortcut.LosslessConfig(draft_confidence=0.0),
                                     fast=shortcut.FastConfig(confidence=0.15, audit_fraction=1.0),
                                     learning=shortcut.LearningConfig(policy_threshold=0.3, fit_steps=30))
    handle = shortcut.wrap(model, config)  # a random tiny model's heads are never very confident
    handle.attach_observer(_observer(model))
    handle.practice(PROMPTS, rounds=2, max_new_tokens=16, progress=False)
    handle.config.mode = "fast"
    mixed = 0
    try:
        for prompt in PROMPTS:
            out = model.generate(input_ids=prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
            committed = set(handle.fast.committed)
            with handle.disabled():
                full = model(input_ids=out).logits[0].argmax(-1)
            start = prompt.shape[1]
            for i in range(start, out.shape[1]):
                if i not in committed:
                    assert int(out[0, i]) == int(full[i - 1]), f"full-path token at {i} differs"
            mixed += any(i not in committed and min(committed, default=i) < i for i in range(start, out.shape[1]))
        assert mixed > 0  # the check above covered full-path tokens that followed commits
        report = handle.fast.report()
        assert report["catch_ups"] > 0 and report["audits"] > 0
    finally:
        handle.remove()


def test_fast_calibration_settles_at_the_target_error_rate():
    """One error raises both bars a step; (1 - target) / target agreements undo it."""
    from shortcut.decode.fast import CONFIDENCE_STEP, FAMILIARITY_STEP, FastController

    controller = FastController(min_confidence=0.3, min_familiarity=0.9, target_error_rate=0.01,
                                audit_fraction=0.0, seed=0)
    controller.record_audit(False)
    assert controller.min_confidence == pytest.approx(0.3 + CONFIDENCE_STEP)
    assert controller.min_familiarity == pytest.approx(0.9 + FAMILIARITY_STEP)
    for _ in range(98):
        controller.record_audit(True)
    assert controller.min_confidence > 0.3 and controller.min_familiarity > 0.9
    for _ in range(5):
        controller.record_audit(True)
    assert controller.min_confidence == 0.3 and controller.min_familiarity == 0.9  # never below the floors
    assert controller.report()["measured_error_rate"] == pytest.approx(1 / 104)


def test_fast_bars_restart_from_their_floors_after_a_refit():
    model, handle, _ = _practised(rounds=1)  # a position buffer in memory to re-fit from
    controller = handle.fast
    for _ in range(10):  # errors of earlier heads pushed both bars up
        controller.record_audit(False)
    raised = controller.min_confidence
    handle.learner.consolidate(steps=5)
    handle.config.mode = "fast"
    try:
        model.generate(input_ids=PROMPTS[0], max_new_tokens=4, do_sample=False)
    finally:
        handle.config.mode = "lossless"
    assert controller.calibrated_for == handle.learner.stats.consolidations
    assert controller.min_confidence <= controller.base_confidence + 4 * 0.05 < raised


def test_fast_mode_does_not_commit_where_a_practised_sequence_goes_on_otherwise(practised):
    """Where the text agrees with a practised sequence for SHORT_MATCH tokens or more, a
    confident head that names another token than the sequence's next one does not
    commit: the full path decides (practised answers that fork)."""
    from shortcut.learn.sequences import SHORT_MATCH, SequenceMemory

    model, handle, _ = practised
    prompt = PROMPTS[0][0].tolist()
    with handle.disabled():
        seq = model.generate(input_ids=PROMPTS[0], max_new_tokens=16, do_sample=False)[0].tolist()
    controller, saved, memory = handle.fast, handle.fast.min_confidence, handle.learner.sequences
    controller.min_confidence = controller.base_confidence = 0.0  # a random tiny model is never confident
    handle.config.mode = "fast"
    handle.set_learning(False)
    vetoes = controller.vetoes
    try:
        for k in range(max(SHORT_MATCH, len(prompt) + 1), len(seq)):
            # A practised sequence that forks from the model's answer at position k. It
            # begins with another token: one that begins with the prompt itself is taken
            # for the prompt's practised answer and recalled outright.
            handle.learner.sequences = SequenceMemory()
            handle.learner.sequences.add([(seq[0] + 1) % 96] + seq[1:k] + [(seq[k] + 1) % 96] + seq[k + 1:])
            before = controller.vetoes
            out = model.generate(input_ids=PROMPTS[0], max_new_tokens=16, do_sample=False)[0].tolist()
            if controller.vetoes > before and out[:k] == seq[:k]:
                assert out[k] == seq[k]  # the full path's token, not the sequence's
    finally:
        handle.learner.sequences = memory
        handle.config.mode = "lossless"
        controller.min_confidence = controller.base_confidence = saved
        handle.set_learning(True)
    assert controller.vetoes > vetoes


def test_fast_mode_commits_only_on_prompts_practised_verbatim(practised):
    """A prompt not in the prompt log (or logged after the heads' latest re-fit) decodes
    losslessly in fast mode (the model's own tokens, nothing committed); with the option
    off the bars alone decide."""
    model, handle, _ = practised
    with handle.disabled():  # not in the log, but continues a practised text: shallow paths look familiar
        reworded = model.generate(input_ids=PROMPTS[0], max_new_tokens=2, do_sample=False)
    assert handle.learner.was_practised(PROMPTS[0][0].tolist())
    assert not handle.learner.was_practised(reworded[0].tolist())
    with handle.disabled():
        ref = model.generate(input_ids=reworded, max_new_tokens=16, do_sample=False)
    controller, saved = handle.fast, handle.fast.min_confidence
    controller.min_confidence = controller.base_confidence = 0.0  # a random tiny model is never confident
    handle.config.mode = "fast"
    handle.set_learning(False)  # keep the reworded prompt out of the log
    try:
        calls, exits = controller.lossless_calls, controller.exits
        assert torch.equal(model.generate(input_ids=reworded, max_new_tokens=16, do_sample=False), ref)
        assert controller.lossless_calls == calls + 1 and controller.exits == exits and controller.committed == []
        model.generate(input_ids=PROMPTS[0], max_new_tokens=16, do_sample=False)
        assert controller.lossless_calls == calls + 1 and controller.committed  # practised: commits
        handle.config.fast.practised_prompts_only = False
        controller.recalibrate(controller.calibrated_for)  # audits of the call above moved the bars
        model.generate(input_ids=reworded, max_new_tokens=16, do_sample=False)
        assert controller.lossless_calls == calls + 1 and controller.committed
    finally:
        handle.config.mode, handle.config.fast.practised_prompts_only = "lossless", True
        controller.min_confidence = controller.base_confidence = saved
        handle.set_learning(True)
    # A prompt counts once the heads have been re-fitted after it was logged.
    model.generate(input_ids=reworded, max_new_tokens=4, do_sample=False)
    assert not handle.learner.was_practised(reworded[0].tolist())
    handle.learner.consolidate(steps=1)
    assert handle.learner.was_practised(reworded[0].tolist())


def test_fast_mode_commits_the_practised_answer_with_no_layer(practised):
    """A plain greedy call whose prompt was practised commits its practised answer (the
    full model's own greedy tokens) without running any layer after the prefill; where
    the call goes on past that answer, the next token catches the recalled ones up and
    audits them, and the output stays the full model's."""
    from shortcut.learn.sequences import SequenceMemory

    model, handle, _ = practised
    prompt = PROMPTS[0]
    with handle.disabled():
        ref = model.generate(input_ids=prompt, max_new_tokens=24, do_sample=False)
    controller = handle.fast
    saved = (controller.min_confidence, controller.base_confidence, controller.audit_fraction)
    memory = handle.learner.sequences
    handle.learner.sequences = SequenceMemory()  # as if practised once, for 16 tokens
    handle.learner.sequences.add(ref[0, :prompt.shape[1] + 16].tolist())
    # Heads that never commit: every token not recalled is the full path's.
    controller.min_confidence = controller.base_confidence = 1.01
    handle.config.mode = "fast"
    handle.set_learning(False)
    try:
        controller.audit_fraction = 0.0
        handle.stats.reset()
        recalled, audits = controller.recalled, controller.audits
        counted = handle.decode_stats.recall_committed
        out = model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False)  # as practised
        assert torch.equal(out, ref[:, :out.shape[1]])
        assert controller.recalled - recalled == 15  # all but the prefill's token
        assert handle.decode_stats.recall_committed - counted == 15
        assert handle.stats.total.per_layer_runs == [prompt.shape[1]] * 4  # the prefill alone
        assert controller.audits == audits

        controller.audit_fraction = 1.0
        errors, recalled = controller.errors, controller.recalled
        out = model.generate(input_ids=prompt, max_new_tokens=24, do_sample=False)  # longer than practised
        assert torch.equal(out, ref)
        assert controller.recalled - recalled == 15
        assert controller.audits - audits >= 15 and controller.errors == errors

        # Even where the heads would commit, the token after the answer takes the full
        # path first: the recalled tokens hold keys/values in no layer.
        controller.min_confidence = controller.base_confidence = 0.0
        controller.audit_fraction, catch_ups = 0.0, controller.catch_ups
        out = model.generate(input_ids=prompt, max_new_tokens=24, do_sample=False)
        end = prompt.shape[1] + 16
        assert controller.catch_ups > catch_ups and end not in controller.committed
        assert torch.equal(out[:, :end + 1], ref[:, :end + 1])

        # Sampling or a logits processor: the practised answer is not this call's answer.
        recalled = controller.recalled
        torch.manual_seed(0)
        model.generate(input_ids=prompt, max_new_tokens=16, do_sample=True)
        model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False, repetition_penalty=1.5)
        assert controller.recalled == recalled
    finally:
        handle.learner.sequences = memory
        handle.config.mode = "lossless"
        controller.min_confidence, controller.base_confidence, controller.audit_fraction = saved
        handle.set_learning(True)


def test_only_plain_greedy_answers_become_practised_sequences(practised):
    model, handle, _ = practised
    memory = handle.learner.sequences
    prompt = torch.tensor([[50, 51, 52, 53]])
    held = len(memory)
    torch.manual_seed(0)
    model.generate(input_ids=prompt, max_new_tokens=6, do_sample=True)
    model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, repetition_penalty=1.5)
    model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, attention_mask=torch.tensor([[0, 1, 1, 1]]))
    assert len(memory) == held
    out = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert len(memory) == held + 1 and memory.sequences[-1] == out[0].tolist()


def test_a_failed_shallow_attempt_does_not_pause_the_lookups(practised):
    """Lookups and drafting forwards back off separately: new content where the shallow
    path keeps failing must not silence the practised sequences (and the other way)."""
    from shortcut.decode.stats import DecodeStats
    from shortcut.learn.sequences import SequenceMemory

    model, handle, _ = practised
    memory = SequenceMemory()
    memory.add(list(range(10, 40)))
    drafter = lossless.ShallowDrafter(model, handle._runtime, None, None, None, None, max_draft=8,
                                      min_confidence=0.0, stats=DecodeStats(), sequences=memory)
    ids = torch.tensor([list(range(10, 22))])
    drafter.forward_backoff.record(accepted=0)  # a shallow attempt just failed
    drafter.forward_backoff.record(accepted=0)
    assert drafter.draft(ids, None, limit=8)[0, 0].item() == 22  # the lookup still drafts
    drafter.lookup_backoff.record(accepted=0)  # a lookup just failed: the next step sits out
    assert drafter.draft(ids, None, limit=8).shape[1] == 0
    assert drafter.draft(ids, None, limit=8)[0, 0].item() == 22
