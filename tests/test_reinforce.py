"""Reward, bounded sampling, REINFORCE loss, entropy and curriculum masks on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from blockdrop import reinforce as R


def test_reward_is_sparsity_bonus_when_correct_and_gamma_when_wrong():
    policy = torch.tensor([[1., 1., 0., 0.], [1., 1., 1., 1.], [0., 0., 0., 0.], [1., 0., 0., 0.]])
    correct = torch.tensor([True, True, True, False])
    r = R.reward(correct, policy, gamma=-10.0)
    assert r.tolist() == pytest.approx([1 - 0.5 ** 2, 0.0, 1.0, -10.0])


def test_bound_maps_probabilities_into_0_2_to_0_8():
    probs = torch.tensor([0.0, 0.5, 1.0, 0.25])
    assert R.bound(probs).tolist() == pytest.approx([0.2, 0.5, 0.8, 0.35])


def test_greedy_keeps_blocks_at_or_above_one_half():
    assert R.greedy(torch.tensor([[0.49, 0.5, 0.51, 0.0]])).tolist() == [[0., 1., 1., 0.]]


def test_sampling_frequencies_follow_the_bounded_probabilities():
    bounded = torch.tensor([0.2, 0.5, 0.8]).expand(20000, 3)
    freq = R.sample(bounded, torch.Generator().manual_seed(0)).mean(0)
    assert freq.tolist() == pytest.approx([0.2, 0.5, 0.8], abs=0.01)


def test_curriculum_mask_decides_the_last_epoch_plus_one_blocks():
    assert R.curriculum_mask(5, 0).tolist() == [0, 0, 0, 0, 1]
    assert R.curriculum_mask(5, 2).tolist() == [0, 0, 1, 1, 1]
    assert R.curriculum_mask(5, 4).tolist() == [1, 1, 1, 1, 1]
    assert R.curriculum_mask(5, 99).tolist() == [1, 1, 1, 1, 1]


def test_undecided_blocks_are_forced_on():
    policy = torch.tensor([[0., 0., 0., 1.], [0., 1., 0., 0.]])
    mask = R.curriculum_mask(4, 1)
    assert R.force_undecided(policy, mask).tolist() == [[1., 1., 0., 1.], [1., 1., 0., 0.]]


def test_reinforce_loss_by_hand():
    bounded = torch.tensor([[0.8, 0.2], [0.5, 0.5]], requires_grad=True)
    policy = torch.tensor([[1., 0.], [1., 1.]])
    advantage = torch.tensor([2.0, -1.0])
    loss = R.reinforce_loss(bounded, policy, advantage)
    # image 0: log p = log .8 + log .8; image 1: log .5 + log .5
    expected = -((2 * math.log(0.8)) * 2.0 + (2 * math.log(0.5)) * -1.0) / 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # d/ds' of -(log s') * A / B = -A / (s' B)  for u=1;  of -(log(1-s')) * A / B = A / ((1-s') B) for u=0
    assert bounded.grad.flatten().tolist() == pytest.approx([-2.0 / 0.8 / 2, 2.0 / 0.8 / 2, 1 / 0.5 / 2, 1 / 0.5 / 2])


def test_reinforce_loss_ignores_masked_blocks_and_does_not_backprop_into_the_advantage():
    bounded = torch.tensor([[0.3, 0.6]], requires_grad=True)
    advantage = torch.tensor([1.5], requires_grad=True)
    loss = R.reinforce_loss(bounded, torch.tensor([[1., 1.]]), advantage, mask=torch.tensor([0., 1.]))
    assert loss.item() == pytest.approx(-math.log(0.6) * 1.5)
    loss.backward()
    assert bounded.grad[0, 0] == 0 and advantage.grad is None


def test_positive_advantage_makes_the_sampled_action_more_likely():
    logits = torch.zeros(1, 3, requires_grad=True)
    policy = torch.tensor([[1., 0., 1.]])
    opt = torch.optim.SGD([logits], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        R.reinforce_loss(R.bound(torch.sigmoid(logits)), policy, torch.tensor([1.0])).backward()
        opt.step()
    assert (torch.sigmoid(logits)[0, [0, 2]] > 0.5).all() and torch.sigmoid(logits)[0, 1] < 0.5


def test_self_critical_advantage_is_sampled_minus_greedy_reward():
    correct_sampled, correct_greedy = torch.tensor([True, False]), torch.tensor([True, True])
    sampled = torch.tensor([[1., 0., 0., 0.], [1., 1., 1., 1.]])
    greedy = torch.tensor([[1., 1., 0., 0.], [0., 0., 0., 0.]])
    adv = R.reward(correct_sampled, sampled, -5.0) - R.reward(correct_greedy, greedy, -5.0)
    assert adv.tolist() == pytest.approx([(1 - 1 / 16) - (1 - 1 / 4), -5.0 - 1.0])


def test_entropy_is_the_full_bernoulli_entropy_and_is_largest_at_one_half():
    h = R.entropy(torch.tensor([[0.5, 0.2]]))
    assert h.item() == pytest.approx(math.log(2) - (0.2 * math.log(0.2) + 0.8 * math.log(0.8)))
    assert R.entropy(torch.tensor([[0.5]])) > R.entropy(torch.tensor([[0.8]]))
    assert R.entropy(torch.tensor([[0.5, 0.2]]), mask=torch.tensor([1., 0.])).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("gamma", [0.0, 1.0, float("nan")])
def test_non_negative_penalty_is_rejected(gamma):
    with pytest.raises(ValueError, match="must be negative"):
        R.validate_penalty(gamma)
    assert R.validate_penalty(-10.0) == -10.0
