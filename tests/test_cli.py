"""The ``shortcut`` CLI in-process on a tiny model with a real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from shortcut import cli

TINY_DATA = Path(__file__).resolve().parent.parent / "shortcut_eval" / "data" / "tiny"


def _practice(model_dir, out, *extra):
    return cli.main(["practice", str(TINY_DATA / "prompts.jsonl"), "-o", str(out), "--model", str(model_dir),
                     "--corpus", str(TINY_DATA / "passages.jsonl"), "--sae-steps", "10", "--rounds", "2",
                     "--new-tokens", "6", "-q", *extra])


def test_practice_inspect_merge(tiny_model_dir, tmp_path, capsys):
    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    assert _practice(tiny_model_dir, a) == 0
    out = capsys.readouterr().out
    assert "round" in out and "skills saved" in out
    assert (a / "heads.safetensors").is_file() and (a / "observers" / "layer_1").is_dir()

    assert cli.main(["inspect", str(a), "--timing", "--model", str(tiny_model_dir)]) == 0
    report = capsys.readouterr().out
    assert "observer share of decode time" in report
    assert "exit after" in report and "decode-time decisions:" in report and "observer:" in report
    assert "prompt log: 10 practised prompts" in report  # 5 prompts x 2 rounds
    assert "draft chances from verification" in report and "lookup" in report

    assert _practice(tiny_model_dir, b, "--skills", str(a), "--rounds", "1") == 0
    assert cli.main(["merge", str(a), str(b), "-o", str(merged)]) == 0
    assert cli.main(["inspect", str(merged)]) == 0
    merged_report = capsys.readouterr().out
    assert "prompt log: 25 practised prompts" in merged_report  # 10 + (10 + 5)
    assert "5 practised sequences" in merged_report  # greedy: both runs produced the same 5, united
    assert "draft chances" not in merged_report  # learned on each folder's own heads: not merged

    # Another practice run trains its own observer: its signatures do not mix.
    c = tmp_path / "c"
    assert _practice(tiny_model_dir, c, "--rounds", "1", "--seed", "1") == 0
    assert cli.main(["merge", str(a), str(c), "-o", str(tmp_path / "bad")]) == 2
    assert "different observers" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_merge_refuses_a_folder_with_an_adapter(tmp_path, capsys):
    """Skills consolidated with --level layerskip carry a LoRA adapter: no averaging."""
    import json
    import shutil

    import shortcut

    from .conftest import make_tiny
    from .test_practice import _observer

    model = make_tiny("llama")
    handle = shortcut.wrap(model, shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2]))
    handle.attach_observer(_observer(model))
    a = handle.save_pretrained(tmp_path / "a")
    b = handle.save_pretrained(tmp_path / "b")
    handle.remove()
    assert cli.main(["merge", str(a), str(b), "-o", str(tmp_path / "ok")]) == 0  # mergeable as they are
    capsys.readouterr()

    adapted = tmp_path / "adapted"
    shutil.copytree(b, adapted)
    (adapted / "adapter").mkdir()
    (adapted / "adapter" / "adapter_config.json").write_text("{}\n")
    manifest = json.loads((adapted / "shortcut.json").read_text())
    manifest["contents"]["adapter"] = "adapter"
    (adapted / "shortcut.json").write_text(json.dumps(manifest))
    for folders in ([a, adapted], [adapted, a]):
        out = tmp_path / "merged"
        assert cli.main(["merge", *map(str, folders), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(adapted) in err and "LoRA adapter" in err and "cannot be merged" in err
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "adapted", "b", "ok"]  # nothing left behind


def test_bad_input_exits_2_and_names_the_problem(tiny_model_dir, tmp_path, capsys):
    assert cli.main(["practice", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    assert cli.main(["practice", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "line 2" in capsys.readouterr().err
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"text": "no prompt"}\n')
    assert cli.main(["practice", str(nokey), "-o", str(tmp_path / "o")]) == 2
    assert "'prompt' or a 'messages'" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "not a shortcut skills folder" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("keep")
    assert cli.main(["practice", str(TINY_DATA / "prompts.jsonl"), "-o", str(foreign)]) == 2
    assert [p.name for p in foreign.iterdir()] == ["x.txt"]
    with pytest.raises(SystemExit) as err:
        cli.main(["teleport"])
    assert err.value.code == 2
