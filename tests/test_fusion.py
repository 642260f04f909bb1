"""Score fusion (issue 21): final = exact + lambda * shortlist cosine, lambda chosen on dev and stored with the head.

The ranking code is checked against brute-force numpy on toy galleries (a fake model whose exact
scores and shortlist vectors are given matrices); the commands run on the tiny published-format
fixture checkpoint and a generated SCAN-layout split, as in test_retrieval.py.
"""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from conftest import write_scan_dataset
from test_retrieval import TEST_IMAGES, data, published  # noqa: F401  (the retrieval tests' split and checkpoint)
from vsl import metrics
from vsl.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from vsl.cli import main
from vsl.config import Config
from vsl.errors import ConfigError
from vsl.rerank import (OFFSET, fused_ranks, rerank, reranked_score, shortlist_pairs, two_stage_matrices,
                        two_stage_parts, two_stage_scores)
from vsl.retrieval import Index, build_index, evaluate_shortlist, fit_shortlist
from vsl.retrieval.fusion import FUSION_GRID, best_fusion

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------
# A toy model: given exact scores (n, m) and given unit shortlist vectors
# --------------------------------------------------------------------------------------------
class ToyModel:
    """``shortlist.images`` / ``captions`` return the given vectors of the rows asked for; the exact
    score of pair (i, j) is ``exact[i, j]``. Embeddings are the row indices (as floats)."""

    def __init__(self, exact: np.ndarray, img_vecs: np.ndarray, cap_vecs: np.ndarray):
        self.exact = torch.from_numpy(exact).float()
        iv, cv = torch.from_numpy(img_vecs).float(), torch.from_numpy(cap_vecs).float()
        self.shortlist = types.SimpleNamespace(images=lambda e: iv[e[:, 0, 0].long()],
                                               captions=lambda e, lengths: cv[e[:, 0, 0].long()])
        self.sim_enc = types.SimpleNamespace(
            score_pairs=lambda imgs, caps, lengths, pi, pc: self.exact[imgs[pi, 0, 0].long(), caps[pc, 0, 0].long()])


def toy(n: int = 12, cpi: int = 2, dim: int = 6, seed: int = 0, informative_cos: float = 1.0):
    """A toy block: exact scores in (0, 1) that are noisy about the truth, cosines too."""
    rng = np.random.default_rng(seed)
    m = n * cpi
    truth = (np.arange(m)[None, :] // cpi == np.arange(n)[:, None]).astype(np.float64)        # (n, m)
    exact = 1 / (1 + np.exp(-(2 * truth + rng.normal(scale=1.5, size=(n, m)))))
    img = rng.normal(size=(n, dim))
    cap = informative_cos * np.repeat(img, cpi, axis=0) + rng.normal(scale=1.0, size=(m, dim))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    emb = types.SimpleNamespace(images=torch.arange(n).float().view(n, 1, 1),
                                captions=torch.arange(m).float().view(m, 1, 1), lengths=torch.ones(m, dtype=torch.long))
    cos = (torch.from_numpy(img).float() @ torch.from_numpy(cap).float().t()).numpy()     # as the head computes it
    return ToyModel(exact, img, cap), emb, exact.astype(np.float32), cos, cpi


def brute_force_orders(exact, cos, k: int, fusion: float):
    """Each image's captions and each caption's images in two-stage order, by numpy, one query at a time."""
    n, m = exact.shape
    fused = exact + np.float32(fusion) * cos

    def order(e_row, c_row, kk):
        top = np.argsort(-c_row, kind="stable")[:kk]
        rest = np.setdiff1d(np.arange(len(c_row)), top)
        return list(top[np.argsort(-e_row[top], kind="stable")]) + list(rest[np.argsort(-c_row[rest], kind="stable")])
    i2t = [order(fused[i], cos[i], min(k, m)) for i in range(n)]
    t2i = [order(fused[:, j], cos[:, j], min(k, n)) for j in range(m)]
    return i2t, t2i


# --------------------------------------------------------------------------------------------
# The fused score
# --------------------------------------------------------------------------------------------
def test_lambda_zero_returns_the_exact_scores_themselves_and_fuses_otherwise():
    exact, cos = torch.rand(3, 4), torch.rand(3, 4) * 2 - 1
    assert reranked_score(exact, cos) is exact and reranked_score(exact, cos, 0.0) is exact
    torch.testing.assert_close(reranked_score(exact, cos, 0.5), exact + 0.5 * cos, rtol=0, atol=0)


@torch.inference_mode()
def _published_two_stage(model, emb, k):
    """The two-stage matrices as computed before score fusion existed (the reference of lambda 0)."""
    img_vecs = model.shortlist.images(emb.images).float()
    cap_vecs = model.shortlist.captions(emb.captions, emb.lengths).float()
    cos, i2t_top, t2i_top, pi, pc = shortlist_pairs(img_vecs, cap_vecs, k)
    exact = model.sim_enc.score_pairs(emb.images, emb.captions, emb.lengths, pi, pc).float()
    n, m = cos.shape
    union = pi * m + pc

    def final_of(rows, cols):
        return exact[torch.searchsorted(union, rows * m + cols)] + OFFSET
    i2t_final = final_of(torch.arange(n).unsqueeze(1), i2t_top)
    t2i_final = final_of(t2i_top, torch.arange(m).unsqueeze(0))
    i2t_sims = cos - OFFSET
    i2t_sims.scatter_(1, i2t_top, i2t_final)
    t2i_sims = cos.sub_(OFFSET)
    t2i_sims.scatter_(0, t2i_top, t2i_final)
    return i2t_sims.numpy(), t2i_sims.numpy()


def test_lambda_zero_two_stage_matrices_are_bit_identical_to_the_unfused_ones():
    model, emb, *_ = toy()
    ref_i2t, ref_t2i = _published_two_stage(model, emb, 5)
    for got in (two_stage_scores(model, emb, 5)[:2], two_stage_scores(model, emb, 5, 0.0)[:2],
                two_stage_matrices(two_stage_parts(model, emb, 5), 0.0)):
        np.testing.assert_array_equal(got[0], ref_i2t)
        np.testing.assert_array_equal(got[1], ref_t2i)


@pytest.mark.parametrize("fusion", [0.0, 0.3, 2.0, 40.0])
def test_fused_two_stage_ordering_equals_a_brute_force_numpy_ranking(fusion):
    model, emb, exact, cos, cpi = toy(n=10, cpi=2)
    k = 4
    i2t_sims, t2i_sims = two_stage_matrices(two_stage_parts(model, emb, k), fusion)
    want_i2t, want_t2i = brute_force_orders(exact, cos, k, fusion)
    assert [list(np.argsort(-row, kind="stable")) for row in i2t_sims] == want_i2t
    assert [list(np.argsort(-col, kind="stable")) for col in t2i_sims.T] == want_t2i
    # Every shortlisted pair (even at a large lambda) sits above every unscored one.
    assert i2t_sims[:, :].max() > OFFSET - 1 and np.sort(i2t_sims, axis=1)[:, -k].min() > np.sort(i2t_sims, axis=1)[:, -k - 1].max()


@pytest.mark.parametrize("fusion", [0.0, 0.7, 5.0])
def test_rerank_orders_candidates_by_the_fused_score(fusion):
    rng = np.random.default_rng(3)
    gallery_exact = rng.random((3, 50)).astype(np.float32)                  # (Q, gallery)
    candidates = np.stack([rng.permutation(50)[:8] for _ in range(3)])
    candidates[2, -2:] = -1                                                 # an approximate index found fewer
    cos = rng.uniform(-1, 1, size=candidates.shape).astype(np.float32)

    def score_pairs(uniq, query, item):
        return torch.from_numpy(gallery_exact[query.numpy(), uniq[item.numpy()]])
    ids, scores, exact, short = rerank(candidates, cos, score_pairs, 5, fusion)
    for q in range(3):
        valid = candidates[q] >= 0
        fused = gallery_exact[q, candidates[q, valid]] + np.float32(fusion) * cos[q, valid]
        order = np.argsort(-fused, kind="stable")[:5]
        assert list(ids[q]) == list(candidates[q, valid][order])
        np.testing.assert_allclose(scores[q], fused[order], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(exact[q], gallery_exact[q, ids[q]])
        np.testing.assert_array_equal(short[q], cos[q, valid][order])


def test_fused_ranks_of_a_grid_equal_the_metrics_of_each_weights_matrices():
    model, emb, exact, cos, cpi = toy(n=16, cpi=3, seed=1)
    parts = two_stage_parts(model, emb, 6)
    grid = [0.0, 0.1, 0.5, 1.0, 4.0, 64.0]
    i2t_ranks, t2i_ranks = fused_ranks(parts, grid, cpi)
    assert i2t_ranks.shape == (6, 16) and t2i_ranks.shape == (6, 48)
    for g, lam in enumerate(grid):
        a, b = two_stage_matrices(parts, lam)
        np.testing.assert_array_equal(i2t_ranks[g], metrics.i2t(a, cpi)[1][0])
        np.testing.assert_array_equal(t2i_ranks[g], metrics.t2i(b, cpi)[1][0])


@pytest.mark.parametrize("seed, informative", [(0, 1.5), (1, 1.5), (2, 0.0)])
def test_the_fit_picks_the_weight_of_the_highest_dev_rsum(seed, informative):
    model, emb, exact, cos, cpi = toy(n=20, cpi=2, seed=seed, informative_cos=informative)
    parts = two_stage_parts(model, emb, 8)
    lam, rows = best_fusion(parts, FUSION_GRID, cpi)
    # The answer by brute force: the protocol metrics of each weight's matrices, the first maximum.
    rsums = [metrics.protocol_result([two_stage_matrices(parts, g)], "full", cpi)["rsum"] for g in sorted(FUSION_GRID)]
    assert lam == sorted(FUSION_GRID)[int(np.argmax(rsums))]
    np.testing.assert_allclose([r["rsum"] for r in rows], rsums, atol=1e-9)
    if informative:            # the cosine knows the truth better than the noisy exact scores
        assert lam > 0 and max(rsums) > rsums[0]
    else:                      # pure-noise cosines never help rsum on this toy
        assert rows[0]["lambda"] == 0.0


def test_a_hand_made_case_where_only_one_weight_ranks_every_query_first():
    # 2 images x 1 caption each, every item shortlisted. Image 0 ranks its caption first iff lambda > 0.5,
    # image 1 iff lambda < 1.75; caption 0 always ranks its image first, caption 1 iff lambda < 1. So
    # every query is right only for 0.5 < lambda < 1: rsum 600 at 0.75, 550 at 0, 0.25 and 1.5, 500 at 3.
    exact = np.array([[0.5, 0.6], [0.2, 0.9]])
    cosines = np.array([[0.6, 0.4], [0.5, 0.1]])
    model = ToyModel(exact, np.eye(2), np.eye(2))
    emb = types.SimpleNamespace(images=torch.arange(2).float().view(2, 1, 1),
                                captions=torch.arange(2).float().view(2, 1, 1), lengths=torch.ones(2, dtype=torch.long))
    parts = two_stage_parts(model, emb, 2)
    parts.cos = torch.from_numpy(cosines).float()             # the cosines of the hand-made case
    lam, rows = best_fusion(parts, [3.0, 0.0, 0.25, 0.75, 1.5], 1)
    assert [r["lambda"] for r in rows] == [0.0, 0.25, 0.75, 1.5, 3.0]
    assert [r["rsum"] for r in rows] == [550.0, 550.0, 600.0, 550.0, 500.0]
    assert lam == 0.75


def test_config_refuses_a_negative_or_non_finite_fusion_weight():
    assert Config().shortlist_fusion == 0.0
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="shortlist_fusion"):
            Config(shortlist_fusion=bad)


# --------------------------------------------------------------------------------------------
# The commands, on the fixture checkpoint
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(published, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion_fitted") / "sgr_sl.pth.tar"
    fit_shortlist(published, data["data_path"], out, vocab_path=data["vocab_path"], device="cpu", dim=16, epochs=10,
                  batch_size=64, progress=False)
    return out


@pytest.fixture(scope="module")
def fused(fitted, tmp_path_factory):
    """The fitted checkpoint with a fusion weight of 0.5 stored with its head."""
    out = tmp_path_factory.mktemp("fusion_fused") / "sgr_fused.pth.tar"
    ckpt = read_checkpoint(fitted)
    save_checkpoint(out, load_checkpoint(fitted), ckpt["config"].replace(shortlist_fusion=0.5), extra=ckpt["extra"])
    return out


def test_fit_fusion_on_a_kept_head_stores_lambda_and_changes_nothing_else(fitted, data, tmp_path, capsys):
    out = tmp_path / "f.pth.tar"
    rc = main(["fit-shortlist", "--checkpoint", str(fitted), "--data_path", data["data_path"], "--vocab_path",
               data["vocab_path"], "--out", str(out), "--fit_fusion", "--keep_head", "--fusion_k", "4", "--quiet",
               "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0 and "kept the checkpoint's 16-d" in text and "<- chosen" in text and "fusion weight lambda" in text
    before, after = read_checkpoint(fitted), read_checkpoint(out)
    fit = after["extra"]["shortlist_fusion_fit"]
    assert after["config"].shortlist_fusion == fit["lambda"] and fit["k"] == 4 and fit["split"] == "dev"
    assert len(fit["grid"]) == len(FUSION_GRID) and fit["rsum"]["fused"] == max(r["rsum"] for r in fit["grid"])
    for a, b in zip(before["model"] + [before["shortlist"]], after["model"] + [after["shortlist"]]):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert after["config"].replace(shortlist_fusion=0.0) == before["config"]
    assert load_checkpoint(out).config.shortlist_fusion == fit["lambda"]          # round trip


def test_a_refitted_head_does_not_inherit_the_old_weight(fused, data, tmp_path):
    out = tmp_path / "refit.pth.tar"
    result = fit_shortlist(fused, data["data_path"], out, vocab_path=data["vocab_path"], device="cpu", epochs=1,
                           progress=False)
    ckpt = read_checkpoint(out)
    assert result["fusion"] is None and ckpt["config"].shortlist_fusion == 0.0
    assert "shortlist_fusion_fit" not in ckpt["extra"]


def test_checkpoints_without_a_fusion_weight_load_with_lambda_zero(fitted, published, tmp_path):
    raw = torch.load(fitted, weights_only=True)
    del raw["config"]["shortlist_fusion"]                       # as written before score fusion existed
    old = tmp_path / "old.pth.tar"
    torch.save(raw, old)
    assert read_checkpoint(old)["config"].shortlist_fusion == 0.0
    assert read_checkpoint(published)["config"].shortlist_fusion == 0.0


def test_search_results_carry_the_fused_exact_and_shortlist_scores(fused, data, tmp_path, capsys):
    out = tmp_path / "idx"
    build_index(fused, data["data_path"], "test", out, vocab_path=data["vocab_path"], device="cpu", progress=False)
    index = Index.load(out)
    assert index.fusion == 0.5
    for shortlist in (6, 0):
        for result in (index.search_text(["a red dog and a blue car"], k=5, shortlist=shortlist)[0],
                       index.search_image([3], k=5, shortlist=shortlist)[0]):
            scores = [h.score for h in result.hits]
            assert scores == sorted(scores, reverse=True)
            np.testing.assert_allclose(scores, [h.exact_score + 0.5 * h.shortlist_score for h in result.hits],
                                       atol=1e-5)
    rc = main(["search", "--index", str(out), "--text", "a red dog", "--k", "3", "--shortlist", "6", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 1
    hits = json.loads(lines[0])["results"]
    assert all({"score", "exact_score", "shortlist_score"} <= set(h) for h in hits)
    assert all(h["score"] == pytest.approx(h["exact_score"] + 0.5 * h["shortlist_score"], abs=1e-5) for h in hits)
    rc = main(["search", "--index", str(out), "--text", "a red dog", "--k", "3", "--shortlist", "6", "--json",
               "--fusion", "0"])
    plain = json.loads(capsys.readouterr().out.strip())["results"]
    assert rc == 0 and all(h["score"] == h["exact_score"] for h in plain)
    assert [h["exact_score"] for h in plain] == sorted((h["exact_score"] for h in plain), reverse=True)


def test_eval_compare_exhaustive_reports_three_rankings_with_paired_intervals(fused, fitted, data, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["eval", "--checkpoint", str(fused), "--data_path", data["data_path"], "--vocab_path", data["vocab_path"],
               "--split", "test", "--shortlist", "5", "--compare_exhaustive", "--output", str(out), "--quiet",
               "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0 and "fused (lambda 0.5)" in text and "two-stage (lambda 0)" in text and "fused-exhaustive" in text
    result = json.loads(out.read_text())
    fusion = result["fusion"]
    assert fusion["lambda"] == 0.5 == result["shortlist"]["fusion"]
    assert set(fusion["rankings"]) == {"exhaustive", "two_stage", "fused"}
    assert set(fusion["paired"]) == {"fused-exhaustive", "fused-two_stage", "two_stage-exhaustive"}
    for name, diffs in fusion["paired"].items():
        assert set(diffs) == set(metrics.TABLE_METRICS)
        for d in diffs.values():
            assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
        arm, base = name.split("-")
        assert diffs["rsum"]["diff"] == pytest.approx(fusion["rankings"][arm]["rsum"] - fusion["rankings"][base]["rsum"])
    # The usual table is the fused ranking; the plain one is what a lambda-0 head ranks.
    assert fusion["rankings"]["fused"] == metrics.flat_metrics(result)
    assert fusion["rankings"]["exhaustive"] == metrics.flat_metrics(result["exhaustive"])
    plain = evaluate_shortlist([str(fitted)], data["data_path"], "test", shortlist=5, vocab_path=data["vocab_path"],
                               device="cpu", progress=False)
    assert fusion["rankings"]["two_stage"] == metrics.flat_metrics(plain) and plain["shortlist"]["fusion"] == 0.0


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vsl: error: "), err
    return err[0]


def test_fit_fusion_bad_input_is_one_line(published, fitted, data, tmp_path, capsys):
    base = ["fit-shortlist", "--data_path", data["data_path"], "--vocab_path", data["vocab_path"], "--quiet",
            "--device", "cpu", "--out", str(tmp_path / "x.pth.tar")]
    assert main([*base, "--checkpoint", published, "--fit_fusion", "--keep_head"]) == 2
    assert "no shortlist head" in _error(capsys)
    assert main([*base, "--checkpoint", str(fitted), "--keep_head"]) == 2
    assert "--fit_fusion" in _error(capsys)
    assert main([*base, "--checkpoint", str(fitted), "--fit_fusion", "--keep_head", "--fusion_k", "0"]) == 2
    assert "--fusion_k" in _error(capsys)
    no_dev = write_scan_dataset(tmp_path / "nodev", "coco_precomp", {"train": 20, "test": 4}, img_dim=64,
                                num_regions=36, extra_words=21, seed=5)
    assert main(["fit-shortlist", "--data_path", no_dev["data_path"], "--vocab_path", no_dev["vocab_path"], "--quiet",
                 "--device", "cpu", "--out", str(tmp_path / "x.pth.tar"), "--checkpoint", published,
                 "--fit_fusion"]) == 2
    assert "dev" in _error(capsys)
    assert not (tmp_path / "x.pth.tar").exists()


def test_search_refuses_a_negative_fusion_weight(fused, data, tmp_path, capsys):
    rc = main(["search", "--index", str(tmp_path / "nowhere"), "--text", "a dog", "--fusion", "-1"])
    assert rc == 2 and "--fusion must be a finite number >= 0" in _error(capsys)
