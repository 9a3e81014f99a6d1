"""GPU kernels (``numba.cuda``), the counterparts of ``_cpu`` and ``_cpu_crf``.

Imported only when a GPU array is passed (``viterbi_numba._gpu`` does the validation, allocation and
launches); importing it needs numba-cuda but no GPU. ``kernels(dtype)`` compiles lazily, once per
float dtype, so every float constant in a float32 kernel is a float32 (no ``.f64`` instruction in its
PTX; DESIGN §7).

Launch shape: one block per sequence (Viterbi, forward, backward) or per (sequence, sample) chain (the
seed sampler, FFBS, the sampler's backward) runs the whole time loop; the block's threads cover the K
beam slots (``j = tid, tid + threads, ...``). The K x D factor rows of the step's other side are staged
in shared memory in tiles of ``tile_rows`` rows, so each thread computes its transition column
``E1[tok[t-1, i]] . E2[tok[t, j]]`` from shared memory with its own row held in registers/local memory:
K^2 D multiply-adds per pass, no (K, K) block is ever stored. Back-pointers and per-step state go to
global memory; scores of the current step live in shared memory.

Reductions over a block (max, sum, first crossing) are warp shuffles, then one shared-memory step
across the warps (in the CUDA simulator, which has no shuffles: a shared-memory tree); the running
sums of the inverse-CDF search are a shared-memory scan. Blocks are a power of two threads, whole warps
on a GPU. Results equal the CPU kernels' up to float
rounding: the same Philox numbers drive the same inverse-CDF rule (float32 kernels use the uniform's
top 24 bits), but sums are added in another order, so a draw whose target lies within rounding of a
CDF boundary may pick the neighbouring slot.
"""

from __future__ import annotations

import math
from functools import lru_cache
from types import SimpleNamespace

import numpy as np
from numba import config, cuda, from_dtype, int32, int64

from . import core

MAX_THREADS = 256  # threads per block (a power of two)
MAX_D = 128  # largest low-rank dimension (a thread's own factor row is a local array of this size)
MAX_K = 1024  # largest beam (top-K keeps 2 * max(K, 4 * threads) entries in shared memory)
SHARED_BUDGET = 40 * 1024  # dynamic shared memory per block, bytes (below the 48 KiB default limit)
PAD = -1
FULL_MASK = 0xFFFFFFFF  # every lane of a warp takes part in the shuffles
FIRST_ROW = 8  # check_beam's per-row flags start here (slots before it: the other checks)
_FAR_ID = 1 << 62  # an id that ranks below every real token in top-K's sentinel slots

_device = core.build(cuda.jit(device=True))
uniform_pair = _device.uniform_pair
uniform_pair_f32 = _device.uniform_pair_f32


@lru_cache(maxsize=None)
def kernels(dtype) -> SimpleNamespace:
    """The GPU kernels for float dtype ``dtype`` (np.float32 or np.float64), compiled on first launch."""
    dtype = np.dtype(dtype)
    scalar = dtype.type
    nbtype = from_dtype(dtype)
    ZERO = scalar(0.0)
    ONE = scalar(1.0)
    NEG_INF = scalar(-np.inf)
    POS_INF = scalar(np.inf)
    ITEMSIZE = dtype.itemsize
    single = dtype == np.float32
    draw_pair = uniform_pair_f32 if single else uniform_pair

    # ---------------------------------------------------------------------------------------------
    # block-wide primitives (every thread of the block must call them)
    # ---------------------------------------------------------------------------------------------
    if config.ENABLE_CUDASIM:
        # The simulator has no warp shuffles: tree reductions in shared memory (any power-of-two block).
        @cuda.jit(device=True)
        def block_reduce(value, scratch, op):
            tid = cuda.threadIdx.x
            scratch[tid] = value
            cuda.syncthreads()
            half = cuda.blockDim.x // 2
            while half > 0:
                if tid < half:
                    scratch[tid] = combine(scratch[tid], scratch[tid + half], op)
                cuda.syncthreads()
                half //= 2
            result = scratch[0]
            cuda.syncthreads()
            return result
    else:
        # On a GPU: a shuffle reduction within each warp, the warps' results through shared memory, a
        # second shuffle reduction, and a broadcast from lane 0 (blocks are whole warps, at most 32).
        @cuda.jit(device=True)
        def block_reduce(value, scratch, op):
            lane = cuda.threadIdx.x % 32
            warp = cuda.threadIdx.x // 32
            offset = 16
            while offset > 0:
                value = combine(value, cuda.shfl_down_sync(FULL_MASK, value, offset), op)
                offset //= 2
            if lane == 0:
                scratch[warp] = value
            cuda.syncthreads()
            warps = cuda.blockDim.x // 32  # a power of two: lanes below it hold the warps' results
            value = scratch[lane if lane < warps else 0]
            offset = 16
            while offset > 0:
                other = cuda.shfl_down_sync(FULL_MASK, value, offset)
                if lane + offset < warps:
                    value = combine(value, other, op)
                offset //= 2
            result = cuda.shfl_sync(FULL_MASK, value, 0)
            cuda.syncthreads()
            return result

    @cuda.jit(device=True)
    def combine(a, b, op):
        """op 0: max, 1: sum, 2: min."""
        if op == 0:
            return a if a > b else b
        if op == 1:
            return a + b
        return a if a < b else b

    @cuda.jit(device=True)
    def block_max(value, scratch):
        """max of ``value`` over the block, returned to every thread (``scratch``: shared, blockDim)."""
        return block_reduce(value, scratch, 0)

    @cuda.jit(device=True)
    def block_sum(value, scratch):
        return block_reduce(value, scratch, 1)

    @cuda.jit(device=True)
    def block_min_int(value, scratch):
        return block_reduce(value, scratch, 2)

    @cuda.jit(device=True)
    def strided_max(values, count, scratch):
        """max of values[:count] (shared or global), over the block."""
        m = NEG_INF
        for k in range(cuda.threadIdx.x, count, cuda.blockDim.x):
            if values[k] > m:
                m = values[k]
        return block_max(m, scratch)

    @cuda.jit(device=True)
    def inclusive_scan(values, count, scratch):
        """values[:count] (shared) becomes its running sum, in chunks of blockDim (Hillis-Steele)."""
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        carry = ZERO
        for base in range(0, count, threads):
            i = base + tid
            scratch[tid] = values[i] if i < count else ZERO
            cuda.syncthreads()
            offset = 1
            while offset < threads:
                add = scratch[tid - offset] if tid >= offset else ZERO
                cuda.syncthreads()
                scratch[tid] += add
                cuda.syncthreads()
                offset *= 2
            if i < count:
                values[i] = scratch[tid] + carry
            carry += scratch[threads - 1]
            cuda.syncthreads()

    @cuda.jit(device=True)
    def block_pick(logits, weights, count, u, scratch, int_scratch):
        """Index drawn from softmax(logits[:count]) with uniform u by the inverse-CDF rule of
        ``core.inverse_cdf_pick``: the smallest i with u * total < prefix[i], else the last i with a
        positive weight. ``weights`` (shared, count) is scratch."""
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        m = strided_max(logits, count, scratch)
        for i in range(tid, count, threads):
            weights[i] = math.exp(logits[i] - m)
        cuda.syncthreads()
        inclusive_scan(weights, count, scratch)
        target = u * weights[count - 1]
        first = count
        for i in range(tid, count, threads):
            below = weights[i - 1] if i > 0 else ZERO
            if target < weights[i] and not target < below and i < first:
                first = i
        first = block_min_int(first, int_scratch)
        if first < count:
            return first
        last = 1  # clamp: the last i whose weight (prefix step) is positive, found as the min of -i
        for i in range(tid, count, threads):
            below = weights[i - 1] if i > 0 else ZERO
            if weights[i] > below and -i < last:
                last = -i
        last = block_min_int(last, int_scratch)
        return -last if last <= 0 else 0

    @cuda.jit(device=True)
    def stage_rows(tile, table, row_ids, start, rows, D):
        """tile[r, :] = table[row_ids[start + r], :] for r < rows, loaded by the whole block (coalesced in d)
        between two barriers: no thread still reads the previous tile, every thread sees the new one."""
        cuda.syncthreads()
        for e in range(cuda.threadIdx.x, rows * D, cuda.blockDim.x):
            r = e // D
            d = e - r * D
            tile[r * D + d] = table[row_ids[start + r], d]
        cuda.syncthreads()

    @cuda.jit(device=True)
    def dot_tile(tile, r, own, D):
        total = ZERO
        for d in range(D):
            total += tile[r * D + d] * own[d]
        return total

    @cuda.jit(device=True)
    def load_own(own, table, row, D):
        for d in range(D):
            own[d] = table[row, d]

    @cuda.jit(device=True)
    def position_shifts(scores, b, length, shift, cum_shift, scratch):
        """shift[t] = max_k scores[b, t, k]; cum_shift[t] = their sum up to min(t, length - 1) (rows of T;
        compensated, so float32 keeps the precision the CPU's float64 sum has)."""
        T = scores.shape[1]
        K = scores.shape[2]
        total = ZERO
        error = ZERO
        for t in range(T):
            m = ZERO
            if t < length:
                m = strided_max(scores[b, t], K, scratch)
                y = m - error
                s = total + y
                error = (s - total) - y
                total = s
            if cuda.threadIdx.x == 0:
                shift[t] = m
                cum_shift[t] = total

    # ---------------------------------------------------------------------------------------------
    # validation
    # ---------------------------------------------------------------------------------------------
    @cuda.jit
    def check_beam(scores, tokens, vocab, flags):
        """One block per (b, t): flags[0] = 1 on NaN/+inf in scores, flags[1] = 1 on a token id outside
        [0, vocab); flags[FIRST_ROW + b * T + t] = 1 where the beam holds a score above -inf."""
        row = cuda.blockIdx.x
        T = scores.shape[1]
        b = row // T
        t = row - b * T
        alive = 0
        for k in range(cuda.threadIdx.x, scores.shape[2], cuda.blockDim.x):
            x = scores[b, t, k]
            if not x < POS_INF:
                cuda.atomic.max(flags, 0, 1)
            if x > NEG_INF:
                alive = 1
        for k in range(cuda.threadIdx.x, tokens.shape[2], cuda.blockDim.x):
            token = tokens[b, t, k]
            if token < 0 or token >= vocab:
                cuda.atomic.max(flags, 1, 1)
        if alive == 1:
            cuda.atomic.max(flags, FIRST_ROW + row, 1)

    @cuda.jit
    def check_finite(values, flags, slot):
        """flags[slot] = 1 if the 1-D array ``values`` holds NaN or inf."""
        for e in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
            if not (values[e] < POS_INF and values[e] > NEG_INF):
                cuda.atomic.max(flags, slot, 1)

    @cuda.jit
    def check_range(values, low, high, flags, slot):
        """flags[slot] = 1 if the 1-D integer array ``values`` holds a value outside [low, high)."""
        for e in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
            if values[e] < low or values[e] >= high:
                cuda.atomic.max(flags, slot, 1)

    @cuda.jit
    def fill(values, value):
        """values[:] = value for a 1-D array."""
        for e in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
            values[e] = value

    @cuda.jit
    def scale_rows(values, scale, out):
        """out[b, t, k] = values[b, t, k] * scale[b]."""
        B, T, K = values.shape
        for e in range(cuda.grid(1), B * T * K, cuda.gridsize(1)):
            b = e // (T * K)
            rest = e - b * T * K
            t = rest // K
            k = rest - t * K
            out[b, t, k] = values[b, t, k] * scale[b]

    # ---------------------------------------------------------------------------------------------
    # beam top-K
    # ---------------------------------------------------------------------------------------------
    @cuda.jit(device=True)
    def ranks_above(key_a, id_a, key_b, id_b):
        """True when (key_a, id_a) comes first: higher score, or equal score and lower id."""
        return key_a > key_b or (key_a == key_b and id_a < id_b)

    @cuda.jit(device=True)
    def bitonic_sort(keys, ids, size):
        """Sort keys/ids[:size] (shared, size a power of two) best first by ``ranks_above``."""
        tid = cuda.threadIdx.x
        width = 2
        while width <= size:
            stride = width // 2
            while stride > 0:
                for i in range(tid, size, cuda.blockDim.x):
                    partner = i ^ stride
                    if partner > i:
                        best_first = (i & width) == 0
                        swap = ranks_above(keys[partner], ids[partner], keys[i], ids[i])
                        if not best_first:
                            swap = ranks_above(keys[i], ids[i], keys[partner], ids[partner])
                        if swap:
                            key = keys[i]
                            keys[i] = keys[partner]
                            keys[partner] = key
                            idx = ids[i]
                            ids[i] = ids[partner]
                            ids[partner] = idx
                cuda.syncthreads()
                stride //= 2
            width *= 2

    @cuda.jit
    def topk_kernel(emissions, k, region, force_tokens, use_force, out_scores, out_tokens, bad_rows):
        """One block per (b, t) row: the k best (score, id), best first, ties to the lower id.

        Shared memory holds the best ``region`` entries so far (sorted, ``region`` a power of two >= k
        and >= 4 block sizes) followed by ``region`` candidate slots. A row entry becomes a candidate
        only if it ranks above the current k-th best; when the candidate slots could overflow, the
        2 * region entries are sorted (bitonic) and the best half kept. A forced token enters first
        with score +inf, so it is always kept, and takes its own score at the end.
        """
        row = cuda.blockIdx.x
        T = emissions.shape[1]
        V = emissions.shape[2]
        b = row // T
        t = row - b * T
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        size = 2 * region
        keys = cuda.shared.array(0, nbtype)[:size]
        ids = cuda.shared.array(0, int64)[(size * ITEMSIZE) // 8:]  # after the keys (see _gpu)
        count = cuda.shared.array(2, int64)  # [candidates held, row has NaN/+inf]
        for i in range(tid, size, threads):
            keys[i] = NEG_INF
            ids[i] = _FAR_ID
        forced = force_tokens[b, t] if use_force else -1
        if tid == 0:
            count[0] = 0
            count[1] = 0
            if forced >= 0:
                keys[region] = POS_INF
                ids[region] = forced
                count[0] = 1
        cuda.syncthreads()
        threshold_key = NEG_INF
        threshold_id = _FAR_ID
        row_values = emissions[b, t]
        for base in range(0, V, threads):
            flush = count[0] + threads > region  # the next chunk might not fit: keep the best half
            cuda.syncthreads()  # every thread has read count before any adds to it
            if flush:
                bitonic_sort(keys, ids, size)
                for i in range(region + tid, size, threads):
                    keys[i] = NEG_INF
                    ids[i] = _FAR_ID
                if tid == 0:
                    count[0] = 0
                cuda.syncthreads()
                threshold_key = keys[k - 1]
                threshold_id = ids[k - 1]
                cuda.syncthreads()
            u = base + tid
            if u < V:
                x = row_values[u]
                if not x < POS_INF:
                    count[1] = 1
                if u != forced and ranks_above(x, u, threshold_key, threshold_id):
                    slot = cuda.atomic.add(count, 0, 1)
                    keys[region + slot] = x
                    ids[region + slot] = u
            cuda.syncthreads()
        bitonic_sort(keys, ids, size)
        if tid == 0:
            bad_rows[b, t] = count[1]
            if forced >= 0:  # the forced token sits first with +inf: move it to its own score's place
                own = row_values[forced]
                pos = 0
                while pos + 1 < k and ranks_above(keys[pos + 1], ids[pos + 1], own, forced):
                    keys[pos] = keys[pos + 1]
                    ids[pos] = ids[pos + 1]
                    pos += 1
                keys[pos] = own
                ids[pos] = forced
        cuda.syncthreads()
        for slot in range(tid, k, threads):
            out_scores[b, t, slot] = keys[slot]
            out_tokens[b, t, slot] = ids[slot]

    # ---------------------------------------------------------------------------------------------
    # Viterbi
    # ---------------------------------------------------------------------------------------------
    @cuda.jit
    def viterbi_kernel(scores, tokens, E1, E2, lengths, tile_rows, shift, cum_shift, history, back,
                       out_beam_idx, out_tokens, out_score, out_step_scores):
        """One block per sequence; same results as ``_cpu.viterbi_kernel`` (ties to the lowest index).

        history (B, T, K): shifted cumulative scores; back (B, T, K): back-pointers (global scratch).
        """
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T = scores.shape[1]
        K = scores.shape[2]
        D = E1.shape[1]
        length = lengths[b]
        shared = cuda.shared.array(0, nbtype)
        prev = shared[:K]
        tile = shared[K:]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        own = cuda.local.array(MAX_D, nbtype)
        position_shifts(scores, b, length, shift[b], cum_shift[b], scratch)
        cuda.syncthreads()
        for j in range(tid, K, threads):
            prev[j] = scores[b, 0, j] - shift[b, 0]
            history[b, 0, j] = prev[j]
        cuda.syncthreads()
        for t in range(1, length):
            for base in range(0, K, threads):
                j = base + tid
                best = NEG_INF
                arg = -1
                if j < K:
                    load_own(own, E2, tokens[b, t, j], D)
                for start in range(0, K, tile_rows):
                    rows = min(tile_rows, K - start)
                    stage_rows(tile, E1, tokens[b, t - 1], start, rows, D)
                    if j < K:
                        for r in range(rows):
                            cand = prev[start + r] + dot_tile(tile, r, own, D)
                            if cand > best or arg < 0:
                                best = cand
                                arg = start + r
                if j < K:
                    history[b, t, j] = best + (scores[b, t, j] - shift[b, t])
                    back[b, t, j] = arg
            cuda.syncthreads()
            for j in range(tid, K, threads):
                prev[j] = history[b, t, j]
            cuda.syncthreads()
        if tid == 0:
            y = 0
            for j in range(1, K):
                if prev[j] > prev[y]:
                    y = j
            score = prev[y] + cum_shift[b, length - 1]
            out_score[b] = score
            cumulative_next = score
            for t in range(length - 1, -1, -1):
                out_beam_idx[b, t] = y
                out_tokens[b, t] = tokens[b, t, y]
                cumulative = score
                if t < length - 1:
                    cumulative = history[b, t, out_beam_idx[b, t + 1]] + cum_shift[b, t]
                    out_step_scores[b, t + 1] = cumulative_next - cumulative
                cumulative_next = cumulative
                if t > 0:
                    y = back[b, t, y]
            out_step_scores[b, 0] = cumulative_next
            for t in range(length, T):
                out_beam_idx[b, t] = PAD
                out_tokens[b, t] = PAD
                out_step_scores[b, t] = ZERO

    # ---------------------------------------------------------------------------------------------
    # the seed's stochastic Viterbi
    # ---------------------------------------------------------------------------------------------
    @cuda.jit(device=True)
    def softmax_column(values, out, n, scratch):
        """out[:, n] = softmax(values) over the block (values: shared, K)."""
        K = out.shape[0]
        m = strided_max(values, K, scratch)
        partial = ZERO
        for j in range(cuda.threadIdx.x, K, cuda.blockDim.x):
            partial += math.exp(values[j] - m)
        total = block_sum(partial, scratch)
        for j in range(cuda.threadIdx.x, K, cuda.blockDim.x):
            out[j, n] = math.exp(values[j] - m) / total

    @cuda.jit
    def stochastic_viterbi_kernel(scores, tokens, E1, E2, lengths, inv_temp, seed_lo, seed_hi, uniforms,
                                  use_uniforms, tile_rows, shift, cum_shift, out_beam_probs, out_beam_idx,
                                  out_tokens, out_path_scores, out_backpointers, out_score):
        """One block per chain (sequence b, sample n = out_beam_idx.shape[2] of them) (DESIGN §3).

        The sampling step: thread j draws the predecessor of state j from
        softmax_i((prev[i] + trans[i, j]) * inv_temp) with the uniform U[b, t-1, j, n], in two passes over
        tiles of factor rows: an online maximum and total, then the running sum up to the crossing
        (the block stops loading tiles once every thread has found its pick). Transitions are computed
        on the fly, so the chains of a sequence share nothing and run side by side.
        """
        chain = cuda.blockIdx.x
        N = out_beam_idx.shape[2]
        b = chain // N
        n = chain - b * N
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T = scores.shape[1]
        K = scores.shape[2]
        D = E1.shape[1]
        length = lengths[b]
        shared = cuda.shared.array(0, nbtype)
        prev = shared[:K]
        new = shared[K:2 * K]
        tile = shared[2 * K:]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        own = cuda.local.array(MAX_D, nbtype)
        position_shifts(scores, b, length, shift[chain], cum_shift[chain], scratch)  # each chain's own copy
        cuda.syncthreads()
        for j in range(tid, K, threads):
            prev[j] = scores[b, 0, j] - shift[chain, 0]
            out_path_scores[b, 0, j, n] = scores[b, 0, j]
        cuda.syncthreads()
        softmax_column(prev, out_beam_probs[b, 0], n, scratch)
        for t in range(1, length):
            emission_shift = shift[chain, t]
            for base in range(0, K, threads):
                j = base + tid
                if j < K:
                    load_own(own, E2, tokens[b, t, j], D)
                m = NEG_INF
                total = ZERO
                for start in range(0, K, tile_rows):  # pass 1: maximum and total, online
                    rows = min(tile_rows, K - start)
                    stage_rows(tile, E1, tokens[b, t - 1], start, rows, D)
                    if j < K:
                        for r in range(rows):
                            x = prev[start + r] + dot_tile(tile, r, own, D)
                            if x > m:
                                total = total * math.exp((m - x) * inv_temp) + ONE
                                m = x
                            elif x != NEG_INF:  # a -inf slot weighs 0 (and -inf - -inf would be NaN)
                                total += math.exp((x - m) * inv_temp)
                u = ZERO
                if j < K:
                    if use_uniforms:
                        u = uniforms[b, t - 1, j, n]
                    else:
                        u0, u1 = draw_pair(seed_lo, seed_hi, core.STREAM_SEED_SAMPLER, b, t - 1, j // 2, n)
                        u = u0 if j % 2 == 0 else u1
                target = u * total
                running = ZERO
                pick = -1 if j < K else 0
                last = 0
                picked = ZERO
                for start in range(0, K, tile_rows):  # pass 2: running sum to the crossing
                    rows = min(tile_rows, K - start)
                    if cuda.syncthreads_and(int32(1 if pick >= 0 else 0)):
                        break
                    stage_rows(tile, E1, tokens[b, t - 1], start, rows, D)
                    if pick < 0:
                        for r in range(rows):
                            x = prev[start + r] + dot_tile(tile, r, own, D)
                            w = math.exp((x - m) * inv_temp)
                            running += w
                            if w > ZERO:
                                last = start + r
                                picked = x
                            if target < running:
                                pick = start + r
                                picked = x
                                break
                if j < K:
                    if pick < 0:  # rounding left no crossing: the last slot with a positive weight
                        pick = last
                    new[j] = picked + (scores[b, t, j] - emission_shift)
                    out_backpointers[b, t - 1, j, n] = pick
            cuda.syncthreads()
            for j in range(tid, K, threads):
                prev[j] = new[j]
                out_path_scores[b, t, j, n] = new[j] + cum_shift[chain, t]
            cuda.syncthreads()
            softmax_column(prev, out_beam_probs[b, t], n, scratch)
        cuda.syncthreads()
        for t in range(length, T):
            for j in range(tid, K, threads):
                out_beam_probs[b, t, j, n] = ZERO
                out_path_scores[b, t, j, n] = prev[j] + cum_shift[chain, t]
                out_backpointers[b, t - 1, j, n] = j
        cuda.syncthreads()
        if tid == 0:
            for t in range(length, T):
                out_beam_idx[b, t, n] = PAD
                out_tokens[b, t, n] = PAD
            y = 0
            for j in range(1, K):
                if prev[j] > prev[y]:
                    y = j
            out_score[b, n] = prev[y] + cum_shift[chain, length - 1]
            for t in range(length - 1, -1, -1):
                out_beam_idx[b, t, n] = y
                out_tokens[b, t, n] = tokens[b, t, y]
                if t > 0:
                    y = out_backpointers[b, t - 1, y, n]

    @cuda.jit
    def stochastic_viterbi_backward_kernel(beam_probs, backpointers, tokens, E1, E2, lengths, grad_beam_probs,
                                           out_grad_scores, grad_E1, grad_E2):
        """One block per (sequence b, chain n): the seed autograd's gradient (``_cpu``'s counterpart),
        added atomically into out_grad_scores (B, T, K) and grad_E1/grad_E2 (V, D), zeroed before."""
        B, T, K, N = beam_probs.shape
        chain = cuda.blockIdx.x
        b = chain // N
        n = chain - b * N
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        D = E1.shape[1]
        length = lengths[b]
        shared = cuda.shared.array(0, nbtype)
        upstream = shared[:K]
        incoming = shared[K:2 * K]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        for j in range(tid, K, threads):
            upstream[j] = ZERO
        cuda.syncthreads()
        for t in range(length - 1, -1, -1):
            partial = ZERO
            for k in range(tid, K, threads):
                partial += beam_probs[b, t, k, n] * grad_beam_probs[b, t, k, n]
            inner = block_sum(partial, scratch)
            for k in range(tid, K, threads):
                p = beam_probs[b, t, k, n]
                upstream[k] += p * (grad_beam_probs[b, t, k, n] - inner)
                cuda.atomic.add(out_grad_scores, (b, t, k), upstream[k])
                incoming[k] = ZERO
            cuda.syncthreads()
            if t == 0:
                break
            for j in range(tid, K, threads):
                a = upstream[j]
                if a != ZERO:
                    i = backpointers[b, t - 1, j, n]
                    cuda.atomic.add(incoming, i, a)
                    src = tokens[b, t - 1, i]
                    dst = tokens[b, t, j]
                    for d in range(D):
                        cuda.atomic.add(grad_E1, (src, d), a * E2[dst, d])
                        cuda.atomic.add(grad_E2, (dst, d), a * E1[src, d])
            cuda.syncthreads()
            for j in range(tid, K, threads):
                upstream[j] = incoming[j]
            cuda.syncthreads()

    # ---------------------------------------------------------------------------------------------
    # exact inference: forward, FFBS, backward
    # ---------------------------------------------------------------------------------------------
    @cuda.jit
    def forward_kernel(scores, tokens, E1, E2, lengths, inv_temp, tile_rows, out_log_z, alpha, col_max, col_sum):
        """One block per sequence: ``_cpu_crf.forward_kernel``'s alpha, col_max, col_sum (B, T, K) and
        log Z_tau. Each column's log-sum-exp is one online pass (running maximum, rescaled sum); the
        removed maxima are added with compensation (float32 keeps about float64's precision there)."""
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        K = scores.shape[2]
        D = E1.shape[1]
        length = lengths[b]
        shared = cuda.shared.array(0, nbtype)
        prev = shared[:K]
        tile = shared[K:]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        own = cuda.local.array(MAX_D, nbtype)
        shift = strided_max(scores[b, 0], K, scratch)
        for j in range(tid, K, threads):
            prev[j] = (scores[b, 0, j] - shift) * inv_temp
            alpha[b, 0, j] = prev[j]
        log_norm = shift * inv_temp
        error = ZERO
        for t in range(1, length):
            shift = strided_max(scores[b, t], K, scratch)
            top = NEG_INF
            for base in range(0, K, threads):
                j = base + tid
                m = NEG_INF
                total = ZERO
                if j < K:
                    load_own(own, E2, tokens[b, t, j], D)
                for start in range(0, K, tile_rows):
                    rows = min(tile_rows, K - start)
                    stage_rows(tile, E1, tokens[b, t - 1], start, rows, D)
                    if j < K:
                        for r in range(rows):
                            a = prev[start + r]
                            if a != NEG_INF:
                                x = a + dot_tile(tile, r, own, D) * inv_temp
                                if x > m:
                                    total = total * math.exp(m - x) + ONE
                                    m = x
                                else:
                                    total += math.exp(x - m)
                if j < K:
                    col_max[b, t, j] = m
                    col_sum[b, t, j] = total
                    value = m + math.log(total) + (scores[b, t, j] - shift) * inv_temp
                    alpha[b, t, j] = value
                    top = max(top, value)
            top = block_max(top, scratch)
            for j in range(tid, K, threads):
                prev[j] = alpha[b, t, j] - top
                alpha[b, t, j] = prev[j]
            y = (top + shift * inv_temp) - error
            s = log_norm + y
            error = (s - log_norm) - y
            log_norm = s
            cuda.syncthreads()
        partial = ZERO
        for j in range(tid, K, threads):
            partial += math.exp(prev[j])
        total = block_sum(partial, scratch)
        if tid == 0:
            out_log_z[b] = log_norm + (math.log(total) - error)

    @cuda.jit
    def sample_kernel(scores, tokens, E1, E2, lengths, inv_temp, log_z, alpha, seed_lo, seed_hi, uniforms,
                      use_uniforms, out_beam_idx, out_tokens, out_log_prob):
        """One block per (sequence b, sample n): backward sampling from ``forward_kernel``'s alpha
        (``_cpu_crf.sample_kernel``'s counterpart); log_prob = S(y) * inv_temp - log Z_tau."""
        B, T, K = scores.shape
        N = out_beam_idx.shape[2]
        D = E1.shape[1]
        chain = cuda.blockIdx.x
        b = chain // N
        n = chain - b * N
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        length = lengths[b]
        shared = cuda.shared.array(0, nbtype)
        logits = shared[:K]
        weights = shared[K:2 * K]
        row = shared[2 * K:2 * K + D]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        int_scratch = cuda.shared.array(MAX_THREADS, int64)
        if use_uniforms:
            u = uniforms[b, length - 1, n]
        else:
            u, _ = draw_pair(seed_lo, seed_hi, core.STREAM_EXACT_SAMPLER, b, length - 1, 0, n)
        for i in range(tid, K, threads):
            logits[i] = alpha[b, length - 1, i]
        cuda.syncthreads()
        y = block_pick(logits, weights, K, u, scratch, int_scratch)
        path_score = scores[b, length - 1, y]
        error = ZERO
        for t in range(length - 1, 0, -1):
            if tid == 0:
                out_beam_idx[b, t, n] = y
            for d in range(tid, D, threads):
                row[d] = E2[tokens[b, t, y], d]
            cuda.syncthreads()
            for i in range(tid, K, threads):
                src = tokens[b, t - 1, i]
                dot = ZERO
                for d in range(D):
                    dot += E1[src, d] * row[d]
                logits[i] = alpha[b, t - 1, i] + dot * inv_temp
            cuda.syncthreads()
            if use_uniforms:
                u = uniforms[b, t - 1, n]
            else:
                u, _ = draw_pair(seed_lo, seed_hi, core.STREAM_EXACT_SAMPLER, b, t - 1, 0, n)
            y = block_pick(logits, weights, K, u, scratch, int_scratch)
            src = tokens[b, t - 1, y]
            dot = ZERO
            for d in range(D):
                dot += E1[src, d] * row[d]
            term = (dot + scores[b, t - 1, y]) - error
            s = path_score + term
            error = (s - path_score) - term
            path_score = s
            cuda.syncthreads()
        if tid == 0:
            out_beam_idx[b, 0, n] = y
            out_log_prob[b, n] = path_score * inv_temp - log_z[b]
        cuda.syncthreads()
        for t in range(tid, T, threads):
            if t < length:
                out_tokens[b, t, n] = tokens[b, t, out_beam_idx[b, t, n]]
            else:
                out_beam_idx[b, t, n] = PAD
                out_tokens[b, t, n] = PAD

    @cuda.jit
    def backward_kernel(tokens, E1, E2, lengths, inv_temp, alpha, col_max, col_sum, tile_rows, row_scale,
                        want_rows, out_marginals, grad_E1, grad_E2):
        """One block per sequence: node marginals and, with ``want_rows``, row_scale[b] times the
        (table-row) gradient of tau * log Z_tau added atomically into grad_E1/grad_E2 (V, D).

        xi[i, j] = exp(alpha[t-1, i] + trans[i, j] * inv_temp - col_max[t, j]) * mu_t[j] / col_sum[t, j]
        (as in ``_cpu_crf.backward_kernel``). Pass 1, a thread per predecessor i: mu_{t-1}[i] = sum_j xi
        and the E1-row gradient sum_j xi E2[tok[t, j]]; pass 2, a thread per j: the E2-row gradient
        sum_i xi E1[tok[t-1, i]]. Both recompute trans from tiles of factor rows.
        """
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T = tokens.shape[1]
        K = tokens.shape[2]
        D = E1.shape[1]
        length = lengths[b]
        scale = row_scale[b]
        shared = cuda.shared.array(0, nbtype)
        ratio = shared[:K]
        prev = shared[K:2 * K]
        top = shared[2 * K:3 * K]
        tile = shared[3 * K:]
        scratch = cuda.shared.array(MAX_THREADS, nbtype)
        own = cuda.local.array(MAX_D, nbtype)
        acc = cuda.local.array(MAX_D, nbtype)
        mu = out_marginals[b]
        partial = ZERO
        for j in range(tid, K, threads):
            partial += math.exp(alpha[b, length - 1, j])
        total = block_sum(partial, scratch)
        for j in range(tid, K, threads):
            mu[length - 1, j] = math.exp(alpha[b, length - 1, j]) / total
        for t in range(length, T):
            for j in range(tid, K, threads):
                mu[t, j] = ZERO
        for t in range(length - 1, 0, -1):
            cuda.syncthreads()
            for j in range(tid, K, threads):
                ratio[j] = mu[t, j] / col_sum[b, t, j]
                top[j] = col_max[b, t, j]
                prev[j] = alpha[b, t - 1, j]
            for side in range(2 if want_rows else 1):
                # side 0: thread per i over tiles of E2 rows; side 1: thread per j over tiles of E1 rows
                for base in range(0, K, threads):
                    mine = base + tid
                    row_sum = ZERO
                    if mine < K:
                        if side == 0:
                            load_own(own, E1, tokens[b, t - 1, mine], D)
                        else:
                            load_own(own, E2, tokens[b, t, mine], D)
                        for d in range(D):
                            acc[d] = ZERO
                    for start in range(0, K, tile_rows):
                        rows = min(tile_rows, K - start)
                        if side == 0:
                            stage_rows(tile, E2, tokens[b, t], start, rows, D)
                        else:
                            stage_rows(tile, E1, tokens[b, t - 1], start, rows, D)
                        if mine < K:
                            for r in range(rows):
                                other = start + r
                                i = mine if side == 0 else other
                                j = other if side == 0 else mine
                                if prev[i] != NEG_INF:
                                    x = math.exp(prev[i] + dot_tile(tile, r, own, D) * inv_temp - top[j]) * ratio[j]
                                    row_sum += x
                                    if want_rows:
                                        for d in range(D):
                                            acc[d] += x * tile[r * D + d]
                    if mine < K:
                        if side == 0:
                            mu[t - 1, mine] = row_sum
                        if want_rows:
                            target = grad_E1 if side == 0 else grad_E2
                            token = tokens[b, t - 1, mine] if side == 0 else tokens[b, t, mine]
                            for d in range(D):
                                cuda.atomic.add(target, (token, d), scale * acc[d])

    @cuda.jit
    def add_paths(beam_idx, path_tokens, lengths, scale, E1, E2, grad_scores, grad_E1, grad_E2):
        """A thread per (b, n): grad_scores[b, t, y_t] += scale[b, n] and the table rows of scale[b, n] * S(y)
        (``_cpu_crf.add_path_rows`` plus the slot gradient), atomically."""
        B, T, N = beam_idx.shape
        D = E1.shape[1]
        chain = cuda.grid(1)
        if chain >= B * N:
            return
        b = chain // N
        n = chain - b * N
        s = scale[b, n]
        for t in range(lengths[b]):
            cuda.atomic.add(grad_scores, (b, t, beam_idx[b, t, n]), s)
            if t > 0:
                u = path_tokens[b, t - 1, n]
                v = path_tokens[b, t, n]
                for d in range(D):
                    cuda.atomic.add(grad_E1, (u, d), s * E2[v, d])
                    cuda.atomic.add(grad_E2, (v, d), s * E1[u, d])

    @cuda.jit
    def find_slots(beam_tokens, targets, slots):
        """slots[b, t, 0] = the first beam slot holding targets[b, t] (a thread per (b, t))."""
        B, T, K = beam_tokens.shape
        row = cuda.grid(1)
        if row >= B * T:
            return
        b = row // T
        t = row - b * T
        slot = 0
        for k in range(K - 1, -1, -1):
            if beam_tokens[b, t, k] == targets[b, t]:
                slot = k
        slots[b, t, 0] = slot

    @cuda.jit
    def path_log_prob(path_score, log_z, inv_temp, out):
        """out[b, n] = path_score[b, n] * inv_temp - log_z[b]."""
        B, N = path_score.shape
        e = cuda.grid(1)
        if e < B * N:
            b = e // N
            out[b, e - b * N] = path_score[b, e - b * N] * inv_temp - log_z[b]

    @cuda.jit
    def sequence_score_kernel(scores, tokens, E1, E2, lengths, beam_idx, out_score):
        """A thread per (b, n): out_score[b, n] = S(y) for the beam path beam_idx[b, :, n] (compensated sum)."""
        B, T, N = beam_idx.shape
        D = E1.shape[1]
        chain = cuda.grid(1)
        if chain >= B * N:
            return
        b = chain // N
        n = chain - b * N
        y = beam_idx[b, 0, n]
        total = scores[b, 0, y]
        error = ZERO
        for t in range(1, lengths[b]):
            x = y
            y = beam_idx[b, t, n]
            src = tokens[b, t - 1, x]
            dst = tokens[b, t, y]
            dot = ZERO
            for d in range(D):
                dot += E1[src, d] * E2[dst, d]
            term = (dot + scores[b, t, y]) - error
            s = total + term
            error = (s - total) - term
            total = s
        out_score[b, n] = total

    return SimpleNamespace(
        check_beam=check_beam, check_finite=check_finite, check_range=check_range, fill=fill,
        find_slots=find_slots, path_log_prob=path_log_prob, scale_rows=scale_rows,
        topk_kernel=topk_kernel, viterbi_kernel=viterbi_kernel, stochastic_viterbi_kernel=stochastic_viterbi_kernel,
        stochastic_viterbi_backward_kernel=stochastic_viterbi_backward_kernel, forward_kernel=forward_kernel,
        sample_kernel=sample_kernel, backward_kernel=backward_kernel, add_paths=add_paths,
        sequence_score_kernel=sequence_score_kernel,
    )


def signatures(dtype) -> dict:
    """The argument types each kernel is launched with for float dtype ``dtype`` (C-contiguous arrays,
    Python ints as int64, Python bools as boolean): what ``compile_ptx`` compiles ahead of time."""
    from numba import boolean

    f = from_dtype(np.dtype(dtype))
    f1, f2, f3, f4 = f[::1], f[:, ::1], f[:, :, ::1], f[:, :, :, ::1]
    i1, i2, i3, i4 = int64[::1], int64[:, ::1], int64[:, :, ::1], int64[:, :, :, ::1]
    beam = (f3, i3, f2, f2, i1)  # scores, tokens, E1, E2, lengths
    return {
        "check_beam": (f3, i3, int64, int32[::1]),
        "check_finite": (f1, int32[::1], int64),
        "check_range": (i1, int64, int64, int32[::1], int64),
        "fill": (f1, f),
        "scale_rows": (f3, f1, f3),
        "topk_kernel": (f3, int64, int64, i2, boolean, f3, i3, i2),
        "viterbi_kernel": beam + (int64, f2, f2, f3, int32[:, :, ::1], i2, i2, f1, f2),
        "stochastic_viterbi_kernel": beam + (f, int64, int64, f4, boolean, int64, f2, f2, f4, i3, i3, f4, i4, f2),
        "stochastic_viterbi_backward_kernel": (f4, i4, i3, f2, f2, i1, f4, f3, f2, f2),
        "forward_kernel": beam + (f, int64, f1, f3, f3, f3),
        "sample_kernel": beam + (f, f1, f3, int64, int64, f3, boolean, i3, i3, f2),
        "backward_kernel": (i3, f2, f2, i1, f, f3, f3, f3, int64, f1, boolean, f3, f2, f2),
        "add_paths": (i3, i3, i1, f2, f2, f2, f3, f2, f2),
        "find_slots": (i3, i2, i3),
        "path_log_prob": (f2, f1, f, f2),
        "sequence_score_kernel": beam + (i3, f2),
    }


def compile_ptx(name: str, dtype, cc: tuple) -> str:
    """PTX of kernel ``name`` for ``dtype`` and compute capability ``cc``, without a GPU.

    numba-cuda 0.30 asks the current device for its compute capability when it compiles a kernel's
    device functions, which fails where there is no GPU; during this call that question is answered
    with ``cc``.
    """
    from numba.cuda import dispatcher

    kernel = getattr(kernels(dtype), name)
    asked = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    try:
        ptx, _ = cuda.compile_ptx(kernel.py_func, signatures(dtype)[name], cc=cc)
    finally:
        dispatcher.get_current_device = asked
    return ptx
