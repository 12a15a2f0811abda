"""wrap(): bad input leaves the model untouched; config and skills persistence."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, BertForMaskedLM, LlamaConfig, LlamaModel

import shortcut
from shortcut import FastConfig, FixedPlan, LosslessConfig, ShortcutConfig
from shortcut.arch import ArchSpec, llama_like_kv, register_architecture

from .conftest import TINY_CONFIGS, make_tiny


def _state(model):
    return [(n, "forward" in m.__dict__, len(m._forward_hooks), len(m._forward_pre_hooks))
            for n, m in model.named_modules()]


def test_rejects_non_causal_lm():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        shortcut.wrap(nn.Linear(2, 2))
    base = LlamaModel(LlamaConfig(**{k: v for k, v in TINY_CONFIGS["llama"].items() if k != "model_type"}))
    with pytest.raises(TypeError, match="causal language model"):
        shortcut.wrap(base)
    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    with pytest.raises(TypeError, match="causal language model"):
        shortcut.wrap(bert)


def test_rejects_meta_device_and_leaves_model_untouched():
    config = AutoConfig.for_model(**TINY_CONFIGS["llama"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    before = _state(model)
    with pytest.raises(ValueError, match="meta device"):
        shortcut.wrap(model)
    assert _state(model) == before


def test_unknown_architecture_names_model_type_and_how_to_register():
    model = make_tiny("gpt2")
    model.config.model_type = "mystery_lm"
    before = _state(model)
    with pytest.raises(shortcut.UnsupportedArchitectureError) as err:
        shortcut.wrap(model)
    assert "mystery_lm" in str(err.value) and "register_architecture" in str(err.value)
    assert _state(model) == before


def test_generic_fallback_serves_unregistered_llama_like_model():
    model = make_tiny("llama")
    model.config.model_type = "llama_fork"
    handle = shortcut.wrap(model)
    assert handle.parts.spec.layers == "model.layers"
    handle.set_policy(FixedPlan(exit_after=1))
    out = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
    assert out.shape == (1, 7)
    handle.remove()


def test_third_party_registration():
    model = make_tiny("llama")
    model.config.model_type = "my_llama"
    register_architecture(ArchSpec(model_types=("my_llama",), layers="model.layers",
                                   final_norm="model.norm", project_kv=llama_like_kv))
    assert "my_llama" in shortcut.registered_model_types()
    shortcut.wrap(model).remove()
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(ArchSpec(model_types=("my_llama",), layers="x", final_norm="y", project_kv=llama_like_kv))


def test_wrapping_twice_is_an_error():
    model = make_tiny("llama")
    handle = shortcut.wrap(model)
    before = _state(model)
    with pytest.raises(RuntimeError, match="already wrapped"):
        shortcut.wrap(model)
    assert _state(model) == before
    handle.remove()
    shortcut.wrap(model).remove()  # fine again after remove


def test_layer_indices_out_of_range():
    model = make_tiny("llama")
    with pytest.raises(ValueError, match=r"observer_layers=\[7\] out of range: the model has layers 0..3"):
        shortcut.wrap(model, ShortcutConfig(observer_layers=[7]))
    assert not any("forward" in m.__dict__ for m in model.modules())
    handle = shortcut.wrap(model)
    with pytest.raises(ValueError, match="exit_after=4 is out of range"):
        handle.set_policy(FixedPlan(exit_after=4))
    with pytest.raises(ValueError, match=r"skip layers \[-1, 9\]"):
        handle.set_policy(FixedPlan(skip={9, -1}))
    assert handle.policy is None
    handle.remove()


def test_config_validation_and_unknown_keys(tmp_path, caplog):
    with pytest.raises(ValueError, match="mode='turbo'"):
        ShortcutConfig(mode="turbo")
    with pytest.raises(ValueError, match="do not lie above the first observer layer"):
        ShortcutConfig(observer_layers=[2], exit_layers=[2]).resolved(4)
    with pytest.raises(ValueError, match=r"exit_layers=\[4\] out of range"):
        ShortcutConfig(observer_layers=[1], exit_layers=[4]).resolved(4)
    default = ShortcutConfig().resolved(30)
    assert default.observer_layers == [2] and default.exit_layers == [3, 7, 11, 15, 19]
    with pytest.raises(ValueError, match=r"fast.confidence=1.5 must be in \[0, 1\]"):
        ShortcutConfig(fast=FastConfig(confidence=1.5))
    with pytest.raises(ValueError, match=r"lossless.accept_bar=0 must be in \(0, 1\)"):
        ShortcutConfig(lossless=LosslessConfig(accept_bar=0))
    with pytest.raises(TypeError, match="lossless.copy_drafts='yes' must be true or false"):
        ShortcutConfig(lossless=LosslessConfig(copy_drafts="yes"))
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"mode": "fast", "colour": "blue"}))
    assert ShortcutConfig.load(path).mode == "fast"
    assert "colour" in caplog.text


def test_disabled_runs_full_model_and_counts_nothing():
    model = make_tiny("qwen3")
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    handle = shortcut.wrap(model)
    handle.set_policy(FixedPlan(exit_after=0))
    with handle.disabled(), torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
    assert handle.stats.total.tokens == 0
    handle.remove()
    with pytest.raises(RuntimeError, match="removed"):
        handle.set_policy(None)


def test_save_and_load_roundtrip_and_refuse_other_model(tmp_path):
    model = make_tiny("llama")
    handle = shortcut.wrap(model, ShortcutConfig(mode="fast", observer_layers=[1]))
    folder = handle.save_pretrained(tmp_path / "skills")
    handle.remove()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "replay_log.json", "shortcut.json"]
    loaded = shortcut.load(model, folder)
    assert loaded.config == handle.config
    loaded.remove()

    other = make_tiny("llama", seed=1)
    with pytest.raises(shortcut.SkillsMismatchError, match="another base model"):
        shortcut.load(other, folder)
    assert not any("forward" in m.__dict__ for m in other.modules())


def test_save_refuses_foreign_folder_and_leaves_nothing_on_failure(tmp_path):
    model = make_tiny("llama")
    handle = shortcut.wrap(model)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a shortcut skills folder"):
        handle.save_pretrained(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    def broken(path):
        raise OSError("disk full")

    handle.config.save = broken  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk full"):
        handle.save_pretrained(tmp_path / "skills")
    assert list(tmp_path.iterdir()) == [foreign]
    handle.remove()


def test_load_corrupted_manifest(tmp_path):
    (tmp_path / "shortcut.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        shortcut.load(make_tiny("llama"), tmp_path)
    with pytest.raises(FileNotFoundError, match="shortcut.json is missing"):
        shortcut.load(make_tiny("llama"), tmp_path / "nowhere")
