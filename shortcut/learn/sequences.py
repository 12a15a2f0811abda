"""Practised sequences: the rung above the shallow path on the skill ladder.

Every plain greedy lossless generate call made while learning (no sampling, no logits
processor, no padding) leaves one sequence here: its prompt and the tokens the full
model produced after it (lossless output is exactly the full model's), so a sequence is
the full model's own greedy answer to its prompt. When a later call's text ends the way
a practised sequence went on, what followed there is proposed as the draft, and no
layer runs to make it; the full model verifies it as it verifies shallow-path drafts,
so output stays identical. Exact repeats then draft their whole practised answer at
once; a reworded prompt whose answer rejoins a practised one drafts from the point
where it does.

Lookup: the last ``KEY`` tokens select candidate positions (an n-gram index); among
them the one whose preceding tokens agree with the text furthest back wins (the most
recent sequence on a tie). :meth:`SequenceMemory.lookup` returns what followed and the
agreement, and lossless drafting sizes the draft from acceptance it learned per
situation (``shortcut/decode/draft_length.py``). :meth:`SequenceMemory.continuation`
applies the fixed rule fast mode's fork check relies on: below ``SHORT_MATCH`` tokens of
agreement a ``PROBE`` of two tokens, from there on ``DRAFT_PER_MATCH`` tokens per
agreeing token. :class:`TextIndex` looks up the current call's own text the same way.

Fast mode asks for more than a match: :meth:`SequenceMemory.answer` gives what followed
a prompt only when a sequence begins with exactly that prompt, and commits it unverified.
"""

from __future__ import annotations

from collections.abc import Iterable

KEY = 3  # tokens that select candidate positions
MAX_CANDIDATES = 64  # most recent candidates compared per lookup (common n-grams have many)
MAX_MATCH = 64  # agreement is counted back this far at most
SHORT_MATCH = 12  # agreement below which a draft is only a probe
PROBE = 2  # draft tokens of a probe
DRAFT_PER_MATCH = 2  # draft tokens allowed per token of agreement from SHORT_MATCH on


class SequenceMemory:
    """Token sequences produced by the full model on practised calls, indexed by n-gram.

    Args:
        capacity: most tokens held; beyond it the oldest sequences go until a quarter of
            it is free (sequences and index take up to ~300 bytes per token: 200k
            tokens, at most ~60 MB).
    """

    def __init__(self, capacity: int = 200_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be at least 1 token")
        self.capacity = capacity
        self.sequences: list[list[int]] = []
        # Where each sequence's answer begins (its prompt's length); None where unknown
        # (sequences loaded from a folder): :meth:`answer` trusts those as before.
        self.starts: list[int | None] = []
        self._seen: set[int] = set()  # hashes of the held sequences (duplicates are skipped)
        self._index: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self._tokens = 0

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def tokens(self) -> int:
        """Total number of tokens stored."""
        return self._tokens

    def add(self, ids: Iterable[int], start: int | None = None) -> bool:
        """Store one sequence (token ids) whose answer begins at ``start`` (the length of
        the prompt it answered, if known); returns whether it was new."""
        seq = [int(t) for t in ids]
        key = hash(tuple(seq))
        if len(seq) <= KEY or key in self._seen:
            return False
        self._seen.add(key)
        self.sequences.append(seq)
        self.starts.append(start)
        self._tokens += len(seq)
        if self._tokens > self.capacity:
            # Free a quarter of the capacity at once: the index is rebuilt once per quarter
            # added, not on every call of a memory that stays full.
            keep = self.capacity - self.capacity // 4
            drop = 0
            while self._tokens > keep and drop < len(self.sequences) - 1:
                self._seen.discard(hash(tuple(self.sequences[drop])))
                self._tokens -= len(self.sequences[drop])
                drop += 1
            del self.sequences[:drop]
            del self.starts[:drop]
            self._reindex()
        else:
            self._index_one(len(self.sequences) - 1)
        return True

    def extend(self, sequences: Iterable[Iterable[int]]) -> None:
        """Store each of ``sequences`` (see :meth:`add`)."""
        for seq in sequences:
            self.add(seq)

    def continuation(self, ids: list[int], limit: int) -> tuple[list[int], int]:
        """What followed the best-matching practised occurrence of the end of ``ids``
        (at most ``limit`` tokens, fewer for a short agreement: see the module doc), and
        the agreement (how many tokens of ``ids`` matched, counted back from the end).
        ``([], 0)`` when the last ``KEY`` tokens never occurred in practice."""
        tokens, match = self.lookup(ids, limit)
        allowed = DRAFT_PER_MATCH * match if match >= SHORT_MATCH else PROBE
        return tokens[:allowed], match

    def lookup(self, ids: list[int], limit: int) -> tuple[list[int], int]:
        """Like :meth:`continuation`, with no length rule: up to ``limit`` tokens of what
        followed the best match, and its agreement (the caller sizes the draft)."""
        if limit <= 0 or len(ids) < KEY:
            return [], 0
        found = best_match(self._index, self.sequences, ids)
        if found is None:
            return [], 0
        s, end, match = found
        return self.sequences[s][end:end + limit], match

    def answer(self, prompt: list[int], limit: int) -> list[int]:
        """The practised answer to exactly ``prompt``: what followed it in the sequence
        that begins with all of it (the longest such continuation, at most ``limit``
        tokens); ``[]`` when no sequence begins with ``prompt``. A sequence whose own
        prompt went on past ``prompt`` does not count: the tokens there were prompt, not
        the model's answer to ``prompt``."""
        best: list[int] = []
        if limit <= 0 or len(prompt) < KEY:
            return best
        for s, end in self._index.get(tuple(prompt[-KEY:]), []):
            seq = self.sequences[s]
            start = self.starts[s]
            if (end == len(prompt) and len(seq) - end > len(best) and (start is None or start <= end)
                    and seq[:end] == prompt):
                best = seq[end:end + limit]
        return best

    def _index_one(self, s: int) -> None:
        seq = self.sequences[s]
        for end in range(KEY, len(seq)):  # a key must be followed by at least one token
            self._index.setdefault(tuple(seq[end - KEY:end]), []).append((s, end))

    def _reindex(self) -> None:
        self._index = {}
        for s in range(len(self.sequences)):
            self._index_one(s)


def best_match(index: dict[tuple[int, ...], list[tuple[int, int]]], sequences: list[list[int]],
               ids: list[int]) -> tuple[int, int, int] | None:
    """``(sequence, end, agreement)`` of the occurrence of the end of ``ids`` in
    ``sequences`` whose preceding tokens agree with ``ids`` furthest back (the most
    recent on a tie); ``None`` when the last ``KEY`` tokens occur nowhere in ``index``."""
    candidates = index.get(tuple(ids[-KEY:]))
    if not candidates:
        return None
    best, best_match_length = candidates[-1], 0  # every candidate matches at least KEY tokens
    for s, end in reversed(candidates[-MAX_CANDIDATES:]):
        seq = sequences[s]
        match = KEY
        while match < MAX_MATCH and match < end and match < len(ids) and seq[end - match - 1] == ids[-match - 1]:
            match += 1
        if match > best_match_length:
            best, best_match_length = (s, end), match
    return best[0], best[1], best_match_length


class TextIndex:
    """The n-gram index of one growing text: the current call's prompt and output, so a
    draft can copy what the text itself said before (a span quoted from the prompt, a
    repeated name or line), with the same matching as :class:`SequenceMemory`."""

    def __init__(self) -> None:
        self.text: list[int] = []
        self._index: dict[tuple[int, ...], list[tuple[int, int]]] = {}

    def sync(self, ids: list[int]) -> None:
        """Make the index hold ``ids``: a text that extends the held one is indexed
        incrementally, any other text from scratch."""
        n = len(self.text)
        if len(ids) < n or ids[:n] != self.text:
            self.text, self._index, n = [], {}, 0
        self.text.extend(ids[n:])
        # A key must be followed by a token: ends n..len-1 become valid (end n was not).
        for end in range(max(KEY, n), len(self.text)):
            self._index.setdefault(tuple(self.text[end - KEY:end]), []).append((0, end))

    def lookup(self, ids: list[int], limit: int) -> tuple[list[int], int]:
        """Up to ``limit`` tokens of what followed the best earlier occurrence of the end
        of ``ids`` in ``ids`` itself, and its agreement; ``([], 0)`` when there is none."""
        if limit <= 0 or len(ids) < KEY:
            return [], 0
        self.sync(ids)
        found = best_match(self._index, [self.text], ids)
        if found is None:
            return [], 0
        _, end, match = found
        return self.text[end:end + limit], match
