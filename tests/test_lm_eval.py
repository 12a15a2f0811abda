"""lm-evaluation-harness as a client: the ``shortcut`` model type, in lossless mode,
scores exactly what ``--model hf`` scores on shortcut's packaged tasks (a tiny random
llama with SmolLM2's tokenizer and practised skills; lm-eval runs in-process)."""

from __future__ import annotations

import json

import lm_eval  # a test dependency (pyproject [test])
import pytest
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import sanitize_list

import shortcut
from shortcut import models
from shortcut_eval import lm_eval_model
from shortcut_eval.lm_eval_model import TASKS_DIR, ShortcutLM, load_jsonl

from .conftest import require_real_model

TASKS = ["shortcut_socialiqa", "shortcut_trivia"]
LIMIT = 4  # documents per task: 12 log-likelihood requests, 4 generations


@pytest.fixture(scope="module")
def skills_dir(tiny_model_dir, tmp_path_factory):
    """Skills practised on the trivia task's own prompts, so that lossless generation
    in the evaluation really drafts (low bars: a random model is never confident)."""
    model, tokenizer = shortcut.load_model(tiny_model_dir)
    config = shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2],
                                     lossless=shortcut.LosslessConfig(draft_confidence=0.0),
                                     learning=shortcut.LearningConfig(policy_threshold=0.3, fit_steps=30))
    handle = shortcut.wrap(model, config)
    passages = load_jsonl("tiny/passages.jsonl")["test"]["text"]
    handle.train_observer(passages, tokenizer, steps=40, d_sae=128, k=8, batch_size=64, progress=False)
    docs = load_jsonl("prompts.jsonl", where="reference")["test"]
    # The task's doc_to_text (the prompt itself), tokenized as lm-eval tokenizes a context
    # without --apply_chat_template.
    prompts = [tokenizer(p, return_tensors="pt")["input_ids"] for p in docs["prompt"][:LIMIT]]
    handle.practice(prompts, rounds=3, max_new_tokens=32, progress=False)
    folder = handle.save_pretrained(tmp_path_factory.mktemp("skills") / "skills")
    handle.remove()
    return folder


def _evaluate(lm):
    # Only shortcut's tasks: indexing lm-eval's built-in tasks takes seconds.
    tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=TASKS, limit=LIMIT, log_samples=True, task_manager=tasks)


@pytest.fixture(scope="module")
def hf_run(tiny_model_dir):
    """The baseline: lm-eval's own ``hf`` model type (``HFLM``) on the same folder."""
    return _evaluate(HFLM(pretrained=str(tiny_model_dir), device="cpu"))


def _metrics(results: dict, task: str) -> dict:
    return {k: float(v) for k, v in results["results"][task].items() if k not in ("name", "alias", "sample_len")}


def _resps(sample: dict) -> list:
    """A sample's responses as the CLI writes them: lm-eval's ``sanitize_list`` (every
    float as its repr, so log-likelihoods still compare exactly), then JSON."""
    return json.loads(json.dumps([sanitize_list(sample["resps"]), sanitize_list(sample["filtered_resps"])]))


def _assert_same_scores(hf: dict, sc: dict) -> None:
    """Equal metrics, and per sample equal responses: the log-likelihood and greedy
    flag of every choice, and the generated text."""
    for task in TASKS:
        assert _metrics(hf, task) == _metrics(sc, task), task
        hf_samples = sorted(hf["samples"][task], key=lambda s: s["doc_id"])
        sc_samples = sorted(sc["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in hf_samples] == [s["doc_id"] for s in sc_samples] == list(range(LIMIT))
        for a, b in zip(hf_samples, sc_samples):
            assert _resps(a) == _resps(b), (task, a["doc_id"])


def test_lossless_scores_equal_hf(hf_run, tiny_model_dir, skills_dir):
    lm = ShortcutLM(pretrained=str(tiny_model_dir), skills=str(skills_dir), mode="lossless", device="cpu")
    sc = _evaluate(lm)
    _assert_same_scores(hf_run, sc)
    assert hf_run["results"]["shortcut_socialiqa"]["acc,none"] == sc["results"]["shortcut_socialiqa"]["acc,none"]
    info = sc["config"]["shortcut"]
    assert info["mode"] == "lossless" and info["skills"] == str(skills_dir) and info["learn"] is False
    # The generations compared above went through drafting (shallow-path drafts or
    # recalled practised sequences), not only the full path.
    assert info["draft"]["drafted"] > 0 and info["draft"]["accepted"] > 0
    lm.handle.remove()


def test_batched_lossless_scores_equal_hf(tiny_model_dir, skills_dir):
    """``--batch_size 4``: lm-eval's generations come as left-padded batches, which
    lossless mode drafts too; every score and generation equals ``hf``'s at the same
    batch size."""
    hf = _evaluate(HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=4))
    lm = ShortcutLM(pretrained=str(tiny_model_dir), skills=str(skills_dir), mode="lossless", device="cpu",
                    batch_size=4)
    sc = _evaluate(lm)
    _assert_same_scores(hf, sc)
    assert sc["config"]["shortcut"]["draft"]["accepted"] > 0
    lm.handle.remove()


def test_cli_model_shortcut_equals_model_hf(hf_run, tiny_model_dir, skills_dir, tmp_path):
    """``python -m shortcut_eval.lm_eval_model --model shortcut ...`` in-process: lm-eval's
    CLI with the packaged tasks; its written results and samples match the ``hf`` run."""
    lm_eval_model.main(["--model", "shortcut", "--model_args",
                        f"pretrained={tiny_model_dir},skills={skills_dir},mode=lossless",
                        "--tasks", ",".join(TASKS), "--limit", str(LIMIT), "--device", "cpu",
                        "--output_path", str(tmp_path), "--log_samples"])
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    results["samples"] = {
        task: [json.loads(line) for line in next(tmp_path.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        for task in TASKS
    }
    _assert_same_scores(hf_run, results)
    assert results["config"]["model"] == "shortcut"
    assert results["config"]["shortcut"]["draft"]["drafted"] > 0


def test_registered_model_type_and_arguments():
    from lm_eval.api.registry import get_model

    assert get_model("shortcut") is ShortcutLM
    with pytest.raises(ValueError, match="mode"):
        ShortcutLM(pretrained="smollm2", mode="turbo")  # refused before anything loads
    assert lm_eval_model.is_shortcut_name("smollm2") and lm_eval_model.is_shortcut_name("SmolLM2-135M")
    assert lm_eval_model.is_shortcut_name("/x/model.Q4_1.gguf")
    assert not lm_eval_model.is_shortcut_name("HuggingFaceTB/SmolLM2-135M") and not lm_eval_model.is_shortcut_name(None)


def test_task_data():
    choice = load_jsonl()["test"]
    assert len(choice) == 100 and set(choice[0]) >= {"question", "choices", "answer"}
    trivia = load_jsonl("prompts.jsonl", where="reference", version=1.0, pretrained="ignored")["test"]
    assert len(trivia) == 35 and all(trivia["reference"])
    assert sorted(p.name for p in TASKS_DIR.glob("*.yaml")) == [f"{t}.yaml" for t in TASKS]
    doc = {"reference": "Reese’s Pieces"}
    assert lm_eval_model.trivia_results(doc, ["reese's pieces!"]) == {"exact_match": 1.0, "contains": 1.0}
    assert lm_eval_model.trivia_results(doc, ["It was Reese's Pieces."]) == {"exact_match": 0.0, "contains": 1.0}
    assert lm_eval_model.trivia_results({"reference": "Rand"}, ["Brandy"]) == {"exact_match": 0.0, "contains": 0.0}


@pytest.mark.real
def test_alias_loads_through_shortcut_and_matches_hf_on_real_model():
    require_real_model()
    folder = models._converted_packaged("smollm2")
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    run = {"tasks": ["shortcut_socialiqa"], "limit": 2, "log_samples": True, "task_manager": tm}
    hf = lm_eval.simple_evaluate(model=HFLM(pretrained=str(folder), device="cpu"), **run)
    lm = ShortcutLM(pretrained="smollm2", device="cpu")
    assert lm.handle.config.mode == "lossless" and lm.pretrained == "smollm2"
    sc = lm_eval.simple_evaluate(model=lm, **run)
    for a, b in zip(hf["samples"]["shortcut_socialiqa"], sc["samples"]["shortcut_socialiqa"]):
        assert a["resps"] == b["resps"]
    lm.handle.remove()
