"""CPU decoding kernels (``@njit``, ``prange`` over sequences): top-K, Viterbi, stochastic Viterbi.

These functions trust their inputs: ``viterbi_numba._validate`` checks shapes, dtypes and value ranges
and ``cpu/ops.py`` allocates the outputs before it calls them. Every kernel works per sequence on
thread-local scratch, so the results do not depend on how many threads run them.

Conventions shared by the kernels
* Beam scores are shifted per position by their maximum before use (``shift[t]``), so a large constant
  added to the scores neither loses float32 precision nor changes a decision; reported path scores add
  the cumulative shift back.
* The transition block ``trans[i, j] = E1[tok[t-1, i]] . E2[tok[t, j]]`` of one step is computed into
  a (K, K) scratch array and reused, never stored for all steps.
* Positions at or after a sequence's length are padding: the path score carries over, back-pointers are
  the identity, probabilities are 0 and indices/tokens are ``PAD`` (-1).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import _portable
from .intrinsics import fast_exp, fmax

# "nsz"/"arcp"/"afn" let LLVM vectorise without changing -inf handling or summation order; "reassoc"
# and "contract" are left out so that sums are done in the documented sequential order.
_FASTMATH = {"nsz", "arcp", "afn"}

portable = _portable.build(njit(cache=True, inline="always"))
chain_uniforms = portable.chain_uniforms
inverse_cdf_pick = portable.inverse_cdf_pick
path_increments = portable.path_increments
fairseq_step_scores = portable.fairseq_step_scores
ranks_above = portable.ranks_above
backtrace = portable.backtrace
place_forced = portable.place_forced
keep_best = portable.keep_best
nbest_paths = portable.nbest_paths


# --------------------------------------------------------------------------------------------------
# beam top-K
# --------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _worse(key_a, id_a, key_b, id_b):
    """True when (key_a, id_a) ranks below (key_b, id_b): lower score, or equal score and larger id."""
    return ranks_above(key_b, id_b, key_a, id_a)


@njit(cache=True, inline="always")
def _sift_down(keys, ids, start, size):
    """Restore the min-heap (worst element at the root) below ``start`` within ``keys[:size]``."""
    pos = start
    key = keys[pos]
    idx = ids[pos]
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _worse(keys[child + 1], ids[child + 1], keys[child], ids[child]):
            child += 1
        if not _worse(keys[child], ids[child], key, idx):
            break
        keys[pos] = keys[child]
        ids[pos] = ids[child]
        pos = child
    keys[pos] = key
    ids[pos] = idx


_SAMPLE = 2048  # strided sample that sets the pre-filter threshold of a long row
_OVERSAMPLE = 3  # the threshold aims at about 3k candidates; fewer than k (p < 1e-5) falls back


@njit(cache=True, inline="always")
def _sample_threshold(row, k, keys, ids):
    """A score that about ``_OVERSAMPLE * k`` entries of ``row`` reach, from a strided sample of it."""
    V = row.shape[0]
    stride = V // _SAMPLE
    rank = min(_SAMPLE, (_SAMPLE * _OVERSAMPLE * k) // V + 1)
    for s in range(rank):
        keys[s] = row[s * stride]
        ids[s] = s
    for start in range(rank // 2 - 1, -1, -1):
        _sift_down(keys, ids, start, rank)
    for s in range(rank, _SAMPLE):
        x = row[s * stride]
        if x > keys[0]:
            keys[0] = x
            ids[0] = s
            _sift_down(keys, ids, 0, rank)
    return keys[0]


@njit(cache=True, parallel=True)
def topk_beam_kernel(emissions, k, force_tokens, use_force, out_scores, out_tokens, bad_rows):
    """Per (b, t) row of ``emissions`` (B, T, V): the k best tokens, best first (ties: lower id first).

    With ``use_force``, ``force_tokens[b, t]`` is in the beam whatever its score, kept at its own score.
    ``bad_rows[b, t]`` is set to 1 where the row holds NaN or +inf (results there are meaningless).
    A long row is first filtered by a threshold from a sample (one predictable branch per entry), so the
    heap only sees a few k candidates; if fewer than k pass, the row is redone without the filter.
    """
    B, T, V = emissions.shape
    inf = np.inf
    for row_id in prange(B * T):
        b = row_id // T
        t = row_id - b * T
        row = emissions[b, t]
        keys = np.empty(max(k, _SAMPLE), dtype=emissions.dtype)
        ids = np.empty(max(k, _SAMPLE), dtype=np.int64)
        candidates = np.empty(V, dtype=np.int32)
        forced = force_tokens[b, t] if use_force else -1
        threshold = _sample_threshold(row, k, keys, ids) if V >= 16 * k else -inf
        while True:
            # candidates: every id whose score is not below the threshold (NaN lands here too)
            count = 0
            bad = 0
            for u in range(V):
                x = row[u]
                if not x < threshold:
                    if not x < inf:
                        bad = 1
                    candidates[count] = u
                    count += 1
            if count >= k or threshold == -inf:
                break
            threshold = -inf
        bad_rows[b, t] = bad
        # fill the heap with the forced token (ranked first) and the first candidates that are not forced
        filled = 0
        if forced >= 0:
            keys[0] = inf
            ids[0] = forced
            filled = 1
        c = 0
        while filled < k:
            u = candidates[c]
            if u != forced:
                keys[filled] = row[u]
                ids[filled] = u
                filled += 1
            c += 1
        for start in range(k // 2 - 1, -1, -1):
            _sift_down(keys, ids, start, k)
        # the rest: ids only grow, so an equal score never displaces an earlier token
        root = keys[0]
        first_unseen = c
        for c in range(first_unseen, count):
            u = candidates[c]
            x = row[u]
            if x > root and u != forced:
                keys[0] = x
                ids[0] = u
                _sift_down(keys, ids, 0, k)
                root = keys[0]
        # heapsort: the worst goes to the end each time, leaving best-first order
        for size in range(k - 1, 0, -1):
            key0 = keys[0]
            id0 = ids[0]
            keys[0] = keys[size]
            ids[0] = ids[size]
            keys[size] = key0
            ids[size] = id0
            _sift_down(keys, ids, 0, size)
        if forced >= 0:  # the forced token sits first with key +inf: move it to its own score's place
            place_forced(keys, ids, k, row[forced], forced)
        for slot in range(k):
            out_scores[b, t, slot] = keys[slot]
            out_tokens[b, t, slot] = ids[slot]


# --------------------------------------------------------------------------------------------------
# shared per-step pieces
# --------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _transition_block(src_rows, dst_rows, E1, E2, src_emb, dst_emb, trans):
    """trans[i, j] = E1[src_rows[i]] . E2[dst_rows[j]]: two gathered (K, D) copies, one BLAS gemm.

    BLAS (through SciPy) runs the K x D x K product at about twice the speed of the best vectorised
    loop Numba gives here; the caller keeps BLAS single-threaded, since the kernels already use every
    core across sequences.
    """
    K = src_rows.shape[0]
    D = E1.shape[1]
    for i in range(K):
        src = E1[src_rows[i]]
        for d in range(D):
            src_emb[i, d] = src[d]
    for j in range(K):
        dst = E2[dst_rows[j]]
        for d in range(D):
            dst_emb[j, d] = dst[d]
    np.dot(src_emb, dst_emb.T, trans)  # the transposed operand goes to BLAS as is, no copy


@njit(cache=True, inline="always")
def _position_shifts(scores_b, length, shift, cum_shift):
    """shift[t] = max_k scores_b[t, k]; cum_shift[t] = sum of shifts up to min(t, length - 1)."""
    T, K = scores_b.shape
    total = 0.0
    for t in range(T):
        if t < length:
            m = scores_b[t, 0]
            for k in range(1, K):
                if scores_b[t, k] > m:
                    m = scores_b[t, k]
            shift[t] = m
            total += m
        else:
            shift[t] = 0.0
        cum_shift[t] = total


# --------------------------------------------------------------------------------------------------
# Viterbi (max-product)
# --------------------------------------------------------------------------------------------------
_ROW_BLOCK = 32  # predecessor rows in the first gemm of the pruned Viterbi step


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _stage_columns(src_rows, dst_rows, E1, E2, dst_emb, dst_norm):
    """The branch and bound's column side: dst_emb[j] = E2[dst_rows[j]] and dst_norm[j] = its norm.
    Returns ``reach``, a bound on a_i . b_j / |b_j| over the step's rows a_i = E1[src_rows[i]] (their
    largest norm, with room for the gemm's rounding)."""
    D = E1.shape[1]
    for j in range(dst_rows.shape[0]):
        dst = E2[dst_rows[j]]
        norm = 0.0
        for d in range(D):
            dst_emb[j, d] = dst[d]
            norm += dst[d] * dst[d]
        dst_norm[j] = np.sqrt(norm)
    max_src_norm = 0.0
    for i in range(src_rows.shape[0]):
        src = E1[src_rows[i]]
        norm = 0.0
        for d in range(D):
            norm += src[d] * src[d]
        max_src_norm = max(max_src_norm, np.sqrt(norm))
    return max_src_norm * 1.001


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _any_open(top, reach, dst_norm, bars):
    """Whether a predecessor whose (best) prefix is ``top`` can still reach some column's ``bars[j]``
    (its best so far; +inf: closed): top + a_i . b_j <= top + reach |b_j| (Cauchy-Schwarz), with a
    margin for rounding."""
    for j in range(bars.shape[0]):
        bar = bars[j]
        if bar != np.inf and top + reach * dst_norm[j] + 1e-4 * (abs(bar) + 1.0) >= bar:
            return True
    return False


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _rows_product(src_rows, order, start, E1, src_block, dst_emb, trans_block):
    """The next block of predecessor rows, order[start:start + rows], times every column, into
    trans_block[:rows]; blocks of 32, 32, 64, 128, ... (at most all K), so that few gemms run when
    nothing prunes. Returns rows."""
    K = order.shape[0]
    D = E1.shape[1]
    rows = min(max(_ROW_BLOCK, start), K - start)
    for r in range(rows):
        src = E1[src_rows[order[start + r]]]
        for d in range(D):
            src_block[r, d] = src[d]
    np.dot(src_block[:rows], dst_emb.T, trans_block[:rows])
    return rows


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _viterbi_step(prev, src_rows, dst_rows, E1, E2, order, dst_norm, src_block, dst_emb, trans_block, best, arg):
    """best[j] = max_i prev[i] + E1[src_rows[i]] . E2[dst_rows[j]]; arg[c, j] = the lowest such i.

    Returns c, the row of ``arg`` (2, K) that holds the result.

    Exact branch and bound: predecessor rows are visited by decreasing ``prev``, in blocks that double
    (32, 32, 64, ...) with one gemm each, and the visit stops once no remaining row can reach any column's best, since
    prev[i] + a_i . b_j <= prev[i] + max|a| |b_j| (Cauchy-Schwarz; a margin covers rounding). Where the
    scores of a step are spread wider than the transitions, most of the K x K x D product is skipped.
    """
    K = prev.shape[0]
    reach = _stage_columns(src_rows, dst_rows, E1, E2, dst_emb, dst_norm)
    for j in range(K):
        best[j] = -np.inf
        arg[0, j] = K
    order[:] = np.argsort(-prev)
    current = 0  # arg[current] holds the arg-maxima so far (two buffers: see _vector)
    start = 0
    while start < K:
        if start > 0:
            top = prev[order[start]]
            if top == -np.inf or not _any_open(top, reach, dst_norm, best):
                break
        rows = _rows_product(src_rows, order, start, E1, src_block, dst_emb, trans_block)
        for r in range(rows):
            i = np.int32(order[start + r])
            s = prev[i]
            row = trans_block[r]
            read = arg[current]
            write = arg[1 - current]
            for j in range(K):
                cand = s + row[j]
                old = best[j]
                better = (cand > old) | ((cand == old) & (i < read[j]))  # ties: lowest i
                write[j] = i if better else read[j]
                best[j] = fmax(cand, old)
            current = 1 - current
        start += rows
    return current


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def viterbi_kernel(
    scores, tokens, E1, E2, lengths, fairseq_steps, out_beam_idx, out_tokens, out_score, out_step_scores
):
    """Best beam path per sequence; ties go to the lowest beam index, both per step and at the end.

    ``out_step_scores``: the increments of S(y) (``_portable.path_increments``), or with
    ``fairseq_steps`` fairseq's ``forward_decoder`` values: with c[t] the cumulative score of step t read
    at the path's beam index of step t+1 (at T-1: the final score), step t gets c[t] - c[t-1].
    """
    B, T, K = scores.shape
    D = E1.shape[1]
    dtype = scores.dtype
    for b in prange(B):
        length = lengths[b]
        order = np.empty(K, dtype=np.int64)
        dst_norm = np.empty(K, dtype=dtype)
        src_block = np.empty((K, D), dtype=dtype)
        dst_emb = np.empty((K, D), dtype=dtype)
        trans_block = np.empty((K, K), dtype=dtype)
        shift = np.empty(T, dtype=np.float64)
        cum_shift = np.empty(T, dtype=np.float64)
        history = np.empty((length, K), dtype=dtype)  # shifted cumulative scores per step
        back = np.empty((length, K), dtype=np.int32)
        best = np.empty(K, dtype=dtype)
        arg = np.empty((2, K), dtype=np.int32)
        _position_shifts(scores[b], length, shift, cum_shift)
        for j in range(K):
            history[0, j] = scores[b, 0, j] - shift[0]
        for t in range(1, length):
            c = _viterbi_step(
                history[t - 1],
                tokens[b, t - 1],
                tokens[b, t],
                E1,
                E2,
                order,
                dst_norm,
                src_block,
                dst_emb,
                trans_block,
                best,
                arg,
            )
            emission_shift = shift[t]
            for j in range(K):
                history[t, j] = best[j] + (scores[b, t, j] - emission_shift)
                back[t, j] = arg[c, j]
        y = backtrace(history[length - 1], back[1:], tokens[b], length, out_beam_idx[b], out_tokens[b])
        out_score[b] = history[length - 1, y] + cum_shift[length - 1]
        if fairseq_steps:
            fairseq_step_scores(history, cum_shift, out_beam_idx[b], length, out_score[b], out_step_scores[b])
        else:
            path_increments(scores[b], tokens[b], E1, E2, out_beam_idx[b], length, out_step_scores[b])
        for t in range(length, T):
            out_step_scores[b, t] = 0.0


# --------------------------------------------------------------------------------------------------
# the n best paths (list Viterbi)
# --------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _nbest_step(
    prev, src_rows, dst_rows, emissions, E1, E2, order, dst_norm, src_block, dst_emb, trans_block, lowest,
    kept, values, entries,
):  # fmt: skip
    """values[j] (n) = the n best of prev[i, r] + E1[src_rows[i]] . E2[dst_rows[j]] over (i, r), in
    ``keep_best``'s order, with the (i, r) of each as entries[j] = i * n + r; prev (K, n) holds each
    predecessor's list, best first (-inf where it has fewer). values must be -inf on entry; a column whose
    emission is -inf (no path passes there) is left so.

    ``_viterbi_step``'s exact branch and bound: predecessors are visited by decreasing best prefix, in
    blocks that double, one gemm each, until no remaining row can enter any column's list (Cauchy-
    Schwarz, with a margin for rounding). A row reaches a column's list only where its best prefix plus
    the transition is at least the list's n-th (``lowest``): one vectorised count per row finds whether
    any column is reached, and only those rows take the scalar inserts.
    """
    K, n = prev.shape
    reach = _stage_columns(src_rows, dst_rows, E1, E2, dst_emb, dst_norm)
    for j in range(K):
        lowest[j] = np.inf if emissions[j] == -np.inf else -np.inf  # +inf: nothing enters
        kept[j] = 0
    heads = prev[:, 0]
    order[:] = np.argsort(-heads)
    start = 0
    while start < K:
        top = heads[order[start]]
        if top == -np.inf or (start > 0 and not _any_open(top, reach, dst_norm, lowest)):
            break
        rows = _rows_product(src_rows, order, start, E1, src_block, dst_emb, trans_block)
        for r in range(rows):
            i = order[start + r]
            head = heads[i]
            row = trans_block[r]
            reached = 0
            for j in range(K):  # vectorised: does any column's list admit this row?
                reached += head + row[j] >= lowest[j]
            if reached == 0:
                continue
            own = prev[i]
            for j in range(K):
                if head + row[j] < lowest[j]:
                    continue
                for rank in range(n):
                    value = own[rank] + row[j]
                    if value == -np.inf or value < lowest[j]:
                        break
                    kept[j], entered = keep_best(values[j], entries[j], kept[j], value, i * n + rank)
                    if not entered:
                        break  # i's later ranks are no better and come after it
                    lowest[j] = values[j, n - 1]
                reached -= 1
                if reached == 0:
                    break  # every column this row reaches is done
        start += rows


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def nbest_kernel(scores, tokens, E1, E2, lengths, out_beam_idx, out_tokens, out_score, out_count):
    """The n = out_beam_idx.shape[2] best distinct beam paths per sequence, best first (list Viterbi,
    docs/design.md §4): for each position t and slot j the n best prefix scores ending there, each
    with the (slot, rank) it extends (``_nbest_step``). Lists are ordered by score, then lower slot, then
    lower rank (``keep_best``), at every step and at the end, which puts equal scores in a fixed order.
    ``out_count[b]``: the paths found (fewer than n when the beam has fewer finite paths); the rest are
    PAD with score -inf.
    """
    B, T, K = scores.shape
    n = out_beam_idx.shape[2]
    D = E1.shape[1]
    dtype = scores.dtype
    for b in prange(B):
        length = lengths[b]
        order = np.empty(K, dtype=np.int64)
        dst_norm = np.empty(K, dtype=dtype)
        src_block = np.empty((K, D), dtype=dtype)
        dst_emb = np.empty((K, D), dtype=dtype)
        trans_block = np.empty((K, K), dtype=dtype)
        lowest = np.empty(K, dtype=dtype)
        kept = np.empty(K, dtype=np.int64)
        shift = np.empty(T, dtype=np.float64)
        cum_shift = np.empty(T, dtype=np.float64)
        best = np.full((length, K, n), -np.inf, dtype=dtype)  # shifted prefix scores, best first
        from_entry = np.zeros((length, K, n), dtype=np.int64)  # slot * n + rank of the prefix extended
        _position_shifts(scores[b], length, shift, cum_shift)
        for j in range(K):
            best[0, j, 0] = scores[b, 0, j] - shift[0]  # -inf for a slot no path may use
        for t in range(1, length):
            _nbest_step(
                best[t - 1], tokens[b, t - 1], tokens[b, t], scores[b, t], E1, E2, order, dst_norm, src_block,
                dst_emb, trans_block, lowest, kept, best[t], from_entry[t],
            )  # fmt: skip
            for j in range(K):
                emission = scores[b, t, j] - shift[t]
                for r in range(n):
                    best[t, j, r] += emission  # -inf stays -inf
        out_count[b] = nbest_paths(
            best[length - 1], from_entry, tokens[b], length, cum_shift[length - 1], np.empty(n, dtype=dtype),
            np.empty(n, dtype=np.int64), out_beam_idx[b], out_tokens[b], out_score[b],
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the write-up's stochastic Viterbi
# --------------------------------------------------------------------------------------------------
_PICK_BLOCK = 16  # rows between the sampler's saved running sums


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _softmax_into(values, scratch, out_probs, n):
    """out_probs[:, n] = softmax(values) (values 1-D, K), the exps vectorised through ``scratch`` (K)."""
    K = values.shape[0]
    m = values[0]
    for k in range(1, K):
        m = values[k] if values[k] > m else m
    for k in range(K):
        scratch[k] = fast_exp(values[k] - m)
    total = 0.0
    for k in range(K):
        total += scratch[k]
    inv = 1.0 / total
    for k in range(K):
        out_probs[k, n] = scratch[k] * inv


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def softmax_pick(logits, scale, u, prefix):
    """Index drawn from softmax(logits * scale) with uniform u by the inverse CDF (``prefix``: scratch).

    The weights are exp((logits[i] - max) * scale), each exp'd on its own; used by both samplers.
    """
    K = logits.shape[0]
    m = logits[0]
    for i in range(1, K):
        m = max(m, logits[i])
    # the running sum starts from the first weight: ``prefix`` is scratch, never read before it is written
    running = fast_exp((logits[0] - m) * scale)
    prefix[0] = running
    for i in range(1, K):
        running += fast_exp((logits[i] - m) * scale)
        prefix[i] = running
    return inverse_cdf_pick(prefix, u * running, K)


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _direct_pick(prev, trans, j, inv_temp, target_u, logits, prefix):
    """The pick for state j from tempered logits prev[i] + trans[i, j], each exp'd on its own.

    Used where the factored weights of ``stochastic_viterbi_kernel`` would lose precision to underflow.
    """
    for i in range(prev.shape[0]):
        logits[i] = prev[i] + trans[i, j]
    return softmax_pick(logits, inv_temp, target_u, prefix)


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _draw_predecessors(
    prev,
    weights,
    trans,
    trans_weights,
    unif,
    inv_temp,
    tiny,
    picks,
    totals,
    checkpoints,
    targets,
    blocks,
    logits,
    prefix,
):
    """The sampling step of one chain: picks[j] = predecessor of state j, drawn with uniform unif[j].

    Column j's weights are weights[i] * trans_weights[i, j] (see ``stochastic_viterbi_kernel``); the pick
    is the smallest i with unif[j] * total_j < prefix_j[i]. One vectorised pass over the rows sums every
    column and saves the running sums every ``_PICK_BLOCK`` rows (``checkpoints``); each column's pick is
    then found by redoing its running sum from the last saved value not above its target, in the same
    order and arithmetic, so the result is that of a full scan. Columns whose total underflows below
    ``tiny``, or whose target rounding leaves no crossing, are redone by ``_direct_pick``.
    """
    K = prev.shape[0]
    for j in range(K):
        totals[j] = 0.0
    for i in range(K):
        a = weights[i]
        if a != 0.0:
            row = trans_weights[i]
            for j in range(K):
                totals[j] += a * row[j]
        if (i + 1) % _PICK_BLOCK == 0:
            checkpoints[(i + 1) // _PICK_BLOCK - 1, :] = totals
    # the block of rows where each column's running sum passes its target
    for j in range(K):
        targets[j] = unif[j] * totals[j]
        blocks[j] = 0
    for c in range(K // _PICK_BLOCK):
        for j in range(K):
            blocks[j] += np.int32(checkpoints[c, j] <= targets[j])
    for j in range(K):
        first = blocks[j] * _PICK_BLOCK
        running = checkpoints[blocks[j] - 1, j] if first > 0 else totals[j] * 0.0
        pick = K
        for i in range(first, min(first + _PICK_BLOCK, K)):
            a = weights[i]
            if a != 0.0:
                running += a * trans_weights[i, j]
                if running > targets[j]:
                    pick = i
                    break
        if totals[j] < tiny or pick == K:
            pick = _direct_pick(prev, trans, j, inv_temp, unif[j], logits, prefix)
        picks[j] = pick


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def stochastic_viterbi_kernel(
    scores,
    tokens,
    E1,
    E2,
    lengths,
    inv_temp,
    tiny,
    seed_lo,
    seed_hi,
    uniforms,
    use_uniforms,
    out_beam_probs,
    out_beam_idx,
    out_tokens,
    out_path_scores,
    out_backpointers,
    out_score,
):
    """The write-up's sampler (docs/design.md §3) for N = out_beam_idx.shape[2] independent chains per sequence.

    For chain n at step t and state j the predecessor is drawn from softmax_i((prev[i] + trans[i, j]) / temp)
    by the inverse-CDF rule with the uniform ``U[b, t-1, j, n]``. The weights are factored,
    ``exp((prev[i] - max prev) / temp) * exp((trans[i, j] - max_i trans[i, j]) / temp)``, so the K x K exps
    of a step are shared by all N chains; a column whose factored total falls below ``tiny`` (underflow)
    is recomputed directly. The draw itself is ``_draw_predecessors``.
    """
    B, T, K = scores.shape
    N = out_beam_idx.shape[2]
    D = E1.shape[1]
    dtype = scores.dtype
    for b in prange(B):
        length = lengths[b]
        src_emb = np.empty((K, D), dtype=dtype)
        dst_emb = np.empty((K, D), dtype=dtype)
        trans = np.empty((K, K), dtype=dtype)
        trans_weights = np.empty((K, K), dtype=dtype)
        column_max = np.empty(K, dtype=dtype)
        shift = np.empty(T, dtype=np.float64)
        cum_shift = np.empty(T, dtype=np.float64)
        chain_scores = np.empty((N, K), dtype=dtype)  # shifted cumulative scores per chain
        new_scores = np.empty(K, dtype=dtype)
        prev_weights = np.empty((N, K), dtype=dtype)
        row_needed = np.empty(K, dtype=np.bool_)
        totals = np.empty(K, dtype=dtype)
        targets = np.empty(K, dtype=dtype)
        unif = np.empty(K, dtype=np.float64)
        prefix = np.empty(K, dtype=dtype)  # scratch of _direct_pick
        picks = np.empty(K, dtype=np.int32)
        blocks = np.empty(K, dtype=np.int32)
        checkpoints = np.empty((K // _PICK_BLOCK, K), dtype=dtype)
        logits = np.empty(K, dtype=dtype)
        _position_shifts(scores[b], length, shift, cum_shift)
        for n in range(N):
            for j in range(K):
                chain_scores[n, j] = scores[b, 0, j] - shift[0]
                out_path_scores[b, 0, j, n] = scores[b, 0, j]
            _softmax_into(chain_scores[n], logits, out_beam_probs[b, 0], n)
        for t in range(1, length):
            _transition_block(tokens[b, t - 1], tokens[b, t], E1, E2, src_emb, dst_emb, trans)
            # per-chain factor exp((prev[i] - max prev) / temp); a row no chain can reach is never read
            for i in range(K):
                row_needed[i] = False
            for n in range(N):
                prev = chain_scores[n]
                m = prev[0]
                for i in range(1, K):
                    m = max(m, prev[i])
                for i in range(K):
                    prev_weights[n, i] = fast_exp((prev[i] - m) * inv_temp)
                    row_needed[i] |= prev_weights[n, i] > 0.0
            # shared factor exp((trans[i, j] - max_i trans[i, j]) / temp)
            for j in range(K):
                column_max[j] = trans[0, j]
            for i in range(1, K):
                row = trans[i]
                for j in range(K):
                    column_max[j] = fmax(row[j], column_max[j])
            for i in range(K):
                if row_needed[i]:
                    for j in range(K):
                        trans_weights[i, j] = fast_exp((trans[i, j] - column_max[j]) * inv_temp)
            emission_shift = shift[t]
            for n in range(N):
                prev = chain_scores[n]
                # the uniforms of this (step, chain)
                if use_uniforms:
                    for j in range(K):
                        unif[j] = uniforms[b, t - 1, j, n]
                else:
                    chain_uniforms(seed_lo, seed_hi, _portable.STREAM_STOCHASTIC_VITERBI, b, t - 1, n, unif)
                _draw_predecessors(
                    prev,
                    prev_weights[n],
                    trans,
                    trans_weights,
                    unif,
                    inv_temp,
                    tiny,
                    picks,
                    totals,
                    checkpoints,
                    targets,
                    blocks,
                    logits,
                    prefix,
                )
                for j in range(K):
                    pick = picks[j]
                    new_scores[j] = prev[pick] + trans[pick, j] + (scores[b, t, j] - emission_shift)
                    out_backpointers[b, t - 1, j, n] = pick
                for j in range(K):
                    prev[j] = new_scores[j]
                    out_path_scores[b, t, j, n] = new_scores[j] + cum_shift[t]
                _softmax_into(prev, logits, out_beam_probs[b, t], n)
        # padding, then the final argmax (lowest index on ties) and the backtrace of each chain
        for n in range(N):
            for t in range(length, T):
                for j in range(K):
                    out_beam_probs[b, t, j, n] = 0.0
                    out_path_scores[b, t, j, n] = chain_scores[n, j] + cum_shift[t]
                    out_backpointers[b, t - 1, j, n] = j
            y = backtrace(
                chain_scores[n],
                out_backpointers[b, :, :, n],
                tokens[b],
                length,
                out_beam_idx[b, :, n],
                out_tokens[b, :, n],
            )
            out_score[b, n] = chain_scores[n, y] + cum_shift[length - 1]


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def stochastic_viterbi_backward_kernel(
    beam_probs,
    backpointers,
    tokens,
    E1,
    E2,
    lengths,
    grad_beam_probs,
    first,
    count,
    out_grad_scores,
    grad_src,
    grad_dst,
):
    """Gradient of a loss on stochastic Viterbi's ``beam_probs`` (B, T, K, N), for sequences first..first+count-1.

    As in the write-up's autograd, the draws are constants and the gathered scores carry the gradient:
    path[t, j] = path[t-1, i] + trans[t-1, i, j] + s[t, j] with i = backpointers[t-1, j], and
    beam_probs[t] = softmax(path[t]). Walking back from the last step, ``upstream`` (K, N) holds the
    gradient reaching path[t]; each (j, n) sends it to its emission, to its predecessor and to the two
    table rows of its transition. Writes out_grad_scores[b] (T, K) (summed over chains) and, per
    sequence c = b - first, the table-row gradients grad_src[c, t] (E1 rows of position t, t < L-1)
    and grad_dst[c, t] (E2 rows of position t, t >= 1) in ``scatter_rows``'s layout.
    Padded positions (beam_probs 0, a constant there) get no gradient. O(T K N D) per sequence.
    """
    B, T, K, N = beam_probs.shape
    D = E1.shape[1]
    dtype = beam_probs.dtype
    for c in prange(count):
        b = first + c
        length = lengths[b]
        upstream = np.zeros((K, N), dtype=dtype)
        incoming = np.empty((K, N), dtype=dtype)
        for t in range(length):
            for k in range(K):
                for d in range(D):
                    grad_src[c, t, k, d] = 0.0
                    grad_dst[c, t, k, d] = 0.0
        for t in range(length - 1, -1, -1):
            probs = beam_probs[b, t]
            grads = grad_beam_probs[b, t]
            for n in range(N):  # softmax backward: p (g - sum_k p_k g_k)
                inner = 0.0
                for k in range(K):
                    inner += probs[k, n] * grads[k, n]
                for k in range(K):
                    upstream[k, n] += probs[k, n] * (grads[k, n] - inner)
            for j in range(K):
                total = 0.0
                for n in range(N):
                    total += upstream[j, n]
                out_grad_scores[b, t, j] = total
            if t == 0:
                break
            incoming[:] = 0.0
            src_rows = tokens[b, t - 1]
            for j in range(K):
                dst = E2[tokens[b, t, j]]
                dst_grad = grad_dst[c, t, j]
                for n in range(N):
                    a = upstream[j, n]
                    if a != 0.0:
                        i = backpointers[b, t - 1, j, n]
                        incoming[i, n] += a
                        src = E1[src_rows[i]]
                        src_grad = grad_src[c, t - 1, i]
                        for d in range(D):
                            src_grad[d] += a * dst[d]
                            dst_grad[d] += a * src[d]
            upstream[:] = incoming
        for t in range(length, T):
            for j in range(K):
                out_grad_scores[b, t, j] = 0.0


@njit(cache=True)
def scatter_rows(tokens, lengths, first, count, scale, grad_src, grad_dst, grad_E1, grad_E2):
    """grad_E1[tok[b, t, i]] += scale[b] * grad_src[c, t, i] (t < L-1), likewise grad_E2 (t >= 1).

    Sequential in (b, t, i) order, so the sums do not depend on the thread count or on ``count``.
    """
    K = tokens.shape[2]
    D = grad_E1.shape[1]
    for c in range(count):
        b = first + c
        length = lengths[b]
        s = scale[b]
        for t in range(length):
            for i in range(K):
                if t < length - 1:
                    row = grad_E1[tokens[b, t, i]]
                    src = grad_src[c, t, i]
                    for d in range(D):
                        row[d] += s * src[d]
                if t > 0:
                    row = grad_E2[tokens[b, t, i]]
                    dst = grad_dst[c, t, i]
                    for d in range(D):
                        row[d] += s * dst[d]
