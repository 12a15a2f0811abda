"""How many tokens a lookup draft proposes, learned from what verification accepted.

A lookup draft (a practised sequence, or the current text itself) costs no layer to make,
but every proposed token costs a position in the verification forward, and a rejected
one is compute spent for nothing. How far such a draft goes on being right depends on
the situation: a long agreement with a practised sequence is usually a rejoined
practised stretch; the same template followed by new content (a practised task on new
input) agrees for a few structure tokens and then leaves it.

So each situation keeps a continuation probability ``p``, the chance that a drafted
token is accepted given that the one before it was, estimated from verification
outcomes as ``accepted / (accepted + rejections)`` (a geometric run length; a draft
that was accepted to its end, or cut by the end of the call, adds no rejection). A draft
then proposes the tokens whose chance of being reached, ``p ** i``, is at least
``accept_bar``: the expected waste per proposed token stays below ``1 - accept_bar``.
A situation below the bar still proposes one token every ``EXPLORE``-th time it comes
up, so an estimate that was too low can recover.

A situation is the draft's source (``"memory"`` or ``"context"``), whether the draft
starts the answer (right after the prompt) or continues it, and the agreement bucket
(how many tokens of the text matched where the continuation was found).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SOURCES = ("memory", "context")
AGREEMENT_BUCKETS = (3, 6, 12, 24, 48)  # lower bounds of the agreement buckets
PRIOR_WEIGHT = 2.0  # rejections the prior counts as; a few outcomes outweigh it
EXPLORE = 8  # a situation below the bar probes one token this often


def bucket(agreement: int) -> int:
    """The lower bound of ``agreement``'s bucket."""
    return max((b for b in AGREEMENT_BUCKETS if agreement >= b), default=AGREEMENT_BUCKETS[0])


def prior(agreement_bucket: int) -> float:
    """Continuation probability before any outcome: a coincidental short match is as
    likely wrong as right; a long one is a rejoined stretch (about what the fixed rule
    that came before proposed: a probe of two below 12 tokens, then twice the agreement)."""
    return {3: 0.6, 6: 0.6, 12: 0.9, 24: 0.95, 48: 0.97}[agreement_bucket]


@dataclass
class DraftLengths:
    """Continuation probabilities per situation, and the draft lengths they give.

    Args:
        accept_bar: a drafted token is proposed while its chance of being accepted is at
            least this (0 < bar < 1; lower drafts longer and wastes more).
    """

    accept_bar: float = 0.3
    counts: dict[tuple[str, bool, int], list[float]] = field(default_factory=dict)
    _declined: dict[tuple[str, bool, int], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.accept_bar < 1.0:
            raise ValueError(f"accept_bar={self.accept_bar} must be in (0, 1)")

    def _counts(self, source: str, opening: bool, agreement: int) -> list[float]:
        if source not in SOURCES:
            raise ValueError(f"source={source!r} is not one of {SOURCES}")
        key = (source, opening, bucket(agreement))
        if key not in self.counts:
            p = prior(key[2])
            self.counts[key] = [PRIOR_WEIGHT * p / (1.0 - p), PRIOR_WEIGHT]
        return self.counts[key]

    def probability(self, source: str, opening: bool, agreement: int) -> float:
        """The continuation probability of a draft in this situation."""
        accepted, rejections = self._counts(source, opening, agreement)
        return accepted / (accepted + rejections)

    def length(self, source: str, opening: bool, agreement: int) -> int:
        """Tokens to propose in this situation: those reached with probability at least
        ``accept_bar``; 0 when not even the first one is (1 every ``EXPLORE``-th time)."""
        p = self.probability(source, opening, agreement)
        if p < self.accept_bar:
            key = (source, opening, bucket(agreement))
            self._declined[key] = (self._declined.get(key, 0) + 1) % EXPLORE
            return int(self._declined[key] == 0)
        if p >= 1.0:
            return 1 << 20
        return int(math.log(self.accept_bar) / math.log(p))

    def update(self, source: str, opening: bool, agreement: int, accepted: int, rejected: bool) -> None:
        """Record a verified draft: ``accepted`` tokens, then a rejection or not."""
        counts = self._counts(source, opening, agreement)
        counts[0] += accepted
        counts[1] += float(rejected)

    def to_dict(self) -> dict[str, list[float]]:
        """Json-ready counts (``"source|opening|bucket"`` -> [accepted, rejections])."""
        return {f"{s}|{int(o)}|{b}": list(v) for (s, o, b), v in self.counts.items()}

    def load_dict(self, data: object) -> None:
        """Take the counts of :meth:`to_dict` (replacing those of the same situations).
        Raises ``ValueError`` naming the first bad key or value; nothing is taken then."""
        counts = {}
        for key, value in _items(data):
            parts = key.split("|")
            if (len(parts) != 3 or parts[0] not in SOURCES or parts[1] not in ("0", "1")
                    or not parts[2].isdigit() or int(parts[2]) not in AGREEMENT_BUCKETS):
                raise ValueError(f"situation {key!r} is not 'source|opening|bucket' with source in {SOURCES}, "
                                 f"opening 0 or 1 and bucket in {AGREEMENT_BUCKETS}")
            counts[(parts[0], parts[1] == "1", int(parts[2]))] = _pair(key, value)
        self.counts.update(counts)


CONFIDENCE_BUCKETS = (0.0, 0.5, 0.7, 0.85, 0.95)  # lower bounds of the head-confidence buckets
SHALLOW_PRIOR_TOKENS = 4.0  # verified tokens the prior of a shallow situation counts as


def confidence_bucket(confidence: float) -> float:
    """The lower bound of ``confidence``'s bucket."""
    return max(b for b in CONFIDENCE_BUCKETS if confidence >= b) if confidence >= 0.0 else 0.0


@dataclass
class ShallowOdds:
    """The chance that a token the shallow path drafts is accepted, per situation, and
    whether it is worth proposing.

    A shallow token is not free like a lookup token: it costs the layers under its exit
    and an SAE encode to make, and a position in the verification forward. Where the
    exit heads are often wrong (a practised task's structure is familiar, its new content
    is not), proposing burns that compute. So each situation, the exit layer and the
    exit head's confidence bucket, keeps the same estimate as a lookup situation
    (``accepted / (accepted + rejections)`` over verified shallow tokens, starting from a
    prior of a few tokens at about the bucket's confidence), and a draft proposes its next token only
    while the chance of reaching it, the product of its tokens' estimates, pays for making
    it: it stays at least the token's cost, what its draft step reads relative to a plain
    step (``costs`` per exit layer, from
    :func:`~shortcut.decode.accounting.shallow_step_costs`), and at least ``accept_bar``.
    An accepted token saves one plain step, so below its cost a proposal loses time on
    average. A token that would fall below the bar ends the draft; as the first
    token of a draft it simply goes on through every layer (plain decoding's step). A
    situation below the bar is still proposed as a draft's first token every
    ``EXPLORE``-th time it comes up, so an estimate that was too low can recover.
    """

    accept_bar: float = 0.3
    costs: dict[int, float] = field(default_factory=dict)  # exit layer -> a draft step's cost in plain steps
    counts: dict[tuple[int, float], list[float]] = field(default_factory=dict)
    _declined: dict[tuple[int, float], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.accept_bar < 1.0:
            raise ValueError(f"accept_bar={self.accept_bar} must be in (0, 1)")
        bad = {layer: cost for layer, cost in self.costs.items() if not 0.0 <= cost}
        if bad:
            raise ValueError(f"costs {bad} must be >= 0 (a draft step's share of a plain step)")

    def bar(self, exit_layer: int) -> float:
        """The chance of being reached that a token drafted at ``exit_layer`` needs."""
        return max(self.accept_bar, self.costs.get(exit_layer, 0.0))

    def _counts(self, exit_layer: int, confidence: float) -> list[float]:
        key = (exit_layer, confidence_bucket(confidence))
        if key not in self.counts:
            p = min(0.95, max(0.3, key[1] + 0.05))
            self.counts[key] = [SHALLOW_PRIOR_TOKENS * p, SHALLOW_PRIOR_TOKENS * (1.0 - p)]
        return self.counts[key]

    def probability(self, exit_layer: int, confidence: float) -> float:
        """The chance that a token drafted at ``exit_layer`` with this head confidence is
        accepted, given that the draft's tokens before it were."""
        accepted, rejections = self._counts(exit_layer, confidence)
        return accepted / (accepted + rejections)

    def worth(self, exit_layer: int, confidence: float, reach: float = 1.0) -> bool:
        """Whether to propose a token drafted in this situation after earlier tokens whose
        chances multiply to ``reach`` (1.0: the draft's first token)."""
        if reach * self.probability(exit_layer, confidence) >= self.bar(exit_layer):
            return True
        if reach < 1.0:
            return False
        key = (exit_layer, confidence_bucket(confidence))
        self._declined[key] = (self._declined.get(key, 0) + 1) % EXPLORE
        return self._declined[key] == 0

    def to_dict(self) -> dict[str, list[float]]:
        """Json-ready counts (``"exit_layer|confidence_bucket"`` -> [accepted, rejections])."""
        return {f"{layer}|{b}": list(v) for (layer, b), v in self.counts.items()}

    def load_dict(self, data: object, num_layers: int) -> None:
        """Take the counts of :meth:`to_dict` for a model of ``num_layers`` layers.
        Raises ``ValueError`` naming the first bad key or value; nothing is taken then."""
        counts = {}
        for key, value in _items(data):
            parts = key.split("|")
            try:
                layer, confidence = int(parts[0]), float(parts[1])
            except (ValueError, IndexError):
                layer, confidence = -1, -1.0
            if len(parts) != 2 or not 0 < layer < num_layers or confidence not in CONFIDENCE_BUCKETS:
                raise ValueError(f"situation {key!r} is not 'exit_layer|confidence_bucket' with an exit layer in "
                                 f"1..{num_layers - 1} and a bucket in {CONFIDENCE_BUCKETS}")
            counts[(layer, confidence)] = _pair(key, value)
        self.counts.update(counts)

    def update(self, situations: list[tuple[int, float]], accepted: int, rejected: bool) -> None:
        """Record a verified shallow draft whose tokens were made in ``situations``:
        the first ``accepted`` were accepted, the next was rejected if ``rejected``."""
        for situation in situations[:accepted]:
            self._counts(*situation)[0] += 1.0
        if rejected and accepted < len(situations):
            self._counts(*situations[accepted])[1] += 1.0


def _items(data: object) -> list[tuple[str, object]]:
    if not isinstance(data, dict):
        raise ValueError(f"counts must be a json object of situations, not {type(data).__name__}")
    return list(data.items())


def _pair(key: str, value: object) -> list[float]:
    """``[accepted, rejections]``: two finite numbers >= 0, not both 0 (a chance needs one)."""
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                       for v in value) or value[0] + value[1] <= 0):
        raise ValueError(f"counts of {key!r} must be [accepted, rejections], two finite numbers >= 0 with a "
                         f"positive sum, got {value!r}")
    return [float(value[0]), float(value[1])]
