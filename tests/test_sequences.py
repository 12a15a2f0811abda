"""The practised-sequence memory that lossless drafts replay (no model needed)."""

from __future__ import annotations

import pytest

from shortcut.learn.sequences import DRAFT_PER_MATCH, KEY, PROBE, SHORT_MATCH, SequenceMemory


def test_continuation_follows_the_longest_agreement_and_is_bounded_by_it():
    memory = SequenceMemory()
    long = list(range(100, 100 + 3 * SHORT_MATCH))
    assert memory.add(long)
    assert memory.add([9, 9, 101, 102, 103, 50, 51, 52])
    assert not memory.add(long)  # already held
    # Only the last KEY tokens agree with either: the most recent sequence wins, and a
    # short agreement proposes a probe.
    assert memory.continuation([0, 101, 102, 103], limit=10) == ([50, 51, 52][:PROBE], KEY)
    # Five tokens agree with the long sequence: it wins; still a probe.
    assert memory.continuation([0, 100, 101, 102, 103, 104], limit=20) == ([105, 106][:PROBE], 6 - 1)
    # SHORT_MATCH tokens agree: DRAFT_PER_MATCH per agreeing token, up to the limit.
    text = long[:SHORT_MATCH]
    tokens, match = memory.continuation(text, limit=100)
    assert match == SHORT_MATCH and tokens == long[SHORT_MATCH:SHORT_MATCH + DRAFT_PER_MATCH * SHORT_MATCH]
    assert memory.continuation(text, limit=3)[0] == long[SHORT_MATCH:SHORT_MATCH + 3]
    assert memory.continuation([7, 7, 7], limit=10) == ([], 0)  # never practised
    assert memory.continuation([101, 102], limit=10) == ([], 0)  # shorter than the key
    assert memory.continuation(long[-KEY:], limit=10) == ([], 0)  # nothing followed it


def test_capacity_drops_the_oldest_sequences():
    memory = SequenceMemory(capacity=16)  # beyond 16 tokens, down to 12
    memory.add([1, 2, 3, 4, 5, 6])
    memory.add([7, 8, 9, 10, 11, 12])
    memory.add([20, 21, 22, 23, 24])
    assert memory.sequences == [[7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24]] and memory.tokens == 11
    assert memory.continuation([1, 2, 3], limit=5) == ([], 0)
    assert memory.continuation([20, 21, 22], limit=5)[0] == [23, 24][:PROBE]
    assert memory.add([1, 2, 3, 4, 5, 6])  # forgotten, so new again
    with pytest.raises(ValueError, match="capacity=0"):
        SequenceMemory(capacity=0)


def test_answer_needs_a_sequence_that_begins_with_the_whole_prompt():
    memory = SequenceMemory()
    prompt = [5, 6, 7, 8]
    memory.add(prompt + [40, 41])
    memory.add(prompt + [40, 41, 42, 43])  # the same answer, practised longer
    memory.add([9] + prompt[1:] + [60, 61, 62])  # ends like the prompt, begins otherwise
    assert memory.answer(prompt, limit=10) == [40, 41, 42, 43]  # the longest
    assert memory.answer(prompt, limit=3) == [40, 41, 42]
    assert memory.answer(prompt + [40], limit=10) == [41, 42, 43]  # a prompt may end inside an answer
    assert memory.answer([1] + prompt, limit=10) == []  # more text before it: not the same prompt
    assert memory.answer([0] + prompt[1:], limit=10) == []
    assert memory.answer(prompt + [40, 41, 42, 43], limit=10) == []  # nothing followed it
    assert memory.answer(prompt, limit=0) == []


def test_text_index_copies_from_earlier_in_the_same_text():
    from shortcut.learn.sequences import TextIndex

    index = TextIndex()
    text = [1, 2, 3, 4, 5, 6, 7, 9, 9, 2, 3, 4]
    # The end [2, 3, 4] occurred before (after 1): what followed there is proposed.
    assert index.lookup(text, limit=3) == ([5, 6, 7], 3)
    # The text grows: indexed incrementally, the longer agreement wins.
    assert index.lookup(text + [5, 6], limit=2) == ([7, 9], 5)
    assert index.lookup([8, 8, 8, 1, 2], limit=4) == ([], 0)  # another text: reindexed, no earlier [8, 1, 2]
    assert index.lookup([1, 2, 3], limit=4) == ([], 0)  # the end itself is no earlier occurrence
    assert index.lookup(text, limit=0) == ([], 0)


def test_lookup_has_no_length_rule_and_continuation_keeps_it():
    memory = SequenceMemory()
    long = list(range(100, 100 + 3 * SHORT_MATCH))
    memory.add(long)
    assert memory.lookup([0, 101, 102, 103], limit=10) == (long[4:14], KEY)
    assert memory.continuation([0, 101, 102, 103], limit=10) == (long[4:4 + PROBE], KEY)
