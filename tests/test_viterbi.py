"""viterbi_decode against the NumPy reference, brute force, and its invariances."""

import numpy as np
import pytest
import reference as ref
from conftest import make_problem
from hypothesis import given, settings
from hypothesis import strategies as st

from viterbi_numba import PAD, viterbi_decode

TOL = {np.float32: 1e-5, np.float64: 1e-12}


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 8),
    K=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([np.float32, np.float64]),
    padded=st.booleans(),
)
def test_matches_reference(B, T, K, seed, dtype, padded):
    rng = np.random.default_rng(seed)
    scores, tokens, E1, E2 = make_problem(rng, B, T, K, dtype=dtype)
    lengths = rng.integers(1, T + 1, B) if padded else None
    got = viterbi_decode(scores, tokens, E1, E2, lengths=lengths)
    beam_idx, path_tokens, best, fairseq_steps = ref.viterbi(scores, tokens, E1, E2, lengths)
    np.testing.assert_array_equal(got.beam_idx, beam_idx)
    np.testing.assert_array_equal(got.tokens, path_tokens)
    np.testing.assert_allclose(got.score, best, rtol=TOL[dtype], atol=TOL[dtype])
    increments = ref.step_increments(scores, tokens, E1, E2, beam_idx, lengths)
    np.testing.assert_allclose(got.step_scores, increments, rtol=TOL[dtype], atol=10 * TOL[dtype])
    assert got.score.dtype == dtype and got.step_scores.dtype == dtype
    np.testing.assert_allclose(got.step_scores.sum(axis=1), got.score, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    fairseq = viterbi_decode(scores, tokens, E1, E2, lengths=lengths, step_scores="fairseq")
    np.testing.assert_array_equal(fairseq.beam_idx, got.beam_idx)
    np.testing.assert_allclose(fairseq.step_scores, fairseq_steps, rtol=TOL[dtype], atol=10 * TOL[dtype])


def test_step_scores_are_the_increments_not_fairseqs_reading(rng):
    """fairseq reads step t's cumulative score at step t+1's beam index; where the best path into that
    slot at step t is not the Viterbi path's prefix the two differ, and only the increments are S(y)'s."""
    scores, tokens, E1, E2 = make_problem(rng, 16, 6, 4)
    got = viterbi_decode(scores, tokens, E1, E2)
    fairseq = viterbi_decode(scores, tokens, E1, E2, step_scores="fairseq")
    trans = ref.transitions(tokens, E1, E2)
    for b in range(16):
        path = got.beam_idx[b]
        assert got.step_scores[b, 0] == scores[b, 0, path[0]]
        np.testing.assert_allclose(
            got.step_scores[b, 1:],
            [scores[b, t, path[t]] + trans[b, t - 1, path[t - 1], path[t]] for t in range(1, 6)],
            rtol=1e-12,
        )
    assert np.abs(got.step_scores - fairseq.step_scores).max() > 1e-3  # the two readings differ somewhere
    with pytest.raises(ValueError, match="step_scores must be 'increments' or 'fairseq'"):
        viterbi_decode(scores, tokens, E1, E2, step_scores="cumulative")


@pytest.mark.parametrize("T, K", [(1, 5), (3, 4), (4, 3), (5, 3)])
def test_equals_brute_force(rng, T, K):
    scores, tokens, E1, E2 = make_problem(rng, 3, T, K)
    got = viterbi_decode(scores, tokens, E1, E2)
    for b, (path, score) in enumerate(ref.brute_force_best(scores, tokens, E1, E2)):
        assert list(got.beam_idx[b]) == path
        assert got.score[b] == pytest.approx(score, rel=1e-12)


def test_padded_batch_equals_each_sequence_alone(rng):
    scores, tokens, E1, E2 = make_problem(rng, 4, 9, 6)
    lengths = np.array([9, 1, 5, 3])
    batch = viterbi_decode(scores, tokens, E1, E2, lengths=lengths)
    for b, L in enumerate(lengths):
        alone = viterbi_decode(scores[b : b + 1, :L], tokens[b : b + 1, :L], E1, E2)
        np.testing.assert_array_equal(batch.beam_idx[b, :L], alone.beam_idx[0])
        np.testing.assert_array_equal(batch.tokens[b, :L], alone.tokens[0])
        assert batch.score[b] == alone.score[0]
        np.testing.assert_array_equal(batch.step_scores[b, :L], alone.step_scores[0])
        assert (batch.beam_idx[b, L:] == PAD).all() and (batch.tokens[b, L:] == PAD).all()
        assert (batch.step_scores[b, L:] == 0).all()


@pytest.mark.parametrize("constant", [1.0, 1e3, 1e6, -1e6])
def test_constant_shift_keeps_the_path(rng, constant):
    scores, tokens, E1, E2 = make_problem(rng, 4, 12, 8)
    base = viterbi_decode(scores, tokens, E1, E2)
    shifted = viterbi_decode(scores + constant, tokens, E1, E2)
    np.testing.assert_array_equal(base.beam_idx, shifted.beam_idx)
    np.testing.assert_allclose(shifted.score, base.score + 12 * constant, rtol=1e-12)
    # float32: scores on a 1/8 grid stay exact at 1e6, so only the kernel's own arithmetic is tested
    grid = np.round(scores * 8) / 8
    base32 = viterbi_decode(grid.astype(np.float32), tokens, E1.astype(np.float32), E2.astype(np.float32))
    shifted32 = viterbi_decode(
        (grid + constant).astype(np.float32), tokens, E1.astype(np.float32), E2.astype(np.float32)
    )
    np.testing.assert_array_equal(base32.beam_idx, shifted32.beam_idx)


def test_ties_go_to_lowest_index():
    scores = np.zeros((1, 3, 4))
    tokens = np.tile(np.arange(4), (1, 3, 1))
    E = np.zeros((4, 2))
    got = viterbi_decode(scores, tokens, E, E)
    assert list(got.beam_idx[0]) == [0, 0, 0]


def test_neg_inf_entries_are_avoided(rng):
    scores, tokens, E1, E2 = make_problem(rng, 2, 5, 4)
    scores[:, :, 0] = -np.inf
    got = viterbi_decode(scores, tokens, E1, E2)
    assert (got.beam_idx != 0).all() and np.isfinite(got.score).all()


def test_mixed_dtypes_and_float16(rng):
    scores, tokens, E1, E2 = make_problem(rng, 2, 5, 4, dtype=np.float32)
    assert viterbi_decode(scores, tokens, E1.astype(np.float64), E2).score.dtype == np.float64
    got16 = viterbi_decode(scores.astype(np.float16), tokens, E1.astype(np.float16), E2.astype(np.float16))
    assert got16.score.dtype == np.float32


def test_non_contiguous_inputs(rng):
    scores, tokens, E1, E2 = make_problem(rng, 3, 6, 5)
    s_nc = np.asfortranarray(scores)
    t_nc = np.asfortranarray(tokens)
    E1_nc = np.asfortranarray(E1)
    got = viterbi_decode(s_nc, t_nc, E1_nc, E2[:, ::1])
    want = viterbi_decode(scores, tokens, E1, E2)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_empty_batch(rng):
    _, _, E1, E2 = make_problem(rng, 1, 2, 3)
    got = viterbi_decode(np.zeros((0, 4, 3)), np.zeros((0, 4, 3), np.int64), E1, E2)
    assert got.beam_idx.shape == (0, 4) and got.score.shape == (0,)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("score_scale, table_scale", [(3.0, 0.05), (1.0, 0.3), (0.01, 2.0)])
def test_pruned_search_is_exact(dtype, score_scale, table_scale):
    """Branch and bound over predecessor rows: wide scores (most rows pruned) to wide transitions (none)."""
    rng = np.random.default_rng(int(score_scale * 100))
    scores, tokens, E1, E2 = make_problem(rng, 3, 12, 100, V=400, D=16, dtype=dtype, scale=score_scale)
    E1 = (E1 * table_scale).astype(dtype)
    E2 = (E2 * table_scale).astype(dtype)
    got = viterbi_decode(scores, tokens, E1, E2)
    beam_idx, path_tokens, best, _ = ref.viterbi(scores, tokens, E1, E2)
    np.testing.assert_array_equal(got.beam_idx, beam_idx)
    np.testing.assert_allclose(got.score, best, rtol=TOL[dtype])


@pytest.mark.parametrize("seed", range(10))
def test_ties_everywhere_follow_the_lowest_index(seed):
    """Integer scores and tables: exact ties in every column, whatever order rows are visited in."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(-2, 3, (2, 6, 40)).astype(np.float64)
    tokens = rng.integers(0, 7, (2, 6, 40))
    E1 = rng.integers(-1, 2, (7, 3)).astype(np.float64)
    E2 = rng.integers(-1, 2, (7, 3)).astype(np.float64)
    got = viterbi_decode(scores, tokens, E1, E2)
    beam_idx, _, best, _ = ref.viterbi(scores, tokens, E1, E2)
    np.testing.assert_array_equal(got.beam_idx, beam_idx)
    np.testing.assert_array_equal(got.score, best)
