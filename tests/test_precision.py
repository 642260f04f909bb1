"""Reduced-precision option (vsl.precision), sync-free scoring loop and the GPU benchmark script (issue 7).

Everything here runs on the CPU: ``tf32`` is a no-op there, ``bf16`` autocasts as on a GPU.
"""

import pytest
import torch

from vsl.config import Config
from vsl.errors import ConfigError
from vsl.models import build_model
from vsl.precision import (
    autocast_dtype,
    check_precision,
    precision_context,
    scores_in_precision,
)

TINY = dict(img_dim=24, word_dim=12, embed_size=32, sim_dim=16, vocab_size=50, num_regions=36)


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny problems: a second thread only adds synchronisation


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
