"""Small LLVM-level helpers that keep the CPU kernels' inner loops vectorised (and fast on AMD).

LLVM turns ``a[j] = x if cond else a[j]`` — and even ``a[j] = maxnum(x, a[j])``, which leaves ``a[j]``
alone when x is NaN — into masked stores (``vmaskmovps``), which are microcoded and several times slower
than a plain store on AMD Zen. The kernels therefore (1) take running maxima with :func:`fmax`, a
``maxnum`` marked ``nnan`` (their operands are never NaN), which stores unconditionally, and (2) keep
running arg-maxima and picks in two buffers, reading one and writing the other.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def fmax(typingctx, a, b):
    """max(a, b) for floats of one type that are never NaN: a plain ``vmaxps``, and no masked store."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        lty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [lty], ir.FunctionType(lty, [lty, lty]))
        return builder.call(fn, args, fastmath=("nnan", "nsz"))

    return a(a, b), codegen
