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
FAMILIES = ["--families", str(TINY / "families.jsonl"), "--family-prompts", "2"]


@pytest.fixture(scope="module")
def practice_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "practice"
    code = cli.main(["practice", "--model", str(tiny_model_dir), "--rounds", "2", "--mode", "both",
                     "--out", str(out), *FAST_PRACTICE, *FAMILIES])
    assert code == 0
    return out


def test_practice_writes_documented_outputs(practice_run):
    result = json.loads((practice_run / "results.json").read_text())
    assert result["task"] == "practice" and result["command"].startswith("shortcut-eval practice")
    for key in ("settings", "environment", "rounds", "tests", "early_exit_sweep", "raw", "seconds"):
        assert key in result, key
    assert {"versions", "processor", "torch_threads", "seed"} <= set(result["environment"])
    methods = {(r["set"], r["method"]) for r in result["tests"]}
    for test_set in ("exact repeats", "near-duplicates", "transfer", "novel"):
        for method in ("plain", "shortcut lossless", "shortcut lossless memory only", "shortcut fast",
                       "prompt lookup", "oracle"):
            assert (test_set, method) in methods, (test_set, method)
        assert any(m.startswith("early-exit E=") for s, m in methods if s == test_set)
    assert [r["round"] for r in result["rounds"] if r["method"] == "shortcut lossless"] == [1, 2]
    for row in result["tests"] + result["rounds"]:
        # fast mode commits an exact repeat's practised answer: no layer runs after the prefill
        assert row["flops_rel"] >= 0 if row["method"] == "shortcut fast" else row["flops_rel"] > 0, row
        if row["method"].startswith(("plain", "shortcut lossless", "early-exit", "prompt")):
            assert row["identical"] == 1.0, row  # every lossless method emits the model's own tokens
    for row in result["raw"]["tests"]["exact repeats"]["plain"]:
        assert row["call_flops_rel"] == 1.0
    exact = next(r for r in result["tests"] if (r["set"], r["method"]) == ("exact repeats", "shortcut lossless"))
    # the practised prompt's kept keys and values are not read again: the call costs less than plain's,
    # while per generated token after the prefill it cannot (every token passes every layer once)
    assert exact["call_flops_rel"] < 1.0 <= exact["flops_rel"] + 1e-9, exact
    fast = next(r for r in result["tests"] if (r["set"], r["method"]) == ("exact repeats", "shortcut fast"))
    assert fast["recalled_share"] > 0 and fast["identical"] == 1.0  # practised answers committed, no layer run
    assert result["early_exit_sweep"]["best"] in (1, 2)
    png = (practice_run / "practice_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(practice_run / "practice_curve.png").shape[0] > 200
    assert "## Test sets" in (practice_run / "report.md").read_text()
    assert (practice_run / "skills" / "shortcut.json").is_file()


def test_transfer_set_and_memory_only_ablation(practice_run):
    """Unseen instances of the practised task families form the transfer set, measured
    like every other set; the memory-only row (shallow path off) sits beside the full
    system on each set and emits the model's own tokens."""
    result = json.loads((practice_run / "results.json").read_text())
    families = [json.loads(line) for line in (TINY / "families.jsonl").read_text().splitlines()]
    settings = result["settings"]
    assert settings["test_sets"] == {"exact repeats": 2, "near-duplicates": 2, "transfer": 2, "novel": 2}
    assert settings["practice_prompts"] == 3 + 4 and settings["family_practice_prompts"] == 4
    assert [r["set"] for r in result["tests"]].index("transfer") < [r["set"] for r in result["tests"]].index("novel")
    transfer = result["raw"]["tests"]["transfer"]
    unseen = {r["id"]: r["family"] for r in families if r["split"] == "transfer"}
    ids = [row["prompt_id"] for row in transfer["plain"]]
    assert set(ids) <= set(unseen) and len({unseen[i] for i in ids}) == 2  # one instance of each family
    practised_ids = {row["prompt_id"] for row in result["raw"]["rounds"][0]["practice"]["plain"]}
    assert {r["id"] for r in families if r["split"] == "practice"} <= practised_ids
    assert not set(ids) & practised_ids
    rows = {(r["set"], r["method"]): r for r in result["tests"]}
    for test_set in ("exact repeats", "near-duplicates", "transfer", "novel"):
        full, memory = rows[(test_set, "shortcut lossless")], rows[(test_set, "shortcut lossless memory only")]
        for row in (full, memory):
            assert {"prompts", "tokens", "speed_ratio", "flops_rel", "bytes_rel", "identical", "recalled_share",
                    "acceptance"} <= set(row), row
        assert memory["identical"] == 1.0 and memory["prompts"] == full["prompts"] == 2
        plain_ids = [r["output_ids"] for r in result["raw"]["tests"][test_set]["plain"]]
        assert [r["output_ids"] for r in result["raw"]["tests"][test_set]["shortcut lossless memory only"]] == plain_ids
    report = (practice_run / "report.md").read_text()
    assert "## Sequence memory only vs full system" in report and "| transfer | shortcut lossless |" in report


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
    result = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in result["tests"]}
    assert {"shortcut lossless [skills]", "shortcut lossless [other]", "shortcut lossless memory only [skills]",
            "shortcut lossless memory only [other]"} <= methods
    # --prompts other than the committed file: no families unless given, the three classic sets
    assert list(result["settings"]["test_sets"]) == ["exact repeats", "near-duplicates", "novel"]


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


def test_committed_families_and_their_sets():
    from shortcut_eval.workload import DATA, prompt_sets

    families = [json.loads(line) for line in (DATA / "families.jsonl").read_text().splitlines()]
    names = sorted({r["family"] for r in families})
    assert len(names) >= 4
    for name in names:
        rows = [r for r in families if r["family"] == name]
        assert len(rows) >= 40 and sum(r["split"] == "practice" for r in rows) == 16, name
        assert all("==" in r["source"] and ":" in r["source"] and "#" in r["source"] for r in rows)
    tiny = [json.loads(line) for line in (TINY / "families.jsonl").read_text().splitlines()]
    assert all(r in families for r in tiny) and len({r["family"] for r in tiny}) == 2

    common = dict(n_practice=8, n_test=6)
    sets = prompt_sets(DATA / "prompts.jsonl", DATA / "near_duplicates.jsonl", families=DATA / "families.jsonl",
                       n_family=4, **common)
    assert list(sets) == ["practice", "exact repeats", "near-duplicates", "transfer", "novel"]
    assert all(len(v) == 6 for k, v in sets.items() if k != "practice")
    assert len(sets["practice"]) == 8 + 4 * len(names)
    transfer = sets["transfer"]
    assert {r["split"] for r in transfer} == {"transfer"} and len({r["family"] for r in transfer}) == 4
    assert not {r["id"] for r in transfer} & {r["id"] for r in sets["practice"]}
    plain = prompt_sets(DATA / "prompts.jsonl", DATA / "near_duplicates.jsonl", **common)
    assert "transfer" not in plain and plain["practice"] == sets["practice"][:8]

    args = cli.build_parser().parse_args(["practice", "--families", "none"])
    cli._resolve(args)
    assert args.families is None
    args = cli.build_parser().parse_args(["practice"])
    cli._resolve(args)
    assert args.families == DATA / "families.jsonl" and args.family_prompts == 16


def test_family_file_errors_name_the_problem(tmp_path):
    from shortcut.data import DataFileError
    from shortcut_eval.workload import family_sets

    bad = tmp_path / "families.jsonl"
    bad.write_text('{"prompt": "a", "family": "x", "split": "practice"}\n'
                   '{"prompt": "b", "family": "x", "split": "novel"}\n')
    with pytest.raises(DataFileError, match=r"line 2: 'split' must be one of practice, transfer, got 'novel'"):
        family_sets(bad, n_family=None, n_test=2)
    bad.write_text('{"prompt": "a", "family": "x", "split": "practice"}\n'
                   '{"prompt": "b", "family": "y", "split": "transfer"}\n')
    with pytest.raises(DataFileError, match="families y have transfer records but no practice records"):
        family_sets(bad, n_family=None, n_test=2)
    bad.write_text('{"prompt": "a", "split": "practice"}\n')
    with pytest.raises(DataFileError, match="missing key"):
        family_sets(bad, n_family=None, n_test=2)
