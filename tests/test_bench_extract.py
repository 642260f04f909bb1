"""benchmarks/bench_extract.py: its FLOP count, its random weights and its input sizes (fast), and one
end-to-end pass at a tiny width without the port (slow); not its timings."""
from __future__ import annotations

import re

import pytest
import torch
from conftest import load_benchmark
from torch.utils.flop_counter import FlopCounterMode

from vsl.vision import Detector, image_scale, load_detector, scaled_size
from vsl.vision.rpn import cell_anchors

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_extract")


def _counted(width: int, height: int, wide: int, proposals: int) -> int:
    """FLOPs of vsl's own modules (convolutions and linear layers) on the meta device: no arithmetic runs."""
    with torch.device("meta"):
        det = Detector(width)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            features = det.backbone(torch.empty(1, 3, height, wide))
            det.proposal_generator.rpn_head(features)
            det.roi_heads.res5(torch.empty(proposals, 16 * width, 14, 14))
            det.roi_heads.box_predictor(torch.empty(proposals, 32 * width))
    return counter.get_total_flops()


@pytest.mark.parametrize("width,height,wide,proposals", [(8, 600, 902, 300),
                                                         (64, 600, 600, 123), (16, 1000, 601, 7)])
def test_flop_count_equals_the_counted_operations(bench, width, height, wide, proposals):
    assert bench.detector_flops(height, wide, proposals, width)["total"] == _counted(width, height, wide, proposals)


def test_flop_count_at_full_width_is_the_issues_arithmetic(bench):
    flops = bench.detector_flops(600, 800, 300, 64)
    assert 5.8e9 < flops["head"] / 300 < 6.0e9                  # ~5.9 GFLOP per proposal
    assert 1.7e12 < flops["head"] < 1.8e12 and 1.0e11 < flops["backbone"] < 1.5e11


@pytest.mark.parametrize("size", [(300, 451), (400, 600), (512, 512), (1000, 100), (33, 2000), (427, 640)])
def test_network_input_size_is_vsls(bench, size):
    assert bench.network_input_size(*size) == scaled_size(*size, image_scale(*size))


def test_random_weights_load_and_keep_the_real_anchors(bench, tmp_path):
    path = bench.make_weights(8, tmp_path, seed=1)
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["proposal_generator.anchor_generator.cell_anchors.0"], cell_anchors().float())
    assert float(state["backbone.res2.0.conv1.norm.running_var"].min()) == 1.0
    det = load_detector(path)                                   # the strict layout check of vsl
    assert det.width == 8 and det.feature_dim == 256
    (tmp_path / "again").mkdir()
    again = torch.load(bench.make_weights(8, tmp_path / "again", seed=1), weights_only=True)
    assert all(torch.equal(state[k], again[k]) for k in state)  # seeded: the port and vsl read one file


def test_the_port_worker_needs_no_vsl(bench):
    """The worker runs in the port's environment: the module imports nothing of vsl at its top level."""
    source = (bench.HERE / "bench_extract.py").read_text()
    top = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not any("vsl" in line or "common" in line for line in top), top


@pytest.mark.slow
def test_bench_extract_smoke_without_the_port(bench, capsys):
    assert bench.main(["--width", "8", "--num_images", "1", "--repeats", "1", "--threads", "1",
                       "--matmul_size", "256", "--matmul_seconds", "0.05"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| vsl.vision"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) == 1 and float(cells[3]) > 0            # one pass, images/s
    assert float(cells[4]) == pytest.approx(31.7, abs=0.1)          # GFLOP per image (chelsea, width 8)
    assert "| floor: FLOPs at the matmul rate |" in out and "port was not run" in out
    assert re.search(r"vsl / floor \d+\.\d+x", out)
