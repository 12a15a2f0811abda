"""ShortcutConfig: every knob of a wrapped model, saved as json beside its skills."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODES = ("lossless", "fast")


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
        learn: practise while the model is used (generate / forward calls update skills).
        target_error_rate: fast mode's bound on tokens that differ from the full path.
        audit_fraction: fast mode's fraction of generate calls whose still-pending
            committed tokens are checked against the full path at the end (one batched
            forward); every catch-up mid-call checks its pending tokens as well.
        fast_confidence: fast mode commits an exit only where the exit head's confidence
            (shortlist softmax) is at least this; audits raise the bar while the measured
            error rate is above ``target_error_rate``.
        fast_practised_prompts_only: fast mode commits shallow tokens only in generate
            calls whose prompt was practised verbatim (in the replay log before the
            heads' latest re-fit); any other call decodes losslessly with the same
            skills. Deep layers read every prompt token, so a reworded prompt moves
            answers where the shallow path cannot see it (``docs/findings.md``). ``False``
            lets the bars alone decide.
        max_draft: most tokens one lossless draft may propose before verification; the
            draft length adapts below it (why 32: ``docs/findings.md``). In
            greedy calls a practised answer replayed with the prompt's prefill is bounded
            by the sequence memory's agreement rule instead (it costs no layer to make,
            and the prompt's forward verifies it).
        draft_confidence: a draft stops where the exit head's confidence falls below this.
        replay_sequences: lossless drafts first try the practised sequences (prompt and
            output of each plain greedy lossless call made while learning): where the
            text ends the way one went on, what followed is drafted without running any
            layer (``shortcut/learn/sequences.py``). In fast mode a plain greedy call whose
            prompt was practised commits its practised answer with no layer at all.
            ``False`` drafts and commits with the shallow path only.
        copy_drafts: lossless drafts may also copy from the call's own text (prompt and
            output so far): where the text ends the way an earlier part of it went on,
            what followed there is proposed, as practised sequences are (a span quoted
            from the prompt, a repeated name or line). No layer runs to make it.
        draft_accept_bar: a draft from the practised sequences or the text itself
            proposes a token only while the chance that verification accepts it, learned
            per situation from earlier verifications, is at least this
            (``shortcut/decode/draft_length.py``); lower drafts longer and wastes more
            compute on rejected tokens.
        shallow_drafts: lossless drafts that the practised sequences do not supply come
            from the shallow path (exit heads chosen by the policy). ``False``: only the
            practised sequences draft and every other token takes the full path, which
            measures what the sequence memory gives alone. Fast mode's commits are not
            affected.
        policy_threshold: exit where the policy predicts at least this agreement.
        consolidate_every: re-fit heads and policy after this many newly practised
            tokens during ordinary use (0: only at the end of ``practice`` rounds).
        fit_steps: optimiser steps of each exit-head re-fit during consolidation.
        seed: seed of every random choice shortcut makes (audits, shuffles).
    """

    mode: str = "lossless"
    observer_layers: list[int] | None = None
    exit_layers: list[int] | None = None
    learn: bool = True
    target_error_rate: float = 0.01
    audit_fraction: float = 0.05
    fast_confidence: float = 0.3
    fast_practised_prompts_only: bool = True
    max_draft: int = 32
    draft_confidence: float = 0.3
    replay_sequences: bool = True
    copy_drafts: bool = True
    draft_accept_bar: float = 0.3
    shallow_drafts: bool = True
    policy_threshold: float = 0.8
    consolidate_every: int = 1024
    fit_steps: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_types()
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        if not 0.0 <= self.target_error_rate < 1.0:
            raise ValueError(f"target_error_rate={self.target_error_rate} must be in [0, 1)")
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ValueError(f"audit_fraction={self.audit_fraction} must be in [0, 1]")
        if not 0.0 <= self.fast_confidence <= 1.0:
            raise ValueError(f"fast_confidence={self.fast_confidence} must be in [0, 1]")
        if self.max_draft < 1:
            raise ValueError(f"max_draft={self.max_draft} must be at least 1")
        if not 0.0 <= self.draft_confidence <= 1.0:
            raise ValueError(f"draft_confidence={self.draft_confidence} must be in [0, 1]")
        if not 0.0 < self.draft_accept_bar < 1.0:
            raise ValueError(f"draft_accept_bar={self.draft_accept_bar} must be in (0, 1)")
        if not 0.0 <= self.policy_threshold <= 1.0:
            raise ValueError(f"policy_threshold={self.policy_threshold} must be in [0, 1]")
        if self.consolidate_every < 0:
            raise ValueError(
                f"consolidate_every={self.consolidate_every} must be 0 (only after practice rounds) or more"
            )
        if self.fit_steps < 1:
            raise ValueError(f"fit_steps={self.fit_steps} must be at least 1")
        for name in ("observer_layers", "exit_layers"):
            value = getattr(self, name)
            if value is not None and not value:
                raise ValueError(f"{name}=[] names no layer; use None for the default")

    def _check_types(self) -> None:
        """Every field has its declared type (json from a skills folder is untrusted:
        ``"learn": "no"`` must not switch learning on). Ints are accepted for floats;
        bools are not ints here."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _FIELD_TYPES[f.name]
            if kind is bool:
                ok = type(value) is bool
            elif kind is int:
                ok = type(value) is int
            elif kind is float:
                ok = type(value) in (int, float) and math.isfinite(value)
            elif kind is str:
                ok = isinstance(value, str)
            else:  # optional list of layer indices
                ok = value is None or (isinstance(value, list) and all(type(v) is int for v in value))
            if not ok:
                names: dict[type | None, str] = {bool: "true or false", int: "an integer", float: "a finite number",
                                                 str: "a string"}
                expected = names.get(kind, "null or a list of integers")
                raise TypeError(f"{f.name}={value!r} must be {expected}")

    def resolved(self, num_layers: int) -> ShortcutConfig:
        """A copy with the ``None`` defaults filled in for a model of ``num_layers``
        layers, checked against that depth."""
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
        return dataclasses.replace(self, observer_layers=sorted(observers), exit_layers=sorted(exits))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a json-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShortcutConfig:
        """A config from ``to_dict()`` output; unknown keys are logged and ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown ShortcutConfig keys: %s", ", ".join(unknown))
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> None:
        """Write the config to ``path`` as json."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ShortcutConfig:
        """Read a config saved with :meth:`save`; ``ValueError`` if ``path`` holds no json object."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid json: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a json object, not {type(data).__name__}")
        return cls.from_dict(data)


_FIELD_TYPES: dict[str, type | None] = {
    "mode": str, "observer_layers": None, "exit_layers": None, "learn": bool, "target_error_rate": float,
    "audit_fraction": float, "fast_confidence": float, "fast_practised_prompts_only": bool, "max_draft": int,
    "draft_confidence": float, "replay_sequences": bool, "copy_drafts": bool,
    "draft_accept_bar": float, "shallow_drafts": bool, "policy_threshold": float,
    "consolidate_every": int, "fit_steps": int, "seed": int,
}
