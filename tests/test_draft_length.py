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


def test_a_shallow_token_must_pay_for_its_draft_step():
    # exit 3 reads a tenth of a plain step, exit 19 more than half: the same chance pays
    # at the shallow exit and not at the deep one
    odds = ShallowOdds(accept_bar=0.3, costs={3: 0.1, 19: 0.55})
    assert odds.bar(3) == 0.3 and odds.bar(19) == 0.55 and odds.bar(7) == 0.3  # no cost known: the bar
    for exit_layer in (3, 19):
        for _ in range(20):  # both exits' confident tokens are accepted half the time
            odds.update([(exit_layer, 0.9)] * 2, accepted=1, rejected=True)
    assert odds.probability(3, 0.9) == pytest.approx(odds.probability(19, 0.9))
    assert 0.3 < odds.probability(3, 0.9) < 0.55
    assert odds.worth(3, 0.9, reach=0.99) and not odds.worth(19, 0.9, reach=0.99)
    with pytest.raises(ValueError, match="must be >= 0"):
        ShallowOdds(costs={3: -0.1})


def test_draft_step_costs_count_the_layers_to_the_exit_its_head_and_the_observer():
    from types import SimpleNamespace

    from shortcut.decode.accounting import ParamSizes, shallow_step_costs

    sizes = ParamSizes(layer=10, kv_projection=2, unembed=40, num_layers=4, observer=5)
    heads = SimpleNamespace(layers=(0, 2), head_cost=lambda layer: {"shortlist": 3 + layer})
    plain = 4 * 10 + 40  # every layer and the unembedding
    assert shallow_step_costs(sizes, heads) == {0: (10 + 3 + 5) / plain, 2: (30 + 5 + 5) / plain}


def test_back_off_doubles_while_attempts_fail_and_ends_on_an_accepted_token():
    from shortcut.decode.lossless import BackOff

    backoff = BackOff()
    assert not backoff.waiting()
    sat_out = []
    for _ in range(5):  # five failed attempts in a row: 1, 2, 4, 8, 8 steps sat out
        backoff.record(accepted=0)
        steps = 0
        while backoff.waiting():
            steps += 1
        sat_out.append(steps)
    assert sat_out == [1, 2, 4, 8, 8]
    backoff.record(accepted=2)
    backoff.record(accepted=0)
    assert backoff.waiting() and not backoff.waiting()  # back to one step


def test_counts_round_trip_and_bad_ones_change_nothing():
    lengths = DraftLengths()
    lengths.update("memory", True, 30, accepted=7, rejected=True)
    lengths.length("context", False, 4)  # a situation met, with its prior only
    again = DraftLengths()
    again.load_dict(lengths.to_dict())
    assert again.counts == lengths.counts
    odds = ShallowOdds()
    odds.update([(3, 0.9), (3, 0.9)], accepted=1, rejected=True)
    restored = ShallowOdds()
    restored.load_dict(odds.to_dict(), num_layers=8)
    assert restored.counts == odds.counts and restored.probability(3, 0.9) == odds.probability(3, 0.9)
    for bad in ({"memory|1|12": [1, 1], "memory|2|12": [1, 1]}, {"memory|1|12": [1]}, {"memory|1|12": [True, 1]},
                ["memory|1|12"]):
        with pytest.raises(ValueError):
            again.load_dict(bad)
    assert again.counts == lengths.counts  # a bad dict takes nothing, not even its good keys
    with pytest.raises(ValueError, match="1..7"):
        restored.load_dict({"8|0.5": [1, 1]}, num_layers=8)
