"""ShortcutConfig's groups: nested json round trip, the flat form of earlier versions,
and type and range checks that name the field."""

from __future__ import annotations

import json
import logging

import pytest

from shortcut import FastConfig, LearningConfig, LosslessConfig, ShortcutConfig

# A config.json as versions before the groups wrote it (every field flat).
FLAT = {
    "mode": "fast", "observer_layers": [1], "exit_layers": [2, 3], "learn": False, "target_error_rate": 0.02,
    "audit_fraction": 0.5, "fast_confidence": 0.4, "fast_practised_prompts_only": False, "max_draft": 8,
    "draft_confidence": 0.2, "replay_sequences": False, "shallow_drafts": False, "policy_threshold": 0.6,
    "consolidate_every": 0, "fit_steps": 50, "seed": 7,
}
GROUPED = ShortcutConfig(
    mode="fast", observer_layers=[1], exit_layers=[2, 3], seed=7,
    lossless=LosslessConfig(max_draft=8, draft_confidence=0.2, recall_sequences=False, shallow_drafts=False),
    fast=FastConfig(target_error_rate=0.02, audit_fraction=0.5, confidence=0.4, practised_prompts_only=False),
    learning=LearningConfig(enabled=False, policy_threshold=0.6, consolidate_every=0, fit_steps=50),
)


def test_nested_round_trip(tmp_path):
    path = tmp_path / "config.json"
    GROUPED.save(path)
    data = json.loads(path.read_text())
    assert data["fast"] == {"target_error_rate": 0.02, "audit_fraction": 0.5, "confidence": 0.4,
                            "practised_prompts_only": False}
    assert data["learning"]["enabled"] is False and "learn" not in data and "max_draft" not in data
    assert ShortcutConfig.load(path) == GROUPED
    assert ShortcutConfig.from_dict(ShortcutConfig().to_dict()) == ShortcutConfig()


def test_flat_form_of_earlier_versions_loads_into_its_groups(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(FLAT))
    assert ShortcutConfig.load(path) == GROUPED
    partial = ShortcutConfig.from_dict({"learn": False, "max_draft": 4})  # the rest keeps its defaults
    assert partial == ShortcutConfig(lossless=LosslessConfig(max_draft=4), learning=LearningConfig(enabled=False))


def test_unknown_keys_are_logged_and_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="shortcut.config"):
        config = ShortcutConfig.from_dict({"colour": "blue", "fast": {"confidence": 0.5, "speed": 2}})
    assert config == ShortcutConfig(fast=FastConfig(confidence=0.5))
    assert "colour" in caplog.text and "fast.speed" in caplog.text


@pytest.mark.parametrize("data, match", [
    ({"learning": {"enabled": "no"}}, r"learning.enabled='no' must be true or false"),
    ({"learn": "no"}, r"learning.enabled='no' must be true or false"),  # flat
    ({"lossless": {"max_draft": True}}, r"lossless.max_draft=True must be an integer"),
    ({"fast": {"confidence": float("nan")}}, r"fast.confidence=nan must be a finite number"),
    ({"fast": [0.5]}, r"fast=\[0.5\] must be a json object"),
    ({"exit_layers": [1.5]}, r"exit_layers=\[1.5\] must be null or a list of integers"),
])
def test_bad_types_are_refused_naming_the_field(data, match):
    with pytest.raises(TypeError, match=match):
        ShortcutConfig.from_dict(data)


def test_ranges_are_checked_by_each_group():
    with pytest.raises(ValueError, match=r"fast.target_error_rate=1.0 must be in \[0, 1\)"):
        FastConfig(target_error_rate=1.0)
    with pytest.raises(ValueError, match="lossless.max_draft=0 must be at least 1"):
        LosslessConfig(max_draft=0)
    with pytest.raises(ValueError, match="learning.consolidate_every=-1 must be 0"):
        LearningConfig(consolidate_every=-1)
    with pytest.raises(TypeError, match="fast=.* must be a FastConfig"):
        ShortcutConfig(fast={"confidence": 0.5})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_draft and lossless.max_draft both given"):
        ShortcutConfig.from_dict({"max_draft": 4, "lossless": {"max_draft": 8}})


def test_resolved_copies_the_groups():
    config = ShortcutConfig()
    resolved = config.resolved(8)
    resolved.fast.confidence = 0.9  # the handle's copy changes; the caller's does not
    assert config.fast.confidence == 0.3
