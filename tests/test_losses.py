"""Triplet loss, soft rank and Visual Semantic Loss: parity with the published code and properties."""
import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vsl.errors import ConfigError
from vsl.losses import (
    TripletLoss,
    VisualSemanticLoss,
    VSLObjective,
    soft_rank,
    textual_semantic_loss,
    triplet_loss,
    visual_semantic_loss,
)

TOL = 1e-5


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return dict(np.load(fixtures_dir / "loss_parity.npz"))


# ------------------------------------------------------------------------------------------------
# parity with the published implementation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_with_published_losses_and_gradient(golden, dtype):
    scores = torch.tensor(golden["scores"], dtype=dtype, requires_grad=True)
    semantic = torch.tensor(golden["image_semantic"], dtype=dtype)
    triplet = triplet_loss(scores, margin=float(golden["margin"]), max_violation=True)
    vsl = visual_semantic_loss(scores, semantic, weight=10.0, temperature=0.001, variant="released")
    (triplet + vsl).backward()
    assert abs(triplet.item() - golden["triplet"]) < TOL
    assert abs(vsl.item() - golden["vsl"]) < TOL
    np.testing.assert_allclose(scores.grad.numpy(), golden["grad_scores"], rtol=0, atol=TOL)


def test_objective_matches_published_total(golden):
    scores = torch.tensor(golden["scores"], requires_grad=True)
    out = VSLObjective()(scores, torch.tensor(golden["image_semantic"]))
    assert set(out) == {"loss", "triplet", "vsl"}
    assert abs(out["loss"].item() - (golden["triplet"] + golden["vsl"])) < 2 * TOL
    out["loss"].backward()
    np.testing.assert_allclose(scores.grad.numpy(), golden["grad_scores"], rtol=0, atol=TOL)


def test_modules_hold_options(golden):
    scores = torch.tensor(golden["scores"])
    semantic = torch.tensor(golden["image_semantic"])
    assert TripletLoss(0.2, True)(scores).item() == pytest.approx(golden["triplet"], abs=TOL)
    assert VisualSemanticLoss(10.0, 0.001)(scores, semantic).item() == pytest.approx(golden["vsl"], abs=TOL)
    assert VisualSemanticLoss(5.0)(scores, semantic).item() == pytest.approx(golden["vsl"] / 2, abs=TOL)


# ------------------------------------------------------------------------------------------------
# triplet loss
# ------------------------------------------------------------------------------------------------
def _triplet_reference(s: np.ndarray, margin: float, max_violation: bool) -> float:
    """Loop-by-loop transcription of the hinge loss definition."""
    b = s.shape[0]
    cost_s = [[max(0.0, margin + s[i, j] - s[i, i]) if i != j else 0.0 for j in range(b)] for i in range(b)]
    cost_im = [[max(0.0, margin + s[i, j] - s[j, j]) if i != j else 0.0 for j in range(b)] for i in range(b)]
    if max_violation:
        return sum(max(row) for row in cost_s) + sum(max(cost_im[i][j] for i in range(b)) for j in range(b))
    return float(np.sum(cost_s) + np.sum(cost_im))


square = st.integers(2, 7).flatmap(
    lambda b: st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=b * b, max_size=b * b)
    .map(lambda v: np.array(v, dtype=np.float64).reshape(b, b)))


@settings(max_examples=60, deadline=None)
@given(s=square, margin=st.floats(0.0, 0.5), max_violation=st.booleans(), shift=st.floats(-3, 3))
def test_triplet_matches_definition_and_is_shift_invariant(s, margin, max_violation, shift):
    loss = triplet_loss(torch.tensor(s), margin, max_violation).item()
    assert loss == pytest.approx(_triplet_reference(s, margin, max_violation), abs=1e-9)
    shifted = triplet_loss(torch.tensor(s + shift), margin, max_violation).item()
    assert shifted == pytest.approx(loss, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(s=square, margin=st.floats(0.0, 0.5))
def test_triplet_is_zero_when_positives_beat_all_negatives_by_margin(s, margin):
    b = s.shape[0]
    off_max = s.max()
    s = s.copy()
    s[np.arange(b), np.arange(b)] = off_max + margin + 1e-3
    for max_violation in (True, False):
        assert triplet_loss(torch.tensor(s), margin, max_violation).item() == 0.0


def test_triplet_sum_over_negatives_bounds_hardest():
    s = torch.randn(9, 9, generator=torch.Generator().manual_seed(0))
    hardest, summed = triplet_loss(s, 0.2, True), triplet_loss(s, 0.2, False)
    assert 0 < hardest < summed


def test_triplet_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        triplet_loss(torch.zeros(3, 4))


# ------------------------------------------------------------------------------------------------
# soft rank
# ------------------------------------------------------------------------------------------------
def _hard_rank(m: np.ndarray, variant: str) -> np.ndarray:
    """1 + #{i != k : compared value > M[j, k]}, by explicit loops."""
    b = m.shape[0]
    rank = np.ones((b, b))
    for j, k, i in itertools.product(range(b), repeat=3):
        value = m[i, j] if variant == "released" else m[j, i]
        if i != k and value > m[j, k]:
            rank[j, k] += 1
    return rank


def _distinct_matrix(b: int, seed: int, gap: float) -> np.ndarray:
    """A (b, b) matrix of distinct values at least ``gap`` apart (random order)."""
    rng = np.random.default_rng(seed)
    return rng.permutation(b * b).reshape(b, b) * gap


@settings(max_examples=30, deadline=None)
@given(b=st.integers(2, 8), seed=st.integers(0, 2**31 - 1), variant=st.sampled_from(["released", "per-image"]))
def test_soft_rank_is_hard_rank_when_gaps_dwarf_temperature(b, seed, variant):
    m = _distinct_matrix(b, seed, gap=0.1)          # 100 T apart: sig is 0 or 1 to 1e-40
    soft = soft_rank(torch.tensor(m), temperature=0.001, variant=variant).numpy()
    np.testing.assert_allclose(soft, _hard_rank(m, variant), rtol=0, atol=1e-9)


def test_soft_rank_released_ranks_against_column_not_row():
    # The released formula compares M[j, k] with column j; per-image with row j. They differ for
    # a non-symmetric matrix and agree for a symmetric one.
    m = _distinct_matrix(5, 3, gap=0.1)
    released = soft_rank(torch.tensor(m), variant="released")
    per_image = soft_rank(torch.tensor(m), variant="per-image")
    assert not torch.allclose(released, per_image)
    sym = m + m.T
    assert torch.allclose(soft_rank(torch.tensor(sym), variant="released"),
                          soft_rank(torch.tensor(sym), variant="per-image"))


@pytest.mark.parametrize("variant", ["released", "per-image"])
def test_soft_rank_chunking_and_analytic_gradient(variant):
    g = torch.Generator().manual_seed(1)
    m = torch.randn(9, 9, dtype=torch.float64, generator=g, requires_grad=True)
    whole = soft_rank(m, 0.3, variant)
    for chunk in (1, 81, 200):          # one row per chunk, one row of B*B, several rows
        assert torch.allclose(soft_rank(m, 0.3, variant, chunk_elements=chunk), whole, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: soft_rank(x, 0.3, variant, chunk_elements=100), (m,))


def test_soft_rank_rejects_bad_options():
    with pytest.raises(ConfigError, match="vsl_rank"):
        soft_rank(torch.zeros(3, 3), variant="per-caption")
    with pytest.raises(ValueError, match="temperature"):
        soft_rank(torch.zeros(3, 3), temperature=0.0)


# ------------------------------------------------------------------------------------------------
# visual / textual semantic loss
# ------------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(b=st.integers(2, 8), seed=st.integers(0, 2**31 - 1), scale=st.floats(0.5, 4.0),
       offset=st.floats(-1, 1), variant=st.sampled_from(["released", "per-image"]))
def test_vsl_is_zero_when_score_ranks_equal_semantic_ranks(b, seed, scale, offset, variant):
    semantic = _distinct_matrix(b, seed, gap=0.1)
    scores = scale * semantic + offset             # increasing map: every comparison is preserved
    loss = visual_semantic_loss(torch.tensor(scores), torch.tensor(semantic), variant=variant)
    assert abs(loss.item()) < 1e-9


def test_vsl_is_positive_when_ranks_disagree():
    semantic = _distinct_matrix(6, 0, gap=0.1)
    loss = visual_semantic_loss(torch.tensor(-semantic), torch.tensor(semantic))
    assert loss.item() > 1.0


def test_textual_loss_ranks_images_per_caption():
    caption_semantic = _distinct_matrix(6, 1, gap=0.1)
    scores = torch.tensor(caption_semantic.T.copy())   # scores.t() induces the semantic ranks
    assert abs(textual_semantic_loss(scores, torch.tensor(caption_semantic), variant="per-image").item()) < 1e-9
    assert visual_semantic_loss(scores, torch.tensor(caption_semantic), variant="per-image").item() > 0.1


def test_vsl_rejects_mismatched_semantic():
    with pytest.raises(ValueError, match="shape"):
        visual_semantic_loss(torch.zeros(4, 4), torch.zeros(3, 3))


# ------------------------------------------------------------------------------------------------
# combined objective
# ------------------------------------------------------------------------------------------------
def test_objective_weight_zero_is_pure_triplet(golden):
    scores = torch.tensor(golden["scores"], requires_grad=True)
    out = VSLObjective(vsl_weight=0.0)(scores, torch.tensor(golden["image_semantic"]))
    assert out["vsl"].item() == 0.0
    assert out["loss"].item() == pytest.approx(golden["triplet"], abs=TOL)
    out["loss"].backward()
    reference = torch.tensor(golden["scores"], requires_grad=True)
    triplet_loss(reference).backward()
    assert torch.equal(scores.grad, reference.grad)


def test_objective_textual_adds_tsl_and_missing_semantic_is_zero(golden):
    scores = torch.tensor(golden["scores"])
    image_sem, caption_sem = torch.tensor(golden["image_semantic"]), torch.tensor(golden["caption_semantic"])
    out = VSLObjective(textual=True)(scores, image_sem, caption_sem)
    assert set(out) == {"loss", "triplet", "vsl", "tsl"}
    assert out["tsl"].item() == pytest.approx(textual_semantic_loss(scores, caption_sem).item(), abs=1e-6)
    assert out["tsl"].item() > 0
    assert out["loss"].item() == pytest.approx((out["triplet"] + out["vsl"] + out["tsl"]).item(), abs=1e-5)
    bare = VSLObjective(textual=True)(scores)
    assert bare["vsl"].item() == 0.0 and bare["tsl"].item() == 0.0
    assert bare["loss"].item() == pytest.approx(golden["triplet"], abs=TOL)
    with pytest.raises(ConfigError):
        VSLObjective(vsl_rank="typo")


# ------------------------------------------------------------------------------------------------
# memory at batch 256
# ------------------------------------------------------------------------------------------------
_MEMORY_PROBE = textwrap.dedent("""
    import resource, torch
    from vsl.losses import VSLObjective
    torch.set_num_threads(1)
    objective = VSLObjective()
    warm = torch.randn(8, 8, requires_grad=True)
    objective(warm, torch.randn(8, 8))["loss"].backward()       # load kernels before measuring
    scores = torch.randn(256, 256, requires_grad=True)
    semantic = torch.rand(256, 256)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    objective(scores, semantic)["loss"].backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(scores.grad).all()
    print((after - before) / 1024)
""")


@pytest.mark.slow
def test_vsl_batch_256_peak_memory_is_bounded():
    # A B^3 float32 tensor at B = 256 is 64 MiB; autograd over the naive formula keeps several
    # (measured ~400 MiB extra; one unchunked B^3 pass ~130 MiB). Chunked: two 4 MiB buffers.
    import vsl
    src = os.path.dirname(os.path.dirname(vsl.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    extra_mib = float(result.stdout.strip().splitlines()[-1])
    assert extra_mib < 64, f"peak memory grew by {extra_mib:.0f} MiB"
