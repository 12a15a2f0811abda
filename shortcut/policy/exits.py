"""When to leave the forward pass early, learned with a local rule.

For each candidate exit layer ``l`` the policy predicts "the exit head at ``l`` will
agree with the full model here" from the SAE signature of the current token:

    p_l = sigmoid(b_l + sum_f a_f w_lf)        a = signature values, L2-normalised

and after the full path has verified the token (outcome ``y`` in {0, 1}) every active
feature moves by the three-factor delta rule

    w_lf += lr * a_f * (y - p_l),   b_l += lr_bias * (y - p_l)

(feature activity x outcome error; no gradient touches the language model).

Telling familiar from novel. Practice mostly shows the rule successes, so on its own it
learns a high base rate and trusts every token. The policy therefore also keeps a
memory of the signatures of practised tokens (a sparse matrix, like an episodic store)
and a token counts as familiar only if its signature's cosine similarity to the nearest
remembered one reaches ``min_familiarity``. The policy exits at the shallowest layer
whose prediction reaches the threshold, for familiar tokens only.

Sequences, not snapshots. The memory keeps signatures in the order they were practised,
so it also knows which signature followed which. When the decoding loop passes the
memory rows the previous token matched (``after``), a token is familiar only if it
resembles a signature that *followed* one of them: it continues a practised sequence.
On text that only resembles the practised one (a reworded prompt whose answer diverges)
single signatures still look familiar where the sequence has already left the practised
path. (What each gate passes on SmolLM2: ``docs/findings.md``.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..observe import Signature


@dataclass
class PolicyDecision:
    """The chosen exit layer (``None``: full path), every layer's prediction, the
    signature's familiarity (cosine similarity to the nearest remembered one; with a
    previous token's matches, the nearest one that followed them) and ``rows``, the
    memory rows this signature matches (what the next token's decision continues from)."""

    exit_layer: int | None
    probabilities: torch.Tensor
    familiarity: float = 0.0
    rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


class ExitPolicy:
    """Delta-rule predictors of exit-head agreement, one per candidate exit layer.

    Args:
        exit_layers: candidate exit layers, ascending.
        d_sae: number of SAE features of the observer the signatures come from.
        threshold: exit when the predicted agreement reaches this.
        lr: learning rate of the feature weights; lr_bias that of the base rates.
        prior: initial logit of every base rate (sigmoid(-3) = 5%: unpractised means full path).
        min_familiarity: cosine similarity to the nearest remembered signature needed
            before any exit is considered.
        memory_size: most signatures remembered (oldest forgotten first).
    """

    def __init__(self, exit_layers: list[int], d_sae: int, *, threshold: float = 0.8,
                 lr: float = 1.0, lr_bias: float = 0.05, prior: float = -3.0,
                 min_familiarity: float = 0.9, memory_size: int = 16384) -> None:
        if not exit_layers or sorted(exit_layers) != list(exit_layers):
            raise ValueError(f"exit_layers must be a non-empty ascending list, got {exit_layers}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold={threshold} must be in (0, 1)")
        self.exit_layers = list(exit_layers)
        self.d_sae = d_sae
        self.min_familiarity = min_familiarity
        self.memory_size = memory_size
        self.memory_indices = torch.zeros(0, 0, dtype=torch.long)
        self.memory_values = torch.zeros(0, 0)
        # Id of memory row 0. Rows are named by ids that never repeat (forgetting the
        # oldest rows or the whole memory moves it on), so the rows a decoding loop holds
        # from an earlier token still name the same signatures after the memory changed.
        self.memory_start = 0
        self._memory_matrix: torch.Tensor | None = None
        self.threshold = threshold
        self.lr = lr
        self.lr_bias = lr_bias
        self.weights = torch.zeros(len(exit_layers), d_sae)
        self.bias = torch.full((len(exit_layers),), float(prior))
        # Evidence, for reports and merging: outcomes seen and agreements, per layer.
        self.trials = torch.zeros(len(exit_layers))
        self.agreements = torch.zeros(len(exit_layers))
        # Decisions taken at decode time: one count per exit layer, the last for the
        # full path (usage statistics: kept when the predictors are re-learned).
        self.decisions = torch.zeros(len(exit_layers) + 1)
        # How often each feature was active at a verified token (familiarity).
        self.feature_counts = torch.zeros(d_sae)

    @staticmethod
    def _activity(sig: Signature) -> tuple[torch.Tensor, torch.Tensor]:
        values = sig.values.float()
        norm = values.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return sig.indices, values / norm

    @torch.no_grad()
    def probabilities(self, sig: Signature) -> torch.Tensor:
        """Predicted agreement per exit layer, shape ``[..., n_exit]``."""
        indices, activity = self._activity(sig)
        # weights[:, indices] -> [n_exit, ..., k]; weighted sum over k.
        logits = (self.weights[:, indices] * activity).sum(-1)
        logits = logits.movedim(0, -1) + self.bias
        return torch.sigmoid(logits)

    # -- familiarity ----------------------------------------------------------------
    @torch.no_grad()
    def remember(self, sig: Signature) -> None:
        """Store the (L2-normalised) signatures of practised tokens."""
        indices, activity = self._activity(sig)
        indices, activity = indices.reshape(-1, indices.shape[-1]), activity.reshape(-1, activity.shape[-1])
        if self.memory_indices.numel() == 0:
            self.memory_indices = indices[-self.memory_size:].clone()
            self.memory_values = activity[-self.memory_size:].clone()
            self.memory_start += max(0, indices.shape[0] - self.memory_size)
        else:
            self.memory_start += max(0, self.memory_len + indices.shape[0] - self.memory_size)
            self.memory_indices = torch.cat([self.memory_indices, indices])[-self.memory_size:]
            self.memory_values = torch.cat([self.memory_values, activity])[-self.memory_size:]
        self._memory_matrix = None

    def _forget_all(self) -> None:
        self.memory_start += self.memory_len
        self.memory_indices = torch.zeros(0, 0, dtype=torch.long)
        self.memory_values = torch.zeros(0, 0)
        self._memory_matrix = None

    @property
    def memory_len(self) -> int:
        """Number of signatures in the memory."""
        return int(self.memory_indices.shape[0])

    def _matrix(self) -> torch.Tensor:
        if self._memory_matrix is None:
            n, k = self.memory_indices.shape
            rows = torch.arange(n).repeat_interleave(k)
            dense_index = torch.stack([rows, self.memory_indices.reshape(-1)])
            with warnings.catch_warnings():  # sparse CSR is "beta" in torch; the ops used here are basic
                warnings.simplefilter("ignore", UserWarning)
                self._memory_matrix = torch.sparse_coo_tensor(
                    dense_index, self.memory_values.reshape(-1), (n, self.d_sae),
                    check_invariants=False).coalesce().to_sparse_csr()
        return self._memory_matrix

    @torch.no_grad()
    def similarities(self, sig: Signature) -> torch.Tensor:
        """Cosine similarity of each signature to every remembered one, shape [N, memory_len]."""
        indices, activity = self._activity(sig)
        indices, activity = indices.reshape(-1, indices.shape[-1]), activity.reshape(-1, activity.shape[-1])
        if self.memory_len == 0:
            return torch.zeros(indices.shape[0], 0)
        query = torch.zeros(self.d_sae, indices.shape[0]).scatter_(0, indices.T, activity.T)
        return (self._matrix() @ query).to_dense().T

    @torch.no_grad()
    def familiarity(self, sig: Signature) -> torch.Tensor:
        """Cosine similarity of each signature to its nearest remembered one, shape [N]."""
        sims = self.similarities(sig)
        return sims.max(dim=1).values if sims.shape[1] else torch.zeros(sims.shape[0])

    def matches(self, sims: torch.Tensor) -> torch.Tensor:
        """Ids of the memory rows a signature (its row of :meth:`similarities`) matches."""
        return (sims >= self.min_familiarity).nonzero().flatten() + self.memory_start

    def _continuing(self, sims: torch.Tensor, after: torch.Tensor) -> float:
        """Best similarity among the rows that followed the rows ``after`` (ids of the
        previous token's matches): how well this token continues a practised sequence."""
        following = after + 1 - self.memory_start
        following = following[(following >= 0) & (following < sims.shape[0])]
        return float(sims[following].max()) if len(following) else 0.0

    @torch.no_grad()
    def sequence_familiarity(self, sig: Signature) -> torch.Tensor:
        """Familiarity of each of N consecutive tokens' signatures as a sequence: the
        first token's own, every later one's as a continuation of its predecessor's
        matches (what :meth:`decide` uses when the decoding loop passes ``after``)."""
        sims = self.similarities(sig)
        if sims.shape[1] == 0:
            return torch.zeros(sims.shape[0])
        out = torch.empty(sims.shape[0])
        out[0] = sims[0].max()
        for t in range(1, sims.shape[0]):
            out[t] = self._continuing(sims[t], self.matches(sims[t - 1]))
        return out

    def decide(self, sig: Signature, after: torch.Tensor | None = None) -> PolicyDecision:
        """The shallowest exit layer predicted to agree (signature of one token);
        ``None`` for unfamiliar tokens. ``after``: memory rows the previous token matched
        (its decision's ``rows``); the token must then continue a practised sequence.
        Without it (previous token unknown) the token's own familiarity counts."""
        probs = self.probabilities(sig).reshape(-1)
        sims = self.similarities(sig)[0]
        if len(sims) == 0:
            familiarity, rows = 0.0, torch.zeros(0, dtype=torch.long)
        else:
            rows = self.matches(sims)
            familiarity = float(sims.max()) if after is None else self._continuing(sims, after)
        if familiarity < self.min_familiarity:
            self.decisions[-1] += 1
            return PolicyDecision(None, probs, familiarity, rows)
        passing = (probs >= self.threshold).nonzero()
        column = int(passing[0]) if len(passing) else len(self.exit_layers)
        self.decisions[column] += 1
        layer = self.exit_layers[column] if column < len(self.exit_layers) else None
        return PolicyDecision(layer, probs, familiarity, rows)

    @torch.no_grad()
    def update(self, sig: Signature, outcomes: torch.Tensor) -> None:
        """Local update from verified outcomes.

        Args:
            sig: signatures of N tokens (``indices``/``values`` shaped [N, k]).
            outcomes: [N, n_exit] booleans, whether each layer's head agreed with the
                full model on that token.
        """
        indices, activity = self._activity(sig)
        indices, activity = indices.reshape(-1, indices.shape[-1]), activity.reshape(-1, activity.shape[-1])
        outcomes = outcomes.reshape(-1, len(self.exit_layers)).float()
        if outcomes.shape[0] != indices.shape[0]:
            raise ValueError(f"{indices.shape[0]} signatures but {outcomes.shape[0]} outcome rows")
        for row in range(indices.shape[0]):  # sequential: each token sees the previous update
            idx, act = indices[row], activity[row]
            p = torch.sigmoid((self.weights[:, idx] * act).sum(-1) + self.bias)
            error = outcomes[row] - p
            self.weights[:, idx] += self.lr * error[:, None] * act[None, :]
            self.bias += self.lr_bias * error
            self.feature_counts[idx[act > 0]] += 1
        self.trials += outcomes.shape[0]
        self.agreements += outcomes.sum(0)

    def reset(self, prior: float = -3.0) -> None:
        """Forget everything learned (used before re-learning from the position buffer)."""
        self.weights.zero_()
        self.bias.fill_(float(prior))
        self.trials.zero_()
        self.agreements.zero_()
        self.feature_counts.zero_()
        self._forget_all()

    # -- persistence --------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The learned tensors and exit layers, for safetensors."""
        return {
            "weights": self.weights, "bias": self.bias, "trials": self.trials,
            "agreements": self.agreements, "feature_counts": self.feature_counts,
            "decisions": self.decisions, "exit_layers": torch.tensor(self.exit_layers),
            "memory_indices": self.memory_indices.to(torch.int32),
            "memory_values": self.memory_values.to(torch.float16),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`state_dict`; ``ValueError`` if its exit layers or width differ."""
        layers = state["exit_layers"].tolist()
        if layers != self.exit_layers or state["weights"].shape != self.weights.shape:
            raise ValueError(
                f"saved policy has exit layers {layers} and {state['weights'].shape[1]} features; "
                f"this one has {self.exit_layers} and {self.weights.shape[1]}"
            )
        for name in ("weights", "bias", "trials", "agreements", "feature_counts"):
            getattr(self, name).copy_(state[name])
        if "decisions" in state:  # absent in folders saved before decisions were counted
            self.decisions.copy_(state["decisions"])
        if "memory_indices" in state:
            self._forget_all()
            self.memory_indices = state["memory_indices"].long()
            self.memory_values = state["memory_values"].float()
            self._memory_matrix = None

    def merge(self, other: ExitPolicy) -> None:
        """Add another worker's practice: evidence-weighted average of the weights,
        summed counts."""
        if other.exit_layers != self.exit_layers or other.weights.shape != self.weights.shape:
            raise ValueError("cannot merge policies with different exit layers or observers")
        n_self, n_other = self.trials[:, None], other.trials[:, None]
        total = n_self + n_other
        seen = total > 0  # layers neither worker tried keep their values
        self.weights = torch.where(seen, (self.weights * n_self + other.weights * n_other) / total.clamp_min(1),
                                   self.weights)
        self.bias = torch.where(seen[:, 0],
                                (self.bias * n_self[:, 0] + other.bias * n_other[:, 0]) / total[:, 0].clamp_min(1),
                                self.bias)
        self.trials += other.trials
        self.agreements += other.agreements
        self.feature_counts += other.feature_counts
        self.decisions += other.decisions
        if other.memory_len:
            self.remember(Signature(other.memory_indices, other.memory_values))
