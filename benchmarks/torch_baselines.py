"""Pure-PyTorch baselines, written from DESIGN §3: what a user of the write-up would run.

* :func:`seed_sampler` — the write-up's stochastic Viterbi: ``torch.topk`` beam, one ``bmm`` for every
  transition block, then a Python loop over positions with ``softmax`` + ``multinomial`` per state.
* :func:`viterbi` — fairseq-style beam Viterbi (``DynamicCRF.forward_decoder``): the same transition
  blocks, ``max`` over predecessors per step.
"""

from __future__ import annotations

import torch


def transition_blocks(beam_tokens: torch.Tensor, E1: torch.Tensor, E2: torch.Tensor) -> torch.Tensor:
    """(B, T-1, K, K) blocks ``E1[tok[t-1, i]] . E2[tok[t, j]]`` through one batched matmul."""
    B, T, K = beam_tokens.shape
    left = E1[beam_tokens[:, :-1]].reshape(-1, K, E1.shape[1])
    right = E2[beam_tokens[:, 1:]].reshape(-1, K, E2.shape[1])
    return torch.bmm(left, right.transpose(1, 2)).view(B, T - 1, K, K)


def stochastic_viterbi(emissions, E1, E2, k, num_samples=1, temperature=1.0, generator=None):
    """The write-up's sampler from emissions (B, T, V): ``torch.topk`` beam, then :func:`stochastic_viterbi_beam`."""
    beam_scores, beam_tokens = torch.topk(emissions, k, 2)
    return stochastic_viterbi_beam(beam_scores, beam_tokens, E1, E2, num_samples, temperature, generator)


def stochastic_viterbi_beam(beam_scores, beam_tokens, E1, E2, num_samples=1, temperature=1.0, generator=None):
    """The write-up's sampler on a given beam, N chains in the last dimension.

    Returns (beam_probs (B, T, K, N), beam_idx (B, T, N), tokens (B, T, N)).
    """
    B, T, K = beam_scores.shape
    N = num_samples
    trans = transition_blocks(beam_tokens, E1, E2)
    score = beam_scores[:, 0, :, None].expand(B, K, N)  # (B, K, N)
    history = [score]
    backpointers = []
    for t in range(1, T):
        # logits[b, i, j, n] = score[b, i, n] + trans[b, t-1, i, j]; draw i for every (b, j, n)
        logits = score[:, :, None, :] + trans[:, t - 1, :, :, None]
        flat = logits.permute(0, 2, 3, 1).reshape(-1, K)
        probs = torch.softmax(flat / temperature, dim=-1)
        picks = torch.multinomial(probs, 1, generator=generator)
        score = flat.gather(1, picks).view(B, K, N) + beam_scores[:, t, :, None]
        backpointers.append(picks.view(B, K, N))
        history.append(score)
    path_scores = torch.stack(history, dim=1)  # (B, T, K, N)
    beam_probs = torch.softmax(path_scores, dim=2)
    index = score.argmax(dim=1)  # (B, N)
    path = [index]
    for back in reversed(backpointers):
        index = back.gather(1, index[:, None, :])[:, 0, :]
        path.append(index)
    beam_idx = torch.stack(path[::-1], dim=1)  # (B, T, N)
    tokens = beam_tokens.gather(2, beam_idx)
    return beam_probs, beam_idx, tokens


def viterbi(emissions, E1, E2, k):
    """fairseq-style Viterbi from emissions: ``torch.topk`` beam, then :func:`viterbi_beam`."""
    beam_scores, beam_tokens = torch.topk(emissions, k, 2)
    return viterbi_beam(beam_scores, beam_tokens, E1, E2)


def viterbi_beam(beam_scores, beam_tokens, E1, E2):
    """fairseq-style Viterbi on a given beam. Returns (best score (B,), tokens (B, T))."""
    B, T, K = beam_scores.shape
    trans = transition_blocks(beam_tokens, E1, E2)
    score = beam_scores[:, 0]
    backpointers = []
    for t in range(1, T):
        score, index = (score[:, :, None] + trans[:, t - 1]).max(dim=1)
        score = score + beam_scores[:, t]
        backpointers.append(index)
    best, index = score.max(dim=1)
    path = [index]
    for back in reversed(backpointers):
        index = back.gather(1, index[:, None])[:, 0]
        path.append(index)
    beam_idx = torch.stack(path[::-1], dim=1)
    return best, beam_tokens.gather(2, beam_idx[:, :, None])[:, :, 0]


def forced_beam(emissions, targets, k):
    """fairseq's beam for the likelihood: the top k tokens with each target forced in (score +inf for the
    selection only). Returns the beam's token ids (B, T, K); no gradient flows through the selection."""
    forced = emissions.detach().scatter(2, targets[:, :, None], float("inf"))
    return forced.topk(k, 2)[1]


def log_likelihood_beam(beam_scores, beam_tokens, targets, E1, E2):
    """fairseq-style ``DynamicCRF.forward`` on a beam that holds the targets (full-length sequences):
    S(targets) - log Z, with log Z a log-sum-exp forward pass over the beam; differentiable."""
    B, T, K = beam_scores.shape
    slots = (beam_tokens == targets[:, :, None]).to(torch.int64).argmax(2)
    numerator = beam_scores.gather(2, slots[:, :, None])[:, :, 0].sum(1)
    numerator = numerator + (E1[targets[:, :-1]] * E2[targets[:, 1:]]).sum((1, 2))
    trans = transition_blocks(beam_tokens, E1, E2)
    alpha = beam_scores[:, 0]
    for t in range(1, T):
        alpha = torch.logsumexp(alpha[:, :, None] + trans[:, t - 1], dim=1) + beam_scores[:, t]
    return numerator - torch.logsumexp(alpha, dim=1)


def log_likelihood(emissions, targets, E1, E2, k):
    """fairseq-style ``DynamicCRF.forward`` from emissions (B, T, V): log p(targets), differentiable with
    respect to the emissions (through the gathered beam scores) and the tables."""
    beam_tokens = forced_beam(emissions, targets, k)
    return log_likelihood_beam(emissions.gather(2, beam_tokens), beam_tokens, targets, E1, E2)
