"""Exit heads (shortcut.heads): logit-lens start, fitting, shortlist scoring,
persistence and input checks, on tiny random models; one real-model check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shortcut.arch import resolve
from shortcut.policy.heads import ExitHeads, collect_states
from tests.conftest import ARCHS, VOCAB, make_tiny

LAYERS = [1, 2, 3]


def _data(model_type: str = "llama", seq: int = 24, seed: int = 0):
    model = make_tiny(model_type)
    parts = resolve(model)
    ids = torch.randint(3, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seed))
    states, final, nxt = collect_states(model, parts, ids, LAYERS)
    return model, parts, states, final, nxt


@pytest.mark.parametrize("model_type", ARCHS)
def test_untrained_head_is_logit_lens(model_type):
    model, parts, states, final, _ = _data(model_type)
    heads = ExitHeads(model, LAYERS)
    with torch.no_grad():
        for layer in LAYERS:
            lens = parts.unembed(parts.final_norm(states[layer]))
            assert torch.equal(heads.logits(layer, states[layer]), lens)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_collect_states_matches_output_hidden_states(model_type):
    model = make_tiny(model_type)
    parts = resolve(model)
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    states, final, nxt = collect_states(model, parts, ids, [0, 2, parts.num_layers])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    for layer in (0, 2):
        assert torch.equal(states[layer], out.hidden_states[layer][0])
    assert torch.equal(states[parts.num_layers], final)
    assert torch.equal(nxt, out.logits[0].argmax(-1))
    assert states[0].shape == (10, final.shape[1]) and nxt.dtype == torch.long


def test_collect_states_drops_padding():
    model = make_tiny("llama")
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    states, final, nxt = collect_states(model, None, ids, [1], attention_mask=mask)
    assert states[1].shape[0] == final.shape[0] == nxt.shape[0] == 10


def test_fit_lowers_kl_and_is_seeded():
    model, parts, states, final, _ = _data()
    heads = ExitHeads(parts, LAYERS)
    before = {layer: heads.kl(layer, states[layer], final) for layer in LAYERS}
    losses = heads.fit(states, final, steps=40, lr=1e-2, batch_size=16, seed=3, vocab="full",
                       hard_weight=0.0, progress=False)
    assert set(losses) == set(LAYERS) and all(len(v) == 40 for v in losses.values())
    for layer in LAYERS:
        assert heads.kl(layer, states[layer], final) < 0.7 * before[layer]
    again = ExitHeads(parts, LAYERS)
    again.fit(states, final, steps=40, lr=1e-2, batch_size=16, seed=3, vocab="full", hard_weight=0.0,
              progress=False)
    for key, value in heads.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_fit_leaves_base_model_untouched():
    model, parts, states, final, _ = _data()
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    parts.final_norm.weight.requires_grad_(False)  # a flag that must come back as it was
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    heads = ExitHeads(parts, LAYERS)
    heads.grow_shortlist(torch.arange(10, 40))
    heads.fit(states, final, steps=10, batch_size=8, vocab="full", progress=False)
    heads.fit(states, final, steps=10, batch_size=8, vocab="shortlist", progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot[key]), key
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(k.startswith(("model.", "lm_head")) for k in heads.state_dict())


def test_fit_only_trains_given_layers_and_shortlist_kl_drops():
    model, parts, states, final, nxt = _data()
    heads = ExitHeads(parts, LAYERS)
    heads.grow_shortlist(nxt, final_hidden=final, top_k=3)
    before = heads.kl(2, states[2], final, vocab="shortlist")
    lens = (heads.predict(2, states[2]).token_ids == nxt).float().mean()
    heads.fit({2: states[2]}, final, steps=40, batch_size=16, hard_weight=0.0, progress=False)  # auto: shortlist
    assert heads.kl(2, states[2], final, vocab="shortlist") < 0.7 * before
    heads.fit({2: states[2]}, final, steps=100, lr=1e-2, batch_size=16, progress=False)  # + hard-label term
    assert (heads.predict(2, states[2]).token_ids == nxt).float().mean() > max(lens + 0.3, 0.9)
    assert torch.count_nonzero(heads.translators["1"].weight) == 0


def test_shortlist_scoring_matches_full_vocabulary():
    model, parts, states, final, nxt = _data()
    heads = ExitHeads(parts, LAYERS)
    heads.fit(states, final, steps=5, batch_size=8, vocab="full", progress=False)
    ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(4))[:30]
    heads.set_shortlist(ids)
    assert torch.equal(heads.shortlist, ids.sort().values)
    h = states[2]
    with torch.no_grad():
        full = heads.logits(2, h)
        short = heads.shortlist_logits(2, h)
    restricted = full[:, heads.shortlist]
    torch.testing.assert_close(short, restricted)
    pred = heads.predict(2, h, use_shortlist=True)
    assert torch.equal(pred.token_ids, heads.shortlist[restricted.argmax(-1)])
    torch.testing.assert_close(pred.confidence, restricted.softmax(-1).max(-1).values)
    pred_full = heads.predict(2, h, use_shortlist=False)
    assert torch.equal(pred_full.token_ids, full.argmax(-1))
    # the cached unembedding rows follow the shortlist
    heads.set_shortlist(ids[:5])
    torch.testing.assert_close(heads.shortlist_logits(2, h), full[:, heads.shortlist])
    added = heads.grow_shortlist([int(ids[6])])
    assert added == 1 and heads.shortlist.numel() == 6


def test_head_cost():
    model, parts, *_ = _data()
    heads = ExitHeads(parts, LAYERS, shortlist=range(10))
    d = parts.unembed.weight.shape[1]
    cost = heads.head_cost(1)
    assert cost["translator"] == d * d + d
    assert cost["full"] - cost["shortlist"] == (VOCAB - 10) * d
    assert cost["shortlist"] == cost["translator"] + d + 10 * d  # llama RMSNorm has d weights


def test_state_dict_round_trips_through_safetensors(tmp_path: Path):
    model, parts, states, final, nxt = _data()
    heads = ExitHeads(parts, LAYERS)
    heads.grow_shortlist(nxt, final_hidden=final, top_k=2)
    heads.fit(states, final, steps=10, batch_size=8, progress=False)
    path = tmp_path / "heads.safetensors"
    save_file(heads.state_dict(), str(path))
    loaded = load_file(str(path))
    assert all(isinstance(k, str) for k in loaded) and "translators.2.weight" in loaded
    rebuilt = ExitHeads.from_state_dict(model, loaded)
    plain = ExitHeads(parts, LAYERS)  # empty shortlist: load_state_dict must resize it
    plain.load_state_dict(loaded)
    assert rebuilt.layers == tuple(LAYERS)
    for other in (rebuilt, plain):
        for layer in LAYERS:
            with torch.no_grad():
                assert torch.equal(other.logits(layer, states[layer]), heads.logits(layer, states[layer]))
                assert torch.equal(other.shortlist_logits(layer, states[layer]),
                                   heads.shortlist_logits(layer, states[layer]))
    empty = ExitHeads(parts, [1])
    save_file(empty.state_dict(), str(tmp_path / "empty.safetensors"))
    assert ExitHeads.from_state_dict(parts, load_file(str(tmp_path / "empty.safetensors"))).shortlist.numel() == 0


def test_bad_input_raises_value_error():
    model, parts, states, final, _ = _data()
    heads = ExitHeads(parts, [1, 2])
    with pytest.raises(ValueError, match="layer 3 has no exit head"):
        heads.predict(3, states[3], use_shortlist=False)
    with pytest.raises(ValueError, match="layer 3 has no exit head"):
        heads.fit({3: states[3]}, final, steps=1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        heads.fit({}, final, steps=1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        heads.fit({1: states[1][:0]}, final[:0], steps=1, progress=False)
    with pytest.raises(ValueError, match="width"):
        heads.fit({1: states[1][:, :10]}, final, steps=1, progress=False)
    with pytest.raises(ValueError, match="width"):
        heads.fit({1: states[1]}, final[:, :10], steps=1, progress=False)
    with pytest.raises(ValueError, match="width"):
        heads.logits(1, states[1][:, :10])
    with pytest.raises(ValueError, match="tokens"):
        heads.fit({1: states[1][:5]}, final, steps=1, progress=False)
    with pytest.raises(ValueError, match="shortlist is empty"):
        heads.predict(1, states[1])
    with pytest.raises(ValueError, match="shortlist is empty"):
        heads.fit({1: states[1]}, final, steps=1, vocab="shortlist", progress=False)
    with pytest.raises(ValueError, match="outside"):
        ExitHeads(parts, [parts.num_layers + 1])
    with pytest.raises(ValueError, match="shortlist token ids"):
        heads.set_shortlist([VOCAB])


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, two threads under contention from
    another process run 20-50x slower (measured: generate 75 s vs 3 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.real
def test_real_head_beats_logit_lens_on_practised_answer(smollm2, one_thread):
    model, tok = smollm2
    parts = resolve(model)
    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "shortcut_eval/data/prompts.jsonl").open()]
    prompt = next(r["prompt"] for r in rows if r["split"] == "practice")
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=False)
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    with torch.no_grad():
        seq = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)[0]
    states, final, nxt = collect_states(model, parts, seq, [10])
    answer = torch.zeros(len(seq), dtype=torch.bool)
    answer[ids.shape[1] - 1:len(seq) - 1] = True
    heads = ExitHeads(parts, [10])
    heads.grow_shortlist(nxt, final_hidden=final, top_k=4)
    lens = (heads.predict(10, states[10][answer]).token_ids == nxt[answer]).float().mean().item()
    heads.fit(states, final, steps=150, seed=0, progress=False)
    fitted = (heads.predict(10, states[10][answer]).token_ids == nxt[answer]).float().mean().item()
    assert fitted >= 0.9 and fitted > lens + 0.3, (lens, fitted)
