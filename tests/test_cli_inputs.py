"""Bad input to every command (``shortcut``, ``shortcut-eval``, ``shortcut-finetune``)
exits with code 2 and one line on stderr that names the value and what is allowed, and
leaves nothing on disk. Every case runs ``main(argv)`` in-process; most fail before
any model loads, the model-dependent ones right after loading a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import shortcut
from shortcut import cli
from shortcut.finetune import consolidate as ft
from shortcut_eval import cli as eval_cli

from .conftest import make_tiny
from .test_finetune import model_dir, skills_dir  # noqa: F401  (fixtures)
from .test_practice import _observer

TINY = Path(__file__).resolve().parent.parent / "shortcut_eval" / "data" / "tiny"
LONG = " ".join(["word"] * 600)  # more tokens than the tiny models' contexts (512 and 128)

FILES = {  # name -> JSONL content, written into each test's tmp_path
    "prompt_int.jsonl": {"prompt": 5},
    "prompt_empty.jsonl": {"prompt": ""},
    "messages_str.jsonl": {"messages": "hi"},
    "messages_no_content.jsonl": {"messages": [{"role": "user"}]},
    "id_int.jsonl": {"id": 3, "prompt": "hi"},
    "no_prompt.jsonl": {"text": "a passage, not a prompt"},
    "empty.jsonl": None,
    "no_text.jsonl": {"id": "p1", "body": "no text key"},
    "text_int.jsonl": {"id": "p1", "text": 7},
    "long_prompt.jsonl": [{"id": "short", "prompt": "Hello there."}, {"id": "far-too-long", "prompt": LONG}],
    "near_of_int.jsonl": {"id": "nd", "of": 339, "prompt": "hi"},
    "answer_out_of_range.jsonl": {"question": "Which?", "choices": ["a", "b"], "answer": 2},
    "answer_str.jsonl": {"question": "Which?", "choices": ["a", "b"], "answer": "0"},
    "answer_bool.jsonl": {"question": "Which?", "choices": ["a", "b"], "answer": True},
    "choices_str.jsonl": {"question": "Which?", "choices": "ab", "answer": 0},
    "choice_one.jsonl": {"question": "Which?", "choices": ["a"], "answer": 0},
    "long_question.jsonl": {"id": "q-long", "question": LONG, "choices": ["a", "b"], "answer": 0},
}


def _write_files(folder: Path) -> None:
    for name, records in FILES.items():
        records = [] if records is None else records if isinstance(records, list) else [records]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "a_file").write_text("not a folder\n")
    (folder / "a_folder").mkdir()


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def _refused(main, argv: list[str], prog: str, match: str, folder: Path, capsys) -> None:
    """``main(argv)`` exits 2 (returned, or raised by argparse), its error is one line
    naming ``match``, and ``folder`` is exactly as it was (no output, no temporary)."""
    before = _tree(folder)
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    # transformers may draw a loading progress bar on stderr first; the error is the last line, alone
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [err.rstrip("\n").splitlines()[-1]], err
    assert errors[0].startswith(f"{prog}: error: "), err
    assert match in errors[0], err
    assert _tree(folder) == before


def _fill(text: str, **paths: Path) -> str:
    """``text`` with ``{w}`` (the test's folder), ``{model}`` and ``{skills}`` filled in."""
    for key, path in paths.items():
        text = text.replace("{" + key + "}", str(path))
    return text


@pytest.fixture(scope="module")
def practised_tiny(tiny_model_dir, tmp_path_factory):
    """Skills practised on ``tiny_model_dir`` (3 layers, context 512) with the ``shortcut`` CLI."""
    out = tmp_path_factory.mktemp("inputs") / "skills"
    assert cli.main(["practice", str(TINY / "prompts.jsonl"), "-o", str(out), "--model", str(tiny_model_dir),
                     "--corpus", str(TINY / "passages.jsonl"), "--sae-steps", "10", "--rounds", "1",
                     "--new-tokens", "4", "-q"]) == 0
    return out


@pytest.fixture
def work(tmp_path):
    _write_files(tmp_path)
    return tmp_path


# -- shortcut ---------------------------------------------------------------------------------
PRACTICE = ["--model", "{model}", "--corpus", str(TINY / "passages.jsonl"), "--sae-steps", "5", "--rounds", "1",
            "--new-tokens", "4", "-q"]
SHORTCUT_CASES = [
    # prompt files
    (["practice", "{w}/prompt_int.jsonl", "-o", "{w}/out"], "'prompt' must be a non-empty string, got 5"),
    (["practice", "{w}/prompt_empty.jsonl", "-o", "{w}/out"], "'prompt' must be a non-empty string"),
    (["practice", "{w}/messages_str.jsonl", "-o", "{w}/out"],
     "'messages' must be a non-empty list of {'role': str, 'content': str}, got \"hi\""),
    (["practice", "{w}/messages_no_content.jsonl", "-o", "{w}/out"], "'messages' must be a non-empty list"),
    (["practice", "{w}/id_int.jsonl", "-o", "{w}/out"], "line 1: 'id' must be a string, got 3"),
    (["practice", "{w}/no_prompt.jsonl", "-o", "{w}/out"], "needs a 'prompt' or a 'messages' key"),
    (["practice", "{w}/empty.jsonl", "-o", "{w}/out"], "empty.jsonl: no records"),
    (["practice", "{w}/missing.jsonl", "-o", "{w}/out"], "missing.jsonl: no such file"),
    # the observer's corpus
    (["practice", str(TINY / "prompts.jsonl"), "-o", "{w}/out", "--corpus", "{w}/no_text.jsonl"],
     "no_text.jsonl, line 1: missing key(s) ['text']"),
    (["practice", str(TINY / "prompts.jsonl"), "-o", "{w}/out", "--corpus", "{w}/text_int.jsonl"],
     "'text' must be a string, got 7"),
    # output paths
    (["practice", str(TINY / "prompts.jsonl"), "-o", "{w}/a_file"],
     "-o/--output {w}/a_file exists and is not a folder"),
    (["practice", str(TINY / "prompts.jsonl"), "-o", "{w}/a_file/out"], "a_file is a file, not a folder"),
    (["merge", "{skills}", "{skills}", "-o", "{w}/a_file"], "exists and is not a folder"),
    (["merge", "{skills}", "{skills}", "-o", "{w}/a_file/out"], "a_file is a file, not a folder"),
    # counts and names
    (["practice", str(TINY / "prompts.jsonl"), "-o", "{w}/out", "--rounds", "0"],
     "argument --rounds: must be an integer >= 1, got '0'"),
    (["practice", str(TINY / "prompts.jsonl"), "-o", "{w}/out", "--new-tokens", "-3"],
     "argument --new-tokens: must be an integer >= 1, got '-3'"),
    (["practice", str(TINY / "prompts.jsonl"), "-o", "{w}/out", "--sae-steps", "x"],
     "argument --sae-steps: must be an integer >= 1, got 'x'"),
    (["practice", str(TINY / "prompts.jsonl"), "-o", "{w}/out", "--skills", "{w}/a_folder"],
     "not a shortcut skills folder"),
    (["practice", str(TINY / "prompts.jsonl"), "-o", "{w}/out", "--model", "smollm9", "-q"],
     "'smollm9' is neither a packaged alias"),
    (["demo", "-n", "0"], "argument -n: must be an integer >= 1, got '0'"),
    (["demo", "--new-tokens", "0"], "argument --new-tokens: must be an integer >= 1, got '0'"),
    (["demo", "--prompts", "{w}/messages_str.jsonl"], "'messages' must be a non-empty list"),
    (["demo", "--model", "smollm9"], "'smollm9' is neither a packaged alias"),
    (["inspect", "{skills}", "--top", "-1"], "argument --top: must be an integer >= 0, got '-1'"),
    (["inspect", "{w}/a_folder"], "not a shortcut skills folder"),
    (["merge", "{skills}", "-o", "{w}/out"], "merge needs at least two skills folders, got 1"),
    (["merge", "{skills}", "{skills}", "-o", "{skills}"],
     "-o/--output {skills} already holds skills; pass --overwrite"),
    # checks against the loaded model: context 512 tokens
    (["practice", "{w}/long_prompt.jsonl", "-o", "{w}/out", *PRACTICE],
     "long_prompt.jsonl: prompt 'far-too-long' has 6"),
    (["practice", str(TINY / "prompts.jsonl"), "-o", "{w}/out", *PRACTICE, "--new-tokens", "512"],
     "--new-tokens 512 leaves no room for a prompt in the model's context of 512 tokens (allowed: at most 511)"),
    (["demo", "--model", "{model}", "--prompts", "{w}/long_prompt.jsonl", "--new-tokens", "4"],
     "prompt 'far-too-long' has 6"),
]


@pytest.mark.parametrize("argv, match", SHORTCUT_CASES, ids=[c[1][:48] for c in SHORTCUT_CASES])
def test_shortcut_refuses(argv, match, work, tiny_model_dir, practised_tiny, capsys):
    paths = {"w": work, "model": tiny_model_dir, "skills": practised_tiny}
    _refused(cli.main, [_fill(a, **paths) for a in argv], f"shortcut {argv[0]}", _fill(match, **paths), work, capsys)


def test_prompt_too_long_names_its_tokens_and_the_limit(work, tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    from shortcut.data import prompt_input_ids

    tokens = prompt_input_ids(AutoTokenizer.from_pretrained(tiny_model_dir), {"prompt": LONG}).shape[1]
    argv = [_fill(a, w=work, model=tiny_model_dir)
            for a in ["practice", "{w}/long_prompt.jsonl", "-o", "{w}/out", *PRACTICE]]
    _refused(cli.main, argv, "shortcut practice",
             f"prompt 'far-too-long' has {tokens} tokens; the model's context is 512 tokens, so with --new-tokens 4 "
             "a prompt may have at most 508", work, capsys)


def test_truncated_skills_files_exit_2(work, capsys):
    """A skills file cut short (an interrupted copy) is reported, not a traceback."""
    model = make_tiny("llama")
    handle = shortcut.wrap(model, shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2]))
    handle.attach_observer(_observer(model))
    good = handle.save_pretrained(work / "good")
    handle.remove()
    cut = work / "cut"
    shutil.copytree(good, cut)
    heads = cut / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:100])
    _refused(cli.main, ["inspect", str(cut)], "shortcut inspect", "", work, capsys)
    _refused(cli.main, ["merge", str(good), str(cut), "-o", str(work / "merged")], "shortcut merge", "", work, capsys)


# -- shortcut-eval ----------------------------------------------------------------------------
EVAL_FAST = ["--model", "{model}", "--corpus", str(TINY / "passages.jsonl"), "--sae-steps", "5",
             "--practice-prompts", "3", "--test-prompts", "2", "--max-new-tokens", "4", "--sweep-prompts", "1",
             "--lookup-tokens", "2", "--rounds", "1", "-q"]
PROMPTS = ["--prompts", str(TINY / "prompts.jsonl"), "--near", str(TINY / "near_duplicates.jsonl")]
EVAL_CASES = [
    (["practice", "--out", "{w}/out", "--dtype", "f16"], "shortcut-eval",
     "argument --dtype: invalid choice: 'f16' (choose from"),
    (["practice", "--out", "{w}/out", "--mode", "turbo"], "shortcut-eval", "argument --mode: invalid choice: 'turbo'"),
    (["practice", "--out", "{w}/out", "--rounds", "-1"], "shortcut-eval",
     "argument --rounds: must be an integer >= 0, got '-1'"),
    (["practice", "--out", "{w}/out", "--max-new-tokens", "0"], "shortcut-eval",
     "argument --max-new-tokens: must be an integer >= 1, got '0'"),
    (["practice", "--out", "{w}/out", "--test-prompts", "0"], "shortcut-eval", "argument --test-prompts"),
    (["practice", "--out", "{w}/out", "--early-exit", "0"], "shortcut-eval",
     "argument --early-exit: must be an integer >= 1, got '0'"),
    (["practice", "--out", "{w}/out", "--lookup-tokens", "-2"], "shortcut-eval", "argument --lookup-tokens"),
    (["practice", "--out", "{w}/out", "--observer-layer", "-1"], "shortcut-eval", "argument --observer-layer"),
    (["practice", "--out", "{w}/out", "--sae-steps", "0"], "shortcut-eval", "argument --sae-steps"),
    (["agreement", "--out", "{w}/out", "--limit", "0"], "shortcut-eval", "argument --limit"),
    (["agreement", "--out", "{w}/out", "--max-length", "1"], "shortcut-eval",
     "argument --max-length: must be an integer >= 2, got '1'"),
    # input files
    (["practice", "--out", "{w}/out", "--prompts", "{w}/prompt_int.jsonl"], "shortcut-eval practice",
     "'prompt' must be a non-empty string, got 5"),
    (["practice", "--out", "{w}/out", "--prompts", "{w}/messages_str.jsonl"], "shortcut-eval practice",
     "'messages' must be a non-empty list"),
    (["practice", "--out", "{w}/out", "--prompts", "{w}/id_int.jsonl"], "shortcut-eval practice",
     "'id' must be a string, got 3"),
    (["practice", "--out", "{w}/out", "--prompts", "{w}/empty.jsonl"], "shortcut-eval practice", "no records"),
    (["practice", "--out", "{w}/out", "--prompts", "{w}/a_folder"], "shortcut-eval practice",
     "a_folder: a folder, not a JSONL file"),
    (["practice", "--out", "{w}/out", "--prompts", str(TINY / "prompts.jsonl"), "--near", "{w}/near_of_int.jsonl"],
     "shortcut-eval practice", "'of' must be the id (a string) of a practised prompt, got 339"),
    (["practice", "--out", "{w}/out", *PROMPTS, "--corpus", "{w}/no_text.jsonl"], "shortcut-eval practice",
     "missing key(s) ['text']"),
    (["agreement", "--out", "{w}/out", "--skills", "{skills}", "--passages", "{w}/text_int.jsonl"],
     "shortcut-eval agreement", "'text' must be a string, got 7"),
    (["choice", "--out", "{w}/out", "--skills", "{skills}", "--data", "{w}/answer_out_of_range.jsonl"],
     "shortcut-eval choice", "'answer' 2 must index into 'choices' (0..1)"),
    (["choice", "--out", "{w}/out", "--skills", "{skills}", "--data", "{w}/answer_str.jsonl"],
     "shortcut-eval choice", "'answer' must be an integer, got \"0\""),
    (["choice", "--out", "{w}/out", "--skills", "{skills}", "--data", "{w}/answer_bool.jsonl"],
     "shortcut-eval choice", "'answer' must be an integer, got true"),
    (["choice", "--out", "{w}/out", "--skills", "{skills}", "--data", "{w}/choices_str.jsonl"],
     "shortcut-eval choice", "'choices' must be a list"),
    (["choice", "--out", "{w}/out", "--skills", "{skills}", "--data", "{w}/choice_one.jsonl"],
     "shortcut-eval choice", "'choices' must be a list of two or more non-empty strings"),
    # output paths, skills, model
    (["practice", "--out", "{w}/a_file", *PROMPTS], "shortcut-eval practice",
     "--out {w}/a_file exists and is not a folder"),
    (["practice", "--out", "{w}/a_file/run", *PROMPTS], "shortcut-eval practice",
     "a_file is a file, not a folder"),
    (["choice", "--out", "{w}/out", "--skills", "{w}/a_folder"], "shortcut-eval choice",
     "not a shortcut skills folder"),
    (["practice", "--out", "{w}/out", *PROMPTS, *EVAL_FAST, "--model", "smollm9"], "shortcut-eval practice",
     "'smollm9' is neither a packaged alias"),
    # checks against the loaded model: 3 layers, context 512 tokens
    (["practice", "--out", "{w}/out", *PROMPTS, *EVAL_FAST, "--early-exit", "1", "99"], "shortcut-eval practice",
     "--early-exit 99: the model has 3 layers; an early exit E must satisfy 1 <= E < 3"),
    (["practice", "--out", "{w}/out", "--prompts", "{w}/long_prompt.jsonl", *EVAL_FAST, "--practice-prompts", "1"],
     "shortcut-eval practice", "prompt 'far-too-long' has 6"),
    (["practice", "--out", "{w}/out", *PROMPTS, *EVAL_FAST, "--max-new-tokens", "600"], "shortcut-eval practice",
     "--max-new-tokens 600 leaves no room for a prompt in the model's context of 512 tokens"),
    (["agreement", "--out", "{w}/out", "--skills", "{skills}", "--model", "{model}", "--max-length", "4000", "-q",
      "--passages", str(TINY / "passages.jsonl")], "shortcut-eval agreement",
     "--max-length 4000 is more than the model's context of 512 tokens"),
    (["choice", "--out", "{w}/out", "--skills", "{skills}", "--model", "{model}", "-q",
      "--data", "{w}/long_question.jsonl"], "shortcut-eval choice",
     "question 'q-long' with the choice 'a' has 6"),
]


@pytest.mark.parametrize("argv, prog, match", EVAL_CASES,
                         ids=[c[2][:48] for c in EVAL_CASES])
def test_shortcut_eval_refuses(argv, prog, match, work, tiny_model_dir, practised_tiny, capsys):
    paths = {"w": work, "model": tiny_model_dir, "skills": practised_tiny}
    _refused(eval_cli.main, [_fill(a, **paths) for a in argv], prog, _fill(match, **paths), work, capsys)


# -- shortcut-finetune ------------------------------------------------------------------------
FINETUNE_CASES = [
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
    (["--lr", "0"], "argument --lr: must be a number in (0, inf), got '0'"),
    (["--lr", "nan"], "argument --lr: must be a number in (0, inf), got 'nan'"),
    (["--heldout", "0.5"], "argument --heldout: must be a number in [0, 0.5), got '0.5'"),
    (["--layer-dropout", "1"], "argument --layer-dropout: must be a number in [0, 1), got '1'"),
    (["--patience", "-1"], "argument --patience: must be an integer >= 0, got '-1'"),
    (["--checkpoint-every", "-1"], "argument --checkpoint-every"),
    (["--lora-rank", "0"], "argument --lora-rank"),
    (["--level", "deep"], "argument --level: invalid choice: 'deep'"),
    (["--extra", "{w}/prompt_int.jsonl"], "record 1: 'prompt' must be a non-empty string, got 5"),
    (["--extra", "{w}/messages_str.jsonl"], "'messages' must be a non-empty list"),
    (["--extra", "{w}/text_int.jsonl"], "'text' must be a string, got int"),
    (["--summary", "{w}/a_folder"], "--summary {w}/a_folder is a folder; give a file name"),
    (["--summary", "{w}/a_file/s.json"], "a_file is a file, not a folder"),
    (["--level", "layerskip", "--quality", "{w}/no_text.jsonl"], "missing key(s) ['text']"),
    (["--level", "layerskip", "--quality", str(TINY / "passages.jsonl"), "--quality-split", "nope"],
     "no records with split='nope'"),
    (["--model", "smollm9"], "'smollm9' is neither a packaged alias"),
    # checks against the loaded model: context 128 tokens
    (["--model", "{model}", "--new-tokens", "125"], "a prompt in the prompt log has"),
    (["--model", "{model}", "--new-tokens", "128"], "--new-tokens 128 leaves no room for a prompt"),
    (["--model", "{model}", "--extra", "{w}/long_prompt.jsonl"],
     "prompt 'far-too-long' has 2999 tokens; the model's context is 128 tokens, so with --new-tokens 64"),
]


@pytest.mark.parametrize("more, match", FINETUNE_CASES, ids=[" ".join(c[0]) for c in FINETUNE_CASES])
def test_shortcut_finetune_refuses(more, match, work, skills_dir, model_dir, capsys):  # noqa: F811
    paths = {"w": work, "model": model_dir}
    argv = [str(skills_dir), "-o", str(work / "out"), "-q", *(_fill(a, **paths) for a in more)]
    _refused(ft.main, argv, "shortcut-finetune", _fill(match, **paths), work, capsys)


@pytest.mark.parametrize("target, match", [("a_file", "exists and is not a folder"),
                                           ("a_file/out", "a_file is a file, not a folder")])
def test_shortcut_finetune_refuses_output_paths(target, match, work, skills_dir, capsys):  # noqa: F811
    _refused(ft.main, [str(skills_dir), "-o", str(work / target), "-q"], "shortcut-finetune", match, work, capsys)
