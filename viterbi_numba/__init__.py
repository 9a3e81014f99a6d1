"""viterbi-numba: Numba kernels to decode and sample the low-rank beam CRF of non-autoregressive generators.

Array API (NumPy or GPU arrays in, the same kind out; docs/design.md is the specification):

* :func:`topk_beam` — per-position top-K beam, optionally forcing given tokens into it.
* :func:`gather_beam` — another model's scores on a beam (a reference's beam scores for :func:`crf_kl`).
* :func:`viterbi_decode` — the best beam path (max-product); :func:`viterbi_nbest` — the n best.
* :func:`stochastic_viterbi` — the write-up's stochastic Viterbi sampler, one or N chains, and
  :func:`stochastic_viterbi_backward`, the gradient the write-up's autograd gives through ``beam_probs``.
* :func:`crf_sample` — exact samples of the CRF with their log-probabilities (FFBS).
* :func:`crf_entropy`, :func:`crf_entropy_grad` — the exact entropy of the CRF and its gradients;
  :func:`crf_kl`, :func:`crf_kl_grad`, :func:`crf_cross_entropy` — of two CRFs on one beam.
* :func:`log_partition`, :func:`marginals`, :func:`log_likelihood` (fairseq ``DynamicCRF.forward``),
  :func:`sequence_score`, and the gradients :func:`log_partition_grad`, :func:`log_likelihood_grad`.
* :func:`crf_forward`, :func:`log_likelihood_forward` — a forward pass kept for sampling and the
  backward pass (what autograd wrappers use).
* :func:`skip_gpu_checks` — GPU calls that never wait for the GPU (for CUDA graph capture).
"""

from ._validate import skip_gpu_checks
from .crf import (
    CRFForward,
    LikelihoodForward,
    crf_cross_entropy,
    crf_entropy,
    crf_entropy_grad,
    crf_forward,
    crf_kl,
    crf_kl_grad,
    crf_sample,
    log_likelihood,
    log_likelihood_forward,
    log_likelihood_grad,
    log_partition,
    log_partition_grad,
    marginals,
    sequence_score,
)
from .decode import (
    gather_beam,
    stochastic_viterbi,
    stochastic_viterbi_backward,
    topk_beam,
    viterbi_decode,
    viterbi_nbest,
)
from .results import (
    PAD,
    Beam,
    CRFSample,
    DistinctSample,
    EntropyGrad,
    KLGrad,
    LikelihoodGrad,
    NBestResult,
    PartitionGrad,
    SamplerGrad,
    StochasticViterbiResult,
    ViterbiResult,
)

__version__ = "0.1.0"

__all__ = [
    "PAD",
    "Beam",
    "CRFForward",
    "CRFSample",
    "DistinctSample",
    "EntropyGrad",
    "KLGrad",
    "LikelihoodForward",
    "LikelihoodGrad",
    "PartitionGrad",
    "SamplerGrad",
    "StochasticViterbiResult",
    "ViterbiResult",
    "NBestResult",
    "crf_cross_entropy",
    "crf_entropy",
    "crf_entropy_grad",
    "crf_forward",
    "crf_kl",
    "crf_kl_grad",
    "crf_sample",
    "log_likelihood",
    "log_likelihood_forward",
    "log_likelihood_grad",
    "log_partition",
    "log_partition_grad",
    "marginals",
    "sequence_score",
    "skip_gpu_checks",
    "stochastic_viterbi",
    "stochastic_viterbi_backward",
    "topk_beam",
    "gather_beam",
    "viterbi_decode",
    "viterbi_nbest",
]
