"""Consolidation fine-tuning (shortcut-finetune) on tiny random models: both levels
train and lower their loss, results load and stay lossless, runs resume exactly, bad
input exits with code 2 and writes nothing."""

from __future__ import annotations

import json
import shutil
import string

import pytest
import torch
from safetensors.torch import load_file

import shortcut
from shortcut.data import prompt_input_ids
from shortcut.finetune import consolidate as ft
from shortcut.finetune.training import Checkpoints
from shortcut.skills.folder import SkillsMismatchError

from .conftest import make_tiny
from .test_practice import PROMPTS, _observer

FAST = {"max_new_tokens": 12, "checkpoint_every": 0}
HEADS = {"steps": 40, "batch_size": 16, "eval_every": 10, "patience": 2, "lr": 3e-3}
LORA = {"level": "layerskip",
        "layerskip": ft.LayerSkipConfig(steps=12, lr=5e-3, batch_size=2, rank=4, alpha=8, layer_dropout=0.2)}


def _config(heads=None, **kw) -> ft.FinetuneConfig:
    return ft.FinetuneConfig(**{**FAST, **kw}, heads=ft.HeadsFitConfig(**{**HEADS, **(heads or {})}))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.digits + string.ascii_letters + " .,;:!?'\"-()\n"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def skills_dir(tmp_path_factory):
    """A tiny llama practised on three prompts, saved as a skills folder."""
    model = make_tiny("llama")
    config = shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2],
                                     lossless=shortcut.LosslessConfig(draft_confidence=0.0),
                                     learning=shortcut.LearningConfig(policy_threshold=0.3, fit_steps=30))
    handle = shortcut.wrap(model, config)
    handle.attach_observer(_observer(model))
    handle.practice(PROMPTS, rounds=2, max_new_tokens=12, progress=False)
    return handle.save_pretrained(tmp_path_factory.mktemp("ft") / "skills")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The same tiny llama with a character tokenizer, saved for the command line."""
    folder = tmp_path_factory.mktemp("ft") / "tiny-llama"
    make_tiny("llama").save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def _greedy(model, prompt, new_tokens):
    with torch.no_grad():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              do_sample=False)[0].tolist()


def _assert_lossless(model, folder):
    handle = shortcut.load(model, folder)
    try:
        for prompt in PROMPTS:
            with handle.disabled():
                ref = model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False)
            assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False), ref)
        assert handle.decode_stats.accepted > 0  # the consolidated skills do draft
    finally:
        handle.remove()


def test_heads_level_trains_keeps_base_and_stays_lossless(skills_dir, tmp_path):
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = ft.finetune(model, skills_dir, tmp_path / "out", config=_config(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # base model bit-identical
    assert summary["regenerated_prompts"] == len(PROMPTS)  # the log's repeats are re-generated once
    fit = summary["heads"]["fit"]
    assert fit["loss_last"] < fit["loss_first"]
    assert fit["heldout_positions"] > 0 and fit["select_steps_run"] >= fit["best_step"] >= 1
    out = tmp_path / "out"
    manifest = json.loads((out / "shortcut.json").read_text())
    assert manifest["contents"]["consolidation"]["level"] == "heads" and "adapter" not in manifest["contents"]
    log, source = (json.loads((folder / "replay_log.json").read_text()) for folder in (out, skills_dir))
    assert log["prompts"] == source["prompts"]
    # Practised sequences: the practised ones plus each re-generated prompt with the greedy
    # continuation it got here (the same, for greedy practice of the same length).
    regenerated = [_greedy(model, prompt, FAST["max_new_tokens"]) for prompt in PROMPTS]
    assert {tuple(x) for x in log["sequences"]} == {tuple(x) for x in source["sequences"] + regenerated}
    assert json.loads((out / ft.SUMMARY_FILE).read_text())["run"] == summary["run"]
    assert not (out / "checkpoints").exists()
    assert not torch.equal(load_file(str(out / "heads.safetensors"))["translators.1.weight"],
                           load_file(str(skills_dir / "heads.safetensors"))["translators.1.weight"])
    _assert_lossless(model, out)


def test_layerskip_level_trains_adapter_that_loads(skills_dir, tmp_path):
    from peft import PeftModel

    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = ["The cat sat on the mat. " * 3, "A quick brown fox jumps over the lazy dog."]
    summary = ft.finetune(model, skills_dir, tmp_path / "out", tokenizer=_tokenizer(), quality_texts=texts,
                          extra=[{"text": "Practice makes perfect, they say."}, {"prompt": "Hi there"}],
                          config=_config(**LORA), progress=False)
    ls = summary["layerskip"]
    assert ls["objective_after"] < ls["objective_before"]
    assert ls["perplexity_base"] > 0 and ls["perplexity_adapted"] > 0 and ls["quality_texts"] == 2
    assert summary["extra_texts"] == 1 and summary["extra_prompts"] == 1
    # The base model object is given back untouched, LoRA layers removed.
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())

    out = tmp_path / "out"
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(make_tiny("llama"), str(out / "adapter"))(input_ids=ids).logits
        base_logits = make_tiny("llama")(input_ids=ids).logits
    assert not torch.allclose(peft_logits, base_logits)  # the adapter changes the model
    adapted = make_tiny("llama")
    _assert_lossless(adapted, out)  # shortcut.load merges the adapter: lossless w.r.t. the adapted model
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, peft_logits, atol=1e-5)
    # The practised sequences are the adapted model's own outputs, the extra prompt's too;
    # the base model's are gone (they are not what the wrapped model says any more).
    log = json.loads((out / "replay_log.json").read_text())
    extra_prompt = prompt_input_ids(_tokenizer(), "Hi there")
    assert log["prompts"][-1] == extra_prompt[0].tolist()
    expected = {tuple(_greedy(adapted, p, FAST["max_new_tokens"])) for p in [*PROMPTS, extra_prompt]}
    assert {tuple(x) for x in log["sequences"]} == expected
    base = {tuple(x) for x in json.loads((skills_dir / "replay_log.json").read_text())["sequences"]}
    assert base - expected  # the adapter changed some continuation, so the check above means something


@pytest.mark.parametrize(("level", "crash_at"), [("heads", 2), ("layerskip", 2), ("layerskip", 4)])
def test_resume_after_interruption_gives_the_same_result(skills_dir, tmp_path, monkeypatch, level, crash_at):
    """Interrupted after the ``crash_at``-th checkpoint (layerskip: 2 = inside the LoRA
    stage, 4 = inside the exit-head stage after the adapter was finished)."""
    extra = LORA if level == "layerskip" else {}
    cfg = _config(checkpoint_every=4, **extra)
    ft.finetune(make_tiny("llama"), skills_dir, tmp_path / "straight", config=cfg, progress=False)

    original, saves = Checkpoints.save, []

    def save_then_crash(self, accelerator, stage, state):
        original(self, accelerator, stage, state)
        saves.append(stage)
        if len(saves) == crash_at:
            raise KeyboardInterrupt("simulated preemption")

    monkeypatch.setattr(Checkpoints, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(make_tiny("llama"), skills_dir, tmp_path / "run", config=cfg, progress=False)
    monkeypatch.setattr(Checkpoints, "save", original)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # no half-written result
    assert Checkpoints(run / "checkpoints", {}, 1, 1, None).latest(saves[-1]) is not None
    with pytest.raises(FileExistsError, match="--resume"):
        ft.finetune(make_tiny("llama"), skills_dir, run, config=cfg, progress=False)
    with pytest.raises(ValueError, match=r"another configuration \(differs in: config.heads.steps\)"):
        other = _config(checkpoint_every=4, heads={"steps": 41}, **extra)
        ft.finetune(make_tiny("llama"), skills_dir, run, config=other, resume=True, progress=False)

    ft.finetune(make_tiny("llama"), skills_dir, run, config=cfg, resume=True, progress=False)
    for name in ("heads.safetensors", "policy.safetensors") + (("adapter/adapter_model.safetensors",) if extra else ()):
        a, b = load_file(str(run / name)), load_file(str(tmp_path / "straight" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not (run / "checkpoints").exists()


def _cli(skills, out, model_dir, *more):
    return ft.main([str(skills), "-o", str(out), "--model", str(model_dir), "--steps", "20", "--batch-size", "16",
                    "--eval-every", "10", "--new-tokens", "8", "--checkpoint-every", "5", "-q", *more])


def test_cli_runs_and_bad_inputs_exit_2(skills_dir, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"text": "Some extra text to learn from."}) + "\n")
    assert _cli(skills_dir, out, model_dir, "--extra", str(extra), "--summary", str(tmp_path / "s.json")) == 0
    assert "agreement after" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["extra_texts"] == 1
    snapshot = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fails(skills, target, *more, match):
        assert _cli(skills, target, model_dir, *more) == 2
        assert match in capsys.readouterr().err

    # No prompt log.
    no_log = tmp_path / "no_log"
    shutil.copytree(skills_dir, no_log)
    (no_log / "replay_log.json").unlink()
    fails(no_log, tmp_path / "x1", match="no prompt log")
    # Empty dataset: the prompt log lists nothing and there is no extra text.
    empty = tmp_path / "empty"
    shutil.copytree(skills_dir, empty)
    (empty / "replay_log.json").write_text('{"prompts": []}\n')
    fails(empty, tmp_path / "x2", match="empty dataset")
    # Skills made for another base model.
    other = tmp_path / "other-model"
    make_tiny("llama", seed=1).save_pretrained(other)
    _tokenizer().save_pretrained(other)
    assert ft.main([str(skills_dir), "-o", str(tmp_path / "x3"), "--model", str(other), "-q"]) == 2
    assert "another base model" in capsys.readouterr().err
    # An output folder that holds another run, and resuming with another configuration.
    fails(skills_dir, out, match="--overwrite")
    fails(skills_dir, out, "--resume", "--lr", "0.01", match="another configuration")
    # A folder that is not ours at all, and a bad extra file.
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    fails(skills_dir, stranger, "--overwrite", match="refusing")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    fails(skills_dir, tmp_path / "x4", "--extra", str(bad), match="line 2")
    fails(tmp_path / "nowhere", tmp_path / "x5", match="not a shortcut skills folder")

    # Nothing was written or overwritten by the failures.
    assert not any((tmp_path / f"x{i}").exists() for i in range(1, 6))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    assert (stranger / "notes.txt").read_text() == "mine" and len(list(stranger.iterdir())) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # Resuming a finished run with the same settings is a no-op; --overwrite replaces it.
    assert _cli(skills_dir, out, model_dir, "--extra", str(extra), "--resume") == 0
    assert _cli(skills_dir, out, model_dir, "--overwrite") == 0
    assert json.loads((out / ft.SUMMARY_FILE).read_text())["extra_texts"] == 0


def test_mismatched_skills_raise_before_training(skills_dir, tmp_path):
    with pytest.raises(SkillsMismatchError):
        ft.finetune(make_tiny("llama", seed=1), skills_dir, tmp_path / "out", config=_config(), progress=False)
    assert not (tmp_path / "out").exists()


def test_layerskip_schedule_helpers():
    from shortcut.finetune.layerskip import active_exits, dropout_rates, exit_weights

    assert [active_exits(s, 8, [7, 11, 15], "rotational") for s in range(4)] == [[7], [11], [15], [7]]
    assert active_exits(0, 9, [7, 11, 15], "gradual") == [15]
    assert active_exits(8, 9, [7, 11, 15], "gradual") == [7, 11, 15]
    rates = dropout_rates(30, 0.2)
    assert rates[0] == 0.0 and abs(rates[-1] - 0.2) < 1e-9 and rates == sorted(rates)
    w = exit_weights([7, 19], 30, 1.0)
    assert abs(sum(w.values()) - 1) < 1e-9 and w[7] < w[19] < w[30]


def test_layerskip_final_layer_anchored_to_the_base_distribution():
    """With ``LayerSkipConfig(final_target="base")`` the final layer's term is the KL divergence from
    the base model's logits: zero while the adapter is still the identity (LoRA's B
    starts at zero), and positive once the adapter moves the final distribution."""
    from peft import LoraConfig, get_peft_model

    from shortcut.arch import resolve
    from shortcut.capture import StateCapture
    from shortcut.finetune.layerskip import base_logits, exit_weights, make_batch, objective
    from shortcut.finetune.regenerate import Example

    model = make_tiny("llama")
    parts = resolve(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    examples = [Example([5, 6, 7, 8, 9, 10, 11], 2), Example([12, 13, 14, 15, 16], 0)]
    batch = make_batch(examples, [0, 1], "cpu")
    capture = StateCapture(parts, [1], keep=lambda t: t)
    try:
        base = base_logits(peft_model, batch)
        with torch.no_grad():
            exits_only = objective(peft_model, parts, capture, batch, [], 1.0, base)
            assert float(exits_only) == pytest.approx(0.0, abs=1e-6)  # identity adapter: KL 0
            anchored = objective(peft_model, parts, capture, batch, [1], 1.0, base)
            tokens = objective(peft_model, parts, capture, batch, [1], 1.0)
            w = exit_weights([1], parts.num_layers, 1.0)
            # Same exit term in both; only the final term differs (KL 0 vs the token CE).
            ce_final = (tokens - anchored) / w[parts.num_layers]
            assert float(ce_final) > 0
            for lora in (m for n, m in peft_model.named_modules() if n.endswith("lora_B.default")):
                lora.weight.normal_(0, 0.5)
            moved = objective(peft_model, parts, capture, batch, [], 1.0, base)
        assert float(moved) > 1e-4
    finally:
        capture.remove()
        peft_model.unload()
