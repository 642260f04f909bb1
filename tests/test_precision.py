"""Reduced-precision option (vsl.precision), sync-free scoring loop and the GPU benchmark script (issue 7).

Everything here runs on the CPU: ``tf32`` is a no-op there, ``bf16`` autocasts as on a GPU.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vsl.models.reference import published_similarity
from vsl.config import Config
from vsl.errors import ConfigError
from vsl.models import build_model
from vsl.precision import autocast_dtype, check_precision, precision_context, scores_in_precision

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
TINY = dict(img_dim=24, word_dim=12, embed_size=32, sim_dim=16, vocab_size=50, num_regions=36)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems: a second OpenMP thread only adds synchronisation (and stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tf32_flags():
    """Save and restore the global switches around a test that changes them."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cuda.matmul.allow_tf32 = saved[1]
    torch.backends.cudnn.allow_tf32 = saved[2]


def _flags():
    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)


def _embedded(module_name, n=5, m=7, seed=0):
    torch.manual_seed(seed)
    model = build_model(Config(module_name=module_name, **TINY)).eval()
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (m,), generator=gen)
    captions = torch.randint(4, TINY["vocab_size"], (m, int(lengths.max())), generator=gen)
    images = torch.randn(n, TINY["num_regions"], TINY["img_dim"], generator=gen).relu()
    with torch.no_grad():
        return model, model.encode_images(images), model.encode_captions(captions, lengths), lengths


# ------------------------------------------------------------------------------------------------
# precision_context
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
def test_fp32_context_is_identical_to_no_context(module_name):
    model, img, cap, lengths = _embedded(module_name)
    with torch.no_grad():
        plain = model.similarity(img, cap, lengths)
        with precision_context("fp32", "cpu"):
            exact = model.similarity(img, cap, lengths)
    assert exact.dtype == torch.float32
    assert torch.equal(plain, exact)


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
def test_bf16_scores_close_to_fp32_and_returned_as_float32(module_name):
    model, img, cap, lengths = _embedded(module_name, n=6, m=9)
    with torch.no_grad():
        exact = scores_in_precision(model.similarity, img, cap, lengths, precision="fp32")
        bf16 = scores_in_precision(model.similarity, img, cap, lengths, precision="bf16")
        tf32 = scores_in_precision(model.similarity, img, cap, lengths, precision="tf32")
    assert bf16.dtype == torch.float32 and bf16.shape == exact.shape
    diff = (bf16 - exact).abs().max().item()
    assert 0 < diff < 2e-2          # bf16 really ran (not bit-identical) and stays close
    assert torch.equal(tf32, exact)  # TF32 does not exist on a CPU


def test_bf16_autocasts_matrix_products():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with precision_context("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
        assert layer(x).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    assert layer(x).dtype == torch.float32
    assert autocast_dtype("bf16") == torch.bfloat16 and autocast_dtype("tf32") is None


@pytest.mark.parametrize("start", [("highest", False, False), ("high", True, True), ("high", True, False)])
def test_settings_set_inside_and_restored_after(tf32_flags, start):
    torch.set_float32_matmul_precision(start[0])
    torch.backends.cuda.matmul.allow_tf32 = start[1]
    torch.backends.cudnn.allow_tf32 = start[2]
    assert _flags() == start
    with precision_context("fp32", "cpu"):
        assert _flags() == ("highest", False, False)
    assert _flags() == start
    with precision_context("tf32", "cpu"):
        assert _flags() == ("high", True, True)
    assert _flags() == start
    with precision_context("bf16", "cpu"):
        assert _flags() == ("highest", False, False)
    assert _flags() == start


def test_settings_restored_when_the_body_raises(tf32_flags):
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    before = _flags()
    with pytest.raises(RuntimeError, match="boom"):
        with precision_context("tf32", "cpu"):
            raise RuntimeError("boom")
    assert _flags() == before
    with pytest.raises(RuntimeError, match="boom"):
        with precision_context("bf16", "cpu"):
            raise RuntimeError("boom")
    assert not torch.is_autocast_enabled("cpu")


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="precision must be one of"):
        with precision_context("fp16", "cpu"):
            pass
    with pytest.raises(ConfigError):
        check_precision("float32")


# ------------------------------------------------------------------------------------------------
# The scoring loop waits for the device a fixed number of times, however many chunks it runs
# ------------------------------------------------------------------------------------------------
_HOST_READS = ("__int__", "__index__", "__bool__", "__float__", "item", "tolist")


def _count_host_reads(monkeypatch, fn):
    """Calls of tensor -> Python value conversions (each one a device sync on a GPU) during ``fn()``."""
    calls = {"n": 0}
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        result = fn()
    finally:
        monkeypatch.undo()
    return calls["n"], result


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
def test_scoring_loop_has_no_per_chunk_host_reads(monkeypatch, module_name):
    model, img, cap, lengths = _embedded(module_name, n=4, m=16)
    chunks = {"many": 0, "one": 0}

    def score(key, budget):
        def run():
            def progress(_pairs):
                chunks[key] += 1
            with torch.no_grad():
                return model.similarity(img, cap, lengths, chunk_elements=budget, progress=progress)
        return run

    reads_many, many = _count_host_reads(monkeypatch, score("many", 4 * 10 * TINY["embed_size"]))
    reads_one, one = _count_host_reads(monkeypatch, score("one", 1 << 30))
    assert chunks["many"] >= 8 and chunks["one"] == 1
    assert reads_many == reads_one          # nothing is read back per chunk
    torch.testing.assert_close(many, one, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# benchmarks/bench_gpu.py
# ------------------------------------------------------------------------------------------------
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
    lengths = bench.coco_caption_lengths(25000, torch.Generator().manual_seed(0))
    assert lengths.dtype == torch.int64 and lengths.shape == (25000,)
    assert 6 <= int(lengths.min()) and int(lengths.max()) <= 50
    assert 12.5 <= lengths.float().mean().item() <= 13.5
    assert 1.8 <= lengths.float().std().item() <= 3.0


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
