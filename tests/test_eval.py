"""``shortcut-eval`` in-process on a tiny random model and the tiny committed data sample."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from shortcut_eval import cli

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "shortcut_eval" / "data" / "tiny"
FAST_PRACTICE = ["--prompts", str(TINY / "prompts.jsonl"), "--near", str(TINY / "near_duplicates.jsonl"),
                 "--corpus", str(TINY / "passages.jsonl"), "--sae-steps", "10", "--practice-prompts", "3",
                 "--test-prompts", "2", "--max-new-tokens", "6", "--sweep-prompts", "1", "--early-exit", "1", "2",
                 "--lookup-tokens", "3", "-q"]


@pytest.fixture(scope="module")
def practice_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "practice"
    code = cli.main(["practice", "--model", str(tiny_model_dir), "--rounds", "2", "--mode", "both",
                     "--out", str(out), *FAST_PRACTICE])
    assert code == 0
    return out


def test_practice_writes_documented_outputs(practice_run):
    result = json.loads((practice_run / "results.json").read_text())
    assert result["task"] == "practice" and result["command"].startswith("shortcut-eval practice")
    for key in ("settings", "environment", "rounds", "tests", "early_exit_sweep", "raw", "seconds"):
        assert key in result, key
    assert {"versions", "processor", "torch_threads", "seed"} <= set(result["environment"])
    methods = {(r["set"], r["method"]) for r in result["tests"]}
    for test_set in ("exact repeats", "near-duplicates", "novel"):
        for method in ("plain", "shortcut lossless", "shortcut fast", "prompt lookup", "oracle"):
            assert (test_set, method) in methods, (test_set, method)
        assert any(m.startswith("early-exit E=") for s, m in methods if s == test_set)
    assert [r["round"] for r in result["rounds"] if r["method"] == "shortcut lossless"] == [1, 2]
    for row in result["tests"] + result["rounds"]:
        # fast mode commits an exact repeat's practised answer: no layer runs after the prefill
        assert row["flops_rel"] >= 0 if row["method"] == "shortcut fast" else row["flops_rel"] > 0, row
        if row["method"] in ("plain", "shortcut lossless") or row["method"].startswith(("early-exit", "prompt")):
            assert row["identical"] == 1.0, row  # every lossless method emits the model's own tokens
    fast = next(r for r in result["tests"] if (r["set"], r["method"]) == ("exact repeats", "shortcut fast"))
    assert fast["replayed_share"] > 0 and fast["identical"] == 1.0  # practised answers committed, no layer run
    assert result["early_exit_sweep"]["best"] in (1, 2)
    png = (practice_run / "practice_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(practice_run / "practice_curve.png").shape[0] > 200
    assert "## Test sets" in (practice_run / "report.md").read_text()
    assert (practice_run / "skills" / "shortcut.json").is_file()


def test_agreement_and_choice_on_practised_skills(practice_run, tiny_model_dir, tmp_path):
    skills = str(practice_run / "skills")
    common = ["--model", str(tiny_model_dir), "--skills", skills, "--mode", "both", "-q"]
    assert cli.main(["agreement", "--passages", str(TINY / "passages.jsonl"), "--out", str(tmp_path / "a"),
                     *common]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "a" / "results.json").read_text())["tests"]}
    assert rows["shortcut lossless"]["agreement"] == 1.0
    assert rows["shortcut lossless"]["perplexity_ratio"] == 1.0
    assert 0.0 <= rows["shortcut fast"]["agreement"] <= 1.0
    assert rows["shortcut fast"]["mean_layers"] <= 3

    assert cli.main(["choice", "--data", str(TINY / "choice.jsonl"), "--out", str(tmp_path / "c"), *common]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "c" / "results.json").read_text())["tests"]}
    assert rows["shortcut lossless"]["accuracy"] == rows["plain (unwrapped)"]["accuracy"]
    assert rows["shortcut lossless"]["same_choice_as_unwrapped"] == 1.0


def test_compare_two_skills_folders(practice_run, tiny_model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(practice_run / "skills", other)
    out = tmp_path / "cmp"
    assert cli.main(["practice", "--model", str(tiny_model_dir), "--skills", str(practice_run / "skills"),
                     "--compare", str(other), "--rounds", "0", "--out", str(out), *FAST_PRACTICE]) == 0
    methods = {r["method"] for r in json.loads((out / "results.json").read_text())["tests"]}
    assert {"shortcut lossless [skills]", "shortcut lossless [other]"} <= methods


def test_bad_input_exits_2_and_leaves_nothing(practice_run, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["teleport"])
    assert err.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["practice", "--mode", "turbo"])
    assert "lossless" in capsys.readouterr().err

    out = tmp_path / "out"
    assert cli.main(["practice", "--prompts", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine", "split": "practice"}\n{"prompt": oops}\n')
    assert cli.main(["practice", "--prompts", str(bad), "--out", str(out)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert cli.main(["practice", "--compare", str(tmp_path), "--out", str(out)]) == 2
    assert "--compare needs --skills" in capsys.readouterr().err
    assert cli.main(["agreement", "--out", str(out)]) == 2
    assert "give --skills" in capsys.readouterr().err
    assert cli.main(["practice", "--rounds", "0", "--out", str(out)]) == 2
    assert cli.main(["choice", "--skills", str(tmp_path), "--out", str(out)]) == 2
    assert "not a shortcut skills folder" in capsys.readouterr().err

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert cli.main(["practice", "--out", str(taken), *FAST_PRACTICE]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    # Skills of another base model: refused after loading, and no half-written folder remains.
    from transformers import AutoModelForCausalLM

    other_model = tmp_path / "other_model"
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for p in model.parameters():
        p.data.normal_()
    model.save_pretrained(other_model)
    shutil.copy(tiny_model_dir / "tokenizer.json", other_model)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", other_model)
    assert cli.main(["choice", "--model", str(other_model), "--skills", str(practice_run / "skills"),
                     "--data", str(TINY / "choice.jsonl"), "--out", str(tmp_path / "mismatch"), "-q"]) == 2
    assert "learned on another base model" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert not (tmp_path / "mismatch").exists()


def test_fresh_skills_take_observer_and_exit_layers(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "shaped"
    assert cli.main(["practice", "--model", str(tiny_model_dir), "--rounds", "1", "--observer-layer", "0",
                     "--exit-layers", "1", "--out", str(out), *FAST_PRACTICE]) == 0
    config = json.loads((out / "skills" / "config.json").read_text())
    assert config["observer_layers"] == [0] and config["exit_layers"] == [1]
    assert cli.main(["practice", "--model", str(tiny_model_dir), "--observer-layer", "2", "--exit-layers", "1",
                     "--out", str(tmp_path / "bad"), *FAST_PRACTICE]) == 2
    assert "do not lie above" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_bench_verify_times_every_width(tiny_model_dir, capsys):
    # benchmarks/ is a folder of scripts, not a package of the wheel
    spec = importlib.util.spec_from_file_location("bench_verify", ROOT / "benchmarks" / "bench_verify.py")
    bench_verify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_verify)

    relative = bench_verify.main(["--model", str(tiny_model_dir), "--repeats", "1"])
    assert list(relative) == list(bench_verify.WIDTHS) and relative[1] == 1.0
    assert all(value > 0 for value in relative.values())
    assert "x one token" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_practice_runs_in_reduced_precision(tiny_model_dir, tmp_path, dtype):
    out = tmp_path / dtype
    assert cli.main(["practice", "--model", str(tiny_model_dir), "--rounds", "2", "--mode", "both",
                     "--dtype", dtype, "--out", str(out), *FAST_PRACTICE]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["dtype"] == dtype
    lossless = [row for row in results["tests"] if row["method"] == "shortcut lossless"]
    assert len(lossless) == 3 and all(row["identical"] == 1.0 for row in lossless)
