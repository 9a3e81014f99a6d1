"""Framework adapters for viterbi-numba, installed as ``viterbi_numba.adapters``.

The core package never imports a framework; adapters live here and import theirs:

* ``viterbi_numba.adapters.torch`` — zero-copy tensors, autograd, the write-up's classes
  (``StochasticViterbiSample``, ``StochasticViterbiSamples``) and fairseq's ``DynamicCRF``.
"""
