"""Skip drafts: the model itself with a learned set of its layers stepped over drafts the
next tokens (self-speculation, as SWIFT and CLaSp do), and the full model verifies them
like any other draft, so the output stays the full model's.

Which layers. Each layer's *influence* is ``1 - cos(input, output)`` of the residual
stream at the newest token (ShortGPT's block influence), averaged over the first
``MEASURE_TOKENS`` tokens that ran every layer; no skip draft before ``WARMUP_TOKENS``
of them. A skip set of depth ``m`` steps over the ``m`` least influential layers from
the signature layer (the observer reads the residual stream before any layer is
stepped over) up to, not including, the last layer.

How many, per situation. The situation is the most active SAE feature of the token's
signature (one situation for all tokens without an observer). For each depth, the
chance that a token drafted with that many layers stepped over is accepted is learned
from verification outcomes, ``accepted / (accepted + rejections)`` as in
:class:`~shortcut.decode.draft_length.ShallowOdds`, per situation, with the estimate over
all situations as its prior. A drafted token costs ``(L - m) / L`` of a plain step to
make plus ``VERIFY_COST`` for its place in the verification forward, and saves a step
when it is reached and accepted. Each token takes the depth with the largest expected
saving (its chance times the chance that the draft's earlier tokens were accepted,
minus its cost); where none is positive it runs every layer: as a draft's first token
that is plain decoding's step, and it needs no verification; a later token ends the
draft. A situation where no depth pays still drafts its first token every
``EXPLORE``-th time, so an estimate that was too low can recover.

Skipped layers write keys/values projected from the hidden state that reached them
(``propagate_kv``), so draft tokens may step over different layers; everything a
draft wrote is cropped before verification.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..observe import Observer
from .draft_length import EXPLORE, SHALLOW_PRIOR_TOKENS
from .lossless import SequenceInputs, drafting, full_logits
from .stats import DecodeStats

SKIP_SHARES = (0.2, 0.3, 0.4, 0.5)  # shares of the model's layers a skip set steps over
# Steps a draft token adds to its verification forward: a verification of a 4-5 token
# draft costs about 1.5-1.7 single-token steps on CPU (benchmarks/bench_verify.py).
VERIFY_COST = 0.15
PRIOR_TOKENS = SHALLOW_PRIOR_TOKENS  # verified tokens a prior counts as (as for shallow tokens)
PRIOR_CHANCE = 0.9  # optimistic: every depth is tried before its estimate settles
WARMUP_TOKENS = 16  # tokens measured on the full path before the first skip draft
MEASURE_TOKENS = 256  # influences settle: later tokens are not measured (it costs a little per token)
ALL = -1  # the situation key of the estimate over all situations


@dataclass
class SkipPlan:
    """Layer influences and per-situation chances of skip-drafted tokens (module doc).

    ``first_layer``: the first layer a skip set may contain; layers before it always run.
    """

    num_layers: int
    first_layer: int
    influence: torch.Tensor = field(init=False)  # summed 1 - cos per layer
    measured: int = 0  # tokens whose influences were summed
    counts: dict[tuple[int, int], list[float]] = field(default_factory=dict)
    _declined: dict[int, int] = field(default_factory=dict, repr=False)
    _sets: dict[int, frozenset[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.first_layer < self.num_layers:
            raise ValueError(f"first_layer={self.first_layer} is out of range: the model has layers "
                             f"0..{self.num_layers - 1}")
        self.influence = torch.zeros(self.num_layers)

    @property
    def warm(self) -> bool:
        """Whether enough tokens were measured to rank the layers."""
        return self.measured >= WARMUP_TOKENS

    @property
    def eligible(self) -> list[int]:
        """Layers a skip set may step over (never the last)."""
        return list(range(self.first_layer, self.num_layers - 1))

    @property
    def depths(self) -> list[int]:
        """The skip-set sizes to choose from, ascending."""
        most = len(self.eligible)
        return sorted({min(most, max(1, round(share * self.num_layers))) for share in SKIP_SHARES} - {0}) \
            if most else []

    def measure(self, inputs: list[torch.Tensor]) -> None:
        """Add one token's influences from the residuals ``inputs`` [d] that entered each
        layer in turn (every layer ran)."""
        if len(inputs) != self.num_layers or self.measured >= MEASURE_TOKENS:
            return
        states = torch.stack([h.float() for h in inputs])
        cos = torch.nn.functional.cosine_similarity(states[:-1], states[1:], dim=-1)
        self.influence[:-1] += 1.0 - cos
        self.measured += 1
        self._sets.clear()

    def skip_set(self, depth: int) -> frozenset[int]:
        """The ``depth`` least influential eligible layers."""
        if depth not in self._sets:
            ranked = sorted(self.eligible, key=lambda i: (float(self.influence[i]), i))
            self._sets[depth] = frozenset(ranked[:depth])
        return self._sets[depth]

    def cost(self, depth: int) -> float:
        """Plain steps a token drafted at ``depth`` costs to make and verify."""
        return (self.num_layers - depth) / self.num_layers + VERIFY_COST

    def _counts(self, situation: int, depth: int) -> list[float]:
        key = (situation, depth)
        if key not in self.counts:
            self.counts[key] = [PRIOR_TOKENS * PRIOR_CHANCE, PRIOR_TOKENS * (1.0 - PRIOR_CHANCE)] \
                if situation == ALL else [0.0, 0.0]
        return self.counts[key]

    def probability(self, situation: int, depth: int) -> float:
        """The chance that a token drafted at ``depth`` in ``situation`` is accepted,
        given that the draft's earlier tokens were."""
        pooled = self._counts(ALL, depth)
        prior = pooled[0] / (pooled[0] + pooled[1])
        accepted, rejections = self.counts.get((situation, depth), (0.0, 0.0)) if situation != ALL else (0.0, 0.0)
        return (accepted + PRIOR_TOKENS * prior) / (accepted + rejections + PRIOR_TOKENS)

    def choose(self, situation: int, reach: float = 1.0) -> int | None:
        """The depth to draft the next token at after earlier draft tokens whose chances
        multiply to ``reach`` (1.0: the draft's first token); ``None``: run every layer."""
        if not self.warm or not self.depths:
            return None
        gains = [(reach * self.probability(situation, d) - self.cost(d), d) for d in self.depths]
        gain, depth = max(gains)
        if gain > 0.0:
            return depth
        if reach < 1.0:
            return None
        self._declined[situation] = (self._declined.get(situation, 0) + 1) % EXPLORE
        return depth if self._declined[situation] == 0 else None

    def update(self, situations: list[tuple[int, int]], accepted: int, rejected: bool) -> None:
        """Record a verified skip draft whose tokens were made in ``situations``
        (situation, depth): the first ``accepted`` were accepted, the next was rejected if
        ``rejected``."""
        for situation, depth in situations[:accepted]:
            self._counts(situation, depth)[0] += 1.0
            self._counts(ALL, depth)[0] += 1.0
        if rejected and accepted < len(situations):
            situation, depth = situations[accepted]
            self._counts(situation, depth)[1] += 1.0
            self._counts(ALL, depth)[1] += 1.0

    def forget_situations(self) -> None:
        """Drop the per-situation estimates (the observer's features changed); the
        influences and the estimates over all situations stay."""
        self.counts = {key: value for key, value in self.counts.items() if key[0] == ALL}
        self._declined.clear()


class SkipStep:
    """Layer policy of one skip-drafted token: run up to the decision layer, read the
    situation there, then step over the chosen skip set (or run every layer)."""

    propagate_kv = True

    def __init__(self, plan: SkipPlan, observer: Observer | None) -> None:
        self.plan = plan
        self.observer = observer
        self.reach = 1.0
        self.runs_full = True  # a declined token runs every layer (else its forward stops there)
        self.begin(None)

    def begin(self, input_ids: torch.Tensor | None) -> None:
        """Start a forward: nothing decided yet."""
        self.situation = ALL
        self.depth: int | None = None
        self.decided = False
        self.skip: frozenset[int] = frozenset()
        self.inputs: list[torch.Tensor] = []  # the newest token's residual entering each layer

    def should_run(self, layer_idx: int, hidden: torch.Tensor) -> bool:
        """Decide at ``plan.first_layer``; afterwards run what the decision says."""
        if layer_idx == self.plan.first_layer:
            if self.observer is not None:
                self.situation = int(self.observer.encode(hidden[:, -1]).indices[0, 0])
            self.depth = self.plan.choose(self.situation, self.reach)
            self.skip = self.plan.skip_set(self.depth) if self.depth is not None else frozenset()
            self.decided = True
        if self.decided and self.depth is None and not self.runs_full:
            self.propagate_kv = False  # cropped right after: nothing to keep
            return False
        self.propagate_kv = True
        if self.depth is None and self.plan.measured < MEASURE_TOKENS:
            self.inputs.append(hidden[0, -1].detach())
        return layer_idx not in self.skip


class SkipDrafter:
    """Drafts with skip sets (module doc) for a lossless decoding loop."""

    def __init__(self, model: Any, runtime: Any, plan: SkipPlan, observer: Observer | None, stats: DecodeStats,
                 on_full_path: Callable[[torch.Tensor], None] | None = None) -> None:
        self.model = model
        self.base = getattr(model, model.base_model_prefix)
        self.runtime = runtime
        self.plan = plan
        self.step = SkipStep(plan, observer)
        self.stats = stats
        self.on_full_path = on_full_path
        self.situations: list[tuple[int, int]] = []  # the latest draft's tokens'
        self.full_logits: torch.Tensor | None = None

    @torch.no_grad()
    def draft(self, input_ids: torch.Tensor, cache: Any, budget: int, stop_ids: frozenset[int],
              inputs: SequenceInputs) -> list[torch.Tensor]:
        """Up to ``budget`` tokens after ``input_ids`` [1, T] (its last token not in
        ``cache`` yet). When the first token runs every layer, ``full_logits`` holds its
        logits and the cache keeps it; otherwise the cache is left as it was."""
        self.situations, self.full_logits = [], None
        drafted: list[torch.Tensor] = []
        token = input_ids[:, -1:]
        position = input_ids.shape[1] - 1
        self.step.reach, self.step.runs_full = 1.0, True
        with drafting(self.runtime, self.step, cache) as keep:
            for index in range(budget):
                self.step.begin(token)  # the runtime begins only the LM's own forwards
                hidden = self.base(input_ids=token, cache=cache, use_cache=True,
                                   **inputs(position, position + 1, token.device)).last_hidden_state
                self.stats.draft_forwards += 1
                self.stats.observer_encodes += self.step.observer is not None
                self.step.runs_full = False
                if self.step.depth is None:
                    if index == 0:  # plain decoding's step: keep it, nothing to verify
                        self.plan.measure(self.step.inputs)
                        self.stats.full_path_steps += 1
                        self.stats.draft_declined += 1
                        self.full_logits = full_logits(self.model, hidden[:, -1:])
                        keep()
                        if self.on_full_path is not None:
                            self.on_full_path(self.full_logits)
                    else:
                        self.stats.draft_declined += 1
                    break
                token = full_logits(self.model, hidden[:, -1:]).argmax(-1)
                drafted.append(token)
                self.situations.append((self.step.situation, self.step.depth))
                self.step.reach *= self.plan.probability(self.step.situation, self.step.depth)
                if int(token) in stop_ids:  # nothing after the end is ever accepted
                    break
                position += 1
        self.stats.skip_drafted += len(drafted)
        return drafted

    def record(self, accepted: int, rejected: bool) -> None:
        """Learn from the verification of the latest draft."""
        self.stats.skip_accepted += accepted
        self.plan.update(self.situations, accepted, rejected)
