"""ShortcutConfig: every knob of a wrapped model, saved as json beside its skills.

The knobs come in groups, one small dataclass for each thing they configure::

    ShortcutConfig(mode="fast", fast=FastConfig(target_error_rate=0.02))

Each group checks its own fields when it is made, so a config that exists is valid
(json from a skills folder is untrusted: ``"learn": "no"`` must not switch learning
on). :meth:`ShortcutConfig.from_dict` reads the nested form :meth:`ShortcutConfig.to_dict`
writes, and the flat form of folders written by earlier versions.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

logger = logging.getLogger(__name__)

MODES = ("lossless", "fast")

# What each declared field type accepts, and how a refusal says so. Ints pass for
# floats; bools are not ints here (``True`` is no draft length).
_KINDS: dict[str, tuple[Any, str]] = {
    "bool": (lambda v: type(v) is bool, "true or false"),
    "int": (lambda v: type(v) is int, "an integer"),
    "float": (lambda v: type(v) in (int, float) and math.isfinite(v), "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list[int] | None": (lambda v: v is None or (isinstance(v, list) and all(type(i) is int for i in v)),
                         "null or a list of integers"),
}


def check_types(obj: Any, prefix: str = "", *, skip: Collection[str] = ()) -> None:
    """``TypeError`` naming the first field of dataclass ``obj`` (other than those in
    ``skip``) whose value does not have its declared type, one of the kinds in
    ``_KINDS``; ``prefix`` goes before the field's name in the message (``"fast."``)."""
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        accepts, expected = _KINDS[str(f.type)]
        value = getattr(obj, f.name)
        if not accepts(value):
            raise TypeError(f"{prefix}{f.name}={value!r} must be {expected}")


def _unit(prefix: str, name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{prefix}{name}={value} must be in [0, 1]")


@dataclass
class LosslessConfig:
    """How lossless mode drafts (its output always equals the unwrapped model's).

    Attributes:
        max_draft: most tokens one draft may propose before verification; the draft
            length adapts below it (why 32: ``docs/findings.md``). In greedy calls the
            practised answer of a prompt practised verbatim, recalled with the prompt's
            prefill, is not bounded by it (it costs no layer to make, and the prompt's
            forward verifies it).
        draft_confidence: a draft stops where the exit head's confidence falls below this.
        recall_sequences: drafts first try the practised sequences (prompt and output of
            each plain greedy lossless call made while learning): where the text ends the
            way one went on, what followed is drafted without running any layer
            (``shortcut/learn/sequences.py``). In fast mode a plain greedy call whose
            prompt was practised commits its practised answer with no layer at all.
            ``False`` drafts and commits with the shallow path only.
        copy_drafts: drafts may also copy from the call's own text (prompt and output so
            far): where the text ends the way an earlier part of it went on, what
            followed there is proposed, as practised sequences are (a span quoted from
            the prompt, a repeated name or line). No layer runs to make it.
        accept_bar: a draft (recalled from the practised sequences, copied from the text,
            or made by the shallow path) proposes a token only while the chance that
            verification accepts it, learned per situation from earlier verifications,
            is at least this (``shortcut/decode/draft_length.py``); lower drafts longer
            and wastes more compute on rejected tokens.
        shallow_drafts: drafts that the practised sequences do not supply come from the
            shallow path (exit heads chosen by the policy). ``False``: only the practised
            sequences draft and every other token takes the full path, which measures what
            the sequence memory gives alone. Fast mode's commits are not affected.
        skip_drafts: drafts that the practised sequences do not supply come from the
            model itself with a learned set of its layers stepped over (self-speculation;
            the set and when it is worth drafting are learned per SAE situation from
            verification outcomes, ``shortcut/decode/skip_draft.py``) instead of the exit
            heads. Off by default: it pays only on models whose layers can be stepped over
            at over ~90% agreement (``docs/findings.md``).
    """

    KEY: ClassVar[str] = "lossless"

    max_draft: int = 32
    draft_confidence: float = 0.3
    recall_sequences: bool = True
    copy_drafts: bool = True
    accept_bar: float = 0.3
    shallow_drafts: bool = True
    skip_drafts: bool = False

    def __post_init__(self) -> None:
        prefix = f"{self.KEY}."
        check_types(self, prefix)
        if self.max_draft < 1:
            raise ValueError(f"{prefix}max_draft={self.max_draft} must be at least 1")
        _unit(prefix, "draft_confidence", self.draft_confidence)
        if not 0.0 < self.accept_bar < 1.0:
            raise ValueError(f"{prefix}accept_bar={self.accept_bar} must be in (0, 1)")


@dataclass
class FastConfig:
    """How fast mode commits shallow tokens (with a bounded error rate).

    Attributes:
        target_error_rate: bound on the share of tokens that differ from the full path.
        audit_fraction: fraction of generate calls whose still-pending committed tokens
            are checked against the full path at the end (one batched forward); every
            catch-up mid-call checks its pending tokens as well.
        confidence: an exit is committed only where the exit head's confidence
            (shortlist softmax) is at least this; audits raise the bar while the measured
            error rate is above ``target_error_rate``.
        practised_prompts_only: commit shallow tokens only in generate calls whose prompt
            was practised verbatim (in the prompt log before the heads' latest re-fit);
            any other call decodes losslessly with the same skills. Deep layers read every
            prompt token, so a reworded prompt moves answers where the shallow path cannot
            see it (``docs/findings.md``). ``False`` lets the bars alone decide.
    """

    KEY: ClassVar[str] = "fast"

    target_error_rate: float = 0.01
    audit_fraction: float = 0.05
    confidence: float = 0.3
    practised_prompts_only: bool = True

    def __post_init__(self) -> None:
        prefix = f"{self.KEY}."
        check_types(self, prefix)
        if not 0.0 <= self.target_error_rate < 1.0:
            raise ValueError(f"{prefix}target_error_rate={self.target_error_rate} must be in [0, 1)")
        _unit(prefix, "audit_fraction", self.audit_fraction)
        _unit(prefix, "confidence", self.confidence)


@dataclass
class LearningConfig:
    """How a wrapped model practises while it is used, and the learned policy's bar.

    Attributes:
        enabled: practise while the model is used (generate / forward calls update skills).
        policy_threshold: exit where the policy predicts at least this agreement.
        consolidate_every: re-fit heads and policy after this many newly practised
            tokens during ordinary use (0: only at the end of ``practice`` rounds).
        fit_steps: optimiser steps of each exit-head re-fit during consolidation.
    """

    KEY: ClassVar[str] = "learning"

    enabled: bool = True
    policy_threshold: float = 0.8
    consolidate_every: int = 1024
    fit_steps: int = 300

    def __post_init__(self) -> None:
        prefix = f"{self.KEY}."
        check_types(self, prefix)
        _unit(prefix, "policy_threshold", self.policy_threshold)
        if self.consolidate_every < 0:
            raise ValueError(f"{prefix}consolidate_every={self.consolidate_every} must be 0 "
                             "(only after practice rounds) or more")
        if self.fit_steps < 1:
            raise ValueError(f"{prefix}fit_steps={self.fit_steps} must be at least 1")


GROUPS: dict[str, type[LosslessConfig] | type[FastConfig] | type[LearningConfig]] = {
    "lossless": LosslessConfig, "fast": FastConfig, "learning": LearningConfig,
}

# The flat keys of config.json files written by earlier versions: key -> (group, field).
FLAT_KEYS: dict[str, tuple[str, str]] = {
    "max_draft": ("lossless", "max_draft"),
    "draft_confidence": ("lossless", "draft_confidence"),
    "replay_sequences": ("lossless", "recall_sequences"),
    "shallow_drafts": ("lossless", "shallow_drafts"),
    "target_error_rate": ("fast", "target_error_rate"),
    "audit_fraction": ("fast", "audit_fraction"),
    "fast_confidence": ("fast", "confidence"),
    "fast_practised_prompts_only": ("fast", "practised_prompts_only"),
    "learn": ("learning", "enabled"),
    "policy_threshold": ("learning", "policy_threshold"),
    "consolidate_every": ("learning", "consolidate_every"),
    "fit_steps": ("learning", "fit_steps"),
}


@dataclass
class ShortcutConfig:
    """Configuration of a wrapped model.

    Attributes:
        mode: ``"lossless"`` (shallow paths draft, the full path verifies; output equals
            the unwrapped model) or ``"fast"`` (shallow paths commit, error rate bounded).
        observer_layers: decoder layers whose output the SAE observers read. ``None``
            picks one early layer, ``num_layers // 12`` (layer 2 of 30 on SmolLM2: exits
            can start right above it, and an early layer's SAE explains more variance;
            ``docs/findings.md``).
        exit_layers: candidate early exits, each the number of decoder layers that run
            before the exit head reads the residual stream (``l`` means layers
            ``0..l-1`` run). Each must lie above the first observer layer, whose output
            the policy reads before it decides. ``None`` picks every fourth depth from
            just above the observer up to three quarters of the model.
        seed: seed of every random choice shortcut makes (audits, shuffles).
        prefix_cache_mb: most memory, in MiB, for the keys and values of text read while
            learning, so that a prompt beginning the way earlier text did (a chat
            template's system prompt, a task's instruction, an exact repeat, earlier turns
            of a conversation) skips the prefill of that beginning
            (``shortcut/decode/prefix.py``); 0 keeps nothing. In memory only, never saved.
        lossless: how lossless mode drafts (:class:`LosslessConfig`).
        fast: how fast mode commits (:class:`FastConfig`).
        learning: practice during use and the policy's bar (:class:`LearningConfig`).
    """

    mode: str = "lossless"
    observer_layers: list[int] | None = None
    exit_layers: list[int] | None = None
    seed: int = 0
    prefix_cache_mb: float = 512.0
    lossless: LosslessConfig = field(default_factory=LosslessConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)

    def __post_init__(self) -> None:
        check_types(self, skip=GROUPS)
        for name, group in GROUPS.items():
            value = getattr(self, name)
            if not isinstance(value, group):
                raise TypeError(f"{name}={value!r} must be a {group.__name__}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb={self.prefix_cache_mb} must be 0 (keep nothing) or more")
        for name in ("observer_layers", "exit_layers"):
            value = getattr(self, name)
            if value is not None and not value:
                raise ValueError(f"{name}=[] names no layer; use None for the default")

    def resolved(self, num_layers: int) -> ShortcutConfig:
        """A copy (groups included) with the ``None`` defaults filled in for a model of
        ``num_layers`` layers, checked against that depth."""
        observers = self.observer_layers
        if observers is None:
            observers = [max(1, num_layers // 12)]
        exits = self.exit_layers
        if exits is None:
            first = min(observers) + 1
            exits = list(range(first, max(first + 1, (3 * num_layers) // 4), 4))
        bad = [i for i in observers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"observer_layers={bad} out of range: the model has layers 0..{num_layers - 1}")
        bad = [e for e in exits if not 1 <= e < num_layers]
        if bad:
            raise ValueError(f"exit_layers={bad} out of range: an exit after l layers needs 1 <= l < {num_layers}")
        low = [e for e in exits if e <= min(observers)]
        if low:
            raise ValueError(
                f"exit_layers {low} do not lie above the first observer layer {min(observers)}: "
                "the policy reads the observer's output before it can decide to exit"
            )
        copied = copy.deepcopy(self)  # the handle's groups are its own: changing them leaves the caller's alone
        copied.observer_layers, copied.exit_layers = sorted(observers), sorted(exits)
        return copied

    def to_dict(self) -> dict[str, Any]:
        """The fields as a json-ready dict, each group a nested dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShortcutConfig:
        """A config from ``to_dict()`` output, or from the flat dict of earlier versions
        (``{"learn": false, "max_draft": 16, ...}``: each key goes to its group). Unknown
        keys, at the top or inside a group, are logged and ignored; a field given both
        flat and nested is refused."""
        top = {f.name for f in dataclasses.fields(cls)} - set(GROUPS)
        groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        unknown = []
        for key, value in data.items():
            if key in GROUPS:
                if not isinstance(value, dict):
                    raise TypeError(f"{key}={value!r} must be a json object")
                known = {f.name for f in dataclasses.fields(GROUPS[key])}
                unknown += [f"{key}.{k}" for k in value if k not in known]
                groups[key].update({k: v for k, v in value.items() if k in known})
            elif key not in top and key not in FLAT_KEYS:
                unknown.append(key)
        for key, (group, name) in FLAT_KEYS.items():
            if key in data:
                if name in groups[group]:
                    raise ValueError(f"{key} and {group}.{name} both given; keep {group}.{name}")
                groups[group][name] = data[key]
        if unknown:
            logger.warning("ignoring unknown ShortcutConfig keys: %s", ", ".join(sorted(unknown)))
        fields: dict[str, Any] = {k: v for k, v in data.items() if k in top}
        fields.update({name: GROUPS[name](**values) for name, values in groups.items()})
        return cls(**fields)

    def save(self, path: str | Path) -> None:
        """Write the config to ``path`` as json (the nested form)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ShortcutConfig:
        """Read a config saved with :meth:`save` (or by an earlier version); ``ValueError``
        if ``path`` holds no json object."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid json: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a json object, not {type(data).__name__}")
        return cls.from_dict(data)
