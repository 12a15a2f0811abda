"""Skills folders are untrusted input: every corruption gives a named error, no crash,
and the model as it was; saves survive a kill at any point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import shortcut
from shortcut.skills.validate import SkillsFileError

from .conftest import make_tiny
from .test_practice import _practised

VOCAB = 96


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    _, handle, _ = _practised(rounds=1)
    folder = handle.save_pretrained(tmp_path_factory.mktemp("skills") / "good")
    handle.remove()
    return folder


def _edit_tensors(name, change):
    def apply(folder):
        state = load_file(str(folder / name))
        change(state)
        save_file(state, str(folder / name))
    return apply


def _edit_json(name, change):
    def apply(folder):
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))
    return apply


def _set(key, value):
    def change(state):
        state[key] = value
    return change


def _truncate(name):
    def apply(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return apply


def _fifo(name):
    def apply(folder):
        (folder / name).unlink()
        os.mkfifo(folder / name)
    return apply


def _directory(name):
    def apply(folder):
        (folder / name).unlink()
        (folder / name).mkdir()
    return apply


def _manifest(key, value):
    return _edit_json("shortcut.json", lambda m: m["contents"].__setitem__(key, value))


def _symlink_out(folder):
    outside = folder.parent / "outside.safetensors"
    shutil.copy(folder / "heads.safetensors", outside)
    (folder / "heads.safetensors").unlink()
    (folder / "heads.safetensors").symlink_to(outside)


CORRUPTIONS = {
    "policy index out of range": (_edit_tensors("policy.safetensors", lambda s: s["memory_indices"].fill_(10**6)),
                                  "policy.safetensors"),
    "policy negative index": (_edit_tensors("policy.safetensors", lambda s: s["memory_indices"].fill_(-3)),
                              "policy.safetensors"),
    "policy wrong shape": (_edit_tensors("policy.safetensors", _set("weights", torch.zeros(2, 7))),
                           "policy.safetensors"),
    "policy NaN weights": (_edit_tensors("policy.safetensors", lambda s: s["weights"].fill_(float("nan"))),
                           "policy.safetensors"),
    "policy exit layer out of range": (_edit_tensors("policy.safetensors", _set("exit_layers", torch.tensor([1, 9]))),
                                       "policy.safetensors"),
    "policy field missing": (_edit_tensors("policy.safetensors", lambda s: s.pop("bias")), "policy.safetensors"),
    "heads shortlist outside vocabulary": (
        _edit_tensors("heads.safetensors", _set("shortlist", torch.tensor([5, VOCAB]))), "heads.safetensors"),
    "heads negative shortlist id": (_edit_tensors("heads.safetensors", _set("shortlist", torch.tensor([-1, 5]))),
                                    "heads.safetensors"),
    "heads wrong shape": (_edit_tensors("heads.safetensors", _set("translators.1.weight", torch.zeros(3, 3))),
                          "heads.safetensors"),
    "heads integer weights": (
        _edit_tensors("heads.safetensors", _set("translators.1.bias", torch.zeros(64, dtype=torch.long))),
        "heads.safetensors"),
    "heads truncated": (_truncate("heads.safetensors"), "heads.safetensors"),
    "heads FIFO": (_fifo("heads.safetensors"), "heads.safetensors"),
    "heads is a directory": (_directory("heads.safetensors"), "heads.safetensors"),
    "heads symlink out of the folder": (_symlink_out, "heads"),
    "replay prompt token outside vocabulary": (
        _edit_json("replay_log.json", lambda d: d["prompts"].append([VOCAB + 5])), "replay_log.json"),
    "replay negative token": (_edit_json("replay_log.json", lambda d: d["sequences"].append([3, -1])),
                              "replay_log.json"),
    "replay prompts not a list": (_edit_json("replay_log.json", lambda d: d.__setitem__("prompts", "abc")),
                                  "replay_log.json"),
    "replay FIFO": (_fifo("replay_log.json"), "replay_log.json"),
    "manifest path with ..": (_manifest("heads", "../heads.safetensors"), "contents.heads"),
    "manifest absolute path": (_manifest("policy", "/etc/passwd"), "contents.policy"),
    "manifest path not a string": (_manifest("replay_log", 5), "contents.replay_log"),
    "manifest truncated": (_truncate("shortcut.json"), "shortcut.json"),
    "manifest contents not an object": (_edit_json("shortcut.json", lambda m: m.__setitem__("contents", [])),
                                        "shortcut.json"),
    "config learn as a string": (_edit_json("config.json", lambda c: c["learning"].__setitem__("enabled", "no")),
                                 "learning.enabled"),
    "config negative consolidate_every": (
        _edit_json("config.json", lambda c: c["learning"].__setitem__("consolidate_every", -5)),
        "learning.consolidate_every"),
    "config bool as an int": (_edit_json("config.json", lambda c: c["lossless"].__setitem__("max_draft", True)),
                              "lossless.max_draft"),
    "config group not an object": (_edit_json("config.json", lambda c: c.__setitem__("fast", 0.5)), "fast"),
    # the flat config.json of earlier versions is checked as strictly
    "flat config learn as a string": (_edit_json("config.json", lambda c: c.clear() or c.update({"learn": "no"})),
                                      "learning.enabled"),
    "flat config bool as an int": (_edit_json("config.json", lambda c: c.clear() or c.update({"max_draft": True})),
                                   "lossless.max_draft"),
    "config float list": (_edit_json("config.json", lambda c: c.__setitem__("exit_layers", [1.5])), "exit_layers"),
    "config exit layer beyond the model": (_edit_json("config.json", lambda c: c.__setitem__("exit_layers", [9])),
                                           "config.json"),
    "config not an object": (_edit_json("config.json", lambda c: c.clear() or c.update({"x": 1}) or None), None),
    "draft odds unknown situation": (
        _edit_json("draft_odds.json", lambda d: d["lookup"].__setitem__("teleport|0|3", [1, 1])), "teleport|0|3"),
    "draft odds negative count": (
        _edit_json("draft_odds.json", lambda d: d["lookup"].__setitem__("memory|1|12", [-1, 2])), "memory|1|12"),
    "draft odds NaN count": (
        _edit_json("draft_odds.json", lambda d: d["lookup"].__setitem__("context|0|3", [float("nan"), 1])),
        "context|0|3"),
    "draft odds both counts zero": (
        _edit_json("draft_odds.json", lambda d: d["lookup"].__setitem__("context|0|6", [0, 0])), "context|0|6"),
    "draft odds exit beyond the model": (
        _edit_json("draft_odds.json", lambda d: d["shallow"].__setitem__("9|0.5", [1, 1])), "field 'shallow'"),
    "draft odds bucket not a bucket": (
        _edit_json("draft_odds.json", lambda d: d["shallow"].__setitem__("1|0.6", [1, 1])), "1|0.6"),
    "draft odds lookup not an object": (
        _edit_json("draft_odds.json", lambda d: d.__setitem__("lookup", [1, 2])), "field 'lookup'"),
    "draft odds FIFO": (_fifo("draft_odds.json"), "draft_odds.json"),
    "manifest draft odds path with ..": (_manifest("draft_odds", "../draft_odds.json"), "contents.draft_odds"),
    "observer weights truncated": (_truncate("observers/layer_0/sae_weights.safetensors"), "layer_0"),
    "observer config FIFO": (_fifo("observers/layer_0/cfg.json"), "cfg.json"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_skills_give_a_named_error_and_leave_the_model_unchanged(good_folder, tmp_path, case):
    corrupt, names = CORRUPTIONS[case]
    folder = tmp_path / "skills"
    shutil.copytree(good_folder, folder)
    corrupt(folder)
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if case == "config not an object":  # unknown keys are dropped with a warning: a valid, empty config
        shortcut.load(model, folder).remove()
        return
    with pytest.raises(SkillsFileError) as info:
        shortcut.load(model, folder)
    assert names in str(info.value), str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "generate" not in model.__dict__  # nothing of shortcut left on the model


def test_a_bad_adapter_leaves_the_model_unchanged(good_folder, tmp_path):
    """An adapter that does not fit the model is refused before peft merges anything."""
    folder = tmp_path / "skills"
    shutil.copytree(good_folder, folder)
    adapter = folder / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 7)},
              str(adapter / "adapter_model.safetensors"))
    _manifest("adapter", "adapter")(folder)
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SkillsFileError, match="adapter_model.safetensors"):
        shortcut.load(model, folder)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_merge_refuses_paths_outside_the_folders(good_folder, tmp_path, capsys):
    from shortcut import cli

    bad = tmp_path / "bad"
    shutil.copytree(good_folder, bad)
    _manifest("observer", "../../escape")(bad)
    out = tmp_path / "merged"
    assert cli.main(["merge", str(good_folder), str(bad), "-o", str(out)]) == 2
    assert "contents.observer" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path.parent / "escape").exists()


KILL = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import shortcut.atomic as atomic
    step, folder = int(sys.argv[1]), Path(sys.argv[2])
    calls = {"n": 0}
    real_rename = Path.rename
    def rename(self, target):
        calls["n"] += 1
        if calls["n"] == step:
            os._exit(9)  # killed before this rename
        return real_rename(self, target)
    Path.rename = rename
    def fill(tmp):
        (tmp / "shortcut.json").write_text("new")
        if step == 0:
            os._exit(9)  # killed while writing
    atomic.replace_folder(folder, fill)
    os._exit(9) if step == 3 else None  # killed after both renames, before the old copy is removed
""")


@pytest.mark.parametrize("step", [0, 1, 2, 3])
def test_a_kill_at_any_point_of_a_save_leaves_the_old_or_the_new_folder(tmp_path, step):
    folder = tmp_path / "skills"
    folder.mkdir()
    (folder / "shortcut.json").write_text("old")
    (folder / "heads.safetensors").write_text("old heads")
    done = subprocess.run([sys.executable, "-c", KILL, str(step), str(folder)], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode == 9
    from shortcut.atomic import recover

    recover(folder)
    text = (folder / "shortcut.json").read_text()
    assert text in ("old", "new")
    if text == "old":
        assert (folder / "heads.safetensors").read_text() == "old heads"  # the old folder, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["skills"]  # no leftover temporary or old folder
