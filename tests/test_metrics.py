"""Retrieval metrics: parity with the published i2t/t2i (ties included) and the evaluation protocols."""
import json

import numpy as np
import pytest
import torch

import vsl.metrics as metrics
from vsl.errors import ConfigError
from vsl.metrics import (
    evaluate_protocol,
    format_table,
    i2t,
    recall_at_k,
    retrieval_metrics,
    t2i,
)


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return dict(np.load(fixtures_dir / "metrics_parity.npz"))


def _published_i2t(sims, cpi):
    """The published per-image loop (1-D argsort per row, np.where per own caption)."""
    n = sims.shape[0]
    ranks, top1 = np.zeros(n), np.zeros(n)
    for index in range(n):
        inds = np.argsort(sims[index])[::-1]
        ranks[index] = min(np.where(inds == c)[0][0] for c in range(cpi * index, cpi * index + cpi))
        top1[index] = inds[0]
    return ranks, top1


def _published_t2i(sims, cpi):
    n = sims.shape[0]
    ranks, top1 = np.zeros(cpi * n), np.zeros(cpi * n)
    sims_t = sims.T
    for index in range(n):
        for i in range(cpi):
            inds = np.argsort(sims_t[cpi * index + i])[::-1]
            ranks[cpi * index + i] = np.where(inds == index)[0][0]
            top1[cpi * index + i] = inds[0]
    return ranks, top1


# ------------------------------------------------------------------------------------------------
# parity
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("convert", [lambda a: a, torch.from_numpy], ids=["numpy", "torch"])
def test_parity_with_published_i2t_t2i(golden, convert):
    sims = convert(golden["sims"])
    (summary_i, (ranks_i, top1_i)), (summary_t, (ranks_t, top1_t)) = i2t(sims), t2i(sims)
    assert summary_i == tuple(golden["i2t"])
    assert summary_t == tuple(golden["t2i"])
    np.testing.assert_array_equal(ranks_i, golden["i2t_ranks"])
    np.testing.assert_array_equal(top1_i, golden["i2t_top1"])
    np.testing.assert_array_equal(ranks_t, golden["t2i_ranks"])
    np.testing.assert_array_equal(top1_t, golden["t2i_top1"])
    assert all(type(v) is float for v in summary_i + summary_t)


@pytest.mark.parametrize("cpi", [5, 1, 2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ties_and_chunk_boundaries_match_published_loop(monkeypatch, cpi, dtype):
    # Heavy ties (values on a 0.25 grid): the 2-D argsort must break them like the per-row calls.
    # A tiny chunk budget forces chunks that do not divide the rows.
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 7 * 13 * cpi)
    rng = np.random.default_rng(cpi)
    n = 23
    sims = (np.round(rng.standard_normal((n, cpi * n)) * 4) / 4).astype(dtype)
    sims[np.arange(n), cpi * np.arange(n)] += 0.5           # some queries should succeed
    for ours, published in ((i2t, _published_i2t), (t2i, _published_t2i)):
        (_, (ranks, top1)) = ours(sims, captions_per_image=cpi)
        ref_ranks, ref_top1 = published(sims, cpi)
        np.testing.assert_array_equal(ranks, ref_ranks)
        np.testing.assert_array_equal(top1, ref_top1)


def test_perfect_and_reversed_retrieval():
    n = 6
    perfect = np.repeat(np.eye(n), 5, axis=1)                   # own captions score 1, others 0
    (r1, r5, r10, medr, meanr), _ = i2t(perfect + 1e-3 * np.arange(5 * n))  # break the 5-way tie
    assert (r1, r5, r10, medr, meanr) == (100.0, 100.0, 100.0, 1.0, 1.0)
    summary, (ranks, _) = t2i(-perfect)                          # own image always last
    assert summary[:3] == (0.0, 0.0, 100.0) and (ranks == n - 1).all() and summary[3] == n


def test_recall_at_k():
    assert recall_at_k([0, 1, 4, 5, 9, 10, 30, 0]) == (25.0, 50.0, 75.0)
    assert recall_at_k(np.array([2, 3]), ks=(3, 4)) == (50.0, 100.0)


def test_shape_errors_are_config_errors():
    with pytest.raises(ConfigError, match=r"expected \(N, 5N\)"):
        i2t(np.zeros((4, 19)))
    with pytest.raises(ConfigError, match="captions_per_image=1"):
        t2i(np.zeros((4, 20)), captions_per_image=1)


# ------------------------------------------------------------------------------------------------
# dictionaries, protocols, table
# ------------------------------------------------------------------------------------------------
def test_retrieval_metrics_dict_is_json_ready(golden):
    result = retrieval_metrics(golden["sims"])
    assert result["i2t"] == dict(zip(("r1", "r5", "r10", "medr", "meanr"), golden["i2t"]))
    assert result["t2i"] == dict(zip(("r1", "r5", "r10", "medr", "meanr"), golden["t2i"]))
    assert result["rsum"] == pytest.approx(golden["i2t"][:3].sum() + golden["t2i"][:3].sum())
    assert json.loads(json.dumps(result)) == result


def test_coco1k_averages_five_folds(golden, monkeypatch):
    # The fixture holds 40 images: with 8-image folds it has the 5-fold layout of COCO 5K.
    monkeypatch.setattr(metrics, "COCO1K_FOLD_IMAGES", 8)
    sims = golden["sims"]
    result = evaluate_protocol(sims, "coco1k")
    folds = [retrieval_metrics(sims[8 * f:8 * f + 8, 40 * f:40 * f + 40]) for f in range(5)]
    assert result["folds"] == folds
    for direction in ("i2t", "t2i"):
        for name in ("r1", "r5", "r10", "medr", "meanr"):
            assert result[direction][name] == pytest.approx(np.mean([f[direction][name] for f in folds]))
    assert result["rsum"] == pytest.approx(np.mean([f["rsum"] for f in folds]))
    # fold metrics differ from the whole-matrix metrics (smaller gallery)
    assert result["i2t"]["r1"] != retrieval_metrics(sims)["i2t"]["r1"]
    assert json.loads(json.dumps(result)) == result
    table = format_table(result)
    assert table.count("fold ") == 5 and "mean" in table
    assert f"{result['rsum']:.1f}" in table.splitlines()[-1]


def test_protocol_checks(golden):
    sims = golden["sims"]
    assert evaluate_protocol(sims, "coco5k") == retrieval_metrics(sims)
    assert evaluate_protocol(sims, "full") == retrieval_metrics(sims)
    with pytest.raises(ConfigError, match="5000"):
        evaluate_protocol(sims, "coco1k")
    with pytest.raises(ConfigError, match="protocol"):
        evaluate_protocol(sims, "coco2k")


def test_format_table_lists_every_metric(golden):
    result = retrieval_metrics(golden["sims"])
    table = format_table(result)
    header = table.splitlines()[1]
    for name in ("R@1", "R@5", "R@10", "medr", "meanr", "rsum"):
        assert name in header
    last = table.splitlines()[-1].replace("|", " ").split()
    assert last[0] == "all"
    assert [float(v) for v in last[1:]] == pytest.approx(
        list(golden["i2t"]) + list(golden["t2i"]) + [result["rsum"]], abs=0.01)


def test_protocol_ranks_are_the_per_query_ranks_of_the_protocol(monkeypatch):
    monkeypatch.setattr(metrics, "COCO1K_FOLD_IMAGES", 20)            # 5 folds of 20 images
    rng = np.random.default_rng(4)
    sims = rng.standard_normal((100, 500)).astype(np.float32)
    sims[np.arange(100), 5 * np.arange(100)] += 1.5
    full_i2t, full_t2i = metrics.protocol_ranks([sims], "coco5k")
    assert np.array_equal(full_i2t, i2t(sims)[1][0]) and np.array_equal(full_t2i, t2i(sims)[1][0])
    # coco1k: ranks within each fold, the same from the 5 diagonal blocks or the full matrix.
    blocks = [sims[i, c] for i, c in metrics.fold_slices("coco1k", 100, 5)]
    fold_i2t, fold_t2i = metrics.protocol_ranks(blocks, "coco1k")
    assert fold_i2t.shape == (100,) and fold_t2i.shape == (500,)
    assert np.array_equal(fold_i2t[20:40], i2t(blocks[1])[1][0]) and np.array_equal(fold_t2i[100:200],
                                                                                      t2i(blocks[1])[1][0])
    for a, b in zip(metrics.protocol_ranks([sims], "coco1k"), (fold_i2t, fold_t2i)):
        assert np.array_equal(a, b)
    assert (fold_i2t <= full_i2t).all() and (fold_i2t < full_i2t).any()      # fewer candidates per fold


def test_metrics_travel_by_name():
    """A direction's metrics are a typed Summary; the flat names of tables come from one list."""
    sims = np.random.default_rng(3).standard_normal((6, 30))
    summary, (ranks, _) = metrics.i2t(sims, 5)
    assert summary._fields == metrics.METRIC_NAMES == ("r1", "r5", "r10", "medr", "meanr")
    assert summary.r1 == summary[0] and summary.recall_sum == summary.r1 + summary.r5 + summary.r10
    result = metrics.retrieval_metrics(sims, 5)
    flat = metrics.flat_metrics(result)
    assert list(flat) == list(metrics.TABLE_METRICS) and flat["t2i_r10"] == result["t2i"]["r10"]
    assert flat["rsum"] == result["rsum"] == pytest.approx(sum(v for k, v in flat.items() if k != "rsum"))
    assert metrics.column_labels() == ["i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "rsum"]
    assert metrics.flat_metrics(result, metrics.RANK_METRICS)["i2t_medr"] == result["i2t"]["medr"]


def test_a_block_of_two_direction_matrices_ranks_each_direction_by_its_own():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((6, 30)), rng.standard_normal((6, 30))
    both = metrics.protocol_result([(a, b)], "full", 5)
    assert both["i2t"] == metrics.retrieval_metrics(a, 5)["i2t"] and both["t2i"] == metrics.retrieval_metrics(b, 5)["t2i"]
    i2t_ranks, t2i_ranks = metrics.protocol_ranks([(a, b)], "full", 5)
    assert np.array_equal(i2t_ranks, metrics.i2t(a, 5)[1][0]) and np.array_equal(t2i_ranks, metrics.t2i(b, 5)[1][0])
