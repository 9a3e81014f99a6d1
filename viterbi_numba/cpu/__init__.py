"""The CPU backend: ``ops.py`` (host side) and the ``@njit`` kernels by family (``decode.py``, ``crf.py``,
``intrinsics.py``). Importing it picks numba's threading layer (``threading_layer.py``) before any
kernel runs."""

from . import threading_layer

threading_layer.choose()
