"""The committed code workload (``shortcut-eval practice --workload code``): its files,
their regeneration, the option that selects them, and a run on it."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from shortcut.data import prompt_input_ids
from shortcut_eval import cli
from shortcut_eval.workload import DATA, WORKLOADS, prompt_sets

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "shortcut_eval" / "data" / "tiny"
KINDS = ("write-function", "add-docstring", "list-comprehension", "unit-test")


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def test_code_files_hold_practised_and_unseen_instances_of_every_kind():
    families = _rows("code_families.jsonl")
    assert sorted({r["family"] for r in families}) == sorted((*KINDS, "edit"))
    for family in {r["family"] for r in families}:
        splits = [r["split"] for r in families if r["family"] == family]
        assert splits.count("practice") >= 12 and splits.count("transfer") >= 12, family
    assert all(r["source"].startswith("cpython==") and "#" in r["source"] for r in families)
    edits = [r for r in families if r["family"] == "edit"]
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant", "user"] for r in edits)

    prompts = _rows("code_prompts.jsonl")
    practice = [r for r in prompts if r["split"] == "practice"]
    assert {r["kind"] for r in practice} == set(KINDS)
    assert [r["kind"] for r in practice[:4]] == list(KINDS)  # any prefix mixes the kinds
    assert not {r["kind"] for r in prompts if r["split"] == "novel"} & {r["family"] for r in families}
    # no request is both a prompt and a family instance
    texts = [r["prompt"] for r in prompts] + [r.get("prompt") or json.dumps(r["messages"]) for r in families]
    assert len(set(texts)) == len(texts)

    by_id = {r["id"]: r for r in practice}
    for edit in _rows("code_edits.jsonl"):
        earlier = by_id[edit["of"]]
        assert edit["messages"][0]["content"] == earlier["prompt"]
        assert edit["messages"][1] == {"role": "assistant", "content": earlier["reference"]}


def test_code_sets_for_the_practice_harness():
    sets = prompt_sets(*WORKLOADS["code"][:2], families=WORKLOADS["code"][2], n_practice=4, n_test=5, n_family=2)
    assert list(sets) == ["practice", "exact repeats", "near-duplicates", "transfer", "novel"]
    assert len(sets["practice"]) == 4 + 2 * 5 and len(sets["exact repeats"]) == 4
    assert [r["of"] for r in sets["near-duplicates"]] == [r["id"] for r in sets["exact repeats"][:3]]
    assert sorted(r["family"] for r in sets["transfer"]) == sorted((*KINDS, "edit"))
    assert any("messages" in r for r in sets["practice"]) and len(sets["novel"]) == 5


def test_edit_prompt_carries_the_earlier_answer(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    edit = _rows("code_edits.jsonl")[0]
    text = tokenizer.decode(prompt_input_ids(tokenizer, edit)[0])
    answer, request = edit["messages"][1]["content"], edit["messages"][2]["content"]
    assert answer in text and request in text and text.index(answer) < text.index(request)


def test_workload_option_picks_committed_files():
    parse = cli.build_parser().parse_args
    args = parse(["practice", "--workload", "code"])
    cli._resolve(args)
    assert (args.prompts, args.near, args.families) == (DATA / "code_prompts.jsonl", DATA / "code_edits.jsonl",
                                                        DATA / "code_families.jsonl")
    args = parse(["practice", "--prompts", str(DATA / "code_prompts.jsonl"), "--families", "none"])
    cli._resolve(args)
    assert (args.near, args.families) == (DATA / "code_edits.jsonl", None)
    args = parse(["practice"])
    cli._resolve(args)
    assert (args.prompts, args.near, args.families) == WORKLOADS["chat"]
    with pytest.raises(cli.UsageError, match="--workload code and --prompts .* both name the prompts"):
        cli._resolve(parse(["practice", "--workload", "code", "--prompts", "x.jsonl"]))


def test_practice_runs_on_the_code_workload(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["practice", "--workload", "code", "--model", str(tiny_model_dir), "--rounds", "1",
                     "--practice-prompts", "2", "--family-prompts", "1", "--test-prompts", "2",
                     "--max-new-tokens", "4", "--early-exit", "--lookup-tokens", "0", "--corpus",
                     str(TINY / "passages.jsonl"), "--sae-steps", "10", "-q", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["settings"]["test_sets"] == {"exact repeats": 2, "near-duplicates": 2, "transfer": 2, "novel": 2}
    lossless = [r for r in result["tests"] if r["method"] == "shortcut lossless"]
    assert len(lossless) == 4 and all(r["identical"] == 1.0 for r in lossless)


@pytest.mark.skipif(platform.python_version() != "3.11.7", reason="the files are read from CPython 3.11.7's library")
def test_extract_code_regenerates_the_committed_files(tmp_path):
    subprocess.run([sys.executable, str(DATA / "extract_code.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("code_prompts.jsonl", "code_edits.jsonl", "code_families.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
