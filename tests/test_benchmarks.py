"""The benchmark scripts (benchmarks/), run in process at toy sizes: their code paths and the
arithmetic they report (FLOP counts, caption lengths), not their timings."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import BENCHMARKS, load_benchmark
from torch.utils.flop_counter import FlopCounterMode

from vsl.config import Config
from vsl.data import read_captions
from vsl.models import build_model
from vsl.models.reference import published_similarity

TINY = dict(img_dim=24, word_dim=12, embed_size=32, sim_dim=16, vocab_size=50, num_regions=36)
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_gpu")


@pytest.mark.slow
def test_benchmark_code_paths_on_a_tiny_split(shared_data_dir, tmp_path, monkeypatch):
    """The two benchmarks' measurement functions, in process and at toy size (the real runs take minutes)."""
    monkeypatch.setenv("VSL_DATA_DIR", str(shared_data_dir))
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_data
    import bench_semantics

    bench_data.make_split(tmp_path, 40, 3, 16)
    assert len(read_captions(tmp_path / "coco_precomp" / "train_caps.txt")) == 200
    for mode in ("vsl", "tfidf", "memmap"):
        result = bench_data.measure(mode, tmp_path, batches=2, batch_size=16, seed=0)
        assert result["batches"] == 2 and result["peak_rss_mb"] > 0
    # the tokenization timing: the baseline is the regex imitation, which splits "j.p. morgan"
    assert bench_data.regex_imitation_tokenize("at a j.p. morgan race") == ["at", "a", "j.p", ".", "morgan", "race"]
    captions = ["at a j.p. morgan race", "a dog . a cat", "a dog ."] * 2
    timing = bench_data.measure_tokenize(captions, chunks=2)
    assert (timing["captions"], timing["differ"], timing["punkt_decides"]) == (6, 2, 4)
    assert timing["vsl_s"] > 0 and timing["baseline_s"] > 0
    bench_semantics.write_corpus(tmp_path / "corpus.txt", 30500)
    lines = read_captions(tmp_path / "corpus.txt")
    assert len(lines) == 30500 and lines[:30000] == bench_semantics.source_captions()
    assert [len(line.split()) for line in lines[30000:]] == [len(line.split()) for line in lines[:500]]
    for mode in ("tfidf", "dense"):
        result = bench_semantics.measure(mode, tmp_path / "corpus.txt", subset=500, batches=2)
        assert result["vocabulary"] > 500 and result["batch_ms_median"] > 0
    del sys.modules["bench_data"], sys.modules["bench_semantics"]


@pytest.mark.slow
def test_bench_eval_smoke(capsys):
    """benchmarks/bench_eval.py runs end to end at tiny sizes and agrees with the published loop."""
    bench = load_benchmark("bench_eval")
    assert bench.main(["--images", "20", "--img_dim", "16", "--words", "30", "--loop_shards", "1",
                       "--repeats", "1", "--threads", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| torch threads |" in out and "20 images x 100 captions" in out
    diff = float(out.rsplit("max |score difference| on the timed shards:", 1)[1].split()[0])
    assert diff < 1e-5


def _mv_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1]


def _counted_flops(fn) -> int:
    # FlopCounterMode has no formula for matrix-vector products (SAF's folded gate uses one).
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.mv: _mv_flop})
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
@pytest.mark.parametrize("published", [True, False])
def test_flops_per_pair_matches_counted_matrix_products(bench, module_name, published):
    """The mixed second difference of counted FLOP over (images, captions) isolates the per-pair cost."""
    config = Config(module_name=module_name, **TINY)
    torch.manual_seed(0)
    model = build_model(config).eval()
    L, n, m = 7, 2, 3

    def total(n_img, n_cap):
        img = torch.randn(n_img, config.num_regions, config.embed_size)
        cap = torch.randn(n_cap, L, config.embed_size)
        lengths = torch.full((n_cap,), L)
        if published:
            return _counted_flops(lambda: published_similarity(model.sim_enc, img, cap, lengths))
        return _counted_flops(lambda: model.similarity(img, cap, lengths, chunk_elements=1 << 30))

    per_pair = (total(2 * n, 2 * m) - total(2 * n, m) - total(n, 2 * m) + total(n, m)) / (n * m)
    if module_name == "SGR" and not published:
        # The last step's node-0 logits are a batched dot product (torch.linalg.vecdot), which the
        # counter does not see as a matrix product: N = L + 1 nodes x sim_dim multiply-adds.
        per_pair += 2 * (L + 1) * config.sim_dim
    assert bench.flops_per_pair(config, L, published=published) == pytest.approx(per_pair, rel=1e-12)


def test_flops_per_pair_at_published_sizes(bench):
    sgr, saf = Config(module_name="SGR"), Config(module_name="SAF")
    assert 25e6 < bench.flops_per_pair(sgr, 13.0) < 28e6          # "about 27 MFLOP" for SGR
    assert bench.flops_per_pair(sgr, 13.0, published=False) < 0.7 * bench.flops_per_pair(sgr, 13.0)
    assert bench.flops_per_pair(saf, 13.0, published=False) == bench.flops_per_pair(saf, 13.0)


def test_coco_caption_lengths_are_coco_like(bench):
    lengths = bench.coco_like_lengths(25000, seed=0)
    assert lengths.dtype == torch.int64 and lengths.shape == (25000,)
    assert 6 <= int(lengths.min()) and int(lengths.max()) <= 50
    assert 12.5 <= lengths.float().mean().item() <= 13.5
    assert 1.8 <= lengths.float().std().item() <= 3.0


@pytest.mark.slow
def test_benchmark_smoke_run_on_cpu(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--quick", "--images", "6", "--captions", "20", "--loop-images", "6",
                     "--loop-captions", "8", "--loop-shard", "4", "--batch-size", "6", "--train-steps", "1",
                     "--matmul-size", "64", "--precisions", "fp32,bf16", "--train-precisions", "fp32",
                     "--time-budget", "120", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| measurement | model | precision |" in printed and "% of matmul rate" in printed
    result = json.loads(out.read_text())
    assert result["meta"]["device"] == "cpu" and result["meta"]["torch"] == torch.__version__
    assert set(result["meta"]["matmul_tflops"]) == {"fp32", "tf32", "bf16"}
    rows = result["rows"]
    by = {(r["measurement"].split(" ")[0], r.get("model"), r.get("precision")): r for r in rows}
    for module in ("SGR", "SAF"):
        # The batched scorer reproduces the published per-caption loop on the loop's pairs.
        batched = next(r for r in rows if r["measurement"].startswith("batched") and r["model"] == module)
        assert batched["max_diff"] < 1e-5
        assert by[("scoring", module, "fp32")]["complete"]
        assert by[("scoring", module, "fp32")]["pairs"] == 6 * 20
        assert 0 < by[("scoring", module, "bf16")]["max_diff"] < 2e-2
        trains = [r for r in rows if r["measurement"].startswith("train") and r["model"] == module]
        assert len(trains) == 2 and all(r["pairs_per_s"] > 0 for r in trains)
    assert all(r["pairs_per_s"] > 0 for r in rows if r.get("pairs"))


@pytest.mark.slow
def test_benchmark_skips_sections_once_the_budget_is_spent(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--quick", "--matmul-size", "32", "--time-budget", "0.001",
                     "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    measured = [r for r in rows if not r["measurement"].startswith("matmul")]
    assert measured and all(r["note"] == bench.SKIPPED for r in measured)
    assert "skipped: time budget spent" in capsys.readouterr().out


def test_benchmark_rejects_unknown_modes(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--precisions", "fp16"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--modules", "SGRAF"])
    args = bench.parse_args(["--precisions", "bf16", "--quick"])
    assert args.precisions == ["fp32", "bf16"] and args.images == bench.QUICK["images"]


def test_bench_retrieval_pairs_smoke(capsys):
    """bench_retrieval.py pairs: the re-ranking scorer's scores equal the all-pairs scores at toy size."""
    import argparse
    bench = load_benchmark("bench_retrieval")
    bench.run_pairs(argparse.Namespace(images=12, captions=60, k=5, forward_images=6, embed_size=16, sim_dim=8,
                                       repeats=1))
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| SGR") or line.startswith("| SAF")]
    assert len(rows) == 2
    assert all(float(row[5]) <= 1e-6 for row in rows)


def test_bench_retrieval_fit_cost_smoke(capsys):
    """bench_retrieval.py fit-cost: one row per head width, the first the baseline (ratio 1)."""
    import argparse
    bench = load_benchmark("bench_retrieval")
    bench.run_fit_cost(argparse.Namespace(embed_size=16, batch_size=8, regions=6, words=4, hidden="0,32",
                                          captions=100, epochs=2, repeats=1))
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]
    assert [r[0] for r in rows[1:]] == ["0 (linear)", "32"] and float(rows[1][2]) == 1.0
    assert "26 steps" in out                                      # ceil(100 / 8) x 2 epochs


def test_demo_explain_benchmark_counts_the_captions_that_name_each_object(tmp_path, monkeypatch):
    """bench_demo_explain on a tiny demo set with an untrained model: its pairs are the captions that
    name the object (counted here word by word), its chance the object's share of regions."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_demo_explain

    from vsl.checkpoint import save_checkpoint
    from vsl.data import demo as dd
    from vsl.data.vocab import tokenize

    spec = dd.DemoSpec(seed=2, train_images=20, dev_images=10, test_images=30, img_dim=16)
    info = dd.make_demo_data(tmp_path / "demo", spec, thumbnails=False)
    config = Config(data_name=info["data_name"], data_path=info["data_path"], vocab_path=info["vocab_path"],
                    vocab_size=info["vocab_size"], img_dim=16, word_dim=8, embed_size=16, sim_dim=8)
    save_checkpoint(tmp_path / "model.pth.tar", build_model(config))
    rows = bench_demo_explain.main(["--checkpoint", str(tmp_path / "model.pth.tar"), "--data", str(tmp_path / "demo")])
    split, scenes = dd.sample_split(spec, "test"), dd.sample_scenes(spec, "test")
    for row in rows:
        slot = dd.SUBJECT if row["entity"] == "subject" else dd.PARTNER
        named = [i for i, c in enumerate(split.captions) if set(tokenize(c)) & set(dd.CLASSES[scenes.classes[i // 5, slot]])]
        assert row["pairs"] == len(named) > 0
        assert row["chance"] == pytest.approx(np.mean([(scenes.region_owner[i // 5] == slot).mean() for i in named]))
        assert 0 <= row["top1"] <= row["top2"] <= 1
    assert {r["model"] for r in rows} == {"trained", "untrained (baseline)"}


def test_bench_million_tiny_mode(tmp_path, capsys):
    """bench_million.py --tiny: per structure (demo scenes, uniform) flat is the baseline (recall vs
    itself not reported, ratio 1), both directions are measured for every index type, the streamed
    gallery files have the demo sizes, and a second run reuses the built indexes."""
    import numpy as np
    bench = load_benchmark("bench_million")
    rows = bench.main(["--tiny", "--out", str(tmp_path / "g")])
    assert [(r["structure"], r["index"]) for r in rows] == [
        (s, t) for s in ("scenes", "uniform") for t in ("flat", "hnsw", "IVF16,PQ32x4fs,RFlat")]
    for structure in ("scenes", "uniform"):
        mine = [r for r in rows if r["structure"] == structure]
        assert mine[0]["t2i_vs_flat"] == 1.0 and "t2i_recall_vs_flat" not in mine[0]
        for r in mine[1:]:
            for d in ("t2i", "i2t"):
                assert 0.5 < r[f"{d}_recall_vs_flat"] <= 1.0 and r[f"{d}_p50_ms"] > 0 and r[f"{d}_first_p50_ms"] > 0
                assert r[f"{d}_built_now"] and r[f"{d}_search_ms"] <= r[f"{d}_p50_ms"]
        assert all(0 < r["rss_anon_mb"] <= r["peak_rss_mb"] for r in mine)
    assert np.load(tmp_path / "g" / "regions.npy", mmap_mode="r").shape == (2000, 36, 128)
    img = np.load(tmp_path / "g" / "scenes" / "image_global.npy")
    cap = np.load(tmp_path / "g" / "scenes" / "caption_global.npy")
    assert img.shape == cap.shape == (2000, 128) and np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    # demo scenes are clustered: an image's nearest other image is far closer than in the uniform gallery
    uni = np.load(tmp_path / "g" / "uniform" / "image_global.npy")
    nearest = lambda x: np.sort(x[:200] @ x.T, axis=1)[:, -2].mean()
    assert nearest(img) > nearest(uni) + 0.1
    assert "| flat |" in capsys.readouterr().out
    again = bench.main(["--tiny", "--out", str(tmp_path / "g"), "--structure", "scenes"])
    assert not again[1]["t2i_built_now"] and again[1]["t2i_build_s"] == rows[1]["t2i_build_s"]
    assert again[1]["t2i_recall_vs_flat"] == rows[1]["t2i_recall_vs_flat"]


def test_bench_grow_tiny_mode_adds_and_matches_a_rebuild(tmp_path):
    """bench_grow.py --tiny: the add's row is a fraction of the rebuild measured in the same run, the
    second add does nothing, and the grown index answers every compared query as the rebuilt one."""
    bench = load_benchmark("bench_grow")
    result = bench.main(["--tiny", "--work", str(tmp_path / "w"), "--json", str(tmp_path / "g.json")])
    rows = {r["step"]: r for r in result["rows"]}
    assert rows["rebuild (baseline)"]["vs_rebuild"] == 1.0 and rows["add"]["images"] == 20
    assert 0 < rows["add"]["vs_rebuild"] < 1
    check = result["check"]
    assert check["same_ids"] == check["queries"] > 0 and check["max_score_diff"] <= bench.TOLERANCE
    assert json.loads((tmp_path / "g.json").read_text())["check"] == check


@pytest.mark.slow
def test_bench_fusion_tiny_mode(tmp_path, capsys):
    """bench_fusion.py --tiny: a model trained for one epoch, its head and lambda fitted, the three
    rankings of the test split and their paired differences, and the targets table."""
    bench = load_benchmark("bench_fusion")
    out = tmp_path / "r.json"
    assert bench.main(["--tiny", "--datasets", "demo", "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["demo"]) == {"weak", "well"}
    for row in results["demo"].values():
        assert row["images"] == bench.TINY_SIZES["test_images"]
        assert set(row["rankings"]) == {"exhaustive", "two_stage", "fused"}
        assert set(row["paired"]) == {"fused-exhaustive", "fused-two_stage", "two_stage-exhaustive"}
        diff = row["paired"]["fused-exhaustive"]["rsum"]
        assert diff["diff"] == pytest.approx(row["rankings"]["fused"]["rsum"] - row["rankings"]["exhaustive"]["rsum"])
        assert row["rankings"]["exhaustive"]["rsum"] == pytest.approx(row["test_rsum_exhaustive"])
        if row["lambda"] == 0:
            assert row["rankings"]["fused"] == row["rankings"]["two_stage"]
    text = capsys.readouterr().out
    assert "numbers to reach (issue 21)" in text and "| demo | weak | - | exhaustive |" in text
