"""Framework adapters for viterbi-numba, installed as ``viterbi_numba.adapters``.

The core package never imports a framework; adapters live here. The PyTorch adapter (zero-copy tensors,
autograd, drop-in modules for the seed's classes) is not written yet.
"""
