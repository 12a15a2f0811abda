"""Lookup-draft lengths learned from verification outcomes (no model needed)."""

from __future__ import annotations

import pytest

from shortcut.decode.draft_length import EXPLORE, DraftLengths, ShallowOdds, bucket


def test_lengths_follow_the_measured_acceptance_of_each_situation():
    lengths = DraftLengths(accept_bar=0.3)
    short, long = lengths.length("memory", True, 5), lengths.length("memory", True, 30)
    assert 1 <= short < long  # the prior: short agreements probe, long ones run
    for _ in range(20):  # this situation keeps failing after two tokens
        lengths.update("memory", True, 30, accepted=2, rejected=True)
    prior_accepted = 2 * 0.95 / 0.05  # the prior of 2 rejections at p = 0.95
    assert lengths.probability("memory", True, 30) == pytest.approx((prior_accepted + 40) / (prior_accepted + 40 + 22))
    assert lengths.length("memory", True, 30) < long
    # Other situations are untouched: the source, the opening flag and the bucket all count.
    assert lengths.length("context", True, 30) == long
    assert lengths.length("memory", False, 30) == long
    assert lengths.length("memory", True, 60) > lengths.length("memory", True, 30)
    for _ in range(50):  # accepted to the end every time: no rejection, drafts grow
        lengths.update("context", False, 4, accepted=3, rejected=False)
    assert lengths.length("context", False, 4) > short


def test_a_situation_below_the_bar_probes_one_token_now_and_then():
    lengths = DraftLengths(accept_bar=0.5)
    for _ in range(30):
        lengths.update("context", False, 3, accepted=0, rejected=True)
    got = [lengths.length("context", False, 3) for _ in range(2 * EXPLORE)]
    assert got.count(1) == 2 and got.count(0) == 2 * EXPLORE - 2


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="accept_bar=1.0"):
        DraftLengths(accept_bar=1.0)
    with pytest.raises(ValueError, match="source='shallow'"):
        DraftLengths().length("shallow", True, 3)
    assert bucket(2) == 3 and bucket(11) == 6 and bucket(100) == 48


def test_shallow_odds_learn_per_exit_and_confidence_and_gate_the_draft():
    odds = ShallowOdds(accept_bar=0.3)
    sure, unsure = (3, 0.97), (3, 0.6)
    assert odds.probability(*sure) > odds.probability(*unsure)  # the prior follows the head's confidence
    assert odds.worth(*sure) and odds.worth(*unsure)
    for _ in range(20):  # confident tokens at exit 3 keep being rejected on this workload
        odds.update([sure, sure], accepted=0, rejected=True)
    assert odds.probability(*sure) < 0.3
    assert odds.probability(5, 0.97) > 0.9  # another exit layer is another situation
    # Below the bar the first token is proposed once every EXPLORE-th time, a later one never.
    got = [odds.worth(*sure) for _ in range(2 * EXPLORE)]
    assert got.count(True) == 2
    assert not odds.worth(*sure, reach=0.99)
    # Reaching a token multiplies the chances of those before it.
    p = odds.probability(*unsure)
    assert odds.worth(*unsure, reach=0.3 / p + 1e-6) and not odds.worth(*unsure, reach=0.3 / p - 1e-6)
    # Outcomes: the accepted prefix counts as accepted, the next token as the rejection.
    before = [list(odds.counts[(5, 0.95)])] if (5, 0.95) in odds.counts else None
    odds.update([(5, 0.97), (5, 0.97), (5, 0.6)], accepted=2, rejected=True)
    assert before is not None and odds.counts[(5, 0.95)][0] == before[0][0] + 2
    assert odds.counts[(5, 0.5)][1] == pytest.approx(4 * 0.45 + 1)  # the prior's share and this one
    with pytest.raises(ValueError, match="accept_bar=0.0"):
        ShallowOdds(accept_bar=0.0)
