"""A freshly wrapped model, no observer: it practises from the first call (practised
sequences recalled as drafts, verified by the full model), and what it practised
persists."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import shortcut
from shortcut.observe import Observer, collect_activations, train_sae
from shortcut.observe.auto import AutoObserver
from shortcut.skills.summary import describe

from .conftest import make_tiny

PROMPTS = [torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[9, 10, 11]]), torch.tensor([[30, 31, 4, 40]])]
NEW = 16


def _reference(model, handle, prompt, **kw):
    with handle.disabled():
        torch.manual_seed(3)
        return model.generate(input_ids=prompt, max_new_tokens=NEW, **kw)


def _delta(handle, before):
    return handle.decode_stats - before


@pytest.fixture
def fresh():
    model = make_tiny("llama")
    handle = shortcut.wrap(model)
    yield model, handle
    handle.remove()


def test_fresh_handle_replays_its_own_answers_without_an_observer(fresh):
    model, handle = fresh
    assert handle.learner is None
    for prompt in PROMPTS:  # first pass: nothing practised yet, plain decoding
        before = handle.decode_stats.copy()
        assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False),
                           _reference(model, handle, prompt, do_sample=False))
        assert _delta(handle, before).recall_accepted == 0
    assert len(handle.experience.sequences) == len(PROMPTS)
    assert handle.experience.practised == [p[0].tolist() for p in PROMPTS]

    prompt = PROMPTS[0]
    ref = _reference(model, handle, prompt, do_sample=False)
    handle.stats.reset()
    before = handle.decode_stats.copy()
    out = model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False)
    delta = _delta(handle, before)
    assert torch.equal(out, ref)
    new = ref.shape[1] - prompt.shape[1]
    # Every token after the prefill's came from the memory or was a verification's own
    # next token, and no layer ran to draft: every layer saw the same tokens.
    assert delta.recall_accepted + delta.verify_forwards == new - 1
    assert delta.verify_forwards <= 4
    runs = handle.stats.total.per_layer_runs
    assert runs == [runs[0]] * len(runs)


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(do_sample=True, top_k=5, temperature=0.7)])
@pytest.mark.parametrize("mode", ["lossless", "fast"])
def test_memory_only_output_is_the_unwrapped_models(kw, mode):
    """Greedy and seeded sampling, in both modes: fast mode without an observer decodes
    losslessly (it has no shallow path to commit with)."""
    model = make_tiny("llama")
    handle = shortcut.wrap(model, shortcut.ShortcutConfig(mode=mode))
    try:
        for _ in range(2):
            for prompt in PROMPTS:
                torch.manual_seed(3)
                out = model.generate(input_ids=prompt, max_new_tokens=NEW, **kw)
                assert torch.equal(out, _reference(model, handle, prompt, **kw)), (mode, kw, prompt)
        assert handle.decode_stats.recall_accepted > 0 or kw["do_sample"]
    finally:
        handle.remove()


def test_learning_off_adds_nothing(fresh):
    model, handle = fresh
    handle.set_learning(False)
    model.generate(input_ids=PROMPTS[0], max_new_tokens=NEW, do_sample=False)
    assert len(handle.experience.sequences) == 0 and handle.experience.practised == []


def test_practice_without_an_observer_fills_the_memory(fresh):
    _, handle = fresh
    rows = handle.practice(PROMPTS, rounds=2, max_new_tokens=NEW, progress=False)
    assert rows[0]["recalled"] == 0 < rows[1]["recalled"]
    assert rows[1]["consolidate_seconds"] == 0.0 and rows[1]["head_agreement"] == {}


def _observer(model) -> Observer:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 96, (40,), generator=g) for _ in range(20)]
    acts = collect_activations(model, shortcut.arch.resolve(model).layers[0], seqs, max_tokens=600, progress=False)
    return Observer(train_sae(acts, d_sae=128, k=8, steps=40, batch_size=64, progress=False), 0)


def test_attach_observer_keeps_what_was_practised():
    model = make_tiny("llama")
    handle = shortcut.wrap(model, shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2], mode="fast"))
    try:
        for prompt in PROMPTS:
            model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False)
        sequences = list(handle.experience.sequences.sequences)
        handle.attach_observer(_observer(model))
        assert handle.learner.sequences is handle.experience.sequences
        assert handle.learner.sequences.sequences == sequences
        assert handle.learner.practised == [p[0].tolist() for p in PROMPTS]
        # Fresh heads were fitted on none of the log: fast mode does not commit yet.
        assert not handle.learner.was_practised(PROMPTS[0][0].tolist())
        before = handle.decode_stats.copy()
        out = model.generate(input_ids=PROMPTS[0], max_new_tokens=NEW, do_sample=False)
        assert torch.equal(out, _reference(model, handle, PROMPTS[0], do_sample=False))
        assert _delta(handle, before).recall_accepted > 0
        assert handle.fast.lossless_calls == 1
    finally:
        handle.remove()


def test_memory_only_save_load_round_trip_replays_on_the_first_call(fresh, tmp_path):
    model, handle = fresh
    for prompt in PROMPTS:
        model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False)
    folder = handle.save_pretrained(tmp_path / "skills")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "draft_odds.json", "observer_buffer.safetensors",
                                                        "replay_log.json", "shortcut.json"]
    assert json.loads((folder / "shortcut.json").read_text())["contents"]["replay_log"] == "replay_log.json"
    summary = describe(folder)
    assert "no observer yet" in summary and "3 practised prompts, 3 practised sequences" in summary

    other = make_tiny("llama")  # same seed: same weights, a second process's model
    loaded = shortcut.load(other, folder)
    try:
        assert loaded.learner is None
        assert loaded.experience.practised == handle.experience.practised
        assert loaded.experience.sequences.sequences == handle.experience.sequences.sequences
        assert loaded._lookup_lengths.counts == handle._lookup_lengths.counts  # what verification taught
        ref = _reference(other, loaded, PROMPTS[1], do_sample=False)
        out = other.generate(input_ids=PROMPTS[1], max_new_tokens=NEW, do_sample=False)
        assert torch.equal(out, ref)
        assert loaded.decode_stats.recall_accepted > 0
    finally:
        loaded.remove()


def test_bad_replay_log_of_a_memory_only_folder_is_refused(fresh, tmp_path):
    model, handle = fresh
    model.generate(input_ids=PROMPTS[0], max_new_tokens=NEW, do_sample=False)
    folder = handle.save_pretrained(tmp_path / "skills")
    other = make_tiny("llama")
    (folder / "replay_log.json").write_text("[1, 2")
    with pytest.raises(shortcut.SkillsFileError, match="replay_log.json: the prompt log is not valid json"):
        shortcut.load(other, folder)
    (folder / "replay_log.json").write_text(json.dumps({"prompts": [[5, 6, 7]], "sequences": [[5, 6, 7, 96]]}))
    with pytest.raises(shortcut.SkillsFileError, match="field 'sequences'"):
        shortcut.load(other, folder)
    assert not any("forward" in m.__dict__ for m in other.modules())  # refused before anything was attached


def _distinct_prompts(n: int, length: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 96, (1, length), generator=g) for _ in range(n)]


def test_observer_trains_itself_from_traffic_and_attaches(caplog):
    """Residuals of new prompts' full forwards fill the buffer; the call that fills it
    starts a background training; the next call attaches the observer. Outputs and the
    global random state stay as without shortcut throughout."""
    model = make_tiny("llama")
    auto = AutoObserver(min_tokens=60, d_sae=64, k=4, steps=20, batch_size=32)
    handle = shortcut.wrap(model, shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2]), observer=auto)
    try:
        prompts = _distinct_prompts(5)
        before = handle.decode_stats.copy()
        model.generate(input_ids=prompts[0], max_new_tokens=NEW, do_sample=False)
        rejected = (handle.decode_stats - before).drafted - (handle.decode_stats - before).accepted
        collected = auto.tokens
        # Every position a full forward read (the prompt's first left out), rejected drafts included.
        assert 0 < collected <= prompts[0].shape[1] - 1 + NEW + rejected
        model.generate(input_ids=prompts[0], max_new_tokens=NEW, do_sample=False)
        assert auto.tokens == collected  # a repeated prompt adds nothing
        def sampled_as_unwrapped(prompt):
            torch.manual_seed(5)
            out = model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=True)
            after = torch.rand(4)  # the global random state the call left behind
            with handle.disabled():
                torch.manual_seed(5)
                assert torch.equal(out, model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=True))
                assert torch.equal(after, torch.rand(4))

        for prompt in prompts[1:3]:
            sampled_as_unwrapped(prompt)
        assert auto.tokens == 60 and (auto.training or auto.observer is not None)  # the third call filled it
        assert handle.learner is None  # attached at the start of the next call
        assert auto.wait(120) and auto.error is None
        with caplog.at_level(logging.INFO, logger="shortcut.observe.auto"):
            sampled_as_unwrapped(prompts[3])  # attaches: new heads must not move the caller's random stream
        assert handle.observer is not None and handle.auto_observer is None
        assert handle.observer.layer == 0 and handle.observer.d_sae == 64
        assert "from the model's own traffic: 60 tokens" in caplog.text and "variance explained" in caplog.text
        out = model.generate(input_ids=prompts[4], max_new_tokens=NEW, do_sample=False)
        assert torch.equal(out, _reference(model, handle, prompts[4], do_sample=False))
        assert handle.learner.stats.tokens_learned > 0  # the shallow path learns from then on
        assert len(handle.experience.sequences) == 2  # the greedy calls' answers were kept
    finally:
        handle.remove()


def test_wrap_observer_argument(tmp_path):
    model = make_tiny("llama")
    config = shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2])
    handle = shortcut.wrap(model, config)
    assert isinstance(handle.auto_observer, AutoObserver) and handle.learner is None  # "auto" by default
    handle.remove()
    handle = shortcut.wrap(model, config, observer=None)
    assert handle.auto_observer is None and handle.learner is None
    folder = handle.save_pretrained(tmp_path / "memory")
    handle.remove()
    observer = _observer(model)
    handle = shortcut.wrap(model, config, observer=observer)
    assert handle.observer is observer and handle.auto_observer is None
    saved = handle.save_pretrained(tmp_path / "skills")
    handle.remove()
    handle = shortcut.wrap(model, config, observer=str(saved))
    probe = torch.randn(3, 64)
    assert torch.equal(handle.observer.encode(probe).indices, observer.encode(probe).indices)
    handle.remove()
    with pytest.raises(ValueError, match="holds no observer"):
        shortcut.wrap(model, config, observer=folder)
    with pytest.raises(shortcut.SkillsMismatchError):
        shortcut.wrap(make_tiny("llama", seed=1), config, observer=saved)
    with pytest.raises(ValueError, match="ambiguous"):
        shortcut.wrap(model, config, observer=True)
    with pytest.raises(TypeError, match="observer must be"):
        shortcut.wrap(model, config, observer=3)
    with pytest.raises(ValueError, match="min_tokens=5"):
        AutoObserver(min_tokens=5)
    assert not any("forward" in m.__dict__ for m in model.modules())  # failed wraps left nothing behind


def test_prompt_positions_with_a_collected_prefix_are_left_out(fresh):
    """A residual depends only on the tokens up to it: the part of a prompt an earlier
    prompt already began with (a chat template's system prompt) adds no rows."""
    model, handle = fresh
    handle.config.lossless.copy_drafts = False  # rejected copied drafts would add rows of their own
    auto = handle.auto_observer
    first = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    model.generate(input_ids=first, max_new_tokens=NEW, do_sample=False)
    answer_rows = auto.tokens - (first.shape[1] - 1)  # the rows of the decode forwards
    second = torch.tensor([[5, 6, 7, 8, 9, 40, 41, 42]])  # shares 5 tokens with the first
    model.generate(input_ids=second, max_new_tokens=NEW, do_sample=False)
    assert auto.tokens - (first.shape[1] - 1) - answer_rows == second.shape[1] - 5 + answer_rows
    assert torch.equal(auto.residuals()[: first.shape[1] - 1].float(), _layer_rows(model, handle, first)[1:])


def test_a_kept_beginning_shifts_no_collected_row(fresh):
    """A prompt whose first block of keys and values was kept from an earlier call
    (the prefill reads from position 16 on) adds the same rows as it would read whole:
    those of the positions after the beginning it shares with a collected prompt."""
    model, handle = fresh
    handle.config.lossless.copy_drafts = False
    auto = handle.auto_observer
    shared = list(range(3, 23))  # 20 tokens: one kept block and 4 more
    first = torch.tensor([shared + [30, 31]])
    model.generate(input_ids=first, max_new_tokens=NEW, do_sample=False)
    answer_rows = auto.tokens - (first.shape[1] - 1)
    second = torch.tensor([shared + [40, 41, 42]])
    before, reused = auto.tokens, handle.decode_stats.prompt_reused
    model.generate(input_ids=second, max_new_tokens=NEW, do_sample=False)
    assert handle.decode_stats.prompt_reused - reused == 16
    assert auto.tokens - before == second.shape[1] - len(shared) + answer_rows
    rows = auto.residuals()[before: before + second.shape[1] - len(shared)].float()
    assert torch.allclose(rows, _layer_rows(model, handle, second)[len(shared):], atol=1e-2)


def _layer_rows(model, handle, ids):
    rows = []
    module = shortcut.arch.resolve(model).layers[handle.auto_observer.layer]
    hook = module.register_forward_hook(lambda m, a, o: rows.append((o[0] if isinstance(o, tuple) else o)[0]))
    with handle.disabled(), torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    return rows[0].to(torch.float16).float()


def test_observer_buffer_survives_save_and_load(fresh, tmp_path):
    """Before the observer trained, the residuals collected for it are saved and a second
    process goes on counting from them; prompts asked before add nothing again."""
    model, handle = fresh
    for prompt in PROMPTS[:2]:
        model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False)
    collected = handle.auto_observer.tokens
    assert 0 < collected < handle.auto_observer.min_tokens
    folder = handle.save_pretrained(tmp_path / "skills")
    assert json.loads((folder / "shortcut.json").read_text())["contents"]["observer_buffer"] \
        == "observer_buffer.safetensors"

    other = make_tiny("llama")
    loaded = shortcut.load(other, folder)
    try:
        auto = loaded.auto_observer
        assert auto.tokens == collected
        assert torch.equal(auto.residuals(), handle.auto_observer.residuals())
        other.generate(input_ids=PROMPTS[0], max_new_tokens=NEW, do_sample=False)
        assert auto.tokens == collected  # asked in the first process: already collected
        other.generate(input_ids=PROMPTS[2], max_new_tokens=NEW, do_sample=False)
        assert auto.tokens > collected  # a new prompt: the count goes on
        again = loaded.save_pretrained(tmp_path / "again")
        assert shortcut.load(make_tiny("llama"), again).auto_observer.tokens == auto.tokens
    finally:
        loaded.remove()


def test_restored_buffer_trains_once_full(tmp_path):
    """A buffer put back by restore() counts toward min_tokens: the next call that fills
    it starts the training."""
    model = make_tiny("llama")
    first = AutoObserver(min_tokens=40, d_sae=64, k=4, steps=10, batch_size=16)
    handle = shortcut.wrap(model, shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2]), observer=first)
    model.generate(input_ids=PROMPTS[0], max_new_tokens=NEW, do_sample=False)
    saved = first.residuals()
    handle.remove()
    second = AutoObserver(min_tokens=40, d_sae=64, k=4, steps=10, batch_size=16)
    handle = shortcut.wrap(model, shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2]), observer=second)
    try:
        second.restore(saved, [PROMPTS[0][0].tolist()])
        assert second.tokens == saved.shape[0] < 40
        model.generate(input_ids=PROMPTS[1], max_new_tokens=NEW, do_sample=False)
        model.generate(input_ids=PROMPTS[2], max_new_tokens=NEW, do_sample=False)
        assert second.tokens == 40 and second.wait(120) and second.error is None
        model.generate(input_ids=PROMPTS[0], max_new_tokens=NEW, do_sample=False)
        assert handle.observer is not None and second.residuals() is None
    finally:
        handle.remove()


@pytest.mark.parametrize("change, match", [
    (lambda s: {**s, "layer": torch.tensor([2])}, "collected at layer 2, but the config's observer layer is 1"),
    (lambda s: {**s, "residuals": s["residuals"][:, :10].contiguous()}, "field 'residuals' has shape"),
    (lambda s: {**s, "residuals": s["residuals"].float()}, "must be float16"),
    (lambda s: {**s, "residuals": torch.full_like(s["residuals"], float("nan"))}, "NaN"),
    (lambda s: {"layer": s["layer"]}, "field 'residuals' is missing"),
])
def test_bad_observer_buffer_is_refused(fresh, tmp_path, change, match):
    from safetensors.torch import load_file, save_file

    model, handle = fresh
    model.generate(input_ids=PROMPTS[0], max_new_tokens=NEW, do_sample=False)
    folder = handle.save_pretrained(tmp_path / "skills")
    path = folder / "observer_buffer.safetensors"
    save_file(change(load_file(str(path))), str(path))
    other = make_tiny("llama")
    with pytest.raises(shortcut.SkillsFileError, match=match):
        shortcut.load(other, folder)
    assert not any("forward" in m.__dict__ for m in other.modules())  # refused before anything was attached


def test_training_set_adds_general_text_when_the_model_folder_has_a_tokenizer(tiny_model_dir, caplog):
    """The call that fills the buffer adds residuals of the packaged passages, read with
    the tokenizer of the model's folder, to the training set; the buffer itself (what
    save_pretrained keeps) stays the traffic's, and the held-out check is on traffic."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    auto = AutoObserver(min_tokens=40, general_tokens=50, d_sae=64, k=4, steps=10, batch_size=16)
    handle = shortcut.wrap(model, shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2]), observer=auto)
    try:
        for prompt in _distinct_prompts(4, length=12):
            model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False)
            if auto.tokens >= 40:
                break
        assert auto.wait(120) and auto.error is None
        assert auto.general_rows == 50
        assert auto.residuals() is not None and auto.residuals().shape[0] == 40
        with caplog.at_level(logging.INFO, logger="shortcut.observe.auto"):
            model.generate(input_ids=_distinct_prompts(5, length=12)[4], max_new_tokens=2, do_sample=False)
        assert "and 50 of general text" in caplog.text
    finally:
        handle.remove()


def test_without_a_tokenizer_the_observer_trains_on_traffic_alone(caplog):
    model = make_tiny("llama")
    auto = AutoObserver(min_tokens=20, d_sae=32, k=4, steps=5, batch_size=8)
    handle = shortcut.wrap(model, shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2]), observer=auto)
    try:
        with caplog.at_level(logging.INFO, logger="shortcut.api"):
            for prompt in _distinct_prompts(4):
                model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False)
                if auto.tokens >= 20:
                    break
        assert auto.wait(120) and auto.error is None and auto.general_rows == 0
        assert "trains on its traffic alone" in caplog.text
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="general_tokens=-1"):
        AutoObserver(general_tokens=-1)
