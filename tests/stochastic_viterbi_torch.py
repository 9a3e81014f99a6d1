"""The write-up's stochastic Viterbi in plain PyTorch with autograd, driven by given uniforms: the oracle
for the gradient of ``beam_probs`` (the draws are the inverse-CDF picks of docs/design.md §3 instead of
``torch.multinomial``; everything else is the write-up's computation, with the design's padding rule)."""

from __future__ import annotations

import torch


def stochastic_viterbi_torch(beam_scores, beam_tokens, E1, E2, uniforms, temperature=1.0, lengths=None):
    """beam_scores (B, T, K), beam_tokens (B, T, K), E1/E2 (V, D) tensors (any may require grad);
    uniforms (B, T-1, K, N). Returns (beam_probs (B, T, K, N), beam_idx (B, T, N))."""
    B, T, K = beam_scores.shape
    N = uniforms.shape[3]
    lengths = [T] * B if lengths is None else [int(x) for x in lengths]
    left = E1[beam_tokens[:, :-1]]  # (B, T-1, K, D)
    right = E2[beam_tokens[:, 1:]]
    trans = torch.einsum("btid,btjd->btij", left, right)
    score = beam_scores[:, 0, :, None].expand(B, K, N)
    history, backs = [score], []
    for t in range(1, T):
        logits = score[:, :, None, :] + trans[:, t - 1, :, :, None]  # (B, i, j, N)
        with torch.no_grad():
            probs = torch.softmax(logits.double() / temperature, dim=1)
            cdf = probs.cumsum(dim=1)
            target = uniforms[:, t - 1][:, None].double() * cdf[:, -1:]
            picks = (cdf <= target).sum(dim=1).clamp(max=K - 1)  # smallest i with target < cdf[i]
        new = logits.gather(1, picks[:, None]).squeeze(1) + beam_scores[:, t, :, None]
        live = torch.tensor([t < L for L in lengths])[:, None, None]
        identity = torch.arange(K)[None, :, None].expand(B, K, N)
        score = torch.where(live, new, score)
        backs.append(torch.where(live, picks, identity))
        history.append(score)
    path = torch.stack(history, dim=1)  # (B, T, K, N)
    beam_probs = torch.softmax(path, dim=2)
    padded = torch.tensor([[t >= L for t in range(T)] for L in lengths])[:, :, None, None]
    beam_probs = torch.where(padded, torch.zeros_like(beam_probs), beam_probs)
    index = torch.stack([path[b, L - 1].argmax(dim=0) for b, L in enumerate(lengths)])  # (B, N)
    idx = [index]
    for back in reversed(backs):
        index = back.gather(1, index[:, None, :])[:, 0, :]
        idx.append(index)
    return beam_probs, torch.stack(idx[::-1], dim=1)
