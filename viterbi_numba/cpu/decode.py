"""CPU decoding kernels (``@njit``, ``prange`` over sequences): top-K, Viterbi, stochastic Viterbi.

These functions trust their inputs: ``viterbi_numba._validate`` checks shapes, dtypes and value ranges
and ``cpu/ops.py`` allocates the outputs before it calls them. Every kernel works per sequence on
thread-local scratch, so the results do not depend on how many threads run them.

Conventions shared by the kernels
* Beam scores are shifted per position by their maximum before use (``shift[t]``), so a large constant
  added to the scores neither loses float32 precision nor changes a decision; reported path scores add
  the cumulative shift back.
* The transition block ``trans[i, j] = E1[tok[t-1, i]] . E2[tok[t, j]]`` of one step is made in column
  strips by ``tiles.py``'s register tiles and reduced as it is made (Viterbi, the sampler's weights);
  never stored for all steps.
* Positions at or after a sequence's length are padding: the path score carries over, back-pointers are
  the identity, probabilities are 0 and indices/tokens are ``PAD`` (-1).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import _portable
from .intrinsics import MASK_BYTES, fast_exp, fmax, key_buffer, key_value, lowest_bit, mask_at_least, ordered_key
from .tiles import (
    ROWS,
    column_totals,
    crossing_counts,
    gather_operands,
    prefetch_operands,
    strip_dots_max,
    strip_width,
    tile_dots,
    workspace,
)

# "nsz"/"arcp"/"afn" let LLVM vectorise without changing -inf handling or summation order; "reassoc"
# and "contract" are left out so that sums are done in the documented sequential order.
_FASTMATH = {"nsz", "arcp", "afn"}

portable = _portable.build(njit(cache=True, inline="always"))
chain_uniforms = portable.chain_uniforms
inverse_cdf_pick = portable.inverse_cdf_pick
path_increments = portable.path_increments
fairseq_step_scores = portable.fairseq_step_scores
backtrace = portable.backtrace
place_forced = portable.place_forced
keep_best = portable.keep_best
nbest_paths = portable.nbest_paths


# --------------------------------------------------------------------------------------------------
# beam top-K
# --------------------------------------------------------------------------------------------------
_BLOCK = 32  # entries per block of a row's pre-filter (at most)
_ROWS_PER_CHUNK = 8  # rows of top-K per scratch allocation
_DIGIT_BITS = 8  # radix sort digits


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _block_maxima(row, block, maxima):
    """maxima[c] = the largest of row[c], row[c + blocks], ..., row[c + (block - 1) blocks] (blocks =
    maxima.shape[0]; the last stripe may be short): blocks strided across the row, so that the pass
    takes the maxima of whole vectors. Returns 1 where the row holds NaN or +inf, else 0."""
    blocks = maxima.shape[0]
    bad = 0
    for c in range(blocks):
        x = row[c]
        maxima[c] = x
        bad |= not x < np.inf
    for j in range(1, block):
        stripe = row[j * blocks :]  # sliced, so the index is known to be >= 0: vector loads, no gathers
        for c in range(min(blocks, stripe.shape[0])):
            x = stripe[c]
            maxima[c] = fmax(x, maxima[c])
            bad |= not x < np.inf
    return bad


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _kth_largest_key(keys, n, k, low, high):
    """The k-th largest of keys[:n] (k <= n), all of which lie in [low, high]: a bisection on the key's
    value, each probe one vectorised count of the keys at or above it."""
    while low < high:
        probe = (low >> 1) + (high >> 1) + ((low | high) & 1)  # the upper middle, without overflow
        reach = 0
        for i in range(n):
            reach += keys[i] >= probe
        if reach >= k:
            low = probe
        else:
            high = probe - 1
    return low


@njit(cache=True, inline="always")
def _radix_sort_descending(keys, ids, n, scratch_keys, scratch_ids, counts):
    """Sorts (keys, ids)[:n] by decreasing key, stably (equal keys keep their order): least significant
    digit first, a digit that every key shares skipped."""
    bits = 8 * keys.itemsize
    radix = 1 << _DIGIT_BITS
    for shift in range(0, bits, _DIGIT_BITS):
        top = (radix >> 1) if shift + _DIGIT_BITS >= bits else 0  # the sign digit: flipped to order it
        counts[:] = 0
        for i in range(n):
            counts[(((~keys[i]) >> shift) & (radix - 1)) ^ top] += 1  # ~key: decreasing order
        if counts[(((~keys[0]) >> shift) & (radix - 1)) ^ top] == n:
            continue
        total = 0
        for d in range(radix):
            c = counts[d]
            counts[d] = total
            total += c
        for i in range(n):
            d = (((~keys[i]) >> shift) & (radix - 1)) ^ top
            slot = counts[d]
            counts[d] = slot + 1
            scratch_keys[slot] = keys[i]
            scratch_ids[slot] = ids[i]
        keys[:n] = scratch_keys[:n]
        ids[:n] = scratch_ids[:n]


@njit(cache=True, inline="always")
def _topk_row(emissions, row_id, k, force_tokens, use_force, block, work, out_scores, out_tokens, bad_rows):
    """``topk_beam_kernel`` for one row, with its scratch ``work``."""
    maxima, block_keys, ids, keys, scratch_ids, scratch_keys, counts = work
    B, T, V = emissions.shape
    blocks = maxima.shape[0]
    b = row_id // T
    t = row_id - b * T
    row = emissions[b, t]
    forced = force_tokens[b, t] if use_force else -1
    bad = _block_maxima(row, block, maxima)
    bad_rows[b, t] = bad
    first = 0
    if forced >= 0:  # first with +inf, then moved to its own score's place
        out_scores[b, t, 0] = np.inf
        out_tokens[b, t, 0] = forced
        first = 1
    if bad:  # NaN or +inf: the call raises, and any valid ids will do
        for slot in range(first, k):
            out_scores[b, t, slot] = 0.0
            out_tokens[b, t, slot] = slot
        return
    # the k-th largest block maximum: at least k blocks, so at least k entries, reach it
    threshold = -np.inf
    if blocks > k:
        for c in range(blocks):
            block_keys[c] = ordered_key(maxima[c])
        low, high = block_keys[:blocks].min(), block_keys[:blocks].max()
        threshold = key_value(_kth_largest_key(block_keys, blocks, k, low, high), maxima[0])
    # the entries that reach it, in order of id: a vector compare's bit mask, then its set bits
    lanes = MASK_BYTES // row.itemsize
    count = 0
    start = 0
    while start + lanes <= V:
        mask = mask_at_least(row, start, threshold)
        while mask:
            u = start + lowest_bit(mask)
            ids[count] = u
            keys[count] = ordered_key(row[u])
            count += u != forced
            mask &= mask - np.uint64(1)
        start += lanes
    for u in range(start, V):
        ids[count] = u
        keys[count] = ordered_key(row[u])
        count += (row[u] >= threshold) & (u != forced)
    # exactly the best k - first of them: all above the cut, then the lowest ids at it
    wanted = k - first
    if wanted > 0:
        cut = _kth_largest_key(keys, count, wanted, keys[:count].min(), keys[:count].max())
        ties = wanted
        for c in range(count):
            ties -= keys[c] > cut
        kept = 0
        for c in range(count):
            key = keys[c]
            keep = (key > cut) | ((key == cut) & (ties > 0))
            ties -= (key == cut) & (ties > 0)
            keys[kept] = key
            ids[kept] = ids[c]
            kept += keep
        _radix_sort_descending(keys, ids, wanted, scratch_keys, scratch_ids, counts)
    for slot in range(first, k):
        u = ids[slot - first]
        out_scores[b, t, slot] = row[u]
        out_tokens[b, t, slot] = u
    if forced >= 0:
        place_forced(out_scores[b, t], out_tokens[b, t], k, row[forced], forced)


@njit(cache=True, parallel=True)
def topk_beam_kernel(emissions, k, force_tokens, use_force, out_scores, out_tokens, bad_rows):
    """Per (b, t) row of ``emissions`` (B, T, V): the k best tokens, best first (ties: lower id first).

    With ``use_force``, ``force_tokens[b, t]`` is in the beam whatever its score, kept at its own score.
    ``bad_rows[b, t]`` is set to 1 where the row holds NaN or +inf (results there are meaningless).
    A row is first filtered: the maxima of its blocks (32 entries strided across the row, fewer when the
    row has under 128 k), in one vectorised pass, and their k-th largest as the threshold. At least k
    blocks reach it, so at least k entries do; a vector compare's bit mask finds those entries (about
    1.2 k on Gaussian scores at the write-up's size). Their exact k-th largest is found by bisection on
    integer keys (``intrinsics.ordered_key``), and the k kept are radix-sorted. 16 us a row on one core
    (AMD EPYC) at the write-up's size (V = 30000, k = 256), about 5 of them the pass over the row.
    """
    B, T, V = emissions.shape
    block = max(1, min(_BLOCK, V // (4 * k)))
    blocks = -(-V // block)
    rows = B * T
    for chunk in prange(-(-rows // _ROWS_PER_CHUNK)):
        # scratch once per chunk of rows: a (V)-long buffer per row would cost page faults each time
        work = (
            np.empty(blocks, dtype=emissions.dtype),  # maxima
            key_buffer(blocks, emissions),  # their keys
            np.empty(V, dtype=np.int64),  # candidates' ids
            key_buffer(V, emissions),  # their keys
            np.empty(k, dtype=np.int64),  # the radix sort's
            key_buffer(k, emissions),
            np.empty(1 << _DIGIT_BITS, dtype=np.int64),
        )
        for row_id in range(chunk * _ROWS_PER_CHUNK, min(rows, (chunk + 1) * _ROWS_PER_CHUNK)):
            _topk_row(emissions, row_id, k, force_tokens, use_force, block, work, out_scores, out_tokens, bad_rows)


# --------------------------------------------------------------------------------------------------
# shared per-step pieces
# --------------------------------------------------------------------------------------------------
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
_ROW_BLOCK = 32  # predecessor rows in the first gemm of the n best's pruned step


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _norm(values):
    """The Euclidean norm of a table row, summed in float64."""
    total = 0.0
    for d in range(values.shape[0]):
        total += values[d] * values[d]
    return np.sqrt(total)


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _reach(src_rows, E1):
    """A bound on a_i . b_j / |b_j| over the step's rows a_i = E1[src_rows[i]]: their largest norm, with
    room for the products' rounding (the branch and bound's row side)."""
    largest = 0.0
    for i in range(src_rows.shape[0]):
        largest = max(largest, _norm(E1[src_rows[i]]))
    return largest * 1.001


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _stage_columns(src_rows, dst_rows, E1, E2, dst_emb, dst_norm):
    """The branch and bound's column side: dst_emb[j] = E2[dst_rows[j]] and dst_norm[j] = its norm.
    Returns ``_reach``."""
    for j in range(dst_rows.shape[0]):
        dst_emb[j, :] = E2[dst_rows[j]]
        dst_norm[j] = _norm(E2[dst_rows[j]])
    return _reach(src_rows, E1)


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
def _viterbi_step(prev, src_rows, dst_rows, E1, E2, order, dst_norm, work, strip_best, strip_arg, best, arg):
    """best[j] = max_i prev[i] + E1[src_rows[i]] . E2[dst_rows[j]]; arg[j] = the lowest such i.

    The block is made and reduced strip by strip (``tiles``), each strip's tiles in order of decreasing
    ``prev`` (the rows are gathered in that order), with an exact branch and bound per strip: the visit
    stops once no remaining row can reach any of the strip's columns' best, since prev[i] + a_i . b_j
    <= prev[i] + max|a| |b_j| (Cauchy-Schwarz; a margin covers rounding). Where the scores of a step
    are spread wider than the transitions, most of the K x K x D product is skipped. Ties go to the
    lowest i whatever the order of the visit.
    """
    src_emb, dst_t, strip, _, _ = work
    K = prev.shape[0]
    width = strip_width(prev)
    order[:] = np.argsort(-prev)
    gather_operands(src_rows[order], dst_rows, E1, E2, src_emb, dst_t)  # rows in the order of the visit
    reach = _reach(src_rows, E1)
    for j in range(K):
        dst_norm[j] = _norm(E2[dst_rows[j]])
    for column in range(0, K, width):
        columns = min(width, K - column)
        for c in range(width):
            strip_best[c] = -np.inf if c < columns else np.inf  # +inf: a padding column, closed
            strip_arg[0, c] = K
        current = 0  # strip_arg[current] holds the arg-maxima so far (two buffers: see intrinsics.fmax)
        for row in range(0, K, ROWS):
            if row > 0:
                top = prev[order[row]]
                if top == -np.inf or not _any_open(top, reach, dst_norm[column : column + width], strip_best):
                    break
            tile_dots(src_emb, dst_t, row, column, strip)
            for r in range(row, min(row + ROWS, K)):
                i = np.int32(order[r])
                s = prev[i]
                values = strip[r]
                read = strip_arg[current]
                write = strip_arg[1 - current]
                for c in range(width):
                    cand = s + values[c]
                    old = strip_best[c]
                    better = (cand > old) | ((cand == old) & (i < read[c]))  # ties: lowest i
                    write[c] = i if better else read[c]
                    strip_best[c] = fmax(cand, old)
                current = 1 - current
        for c in range(columns):
            best[column + c] = strip_best[c]
            arg[column + c] = strip_arg[current, c]


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
        work = workspace(K, D, scores)
        dst_norm = np.zeros(work[1].shape[1], dtype=dtype)  # padding columns: 0
        strip_best = np.empty(work[2].shape[1], dtype=dtype)
        strip_arg = np.empty((2, work[2].shape[1]), dtype=np.int32)
        shift = np.empty(T, dtype=np.float64)
        cum_shift = np.empty(T, dtype=np.float64)
        history = np.empty((length, K), dtype=dtype)  # shifted cumulative scores per step
        back = np.empty((length, K), dtype=np.int32)
        best = np.empty(K, dtype=dtype)
        arg = np.empty(K, dtype=np.int32)
        _position_shifts(scores[b], length, shift, cum_shift)
        for j in range(K):
            history[0, j] = scores[b, 0, j] - shift[0]
        for t in range(1, length):
            if t + 1 < length:
                prefetch_operands(tokens[b, t], tokens[b, t + 1], E1, E2)
            _viterbi_step(
                history[t - 1], tokens[b, t - 1], tokens[b, t], E1, E2, order, dst_norm, work, strip_best, strip_arg,
                best, arg,
            )  # fmt: skip
            emission_shift = shift[t]
            for j in range(K):
                history[t, j] = best[j] + (scores[b, t, j] - emission_shift)
                back[t, j] = arg[j]
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

    An exact branch and bound (Viterbi's, with whole-K row blocks): predecessors are visited by
    decreasing best prefix, in blocks that double, one gemm each, until no remaining row can enter any
    column's list (Cauchy-Schwarz, with a margin for rounding). A row reaches a column's list only where
    its best prefix plus the transition is at least the list's n-th (``lowest``): one vectorised count
    per row finds whether any column is reached, and only those rows take the scalar inserts.
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
def _draw_strip(
    chain_scores, prev_weights, strip, weights, unif, column, inv_temp, tiny, totals, targets, counts, picks,
    picked_trans, logits, prefix,
):  # fmt: skip
    """The sampling step of every chain for the strip of columns j = column + c (c < strip width, j < K):
    picks[n, j] = chain n's predecessor of state j, drawn with uniform unif[n, j], and picked_trans[n, j]
    = trans[picks[n, j], j].

    ``strip`` (K, width) holds the strip's transitions, ``weights`` (K, width) their shared factors
    (0 in the padding columns); column j's weights are prev_weights[n, i] * weights[i, c], ``totals[n,
    c]`` their sum in order of i, and the pick is the smallest i with unif[n, j] * totals[n, c] < the
    running sum over rows 0..i. Running sums never decrease, so the pick is the count of rows whose
    running sum is at most the target: ``tiles.crossing_counts`` counts them for all chains in one pass
    over the strip, with the running sums in registers (no search, no branch). Columns whose total
    underflows below ``tiny``, or whose target rounding leaves no crossing, are redone by
    ``_direct_pick``.
    """
    N, K = prev_weights.shape
    columns = min(weights.shape[1], K - column)
    column_totals(weights, prev_weights, totals)
    for n in range(N):
        for c in range(columns):
            targets[n, c] = unif[n, column + c] * totals[n, c]
    crossing_counts(weights, prev_weights, targets, counts)
    for n in range(N):
        for c in range(columns):
            pick = counts[n, c]
            if totals[n, c] < tiny or pick == K:
                pick = _direct_pick(chain_scores[n], strip, c, inv_temp, unif[n, column + c], logits, prefix)
            picks[n, column + c] = pick
            picked_trans[n, column + c] = strip[pick, c]


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
    is recomputed directly. The draw itself is ``_draw_strip``.
    """
    B, T, K = scores.shape
    N = out_beam_idx.shape[2]
    D = E1.shape[1]
    dtype = scores.dtype
    for b in prange(B):
        length = lengths[b]
        src_emb, dst_t, strip, column_max, _ = workspace(K, D, scores)
        width = strip_width(scores)
        weights = np.empty((K, width), dtype=dtype)  # a strip's shared factors
        shift = np.empty(T, dtype=np.float64)
        cum_shift = np.empty(T, dtype=np.float64)
        chain_scores = np.empty((N, K), dtype=dtype)  # shifted cumulative scores per chain
        prev_weights = np.empty((N, K), dtype=dtype)
        unif = np.empty((N, K), dtype=np.float64)
        picks = np.empty((N, K), dtype=np.int32)
        picked_trans = np.empty((N, K), dtype=dtype)  # trans[picks[n, j], j]
        totals = np.empty((N, width), dtype=dtype)  # each chain's column totals of a strip's weights
        targets = np.zeros((N, width), dtype=dtype)  # (the padding's stay 0, its counts unread)
        counts = np.empty((N, width), dtype=np.int32)
        prefix = np.empty(K, dtype=dtype)  # scratch of _direct_pick
        logits = np.empty(K, dtype=dtype)
        _position_shifts(scores[b], length, shift, cum_shift)
        for n in range(N):
            for j in range(K):
                chain_scores[n, j] = scores[b, 0, j] - shift[0]
                out_path_scores[b, 0, j, n] = scores[b, 0, j]
            _softmax_into(chain_scores[n], logits, out_beam_probs[b, 0], n)
        for t in range(1, length):
            # each chain's factor exp((prev[i] - max prev) / temp) and its uniforms of this step
            for n in range(N):
                prev = chain_scores[n]
                m = prev[0]
                for i in range(1, K):
                    m = max(m, prev[i])
                for i in range(K):
                    prev_weights[n, i] = fast_exp((prev[i] - m) * inv_temp)
                if use_uniforms:
                    for j in range(K):
                        unif[n, j] = uniforms[b, t - 1, j, n]
                else:
                    chain_uniforms(seed_lo, seed_hi, _portable.STREAM_STOCHASTIC_VITERBI, b, t - 1, n, unif[n])
            # the block strip by strip, each strip drawn from while it is in L1: its column maxima, the
            # shared factor exp((trans[i, j] - max_i trans[i, j]) / temp), and every chain's picks
            gather_operands(tokens[b, t - 1], tokens[b, t], E1, E2, src_emb, dst_t)
            if t + 1 < length:
                prefetch_operands(tokens[b, t], tokens[b, t + 1], E1, E2)
            for column in range(0, K, width):
                strip_dots_max(src_emb, dst_t, column, K, strip, None, inv_temp, column_max)
                columns = min(width, K - column)
                for i in range(K):
                    row = strip[i]
                    weight_row = weights[i]
                    for c in range(columns):
                        weight_row[c] = fast_exp((row[c] - column_max[c]) * inv_temp)
                    for c in range(columns, width):
                        weight_row[c] = 0.0  # the padding adds nothing to the running sums
                _draw_strip(
                    chain_scores, prev_weights, strip, weights, unif, column, inv_temp, tiny, totals, targets, counts,
                    picks, picked_trans, logits, prefix,
                )  # fmt: skip
            emission_shift = shift[t]
            for n in range(N):
                prev = chain_scores[n]
                for j in range(K):
                    pick = picks[n, j]
                    out_backpointers[b, t - 1, j, n] = pick
                    logits[j] = prev[pick] + picked_trans[n, j] + (scores[b, t, j] - emission_shift)
                for j in range(K):
                    prev[j] = logits[j]
                    out_path_scores[b, t, j, n] = logits[j] + cum_shift[t]
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
