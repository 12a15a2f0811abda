"""What lossless and fast decoding did, summed over a handle's generate calls."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class DecodeStats:
    """Counts kept by the decoding loops (``handle.decode_stats``).

    Take a :meth:`copy` before some calls and subtract it afterwards for what those
    calls did: ``delta = handle.decode_stats - before``.

    Attributes:
        drafted: draft tokens proposed for verification (shallow path and practised
            sequences together).
        accepted: drafted tokens that verification accepted (a drafted end of sequence
            that matched included).
        recalled: drafted tokens taken from practised sequences (no layer ran for them).
        recall_accepted: of those, the accepted ones.
        copied: drafted tokens copied from the call's own text (prompt and output so
            far; no layer ran for them).
        copy_accepted: of those, the accepted ones.
        skip_drafted: drafted tokens made by the model with a learned set of its layers
            stepped over (``lossless.skip_drafts``; ``shortcut/decode/skip_draft.py``).
        skip_accepted: of those, the accepted ones.
        recall_committed: fast mode's tokens committed from a practised answer with no
            layer run.
        draft_forwards: shallow (or skip) forwards run to draft a token.
        verify_forwards: full forwards that verified a draft (the prefill not counted).
        full_path_steps: draft attempts whose first token went on through every layer
            (unfamiliar or unsure), standing in for a plain decoding step.
        draft_unfamiliar: of those, the ones the policy sent to the full path.
        draft_unsure: drafts ended by an exit head below the confidence bar.
        draft_declined: drafts ended where the learned chance of reaching the next
            shallow token fell below ``accept_bar`` (``ShallowOdds``), or where no skip
            set was expected to save compute (``SkipPlan``).
        draft_refusals: drafts ended by a later token the policy found unfamiliar.
        draft_paused: decoding steps the back-off skipped without asking the policy.
        prompt_reused: prompt positions whose keys and values were kept from earlier
            text (``prefix.py``): the prefill did not read them.
        observer_encodes: SAE encodes of a single position (decisions and trails).
        head_params: exit-head parameters read (shortlist scoring), for compute
            accounting.
        exits: exit layer -> shallow tokens that left the forward there.
    """

    drafted: int = 0
    accepted: int = 0
    recalled: int = 0
    recall_accepted: int = 0
    copied: int = 0
    copy_accepted: int = 0
    skip_drafted: int = 0
    skip_accepted: int = 0
    recall_committed: int = 0
    draft_forwards: int = 0
    verify_forwards: int = 0
    full_path_steps: int = 0
    draft_unfamiliar: int = 0
    draft_unsure: int = 0
    draft_declined: int = 0
    draft_refusals: int = 0
    draft_paused: int = 0
    prompt_reused: int = 0
    observer_encodes: int = 0
    head_params: float = 0.0
    exits: dict[int, int] = field(default_factory=dict)

    def exited(self, layer: int) -> None:
        """Count one shallow token that left the forward after ``layer`` layers."""
        self.exits[layer] = self.exits.get(layer, 0) + 1

    def copy(self) -> DecodeStats:
        """An independent snapshot."""
        return dataclasses.replace(self, exits=dict(self.exits))

    def __sub__(self, other: DecodeStats) -> DecodeStats:
        """Field-wise difference: what happened between ``other`` and ``self``."""
        values = {f.name: getattr(self, f.name) - getattr(other, f.name)
                  for f in dataclasses.fields(self) if f.name != "exits"}
        exits = {layer: count - other.exits.get(layer, 0) for layer, count in self.exits.items()}
        return DecodeStats(**values, exits={layer: n for layer, n in exits.items() if n})

    def as_dict(self) -> dict[str, float]:
        """Flat numbers for reports: every field, and ``exit_<l>`` per exit layer."""
        flat: dict[str, float] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "exits"}
        flat.update({f"exit_{layer}": count for layer, count in sorted(self.exits.items())})
        return flat
