"""One GRPO step of a small policy with the DynamicCRF output layer, optionally under
DistributedDataParallel (gloo, CPU); saves the parameters' gradients. Run by test_distributed.py:

    python tests/ddp_worker.py --rank R --world 2 --port P --out grads_R.pt   # one of two ranks
    python tests/ddp_worker.py --rank 0 --world 1 --out grads.pt              # the whole batch alone
"""

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from viterbi_numba.adapters.torch import DynamicCRF

FEATURES, STEPS, VOCAB, GROUP, EXAMPLES = 6, 5, 12, 4, 4


class Policy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(FEATURES, STEPS * VOCAB)
        self.crf = DynamicCRF(VOCAB, low_rank=3, beam_size=6)

    def emissions(self, x):
        return self.encoder(x).view(-1, STEPS, VOCAB)

    def forward(self, x, tokens, old_log_prob, advantages, clip=0.2):
        """The clipped PPO objective of GRPO for sampled ``tokens`` (B*G, T), re-scored by the CRF."""
        log_prob = self.crf(self.emissions(x).repeat_interleave(GROUP, 0), tokens)
        ratio = torch.exp(log_prob - old_log_prob)
        return -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).mean()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--port", type=int, default=29500)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    policy = Policy().double()
    # the global batch and its samples, the same in every process
    x = torch.randn(EXAMPLES, FEATURES, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emissions = policy.emissions(x)
        tokens, _ = policy.crf.sample(emissions, GROUP, generator=torch.Generator().manual_seed(2))
        tokens = tokens.permute(0, 2, 1).reshape(EXAMPLES * GROUP, STEPS)
        old_log_prob = policy.crf(emissions.repeat_interleave(GROUP, 0), tokens)
        rewards = (tokens % 3 == 0).double().mean(1).view(EXAMPLES, GROUP)
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).reshape(-1)
    # this process's shard of the examples (and of their groups)
    per_rank = EXAMPLES // args.world
    rows = slice(args.rank * per_rank, (args.rank + 1) * per_rank)
    groups = slice(rows.start * GROUP, rows.stop * GROUP)
    model = policy
    if args.world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world
        )
        model = DistributedDataParallel(policy)
    loss = model(x[rows], tokens[groups], old_log_prob[groups] - 0.05, advantages[groups])
    loss.backward()
    torch.save({name: p.grad for name, p in policy.named_parameters()}, args.out)
    if args.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
