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
    log=None,
    entropies=None,
):
    """Run GRPO; returns the mean reward of every step's samples (and appends the policy's mean exact
    entropy per step to ``entropies`` when given).

    ``entropy_bonus`` C subtracts C * mean H(p) from the loss; ``kl_ref`` C adds C * mean KL(p || ref),
    ref being a frozen copy of the initial policy (both exact, DynamicCRF.entropy and DynamicCRF.kl).
    """
    torch.manual_seed(seed)
    task = Task(seed=seed)
    model = Captioner(task)
    frozen = copy.deepcopy(model).requires_grad_(False)  # the KL reference: the initial policy
    writeup_sampler = StochasticViterbiSamples(task.vocab, low_rank=8, beam_size=model.crf.beam, num_samples=group)
    writeup_sampler.E1, writeup_sampler.E2 = model.crf.E1, model.crf.E2  # the same tables
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    @torch.no_grad()
    def draw(x):
        """The group's tokens (B*G, T), group-major per input, and their log-probabilities now."""
        emissions = model.emissions(x)
        if sampler == "exact":
            tokens, _ = model.crf.sample(emissions, group)
        else:
            tokens = writeup_sampler._compute_grpo_samples(emissions)[2]
        flat = tokens.permute(0, 2, 1).reshape(-1, task.steps)
        return flat, model.crf(emissions.repeat_interleave(group, 0), flat)

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
        flat, old_log_prob = draw(x)
        rewards = torch.tensor([token_f1(s.tolist(), reference[i // group].tolist()) for i, s in enumerate(flat)])
        rewards = rewards.view(batch, group)
        advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
        advantages = advantages.reshape(-1)
        for _ in range(ppo_epochs):
            loss = ppo_loss(x, flat, old_log_prob, advantages)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rewards_per_step.append(rewards.mean().item())
        if entropies is not None:
            with torch.no_grad():
                entropies.append(model.crf.entropy(model.emissions(x)).mean().item())
        if log is not None and (step % 10 == 0 or step == steps - 1):
            log(f"step {step:4d}  mean reward {rewards_per_step[-1]:.3f}")
    return rewards_per_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampler", choices=["exact", "stochastic-viterbi"], default="exact")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the sampling step and the loss")
    parser.add_argument("--entropy-bonus", type=float, default=0.0, help="C: the loss subtracts C * mean H(p)")
    parser.add_argument("--kl-ref", type=float, default=0.0, help="C: the loss adds C * mean KL(p || initial p)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    entropies = []
    rewards = train(
        args.sampler,
        steps=args.steps,
        seed=args.seed,
        compile=args.compile,
        entropy_bonus=args.entropy_bonus,
        kl_ref=args.kl_ref,
        log=print,
        entropies=entropies,
    )
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    print(
        f"policy entropy {sum(entropies[:20]) / 20:.2f} (first 20 steps) -> {sum(entropies[-20:]) / 20:.2f} "
        "(last 20 steps) nats"
    )
    print(
        f"{args.sampler} sampler{' (compiled)' if args.compile else ''}: mean reward {first:.3f} (first 20 steps) "
        f"-> {last:.3f} (last 20 steps) "
        f"in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
