"""GPU top-K beam: one block per (b, t) row, a sorted region and a candidate region in shared memory."""

from __future__ import annotations

from numba import config, cuda, int64, uint32

from .block import FULL_MASK, Family

_FAR_ID = 1 << 62  # an id that ranks below every real token in top-K's sentinel slots
LOADS = 2  # row entries a thread loads per chunk before comparing them (the region holds two chunks)


def build(blk) -> Family:
    """This family's kernels for the float dtype of ``blk`` (the block primitives of ``block.build``)."""
    t = blk.types
    NEG_INF = blk.NEG_INF
    POS_INF = blk.POS_INF
    nbtype = blk.nbtype
    ITEMSIZE = blk.ITEMSIZE
    ranks_above = blk.ranks_above
    place_forced = blk.place_forced
    family = Family()

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

    if config.ENABLE_CUDASIM:  # no warp votes in the simulator: an atomic per candidate

        @cuda.jit(device=True)
        def reserve_slot(count, take):
            return cuda.atomic.add(count, 0, 1) if take else 0
    else:

        @cuda.jit(device=True)
        def reserve_slot(count, take):
            """A candidate slot for each lane that takes one, compacted by a warp vote: one atomic add
            per warp (by its first taking lane), each lane's offset the takers below it. Every lane of
            the warp must call it."""
            mask = cuda.ballot_sync(FULL_MASK, take)
            if mask == 0:
                return 0
            lane = cuda.laneid
            leader = cuda.ffs(mask) - 1
            first = 0
            if lane == leader:
                first = cuda.atomic.add(count, 0, cuda.popc(mask))
            first = cuda.shfl_sync(FULL_MASK, first, leader)
            return first + cuda.popc(mask & ((uint32(1) << uint32(lane)) - uint32(1)))

    @family.kernel((t.f3, t.int64, t.int64, t.i2, t.boolean, t.f3, t.i3, t.int32[::1], t.int64))
    def topk_kernel(emissions, k, region, force_tokens, use_force, out_scores, out_tokens, flags, slot):
        """One block per (b, t) row: the k best (score, id), best first, ties to the lower id.

        Shared memory holds the best ``region`` entries so far (sorted, ``region`` a power of two >= k
        and >= 4 block sizes) followed by ``region`` candidate slots. A row entry becomes a candidate
        only if it ranks above the current k-th best; when the candidate slots could overflow, the
        2 * region entries are sorted (bitonic) and the best half kept. A forced token enters first
        with score +inf, so it is always kept, and takes its own score at the end. NaN or +inf in the
        row sets flags[slot]; the ids written are in [0, V) whatever the row holds (a row with NaN
        may leave slots unfilled, which then read id 0).
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
        ids = cuda.shared.array(0, int64)[(size * ITEMSIZE) // 8 :]  # after the keys (see gpu/ops.py)
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
        values = cuda.local.array(LOADS, nbtype)
        for base in range(0, V, threads * LOADS):
            flush = count[0] + threads * LOADS > region  # the next chunk might not fit: keep the best half
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
            for q in range(LOADS):  # LOADS loads in flight before the first use
                u = base + q * threads + tid
                values[q] = row_values[u] if u < V else NEG_INF
            for q in range(LOADS):
                u = base + q * threads + tid
                x = values[q]
                if u < V and not x < POS_INF:
                    count[1] = 1
                take = u < V and u != forced and ranks_above(x, u, threshold_key, threshold_id)
                slot = reserve_slot(count, take)
                if take:
                    keys[region + slot] = x
                    ids[region + slot] = u
            cuda.syncthreads()
        bitonic_sort(keys, ids, size)
        if tid == 0:
            if count[1] != 0:
                cuda.atomic.max(flags, slot, 1)
            if forced >= 0:  # the forced token sits first with +inf: move it to its own score's place
                place_forced(keys, ids, k, row_values[forced], forced)
        cuda.syncthreads()
        for i in range(tid, k, threads):
            out_scores[b, t, i] = keys[i]
            out_tokens[b, t, i] = ids[i] if ids[i] < V else 0

    return family
