"""The CPU backend: ``ops.py`` (host side) and the ``@njit`` kernels by family (``decode.py``, ``crf.py``,
``intrinsics.py``)."""
