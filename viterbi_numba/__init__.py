"""viterbi-numba: Numba kernels to decode and sample the low-rank beam CRF of non-autoregressive generators.

Array API (NumPy in, NumPy out):

* :func:`topk_beam` — per-position top-K beam, optionally forcing given tokens into it.
* :func:`viterbi_decode` — the best beam path (max-product).
* :func:`stochastic_viterbi` — the seed's stochastic Viterbi sampler, one or N chains.
"""

from .api import (
    PAD,
    Beam,
    StochasticViterbiResult,
    ViterbiResult,
    stochastic_viterbi,
    topk_beam,
    viterbi_decode,
)

__version__ = "0.1.0"

__all__ = [
    "PAD",
    "Beam",
    "StochasticViterbiResult",
    "ViterbiResult",
    "stochastic_viterbi",
    "topk_beam",
    "viterbi_decode",
]
