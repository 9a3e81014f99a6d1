"""viterbi-numba: Numba kernels to decode and sample the low-rank beam CRF of non-autoregressive generators.

Array API (NumPy in, NumPy out):

* :func:`topk_beam` — per-position top-K beam, optionally forcing given tokens into it.
* :func:`viterbi_decode` — the best beam path (max-product).
* :func:`stochastic_viterbi` — the seed's stochastic Viterbi sampler, one or N chains, and
  :func:`stochastic_viterbi_backward`, the gradient the seed's autograd gives through ``beam_probs``.
* :func:`crf_sample` — exact samples of the CRF with their log-probabilities (FFBS).
* :func:`log_partition`, :func:`marginals`, :func:`log_likelihood` (fairseq ``DynamicCRF.forward``),
  :func:`sequence_score`, and the gradients :func:`log_partition_grad`, :func:`log_likelihood_grad`.
"""

from .api import (
    PAD,
    Beam,
    SamplerGrad,
    StochasticViterbiResult,
    ViterbiResult,
    stochastic_viterbi,
    stochastic_viterbi_backward,
    topk_beam,
    viterbi_decode,
)
from .crf import (
    CRFSample,
    LikelihoodGrad,
    PartitionGrad,
    crf_sample,
    log_likelihood,
    log_likelihood_grad,
    log_partition,
    log_partition_grad,
    marginals,
    sequence_score,
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
    "SamplerGrad",
    "stochastic_viterbi_backward",
    "CRFSample",
    "LikelihoodGrad",
    "PartitionGrad",
    "crf_sample",
    "log_likelihood",
    "log_likelihood_grad",
    "log_partition",
    "log_partition_grad",
    "marginals",
    "sequence_score",
]
