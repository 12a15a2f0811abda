"""The exit policy's local learning rule, persistence and merging."""

from __future__ import annotations

import pytest
import torch

from shortcut.observe import Signature
from shortcut.policy.exits import ExitPolicy


def _sig(features: list[int], d_sae: int = 64, k: int = 4) -> Signature:
    indices = torch.tensor([features[:k]])
    values = torch.linspace(2.0, 1.0, k)[None, :]
    return Signature(indices, values)


def test_local_rule_learns_familiar_and_keeps_novel_on_full_path():
    torch.manual_seed(0)
    policy = ExitPolicy([3, 5], d_sae=64, threshold=0.8)
    practised = _sig([1, 2, 3, 4])
    novel = _sig([40, 41, 42, 43])
    before = policy.probabilities(practised).clone()
    assert policy.decide(practised).exit_layer is None  # nothing learned: full path
    # Synthetic stream: the shallow head (layer 3) is wrong, layer 5 is right, every time.
    for _ in range(10):
        policy.update(practised, torch.tensor([[False, True]]))
    after = policy.probabilities(practised)[0]
    assert after[1] > before[0, 1] + 0.5 and after[0] < before[0, 0]
    assert policy.decide(practised).exit_layer is None  # learned, but never remembered as practised
    policy.remember(practised)
    assert float(policy.familiarity(practised)[0]) == pytest.approx(1.0)
    assert float(policy.familiarity(novel)[0]) == 0.0
    assert policy.decide(practised).exit_layer == 5
    # Features never seen keep weight 0: the novel signature gets only the base rate.
    assert policy.decide(novel).exit_layer is None
    assert torch.all(policy.weights[:, 40:44] == 0)
    # A mismatch weakens exactly the features that were active.
    w = policy.weights.clone()
    policy.update(practised, torch.tensor([[False, False]]))
    assert torch.all(policy.weights[1, [1, 2, 3, 4]] < w[1, [1, 2, 3, 4]])
    assert torch.equal(policy.weights[:, 10:], w[:, 10:])


def test_state_dict_roundtrip_gives_same_decisions():
    policy = ExitPolicy([3, 5], d_sae=64)
    for _ in range(5):
        policy.update(_sig([1, 2, 3, 4]), torch.tensor([[True, True]]))
    policy.remember(_sig([1, 2, 3, 4]))
    clone = ExitPolicy([3, 5], d_sae=64)
    clone.load_state_dict({k: v.clone() for k, v in policy.state_dict().items()})
    for sig in (_sig([1, 2, 3, 4]), _sig([9, 8, 7, 6])):
        assert torch.equal(clone.probabilities(sig), policy.probabilities(sig))
        assert clone.decide(sig).exit_layer == policy.decide(sig).exit_layer
        assert torch.allclose(clone.familiarity(sig), policy.familiarity(sig), atol=1e-3)
    assert float(clone.familiarity(_sig([1, 2, 3, 4]))[0]) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="exit layers"):
        ExitPolicy([4], d_sae=64).load_state_dict(policy.state_dict())


def test_merge_adds_statistics():
    a, b = ExitPolicy([3, 5], d_sae=64), ExitPolicy([3, 5], d_sae=64)
    for _ in range(3):
        a.update(_sig([1, 2, 3, 4]), torch.tensor([[True, True]]))
    for _ in range(5):
        b.update(_sig([20, 21, 22, 23]), torch.tensor([[False, True]]))
    a_trials, a_agree = a.trials.clone(), a.agreements.clone()
    a.merge(b)
    assert torch.equal(a.trials, a_trials + b.trials)
    assert torch.equal(a.agreements, a_agree + b.agreements)
    # Both workers' practised features now carry weight, and both memories are kept.
    assert a.weights[1, 1] > 0 and a.weights[1, 20] > 0
    a_mem = a.memory_len
    b.remember(_sig([20, 21, 22, 23]))
    a.merge(b)
    assert a.memory_len == a_mem + 1
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(ExitPolicy([3], d_sae=64))


def test_bad_arguments():
    with pytest.raises(ValueError, match="ascending"):
        ExitPolicy([5, 3], d_sae=8)
    with pytest.raises(ValueError, match="threshold"):
        ExitPolicy([3], d_sae=8, threshold=1.5)
    with pytest.raises(ValueError, match="outcome rows"):
        ExitPolicy([3], d_sae=64).update(_sig([1, 2, 3, 4]), torch.ones(2, 1, dtype=torch.bool))


def test_decisions_are_counted_saved_and_merged():
    policy = ExitPolicy([3, 5], d_sae=64, threshold=0.8)
    practised, novel = _sig([1, 2, 3, 4]), _sig([40, 41, 42, 43])
    for _ in range(10):
        policy.update(practised, torch.tensor([[False, True]]))
    policy.remember(practised)
    assert policy.decide(practised).exit_layer == 5
    assert policy.decide(novel).exit_layer is None
    assert policy.decisions.tolist() == [0.0, 1.0, 1.0]  # exit 3, exit 5, full path
    policy.reset()
    assert policy.decisions.tolist() == [0.0, 1.0, 1.0]  # usage survives re-learning
    loaded = ExitPolicy([3, 5], d_sae=64)
    loaded.load_state_dict(policy.state_dict())
    loaded.merge(policy)
    assert loaded.decisions.tolist() == [0.0, 2.0, 2.0]


def test_sequence_familiarity_needs_the_practised_order():
    policy = ExitPolicy([3, 5], d_sae=64, threshold=0.5)
    for _ in range(10):
        policy.update(_sig([1, 2, 3, 4]), torch.tensor([[True, True]]))
    a, b, c = _sig([1, 2, 3, 4]), _sig([10, 11, 12, 13]), _sig([20, 21, 22, 23])
    # Practised sequence a -> b -> c, remembered in that order.
    policy.remember(Signature(torch.cat([a.indices, b.indices, c.indices]), torch.cat([a.values, b.values, c.values])))
    after_a = policy.decide(a).rows
    assert policy.decide(b, after=after_a).familiarity == pytest.approx(1.0)  # b followed a
    assert policy.decide(c, after=after_a).familiarity == 0.0  # c never followed a
    assert policy.decide(c).familiarity == pytest.approx(1.0)  # on its own, c was practised
    assert policy.decide(a, after=torch.zeros(0, dtype=torch.long)).exit_layer is None  # after an unfamiliar token
    # The batch form scores a whole sequence the same way.
    seq = Signature(torch.cat([a.indices, c.indices, b.indices]), torch.cat([a.values, c.values, b.values]))
    assert policy.sequence_familiarity(seq).tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)


def test_matched_rows_keep_their_meaning_when_the_memory_changes():
    policy = ExitPolicy([3], d_sae=64, memory_size=3)
    a, b, c, x = (_sig(f) for f in ([1, 2, 3, 4], [10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]))
    both = lambda *sigs: Signature(torch.cat([s.indices for s in sigs]), torch.cat([s.values for s in sigs]))  # noqa: E731
    policy.remember(both(a, b, c))
    after_a = policy.decide(a).rows
    policy.remember(x)  # a is forgotten (memory of 3); b still follows it
    assert policy.decide(b, after=after_a).familiarity == pytest.approx(1.0)
    policy.reset()
    policy.remember(both(c, b))  # a new memory: the old ids name nothing in it
    assert policy.decide(b, after=after_a).familiarity == 0.0
