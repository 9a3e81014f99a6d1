"""numba's threading layer for the CPU kernels: TBB where it can be loaded (docs/design.md §7).

The default layer is GNU OpenMP when numba finds it: a process that has run a parallel kernel then
cannot ``fork`` (the children are killed, a ``multiprocessing`` fork pool hangs), and its idle workers
spin, so two processes sharing the cores run several times slower than one. numba's TBB layer is safe
with both fork and Python threads and yields its idle workers. The PyPI ``tbb`` wheel (a dependency on
Linux) puts ``libtbb`` in ``<prefix>/lib``, which the loader does not search in a virtual environment, so
it is loaded here by path before numba looks for it. A layer chosen by the user (``NUMBA_THREADING_LAYER``
or ``numba.config.THREADING_LAYER``, which numba reads from the environment) is left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

_NAMES = ("libtbb.so.12", "libtbb.12.dylib", "tbb12.dll")


def _load_tbb() -> bool:
    """Load libtbb globally, from the loader's search path or the tbb wheel's directory; True if loaded."""
    directories = ["", os.path.join(sys.prefix, "lib"), os.path.join(sys.prefix, "Library", "bin")]
    for directory in directories:
        for name in _NAMES:
            try:
                ctypes.CDLL(os.path.join(directory, name), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
            except OSError:
                continue
            return True
    return False


def choose() -> str:
    """Set numba's threading layer to TBB unless the user chose one or TBB cannot be loaded (a user's
    "tbb" or "safe" gets libtbb loaded too); the layer requested (numba starts it with the first
    parallel kernel)."""
    from numba import config

    requested = str(config.THREADING_LAYER)
    if requested in ("tbb", "safe"):
        _load_tbb()
    elif requested == "default" and _load_tbb():
        config.THREADING_LAYER = "tbb"
    return str(config.THREADING_LAYER)
