"""GRPO on a toy captioning task with the DynamicCRF output layer, on the CPU.

Each input is a random feature vector ("image"); its reference caption is a fixed function of it (T
tokens, each the argmax of a hidden linear map). A one-layer encoder turns the features into emissions
(B, T, V); ``DynamicCRF`` is the output layer. Every step draws a group of samples per input, rewards
each with token-F1 against the reference, takes the group mean as baseline (GRPO), and runs a clipped
PPO update whose ratio re-scores the sampled tokens with ``DynamicCRF.forward``.

    python examples/grpo_toy.py                    # exact samples (crf.sample)
    python examples/grpo_toy.py --sampler stochastic-viterbi  # the write-up's sampler (StochasticViterbiSamples)
    python examples/grpo_toy.py --compile          # the sampling step and the PPO loss under torch.compile
    python examples/grpo_toy.py --entropy-bonus 0.01 --kl-ref 0.05  # exact regularisers (DynamicCRF.entropy, .kl)
    python examples/grpo_toy.py --without-replacement  # distinct samples per group, priority-weighted advantages

Each run prints the mean reward and the share of zero-variance groups (every reward in the group equal,
so every GRPO advantage is 0 and the group teaches nothing). With ``--without-replacement`` each group is
N distinct sequences (``crf.sample(..., replacement=False)``); the reward curve is then the
priority-sampling estimate of the expected reward, sum_i w_i R_i, unbiased as the plain mean is with
replacement (see :func:`priority_advantages` for the update).

With ``--compile`` the two model-side functions (draw the group and score it; the clipped PPO loss) are
compiled with ``fullgraph=True``: the CRF's operators are ``torch.library`` custom ops, so the whole of
each is one graph, and the samples are the eager run's (the seeds come from torch's generator).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import Counter

import torch
from torch import nn

from viterbi_numba.adapters.torch import DynamicCRF, StochasticViterbiSamples


class Task:
    """Random features and their reference captions (T tokens out of V)."""

    def __init__(self, features=16, steps=6, vocab=30, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.hidden = torch.randn(steps, vocab, features, generator=gen)
        self.features, self.steps, self.vocab = features, steps, vocab
        self.gen = gen

    def batch(self, size):
        x = torch.randn(size, self.features, generator=self.gen)
        return x, torch.einsum("tvf,bf->btv", self.hidden, x).argmax(dim=2)  # (B, F), (B, T)


def priority_advantages(rewards, weights):
    """GRPO's advantages (B, G) for groups drawn without replacement, from their rewards (B, G) and
    priority-sampling weights w = p / q (B, G).

    Distinct samples are not i.i.d. draws of p (they over-represent its tail), so the plain group mean and
    std would be biased. The weights make sum_i w_i f(y_i) an unbiased estimate of E_p[f] (priority
    sampling, Kool et al. 2019 and 2020). They are self-normalised here, w~ = w / sum w, and give GRPO's
    baseline b = sum w~ R, scale s^2 = sum w~ (R - b)^2 and each sample's share of the policy gradient:
    A_i = G w~_i (R_i - b) / s, so that the loss's mean over the group (before clipping) is
    sum_i w~_i (R_i - b) / s * ratio_i. Equal weights give GRPO's advantage back (with the population std),
    and a group whose rewards are all equal still gets 0. Self-normalising costs an O(1/G) bias, as GRPO's
    own group statistics do (they include the sample itself), and keeps the advantages' scale off the sum
    of the weights, which is 1 only on average; the unbiased alternative, the unordered-set estimator with
    its built-in baseline (Kool et al. 2020), needs leave-one-out probabilities of unordered sets, sums over
    the orders of the group.
    """
    normalised = weights / weights.sum(1, keepdim=True)
    baseline = (normalised * rewards).sum(1, keepdim=True)
    spread = (normalised * (rewards - baseline) ** 2).sum(1, keepdim=True).sqrt()
    return rewards.shape[1] * normalised * (rewards - baseline) / (spread + 1e-6)


def token_f1(sample, reference):
    """F1 of the multisets of tokens of two sequences."""
    overlap = sum((Counter(sample) & Counter(reference)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(sample), overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


class Captioner(nn.Module):
    def __init__(self, task, beam=12, rank=8):
        super().__init__()
        self.task = task
        self.encoder = nn.Linear(task.features, task.steps * task.vocab)
        self.crf = DynamicCRF(task.vocab, low_rank=rank, beam_size=beam)

    def emissions(self, x):
        return self.encoder(x).view(-1, self.task.steps, self.task.vocab)


def train(
    sampler="exact",
    steps=400,
    batch=16,
    group=8,
    lr=0.03,
    clip=0.2,
    ppo_epochs=2,
    seed=0,
    compile=False,
    entropy_bonus=0.0,
    kl_ref=0.0,
    replacement=True,
    log=None,
    entropies=None,
    zero_variance=None,
):
    """Run GRPO; returns the mean reward of every step's samples (without replacement its priority-sampling
    estimate, the weighted sum), and appends the policy's mean exact entropy per step to ``entropies`` and
    the fraction of zero-variance groups per step to ``zero_variance`` when given.

    ``entropy_bonus`` C subtracts C * mean H(p) from the loss; ``kl_ref`` C adds C * mean KL(p || ref),
    ref being a frozen copy of the initial policy (both exact, DynamicCRF.entropy and DynamicCRF.kl).
    ``replacement=False`` draws each group's samples distinct (the exact sampler only) and weighs the
    advantages by :func:`priority_advantages`.
    """
    if not replacement and sampler != "exact":
        raise ValueError(f"sampling without replacement needs the exact sampler, got sampler={sampler!r}")
    torch.manual_seed(seed)
    task = Task(seed=seed)
    model = Captioner(task)
    frozen = copy.deepcopy(model).requires_grad_(False)  # the KL reference: the initial policy
    writeup_sampler = StochasticViterbiSamples(task.vocab, low_rank=8, beam_size=model.crf.beam, num_samples=group)
    writeup_sampler.E1, writeup_sampler.E2 = model.crf.E1, model.crf.E2  # the same tables
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    @torch.no_grad()
    def draw(x):
        """The group's tokens (B*G, T), group-major per input, their log-probabilities now, and without
        replacement their priority-sampling weights (B, G) (None with replacement)."""
        emissions = model.emissions(x)
        weights = None
        if sampler != "exact":
            tokens = writeup_sampler._compute_grpo_samples(emissions)[2]
        elif replacement:
            tokens, _ = model.crf.sample(emissions, group)
        else:  # the beam holds 12**6 paths, so every group has all G samples (count == G)
            tokens, _, weights, _, _ = model.crf.sample(emissions, group, replacement=False)
        flat = tokens.permute(0, 2, 1).reshape(-1, task.steps)
        return flat, model.crf(emissions.repeat_interleave(group, 0), flat), weights

    def ppo_loss(x, flat, old_log_prob, advantages):
        emissions = model.emissions(x)
        log_prob = model.crf(emissions.repeat_interleave(group, 0), flat)
        ratio = torch.exp(log_prob - old_log_prob)
        loss = -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).mean()
        if entropy_bonus:
            loss = loss - entropy_bonus * model.crf.entropy(emissions).mean()
        if kl_ref:
            loss = loss + kl_ref * model.crf.kl(emissions, frozen.crf, frozen.emissions(x)).mean()
        return loss

    if compile:
        draw, ppo_loss = torch.compile(draw, fullgraph=True), torch.compile(ppo_loss, fullgraph=True)
    rewards_per_step = []
    for step in range(steps):
        x, reference = task.batch(batch)
        flat, old_log_prob, weights = draw(x)
        rewards = torch.tensor([token_f1(s.tolist(), reference[i // group].tolist()) for i, s in enumerate(flat)])
        rewards = rewards.view(batch, group)
        if weights is None:
            advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
            mean_reward = rewards.mean()
        else:
            weights = weights.to(rewards.dtype)
            advantages = priority_advantages(rewards, weights)
            mean_reward = (weights * rewards).sum(1).mean()
        advantages = advantages.reshape(-1)
        same_rewards = (rewards.amax(1) == rewards.amin(1)).double().mean().item()
        for _ in range(ppo_epochs):
            loss = ppo_loss(x, flat, old_log_prob, advantages)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rewards_per_step.append(mean_reward.item())
        if entropies is not None:
            with torch.no_grad():
                entropies.append(model.crf.entropy(model.emissions(x)).mean().item())
        if zero_variance is not None:
            zero_variance.append(same_rewards)
        if log is not None and (step % 10 == 0 or step == steps - 1):
            log(f"step {step:4d}  mean reward {rewards_per_step[-1]:.3f}  zero-variance groups {same_rewards:.0%}")
    return rewards_per_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampler", choices=["exact", "stochastic-viterbi"], default="exact")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the sampling step and the loss")
    parser.add_argument("--entropy-bonus", type=float, default=0.0, help="C: the loss subtracts C * mean H(p)")
    parser.add_argument("--kl-ref", type=float, default=0.0, help="C: the loss adds C * mean KL(p || initial p)")
    parser.add_argument(
        "--without-replacement",
        action="store_true",
        help="draw each group's samples distinct (exact sampler), with priority-weighted advantages",
    )
    args = parser.parse_args(argv)
    if args.without_replacement and args.sampler != "exact":
        parser.error("--without-replacement needs --sampler exact")
    start = time.perf_counter()
    entropies, zero_variance = [], []
    rewards = train(
        args.sampler,
        steps=args.steps,
        seed=args.seed,
        compile=args.compile,
        entropy_bonus=args.entropy_bonus,
        kl_ref=args.kl_ref,
        replacement=not args.without_replacement,
        log=print,
        entropies=entropies,
        zero_variance=zero_variance,
    )
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    print(
        f"policy entropy {sum(entropies[:20]) / 20:.2f} (first 20 steps) -> {sum(entropies[-20:]) / 20:.2f} "
        "(last 20 steps) nats"
    )
    print(
        f"zero-variance groups {sum(zero_variance[:20]) / 20:.1%} (first 20 steps) -> "
        f"{sum(zero_variance[-20:]) / 20:.1%} (last 20 steps), {sum(zero_variance) / len(zero_variance):.1%} of all"
    )
    mode = " without replacement" if args.without_replacement else ""
    print(
        f"{args.sampler} sampler{mode}{' (compiled)' if args.compile else ''}: mean reward {first:.3f} "
        f"(first 20 steps) -> {last:.3f} (last 20 steps), {sum(rewards) / len(rewards):.3f} over all "
        f"{len(rewards)} steps in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
