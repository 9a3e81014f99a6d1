"""examples/grpo_toy.py: a short GRPO run improves the mean reward with either sampler."""

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

_PATH = Path(__file__).resolve().parent.parent / "examples" / "grpo_toy.py"
_spec = importlib.util.spec_from_file_location("grpo_toy", _PATH)
grpo_toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grpo_toy)


@pytest.mark.parametrize("sampler", ["exact", "stochastic-viterbi"])
def test_short_grpo_run_improves_the_reward(sampler):
    rewards = grpo_toy.train(sampler, steps=80)
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    assert last > first + 0.05, f"{sampler}: mean reward {first:.3f} -> {last:.3f}"


def test_groups_drawn_without_replacement_improve_the_reward_with_fewer_zero_variance_groups():
    # the same 80 steps and seed as with replacement: distinct samples tie less often, so fewer groups
    # have every advantage 0
    with_replacement, without_replacement = [], []
    grpo_toy.train("exact", steps=80, zero_variance=with_replacement)
    rewards = grpo_toy.train("exact", steps=80, replacement=False, zero_variance=without_replacement)
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    assert last > first + 0.05, f"without replacement: mean reward {first:.3f} -> {last:.3f}"
    assert sum(without_replacement) < sum(with_replacement), (without_replacement, with_replacement)
    with pytest.raises(ValueError, match="without replacement needs the exact sampler"):
        grpo_toy.train("stochastic-viterbi", steps=1, replacement=False)


def test_priority_advantages():
    rewards = torch.tensor([[0.1, 0.5, 0.3, 0.7], [0.4, 0.4, 0.4, 0.4]])
    equal = torch.full((2, 4), 0.2)
    got = grpo_toy.priority_advantages(rewards, equal)
    # equal weights: GRPO's advantage with the population std; a zero-variance group gets 0
    want = (rewards[0] - rewards[0].mean()) / rewards[0].std(unbiased=False)
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[1], torch.zeros(4))
    # unequal weights: the baseline is the weighted mean (0.108 here, pulled to the heavy sample's 0.1, so
    # the sample of reward 0.3, below the plain mean, is above it), the advantages sum to 0, and only the
    # weights' ratios count
    weights = torch.tensor([[0.9, 0.01, 0.01, 0.01]])
    heavy = grpo_toy.priority_advantages(rewards[:1], weights)
    assert heavy[0, 0] < 0 and (heavy[0, 1:] > 0).all() and want[2] < 0
    torch.testing.assert_close(heavy.sum(), torch.tensor(0.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(grpo_toy.priority_advantages(rewards[:1], 3 * weights), heavy)


def test_compiled_run_draws_the_eager_samples():
    # compiled with fullgraph=True (a graph break would raise); the first steps' rewards are the eager
    # run's (the same samples); later steps may part as compiled and eager arithmetic round differently
    eager = grpo_toy.train("exact", steps=3)
    compiled = grpo_toy.train("exact", steps=3, compile=True)
    assert compiled[0] == eager[0]
    assert compiled == pytest.approx(eager, abs=0.05)


def test_the_exact_regularisers_do_what_they_say():
    # 60 steps: the entropy bonus keeps the policy's entropy up; the KL penalty keeps it nearer the
    # initial policy, whose entropy is high, so it too ends with more entropy than plain GRPO
    plain, bonus, penalty = [], [], []
    grpo_toy.train("exact", steps=60, entropies=plain)
    grpo_toy.train("exact", steps=60, entropy_bonus=0.05, entropies=bonus)
    grpo_toy.train("exact", steps=60, kl_ref=0.2, entropies=penalty)
    last = lambda values: sum(values[-20:]) / 20  # noqa: E731
    assert last(bonus) > last(plain) + 1.0 and last(penalty) > last(plain) + 0.3, (plain, bonus, penalty)


def test_token_f1():
    assert grpo_toy.token_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert grpo_toy.token_f1([1, 1, 4], [1, 2, 3]) == pytest.approx(1 / 3)
    assert grpo_toy.token_f1([5], [1]) == 0.0
