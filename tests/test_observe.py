"""SAE observers (shortcut.observe): collection, training, save/load, the hook.

Tiny random Llama built in-process; one real-model test marked ``real``."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shortcut.data import DEFAULT_PASSAGES
from shortcut.observe import (
    OBSERVER_META_FILENAME,
    Observer,
    Signature,
    collect_activations,
    load_observer,
    sae_quality,
    save_observer,
    train_sae,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

D, N_LAYERS, VOCAB, LAYER = 64, 4, 1000, 1
FP = {"model_type": "llama", "hidden_size": D, "num_hidden_layers": N_LAYERS, "name": "tiny"}


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=128,
                      num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _docs(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(5, 90, (1,), generator=g)),), generator=g)
            for _ in range(n)]


class CharTokenizer:
    """A tokenizer substitute: one id per character, BOS first."""

    bos_token_id = 1
    pad_token_id = 0

    def __call__(self, text: str) -> dict:
        return {"input_ids": [1] + [3 + ord(c) % (VOCAB - 3) for c in text]}


@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


@pytest.fixture(scope="module")
def acts(model):
    return collect_activations(model, model.model.layers[LAYER], _docs(60), max_tokens=3000,
                               seq_len=32, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def sae(acts):
    return train_sae(acts, d_sae=128, k=8, steps=60, lr=3e-3, batch_size=256, seed=0,
                     progress=False)


# ----------------------------------------------------------------------------- collection
def test_collect_matches_hidden_states_and_excludes_first_position(model):
    docs = _docs(5, seed=1)
    got = collect_activations(model, model.model.layers[LAYER], docs, max_tokens=10_000,
                              seq_len=16, batch_size=3, progress=False)
    expected = []
    with torch.no_grad():
        for d in docs:
            for s in range(0, len(d), 16):
                chunk = d[s:s + 16]
                if len(chunk) < 2:
                    continue
                hs = model(chunk[None], output_hidden_states=True).hidden_states[LAYER + 1]
                expected.append(hs[0, 1:])
    expected = torch.cat(expected)
    assert got.shape == expected.shape
    # batches are grouped by length, so compare as sets of rows (sorted by a key)
    key = lambda t: t[torch.argsort(t[:, 0])]
    torch.testing.assert_close(key(got), key(expected), atol=1e-4, rtol=1e-4)


def test_collect_stops_early_bounded_and_removes_hook(model):
    n_hooks = len(model.model.layers[LAYER]._forward_hooks)
    later_calls = []
    h = model.model.layers[N_LAYERS - 1].register_forward_hook(lambda *a: later_calls.append(1))
    try:
        out = collect_activations(model, model.model.layers[LAYER], _docs(60), max_tokens=500,
                                  seq_len=32, progress=False)
    finally:
        h.remove()
    assert out.shape == (500, D)
    assert later_calls == []  # layers after the observed one never ran
    assert len(model.model.layers[LAYER]._forward_hooks) == n_hooks


def test_collect_texts_with_tokenizer_excludes_bos_and_padding(model):
    texts = ["hello world", "", "a somewhat longer sentence of text", "   "]
    out = collect_activations(model, model.model.layers[LAYER], texts, CharTokenizer(),
                              max_tokens=1000, seq_len=64, progress=False)
    # BOS (position 0) excluded; blanks skipped; no padding rows.
    assert out.shape[0] == len("hello world") + len("a somewhat longer sentence of text")


def test_collect_empty_corpus_raises(model):
    layer = model.model.layers[LAYER]
    n_hooks = len(layer._forward_hooks)
    for corpus, tok in [([], None), (["", "  \n"], CharTokenizer()), ([torch.tensor([5])], None)]:
        with pytest.raises(ValueError, match="empty or blank"):
            collect_activations(model, layer, corpus, tok, max_tokens=10, progress=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        collect_activations(model, layer, ["text"], None, max_tokens=10, progress=False)
    assert len(layer._forward_hooks) == n_hooks


# ----------------------------------------------------------------------------- training
def test_train_is_seeded_and_quality_finite(acts, sae):
    q = sae_quality(sae, acts)
    assert set(q) >= {"fve", "l0", "dead_fraction", "mse"}
    assert all(math.isfinite(v) for v in q.values())
    assert q["l0"] <= 8 + 1e-6 and 0.0 <= q["dead_fraction"] <= 1.0
    assert q["fve"] > 0.3  # 60 steps on a random model's residuals: well above chance
    again = train_sae(acts, d_sae=128, k=8, steps=60, lr=3e-3, batch_size=256, seed=0,
                      progress=False)
    assert torch.equal(again.W_enc, sae.W_enc)
    with pytest.raises(ValueError):
        train_sae(acts[:0], d_sae=128, k=8, steps=1, progress=False)


# ----------------------------------------------------------------------------- save/load
def test_save_load_roundtrip_identical_encodings(tmp_path, acts, sae):
    folder = save_observer(sae, tmp_path / "observers" / "layer_1", layer=LAYER, fingerprint=FP,
                           quality={"fve": 0.5})
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["cfg.json", "sae_weights.safetensors", OBSERVER_META_FILENAME])
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    obs = load_observer(folder, d_model=D, n_layers=N_LAYERS, expected_fingerprint=FP)
    assert obs.layer == LAYER and obs.quality == {"fve": 0.5} and obs.k == 8
    x = acts[:200]
    before, after = Observer(sae, LAYER).encode(x), obs.encode(x)
    assert torch.equal(before.indices.sort(-1).values, after.indices.sort(-1).values)
    torch.testing.assert_close(before.values, after.values, atol=1e-5, rtol=1e-5)
    # the fast path is exactly sae-lens's encode
    dense = obs.sae.encode(x)
    assert torch.equal(after.values, dense.topk(obs.k, dim=-1).values)
    # a second load is bit-identical; resaving over the folder works
    again = load_observer(folder, d_model=D, n_layers=N_LAYERS)
    assert torch.equal(again.encode(x).values, after.values)
    save_observer(obs, folder, layer=LAYER, fingerprint=FP)
    assert load_observer(folder, d_model=D, n_layers=N_LAYERS).quality == {"fve": 0.5}


def test_load_errors(tmp_path, sae):
    folder = save_observer(sae, tmp_path / "obs", layer=LAYER, fingerprint=FP)
    with pytest.raises(ValueError, match="width mismatch"):
        load_observer(folder, d_model=D * 2, n_layers=N_LAYERS)
    with pytest.raises(ValueError, match="out of range"):
        load_observer(folder, d_model=D, n_layers=LAYER)
    with pytest.raises(ValueError, match="another base model"):
        load_observer(folder, d_model=D, n_layers=N_LAYERS,
                      expected_fingerprint={**FP, "name": "other"})
    with pytest.raises(FileNotFoundError, match="not found"):
        load_observer(tmp_path / "nope", d_model=D, n_layers=N_LAYERS)

    # plain sae-lens folder: needs the layer
    (folder / OBSERVER_META_FILENAME).unlink()
    with pytest.raises(ValueError, match="layer"):
        load_observer(folder, d_model=D, n_layers=N_LAYERS)
    assert load_observer(folder, d_model=D, n_layers=N_LAYERS, layer=2).layer == 2
    with pytest.raises(ValueError, match="out of range"):
        load_observer(folder, d_model=D, n_layers=N_LAYERS, layer=N_LAYERS)

    weights = folder / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="sae_weights.safetensors"):
        load_observer(folder, d_model=D, n_layers=N_LAYERS, layer=1)
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="sae_weights.safetensors"):
        load_observer(folder, d_model=D, n_layers=N_LAYERS, layer=1)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        load_observer(folder, d_model=D, n_layers=N_LAYERS, layer=1)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json"):
        load_observer(folder, d_model=D, n_layers=N_LAYERS, layer=1)
    (folder / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_observer(folder, d_model=D, n_layers=N_LAYERS, layer=1)


def test_corrupted_meta_json(tmp_path, sae):
    folder = save_observer(sae, tmp_path / "obs", layer=LAYER, fingerprint=FP)
    (folder / OBSERVER_META_FILENAME).write_text('{"layer": ')
    with pytest.raises(ValueError, match=OBSERVER_META_FILENAME):
        load_observer(folder, d_model=D, n_layers=N_LAYERS)


def test_failed_save_leaves_nothing(tmp_path, sae, monkeypatch):
    target = tmp_path / "observers" / "layer_1"

    def broken(path):
        path = type(target)(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "sae_weights.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(sae, "save_inference_model", broken)
    with pytest.raises(OSError, match="disk full"):
        save_observer(sae, target, layer=LAYER, fingerprint=FP)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
    with pytest.raises(ValueError, match="JSON"):
        save_observer(sae, target, layer=LAYER, fingerprint={"bad": object()})
    assert not target.exists()
    monkeypatch.undo()
    # a failed overwrite keeps the previous observer intact
    save_observer(sae, target, layer=LAYER, fingerprint=FP)
    monkeypatch.setattr(sae, "save_inference_model", broken)
    with pytest.raises(OSError):
        save_observer(sae, target, layer=LAYER, fingerprint=FP)
    assert load_observer(target, d_model=D, n_layers=N_LAYERS).layer == LAYER
    assert [p.name for p in target.parent.iterdir()] == ["layer_1"]


# ----------------------------------------------------------------------------- the hook
def test_attached_observer_keeps_logits_identical(model, sae, acts):
    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    n_hooks = len(model.model.layers[LAYER]._forward_hooks)
    obs = Observer(sae, LAYER)
    seen: list[Signature] = []
    obs.attach(model.model.layers[LAYER], callback=seen.append)
    try:
        with torch.no_grad():
            out = model(ids).logits
            hs = model(ids, output_hidden_states=True).hidden_states[LAYER + 1]
    finally:
        obs.detach()
    obs.detach()  # idempotent
    assert torch.equal(out, ref)
    assert len(model.model.layers[LAYER]._forward_hooks) == n_hooks
    sig = obs.last_signature
    assert sig is not None and sig.indices.shape == (3, 8) and sig.values.shape == (3, 8)
    assert len(seen) == 2 and not sig.values.requires_grad
    expected = obs.encode(hs[:, -1])
    assert torch.equal(sig.indices, expected.indices) and torch.equal(sig.values, expected.values)
    assert (sig.values[:, :-1] >= sig.values[:, 1:]).all()  # strongest first
    with pytest.raises(ValueError, match="width"):
        obs.encode(torch.zeros(2, D + 1))


# ----------------------------------------------------------------------------- real model
def _real_texts() -> tuple[list[str], list[str]]:
    """Real English (train, held-out): the evals passages if present, else stdlib docstrings."""
    p = DEFAULT_PASSAGES
    if p.exists():
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        train = [r["text"] for r in rows if r.get("split", "train") != "heldout"]
        held = [r["text"] for r in rows if r.get("split") == "heldout"]
        if train and held:
            return train, held
    import argparse
    import collections
    import email
    import logging
    import pathlib
    import subprocess
    import textwrap
    docs = [d for m in (argparse, collections, email, json, logging, pathlib, subprocess, textwrap)
            for name in dir(m)
            if isinstance(d := getattr(getattr(m, name), "__doc__", None), str) and len(d) > 300]
    return [d for i, d in enumerate(docs) if i % 5], docs[::5]


@pytest.mark.real
def test_real_model_small_sae(smollm2):
    model, tokenizer = smollm2
    train, held = _real_texts()
    layer = model.model.layers[6]
    tr = collect_activations(model, layer, train, tokenizer, max_tokens=6000, progress=False)
    ho = collect_activations(model, layer, held, tokenizer, max_tokens=2000, progress=False)
    assert tr.shape[1] == 576 and tr.shape[0] > 1000
    sae = train_sae(tr, d_sae=512, k=32, steps=150, batch_size=256, progress=False)
    q = sae_quality(sae, ho)
    assert all(math.isfinite(v) for v in q.values())
    # Floor 0.7: on the held-out passages this 512-wide SAE measured FVE 0.00 after 1 step,
    # 0.11 after 20, 0.36 after 50 and 0.81 after 150 (the 2048-wide default: 0.886).
    # 0.7 catches a run that did not train while leaving 0.1 of margin for other corpora.
    assert q["fve"] > 0.7, q
    assert q["l0"] <= 32 + 1e-6
