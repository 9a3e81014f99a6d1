"""GPU top-K beam: one block per (b, t) row; the best entries so far and the candidates in shared memory.

The row is read in chunks, several loads in flight per thread. An entry becomes a candidate only if it
ranks above the current threshold (at most the k-th best so far), and the candidates of a warp are
compacted by a vote. When the candidate half could overflow, a radix select (8-bit digits of an
order-preserving key, most significant first, then of the id so that ties go to the lower id) finds
the k-th best of everything held and keeps only the entries at or above it, unsorted; only the k kept
at the end are sorted. A select costs a few histogram passes over the buffer, where the sort it
replaces had log2(2 region)^2 / 2 compare-exchange stages. ``family.devices`` holds the three phases
(``admit_chunk``, ``keep_best``, ``bitonic_sort``), which ``benchmarks/gpu_model.py`` compiles alone to
count their instructions.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from numba import config, cuda, int32, int64, uint32, uint64

from .block import FULL_MASK, Family

_FAR_ID = 1 << 62  # the id of an empty slot: it ranks below every real token
_RID_TOP = (1 << 31) - 1  # ids are below it (V < 2**31 - 1); rid = _RID_TOP - id ranks lower ids higher
LOADS = 2  # row entries a thread loads per chunk before comparing them
BINS = 256  # values of an 8-bit digit
ENTRIES = 512 if config.ENABLE_CUDASIM else 8  # buffer entries per thread at most (see gpu/ops.py)
_UNROLL = not config.ENABLE_CUDASIM  # loops over a thread's entries: ENTRIES long on a GPU (unrolled)
_KEPT, _CANDIDATES, _NAN, _NEED, _CHOSEN, _STOP = range(6)  # the block's shared state


def build(blk) -> Family:
    """This family's kernels for the float dtype of ``blk`` (the block primitives of ``block.build``)."""
    t = blk.types
    NEG_INF = blk.NEG_INF
    POS_INF = blk.POS_INF
    ZERO = blk.ZERO
    nbtype = blk.nbtype
    ITEMSIZE = blk.ITEMSIZE
    ranks_above = blk.ranks_above
    place_forced = blk.place_forced
    KEY_BITS = 8 * ITEMSIZE
    KEY_PASSES = ITEMSIZE  # 8-bit digits of the key; then 4 of the id
    key_type = uint32 if ITEMSIZE == 4 else uint64  # an order key: the value's bits, 32-bit math in float32
    SIGN = key_type(1) << key_type(KEY_BITS - 1)
    KEY_MASK = key_type(0xFFFFFFFF) if ITEMSIZE == 4 else key_type(0xFFFFFFFFFFFFFFFF)
    family = Family()

    if config.ENABLE_CUDASIM:  # plain Python: the bits through NumPy views
        float_type = np.float32 if ITEMSIZE == 4 else np.float64
        uint_type = np.uint32 if ITEMSIZE == 4 else np.uint64

        def float_bits(x):
            return key_type(np.array([x], dtype=float_type).view(uint_type)[0])

        def bits_float(bits):
            return nbtype(np.array([bits], dtype=uint_type).view(float_type)[0])
    else:
        from numba.cuda import libdevice

        if ITEMSIZE == 4:

            @cuda.jit(device=True)
            def float_bits(x):
                return uint32(libdevice.float_as_int(x))

            @cuda.jit(device=True)
            def bits_float(bits):
                return libdevice.int_as_float(int32(bits))
        else:

            @cuda.jit(device=True)
            def float_bits(x):
                return uint64(libdevice.double_as_longlong(x))

            @cuda.jit(device=True)
            def bits_float(bits):
                return libdevice.longlong_as_double(int64(bits))

    @cuda.jit(device=True)
    def order_key(x):
        """The bits of x as an unsigned key in the order of the values (-0.0 read as +0.0)."""
        if x == ZERO:
            x = ZERO
        bits = float_bits(x)
        if bits & SIGN:
            return ~bits & KEY_MASK
        return bits | SIGN

    @cuda.jit(device=True)
    def key_value(key):
        """The value of an order key (-inf for the keys below -inf's, which are NaN bit patterns)."""
        bits = (key ^ SIGN) if key & SIGN else (~key & KEY_MASK)
        x = bits_float(bits)
        return x if x >= NEG_INF else NEG_INF

    @cuda.jit(device=True)
    def rank_id(token):
        """The low half of the composite (key, rank_id): higher for a lower id, 0 for an empty slot."""
        return uint32(0) if token == _FAR_ID else uint32(_RID_TOP - token)

    @cuda.jit(device=True)
    def bitonic_sort(keys, ids, size):
        """Sort keys/ids[:size] (shared, size a power of two) best first by ``ranks_above``. Unsigned
        indices and while loops: no wraparound code, no 64-bit division for a strided loop's trips."""
        tid = uint32(cuda.threadIdx.x)
        threads = uint32(cuda.blockDim.x)
        count = uint32(size)
        width = uint32(2)
        while width <= count:
            stride = width >> uint32(1)
            while stride > 0:
                i = tid
                while i < count:
                    partner = uint32(i ^ stride)
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
                    i = uint32(i + threads)
                cuda.syncthreads()
                stride >>= uint32(1)
            width <<= uint32(1)

    if config.ENABLE_CUDASIM:  # no warp votes in the simulator: an atomic per entry, one thread chooses

        @cuda.jit(device=True)
        def reserve_slot(count, take):
            return uint32(cuda.atomic.add(count, 0, 1)) if take else uint32(0)

        @cuda.jit(device=True)
        def histogram_add(hist, digit):
            if digit >= 0:
                cuda.atomic.add(hist, digit, 1)

        @cuda.jit(device=True)
        def choose_digit(hist, need, state):
            if cuda.threadIdx.x == 0:
                above = 0
                for d in range(BINS - 1, -1, -1):
                    if above + hist[d] >= need:
                        state[_CHOSEN] = d
                        state[_NEED] = need - above
                        state[_STOP] = 1 if hist[d] == need - above else 0
                        return
                    above += hist[d]
    else:

        @cuda.jit(device=True)
        def reserve_slot(count, take):
            """A slot for each lane that takes one, compacted by a warp vote: one atomic add per warp (by
            its first taking lane), each lane's offset the takers below it. Every lane must call it."""
            mask = uint32(cuda.ballot_sync(FULL_MASK, take))
            if mask == 0:
                return uint32(0)
            lane = uint32(cuda.laneid)
            leader = uint32(uint32(cuda.ffs(mask)) - uint32(1))
            first = int32(0)
            if lane == leader:
                first = cuda.atomic.add(count, 0, int32(cuda.popc(mask)))
            first = cuda.shfl_sync(FULL_MASK, first, leader)
            return uint32(uint32(first) + uint32(cuda.popc(uint32(mask & uint32((uint32(1) << lane) - uint32(1))))))

        @cuda.jit(device=True)
        def histogram_add(hist, digit):
            """hist[digit] += 1 for the lanes whose digit is >= 0, one atomic per distinct digit of the warp
            (the leading digits of a row's scores are few). Every lane must call it."""
            peers = cuda.match_any_sync(int32(-1), digit)
            if digit >= 0 and int32(cuda.laneid) == int32(cuda.ffs(peers)) - int32(1):
                cuda.atomic.add(hist, uint32(digit), cuda.popc(peers))

        @cuda.jit(device=True)
        def choose_digit(hist, need, state):
            """The first warp finds the digit d where the entries with a higher digit number fewer than
            ``need`` and those with d or higher at least ``need``: each lane sums 8 bins from the top, a
            shuffle scan adds the lanes, and the lane that crosses walks its bins."""
            if cuda.threadIdx.x < 32:
                lane = cuda.laneid
                top = BINS - 1 - 8 * lane
                own = 0
                for j in range(8):
                    own += hist[top - j]
                total = own
                offset = 1
                while offset < 32:
                    other = cuda.shfl_up_sync(FULL_MASK, total, offset)
                    if lane >= offset:
                        total += other
                    offset *= 2
                above = total - own
                if above < need and need <= total:
                    for j in range(8):
                        count = hist[top - j]
                        if above + count >= need:
                            state[_CHOSEN] = top - j
                            state[_NEED] = need - above
                            state[_STOP] = 1 if count == need - above else 0
                            break
                        above += count

    @cuda.jit(device=True)
    def keep_best(keys, ids, size, k, state, hist, kept_count):
        """Keep the k best real entries of keys/ids[:size] (fewer if fewer are held) in slots [0, kept),
        unsorted, and empty every other slot; return (key, id), at most the k-th best (conservative:
        a later entry that ranks above it may still be among the best, one that does not cannot), or
        (-inf, far id) while at most k are held. Every thread must call it.

        Each thread holds its entries (and their order keys) in registers for the whole select
        (``ENTRIES`` bounds their number: gpu/ops.py checks it), then empties their slots and writes
        those kept into [0, kept), compacted by a warp vote."""
        tid = uint32(cuda.threadIdx.x)
        threads = uint32(cuda.blockDim.x)
        per_thread = uint32(size) // threads
        loop = ENTRIES if _UNROLL else per_thread  # a constant trip count on a GPU (q < per_thread is uniform)
        held_keys = cuda.local.array(ENTRIES, nbtype)
        held_ids = cuda.local.array(ENTRIES, int64)
        orders = cuda.local.array(ENTRIES, key_type)
        rids = cuda.local.array(ENTRIES, uint32)
        for q in range(loop):
            i = uint32(tid + uint32(q) * threads)
            held_keys[q] = keys[i] if q < per_thread else NEG_INF
            held_ids[q] = ids[i] if q < per_thread else _FAR_ID
            orders[q] = order_key(held_keys[q])
            rids[q] = rank_id(held_ids[q])
        real = state[_KEPT] + state[_CANDIDATES]
        select = real > k
        # The digits chosen so far, in place (undetermined bits 0), and the masks of their bits.
        high = key_type(0)
        high_mask = key_type(0)
        low = uint32(0)
        low_mask = uint32(0)
        if select:
            need = k
            for p in range(KEY_PASSES + 4):
                in_key = p < KEY_PASSES
                shift = (KEY_BITS - 8 * (p + 1)) if in_key else (32 - 8 * (p - KEY_PASSES + 1))
                d = tid
                while d < BINS:  # (a strided range would divide in 64 bits for its trip count)
                    hist[d] = 0
                    d += threads
                cuda.syncthreads()
                for q in range(loop):
                    digit = int32(-1)
                    if rids[q] != 0 and (orders[q] & high_mask) == high:
                        if in_key:
                            digit = int32((orders[q] >> key_type(shift)) & key_type(BINS - 1))
                        elif (rids[q] & low_mask) == low:
                            digit = int32((rids[q] >> uint32(shift)) & uint32(BINS - 1))
                    histogram_add(hist, digit)
                cuda.syncthreads()
                choose_digit(hist, need, state)
                cuda.syncthreads()
                need = state[_NEED]
                if in_key:
                    high |= key_type(state[_CHOSEN]) << key_type(shift)
                    high_mask |= key_type(BINS - 1) << key_type(shift)
                else:
                    low |= uint32(state[_CHOSEN]) << uint32(shift)
                    low_mask |= uint32(BINS - 1) << uint32(shift)
                if state[_STOP] != 0:
                    break
        if tid == 0:
            kept_count[0] = 0
        for q in range(loop):
            if q < per_thread:
                i = uint32(tid + uint32(q) * threads)
                keys[i] = NEG_INF
                ids[i] = _FAR_ID
        cuda.syncthreads()
        for q in range(loop):
            take = rids[q] != 0
            if take and select:
                entry_high = orders[q] & high_mask
                take = entry_high > high or (entry_high == high and (rids[q] & low_mask) >= low)
            slot = reserve_slot(kept_count, take)
            if take:
                keys[slot] = held_keys[q]
                ids[slot] = held_ids[q]
        cuda.syncthreads()
        if tid == 0:
            state[_KEPT] = kept_count[0]
            state[_CANDIDATES] = 0
        cuda.syncthreads()
        if not select:
            return NEG_INF, int64(_FAR_ID)
        if low_mask == 0:  # the key's lowest completion, and any id
            return key_value(high), int64(_FAR_ID)
        return key_value(high), int64(_RID_TOP) - int64(low)  # the key, and the id's highest completion

    @cuda.jit(device=True)
    def admit_chunk(row_values, base, forced, threshold_key, threshold_id, keys, ids, first, state):
        """The row's entries base .. base + LOADS * threads - 1: LOADS loads per thread in flight before
        the first use; those above the threshold become candidates (slots from ``first`` on), compacted
        by a warp vote. Every thread must call it."""
        tid = uint32(cuda.threadIdx.x)
        threads = uint32(cuda.blockDim.x)
        V = uint32(row_values.shape[0])
        values = cuda.local.array(LOADS, nbtype)
        for q in range(LOADS):
            u = uint32(uint32(base) + uint32(q) * threads + tid)  # numba widens sums; 32 bits suffice
            values[q] = row_values[u] if u < V else NEG_INF
        candidates = state[_CANDIDATES:]  # reserve_slot counts at index 0
        for q in range(LOADS):
            u = uint32(uint32(base) + uint32(q) * threads + tid)
            token = int64(u)
            x = values[q]
            if u < V and not x < POS_INF:
                state[_NAN] = 1
            take = u < V and token != forced and ranks_above(x, token, threshold_key, threshold_id)
            place = reserve_slot(candidates, take)
            if take:
                at = uint32(uint32(first) + place)
                keys[at] = x
                ids[at] = token

    family.devices = SimpleNamespace(admit_chunk=admit_chunk, keep_best=keep_best, bitonic_sort=bitonic_sort)

    @family.kernel((t.f3, t.int64, t.int64, t.i2, t.boolean, t.f3, t.i3, t.int32[::1], t.int64))
    def topk_kernel(emissions, k, region, force_tokens, use_force, out_scores, out_tokens, flags, slot):
        """One block per (b, t) row: the k best (score, id), best first, ties to the lower id.

        Shared memory holds 2 * ``region`` slots (``region`` a power of two >= k): the kept entries in
        the first k, candidates after them. A row entry becomes a candidate only if it ranks above the
        current threshold; when the candidate slots could overflow, ``keep_best`` keeps the k best of
        all in the first k. A forced token enters first with score +inf, so it is always kept, and
        takes its own score at the end. NaN or +inf in the row sets flags[slot]; the ids written are in
        [0, V) whatever the row holds (a row with NaN may leave slots unfilled, which then read id 0).
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
        state = cuda.shared.array(6, int32)
        hist = cuda.shared.array(BINS, int32)
        kept_count = cuda.shared.array(1, int32)
        for i in range(tid, size, threads):
            keys[i] = NEG_INF
            ids[i] = _FAR_ID
        forced = force_tokens[b, t] if use_force else -1
        cuda.syncthreads()  # the empty slots are written before the forced token takes one
        if tid == 0:
            state[_KEPT] = 0
            state[_CANDIDATES] = 0
            state[_NAN] = 0
            if forced >= 0:
                keys[k] = POS_INF
                ids[k] = forced
                state[_CANDIDATES] = 1
        cuda.syncthreads()
        threshold_key = NEG_INF
        threshold_id = int64(_FAR_ID)
        row_values = emissions[b, t]
        chunk = threads * LOADS
        for base in range(0, V + chunk, chunk):  # one more trip for the final select (one inlined copy)
            flush = base >= V or state[_CANDIDATES] + chunk > size - k  # or the next chunk might not fit
            cuda.syncthreads()  # every thread has read the count before any adds to it
            if flush:
                threshold_key, threshold_id = keep_best(keys, ids, size, k, state, hist, kept_count)
            if base >= V:
                break
            admit_chunk(row_values, base, forced, threshold_key, threshold_id, keys, ids, k, state)
            cuda.syncthreads()
        width = 1
        while width < k:
            width *= 2
        bitonic_sort(keys, ids, width)
        if tid == 0:
            if state[_NAN] != 0:
                cuda.atomic.max(flags, slot, 1)
            if forced >= 0:  # the forced token sits first with +inf: move it to its own score's place
                place_forced(keys, ids, k, row_values[forced], forced)
        cuda.syncthreads()
        for i in range(tid, k, threads):
            out_scores[b, t, i] = keys[i]
            out_tokens[b, t, i] = ids[i] if ids[i] < V else 0

    return family
