#!/usr/bin/env python
"""Region-feature extraction speed (issue 23): ``vsl.vision`` against the reference port, and the floor.

**CPU** (default): images/s of :class:`vsl.vision.Detector` (``extract``: Caffe preprocessing,
backbone, RPN, RoI pooling, the res5 head over every proposal, ``generate_tsv.py``'s selection)
and of the reference port (``modeling_frcnn.py`` of the LXMERT demo in ``transformers``, run by
this script as a subprocess in the port's own environment: ``--port DIR --port_python PY``; the
same Caffe preprocessing and selection, the port's network) on the same photographs, the same
weights, the same CPU and thread count, in one run. Passes alternate (vsl, port, port, vsl, ...)
because the machine is shared; medians are reported with the load average.

The FLOPs of one image (:func:`detector_flops`, 2 per multiply-add) are those of the backbone and
the RPN on the image's network input plus the res5 head and the predictors over its proposals
(about 5.9 GFLOP per proposal at full width: ~1.8 TFLOP for 300, against ~0.07 TFLOP for the
backbone). "% of matmul" divides each extractor's FLOP/s by the rate of a square float32 matrix
product (:func:`common.matmul_rate`) measured in the same run on the same threads, before, between
and after the passes (median); the *floor* is the time all those FLOPs take at that rate. Issue
23's targets: vsl at least 1.2x the port and within 1.5x of the floor.

Weights: ``--weights FILE`` (the port's state-dict format), or by default a random initialisation
at ``--width`` (64 = the real model) in that format, written once to a temporary folder and read by
both (:func:`random_weights`: He-normal convolutions, batch norms with random affine terms and
unit statistics, the residual branches' last norm scaled down so activations stay bounded through
the 33 blocks). Random weights cost what the real ones cost: the head runs over all 300
proposals either way, and the selection's per-class NMS is over 1,600 classes either way.

**CUDA** (``--device cuda``): images/s in each ``--dtype`` (float32 = exact fp32, TF32 off; tf32;
bfloat16; float16) over the photos repeated to ``--gpu_images``, and the largest difference of the
kept regions' features of each reduced mode against float32 (relative to their largest magnitude,
on the images whose 36 kept boxes agree with float32's; how many agree is reported too), with the
projected time for the 123,287 COCO images (target: under 30 minutes in TF32).

Usage::

    python benchmarks/bench_extract.py                                   # vsl + floor, full width
    python benchmarks/bench_extract.py --port /work/butd-port/src_copy --port_python /work/sideenv/bin/python
    python benchmarks/bench_extract.py --width 8 --num_images 1 --repeats 1   # smoke test, seconds
    python benchmarks/bench_extract.py --device cuda --dtype float32 tf32 bfloat16 float16

The port's directory holds ``modeling_frcnn.py`` and ``utils.py`` of the ``transformers`` LXMERT
example (with ``cv2``, ``requests``, ``wget``, ``yaml``, ``filelock``, ``tqdm`` and a torchvision that
loads, in ``--port_python``'s environment); nothing of it is in this repository.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

# Only numpy / torch / PIL at module level: the port worker (``--_port_worker``) runs this file in the
# port's environment, which has no vsl. vsl and common are imported where they are used.
HERE = Path(__file__).resolve().parent

#: The shipped scikit-image photographs, in the order the benchmark takes them (RGB first).
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "camera.png")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
#: COCO 2014 train + val images (SCAN's coco_precomp is made from these).
COCO_IMAGES = 123_287
#: The port's (and vsl's) pixel means, BGR (cfg.PIXEL_MEANS of bottom-up-attention).
PIXEL_MEANS_BGR = (102.9801, 115.9465, 122.7717)
#: Modes of ``--dtype`` on CUDA: weights / activations dtype and the TF32 switch.
GPU_MODES = {"float32": (torch.float32, "fp32"), "tf32": (torch.float32, "tf32"),
             "bfloat16": (torch.bfloat16, "fp32"), "float16": (torch.float16, "fp32")}
#: The matrix-product rate each mode is compared with (float16 against bf16: the same tensor cores).
MATMUL_OF_MODE = {"float32": "fp32", "tf32": "tf32", "bfloat16": "bf16", "float16": "bf16"}


# ------------------------------------------------------------------------------------------------
# Images and weights
# ------------------------------------------------------------------------------------------------
def skimage_data_dir() -> Optional[Path]:
    """``skimage/data`` of the installed scikit-image wheel, found without importing it."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data"
    return path if path.is_dir() else None


def photo_paths(images: Optional[Sequence[str]], count: int) -> List[Path]:
    """``--images`` (files or folders), or the first ``count`` of :data:`PHOTOS` from scikit-image."""
    if images:
        paths: List[Path] = []
        for item in images:
            p = Path(item)
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
        return paths[:count] if count else paths
    data = skimage_data_dir()
    if data is None:
        raise SystemExit("error: no --images given and scikit-image (its shipped photos) is not installed")
    return [data / name for name in PHOTOS[:count or len(PHOTOS)]]


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB as an image viewer shows it (EXIF orientation applied; grey, RGBA converted).

    A ``.npy`` file is an already decoded (H, W, 3) uint8 array (for machines without PIL).
    """
    if path.suffix.lower() == ".npy":
        return np.load(path)
    from PIL import Image, ImageOps
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()


def random_weights(layout: Mapping[str, Tuple[int, ...]], anchors: torch.Tensor, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A random state dict of the detector's ``layout`` (key -> shape, the port's names), float32.

    Convolutions He-normal; batch norms: weight U(0.5, 1) (U(0.1, 0.3) for each block's last norm,
    ``conv3.norm``, so the 33 residual sums stay bounded), bias N(0, 0.05), running mean 0,
    running variance 1; RPN and predictor layers N(0, 0.01) (the port's own initialisation), the
    class embedding N(0, 1), biases 0; the cell anchors are ``anchors`` (their stored values are used).
    """
    gen = torch.Generator().manual_seed(seed)
    out: Dict[str, torch.Tensor] = {}
    for key, shape in layout.items():
        if key.endswith("cell_anchors.0"):
            value = anchors.clone().float()
        elif key.endswith("num_batches_tracked"):
            value = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_mean"):
            value = torch.zeros(shape)
        elif key.endswith("running_var"):
            value = torch.ones(shape)
        elif key.endswith("norm.weight"):
            low, high = (0.1, 0.3) if key.endswith("conv3.norm.weight") else (0.5, 1.0)
            value = torch.empty(shape).uniform_(low, high, generator=gen)
        elif key.endswith("norm.bias"):
            value = torch.randn(shape, generator=gen) * 0.05
        elif key.endswith("bias"):
            value = torch.zeros(shape)
        elif key.endswith("cls_embedding.weight"):
            value = torch.randn(shape, generator=gen)
        elif len(shape) == 4 and key.startswith(("backbone.", "roi_heads.res5.")):
            fan_in = shape[1] * shape[2] * shape[3]
            value = torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)
        else:                                                   # RPN and predictor layers
            value = torch.randn(shape, generator=gen) * 0.01
        out[key] = value
    return out


def make_weights(width: int, folder: Path, seed: int = 0) -> Path:
    """Write :func:`random_weights` at ``width`` to ``folder`` (the port's format); returns the file."""
    from vsl.vision import expected_layout
    from vsl.vision.rpn import cell_anchors
    path = folder / f"butd_random_w{width}_seed{seed}.pth"
    torch.save(random_weights(expected_layout(width), cell_anchors(), seed), path)
    return path


# ------------------------------------------------------------------------------------------------
# Arithmetic
# ------------------------------------------------------------------------------------------------
def _conv_out(size: int, kernel: int, stride: int, padding: int = 0, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _stage_flops(blocks: int, h: int, w: int, c_in: int, bottleneck: int, c_out: int, stride: int,
                 dilation: int, batch: int = 1) -> Tuple[float, int, int]:
    """FLOPs of a ResNet stage (stride in the first 1x1), and its output size."""
    flops = 0.0
    for b in range(blocks):
        s = stride if b == 0 else 1
        ho, wo = _conv_out(h, 1, s), _conv_out(w, 1, s)
        cin = c_in if b == 0 else c_out
        flops += 2 * ho * wo * cin * bottleneck                       # conv1 1x1 (stride s)
        flops += 2 * ho * wo * bottleneck * bottleneck * 9            # conv2 3x3 (dilated, same size)
        flops += 2 * ho * wo * bottleneck * c_out                     # conv3 1x1
        if b == 0:
            flops += 2 * ho * wo * cin * c_out                        # shortcut 1x1 (stride s)
        h, w = ho, wo
    return flops * batch, h, w


def detector_flops(height: int, width: int, proposals: int, net_width: int = 64) -> Dict[str, float]:
    """FLOPs (2 per multiply-add) of the BUTD detector on an ``height x width`` network input.

    ``backbone``: stem 7x7/2 convolution, Caffe max pool (3x3/2, ceil), res2-res4 (3, 4, 23
    bottleneck blocks); ``rpn``: its 3x3 convolution and 1x1 outputs on res4; ``head``: res5 (3
    blocks, stride 1, dilation 2) on ``proposals`` 14x14 maps plus the class, box and attribute
    layers. Element-wise work (batch norm, ReLU, pooling, NMS) is not counted.
    """
    w = net_width
    stem = _conv_out(height, 7, 2, 3), _conv_out(width, 7, 2, 3)
    flops = {"backbone": 2.0 * stem[0] * stem[1] * 3 * w * 49}
    h, ww = (math.ceil((s - 3) / 2) + 1 for s in stem)                # Caffe max pool, ceil mode
    c_in = w
    for blocks, stride, mult in ((3, 1, 4), (4, 2, 8), (23, 2, 16)):
        f, h, ww = _stage_flops(blocks, h, ww, c_in, mult * w // 4, mult * w, stride, 1)
        flops["backbone"] += f
        c_in = mult * w
    hidden = 8 * w
    flops["rpn"] = 2.0 * h * ww * (c_in * hidden * 9 + hidden * 12 + hidden * 48)
    res5, _, _ = _stage_flops(3, 14, 14, 16 * w, 8 * w, 32 * w, 1, 2, batch=proposals)
    d = 32 * w
    predictors = 2.0 * proposals * (d * 1601 + d * 6400 + (d + d // 8) * (d // 4) + (d // 4) * 401)
    flops["head"] = res5 + predictors
    flops["total"] = flops["backbone"] + flops["rpn"] + flops["head"]
    return flops


def network_input_size(height: int, width: int) -> Tuple[int, int]:
    """The Caffe test scale (shorter side 600, longer at most 1,000) applied to an image size."""
    scale = 600.0 / min(height, width)
    if round(scale * max(height, width)) > 1000:
        scale = 1000.0 / max(height, width)
    return int(np.round(height * scale)), int(np.round(width * scale))


# ------------------------------------------------------------------------------------------------
# The port, in its own environment (``--_port_worker``)
# ------------------------------------------------------------------------------------------------
def port_config(port_utils, width: int):
    """The port's ``Config`` for the published VG model (``unc-nlp/frcnn-vg-finetuned``), channels x width/64."""
    return port_utils.Config({
        "MODEL": {"DEVICE": "cpu", "MAX_POOL": True, "PIXEL_MEAN": list(PIXEL_MEANS_BGR),
                  "PIXEL_STD": [1.0, 1.0, 1.0]},
        "BACKBONE": {"FREEZE_AT": 2},
        "RESNETS": {"DEPTH": 101, "NORM": "BN", "NUM_GROUPS": 1, "WIDTH_PER_GROUP": width,
                    "STEM_OUT_CHANNELS": width, "RES2_OUT_CHANNELS": 4 * width, "OUT_FEATURES": ["res4"],
                    "STRIDE_IN_1X1": True, "RES5_DILATION": 1},
        "PROPOSAL_GENERATOR": {"HIDDEN_CHANNELS": 8 * width, "MIN_SIZE": 16},
        "ANCHOR_GENERATOR": {"SIZES": [[64, 128, 256, 512]], "ASPECT_RATIOS": [[0.5, 1.0, 2.0]], "OFFSET": 0.0},
        "RPN": {"IN_FEATURES": ["res4"], "NMS_THRESH": 0.7, "PRE_NMS_TOPK_TEST": 6000, "POST_NMS_TOPK_TEST": 300,
                "PRE_NMS_TOPK_TRAIN": 12000, "POST_NMS_TOPK_TRAIN": 2000, "BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],
                "BATCH_SIZE_PER_IMAGE": 256, "POSITIVE_FRACTION": 0.5, "SMOOTH_L1_BETA": 0.0, "LOSS_WEIGHT": 1.0,
                "BOUNDARY_THRESH": -1, "IOU_THRESHOLDS": [0.3, 0.7], "IOU_LABELS": [0, -1, 1]},
        "ROI_HEADS": {"IN_FEATURES": ["res4"], "NUM_CLASSES": 1600, "NMS_THRESH_TEST": 0.3,
                      "SCORE_THRESH_TEST": 0.2, "POSITIVE_FRACTION": 0.25, "PROPOSAL_APPEND_GT": True,
                      "IOU_THRESHOLDS": [0.5], "IOU_LABELS": [0, 1]},
        "ROI_BOX_HEAD": {"ATTR": True, "NUM_ATTRS": 400, "BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
                         "CLS_AGNOSTIC_BBOX_REG": False, "POOLER_RESOLUTION": 14, "POOLER_SAMPLING_RATIO": 0,
                         "RES5HALVE": False, "SMOOTH_L1_BETA": 0.0},
        "INPUT": {"FORMAT": "BGR", "MIN_SIZE_TEST": 600, "MAX_SIZE_TEST": 1000},
        "MIN_DETECTIONS": 10, "MAX_DETECTIONS": 36, "PAD_VALUE": 0, "SIZE_DIVISIBILITY": 0,
    })


def caffe_blob(rgb: np.ndarray) -> Tuple[torch.Tensor, float]:
    """(1, 3, H', W') float32 BGR minus the means at the Caffe test scale (``fast_rcnn.test._get_blobs``)."""
    import torch.nn.functional as F
    bgr = rgb[:, :, ::-1].astype(np.float32) - np.array(PIXEL_MEANS_BGR, np.float32)
    size = network_input_size(*rgb.shape[:2])
    blob = torch.from_numpy(np.ascontiguousarray(bgr)).permute(2, 0, 1)[None]
    blob = F.interpolate(blob, size=size, mode="bilinear", align_corners=False)
    return blob, size[0] / rgb.shape[0]


def tsv_selection(proposals: torch.Tensor, class_probs: torch.Tensor, nms, boxes: int = 36) -> torch.Tensor:
    """``generate_tsv.py``'s selection as it is published: a loop of per-class NMS (0.3) over the proposals."""
    max_conf = torch.zeros(proposals.shape[0])
    for c in range(1, class_probs.shape[1]):
        keep = nms(proposals, class_probs[:, c], 0.3)
        max_conf[keep] = torch.maximum(max_conf[keep], class_probs[keep, c])
    keep = torch.nonzero(max_conf >= 0.4).flatten()
    if keep.numel() != boxes:
        keep = torch.from_numpy(np.argsort(-max_conf.numpy(), kind="stable")[:boxes].copy())
    return keep


def port_worker(args) -> int:
    """Load the port, then answer one line per request on stdin: ``run`` (a timed pass) or ``dump PATH``."""
    sys.path.insert(0, str(Path(args.port).resolve()))
    import torch.nn.functional as F
    import modeling_frcnn
    import utils as port_utils
    from torchvision.ops import nms
    torch.set_num_threads(args.threads)
    model = modeling_frcnn.GeneralizedRCNN(port_config(port_utils, args.width))
    model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    model.eval()
    images = [read_rgb(Path(p)) for p in args.images]

    @torch.no_grad()
    def extract(rgb, stages):
        t0 = time.perf_counter()
        blob, scale = caffe_blob(rgb)
        sizes = torch.tensor([blob.shape[-2:]])
        features = model.backbone(blob)
        proposals, _ = model.proposal_generator(blob, sizes, features, None)
        t1 = time.perf_counter()
        class_scores, _, _, pooled = model.roi_heads(features, proposals, None)
        t2 = time.perf_counter()
        keep = tsv_selection(proposals[0], F.softmax(class_scores, dim=-1), nms)
        t3 = time.perf_counter()
        for name, dt in (("backbone+rpn", t1 - t0), ("head", t2 - t1), ("selection", t3 - t2)):
            stages[name] = stages.get(name, 0.0) + dt
        return dict(proposals=int(proposals[0].shape[0]), keep=keep.numpy(), features=pooled[keep].numpy(),
                    boxes=(proposals[0][keep] / scale).numpy())

    extract(images[0], {})                                   # warm-up: allocator, oneDNN primitives
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        request = line.split()
        if not request:
            break
        stages: Dict[str, float] = {}
        t0 = time.perf_counter()
        outs = [extract(rgb, stages) for rgb in images]
        seconds = time.perf_counter() - t0
        if request[0] == "dump":
            np.savez(request[1], **{f"{i}_{k}": v for i, o in enumerate(outs) for k, v in o.items() if k != "proposals"})
        print(json.dumps({"seconds": seconds, "proposals": [o["proposals"] for o in outs], "stages": stages}),
              flush=True)
    return 0


class PortProcess:
    """The port worker as a subprocess: one timed pass per :meth:`run`."""

    def __init__(self, python: str, port: str, weights: Path, width: int, images: Sequence[Path], threads: int):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        env.pop("PYTHONPATH", None)                          # the port's environment, not vsl's
        cmd = [python, str(Path(__file__).resolve()), "--_port_worker", "--port", port, "--weights", str(weights),
               "--width", str(width), "--threads", str(threads), "--images", *map(str, images)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: the port worker exited with status {self.proc.wait()} (see its stderr above)")
        return json.loads(line)

    def run(self, dump: Optional[Path] = None) -> dict:
        self.proc.stdin.write(f"dump {dump}\n" if dump else "run\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.write("\n")
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------------
# vsl
# ------------------------------------------------------------------------------------------------
def vsl_pass(detector, images: Sequence[np.ndarray], selection) -> Tuple[float, list]:
    t0 = time.perf_counter()
    regions = detector.extract(images, selection=selection)
    return time.perf_counter() - t0, regions


def vsl_proposal_counts(detector, images: Sequence[np.ndarray]) -> List[int]:
    return [int(detector.detect(rgb).proposals.shape[0]) for rgb in images]


def _relative_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _fmt_s(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.2f} s"


def run_cpu(args) -> int:
    from common import markdown_table, matmul_rate
    from vsl.vision import BoxSelection, load_detector

    torch.set_num_threads(args.threads)
    paths = photo_paths(args.images, args.num_images)
    images = [read_rgb(p) for p in paths]
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        weights = Path(args.weights) if args.weights else make_weights(args.width, Path(tmp), args.seed)
        detector = load_detector(weights, device="cpu", dtype=torch.float32)
        if args.head_chunk:
            detector.head_chunk = args.head_chunk
        selection = BoxSelection.parse("36")
        width = detector.width
        counts = vsl_proposal_counts(detector, images[:1]) + vsl_proposal_counts(detector, images[1:])  # + warm-up
        sizes = [network_input_size(*im.shape[:2]) for im in images]
        flops = [detector_flops(h, w, r, width) for (h, w), r in zip(sizes, counts)]
        total = {k: sum(f[k] for f in flops) for k in flops[0]}
        port = (PortProcess(args.port_python, args.port, weights, width, paths, args.threads)
                if args.port else None)
        print(f"# bench_extract: {len(images)} images {[p.name for p in paths]}, width {width}, "
              f"{args.threads} threads, network inputs {sizes}, proposals {counts}", flush=True)
        rates = [matmul_rate(torch.device("cpu"), "fp32", args.matmul_size, min_seconds=args.matmul_seconds)]
        vsl_times, port_times, port_stages, regions = [], [], [], None
        for r in range(args.repeats):
            order = ("vsl", "port") if r % 2 == 0 else ("port", "vsl")
            for who in order:
                if who == "vsl":
                    seconds, regions = vsl_pass(detector, images, selection)
                    vsl_times.append(seconds)
                elif port is not None:
                    reply = port.run()
                    port_times.append(reply["seconds"])
                    port_stages.append(reply["stages"])
                    if reply["proposals"] != counts:
                        print(f"note: the port found {reply['proposals']} proposals, vsl {counts}", flush=True)
            print(f"pass {r + 1}/{args.repeats}: vsl {vsl_times[-1]:.2f} s"
                  + (f", port {port_times[-1]:.2f} s" if port_times else "") + f" for {len(images)} images", flush=True)
            rates.append(matmul_rate(torch.device("cpu"), "fp32", args.matmul_size, min_seconds=args.matmul_seconds))
        parity, n = None, len(images)
        if port is not None:
            dump = Path(tmp) / "port.npz"
            port.run(dump)
            ref = np.load(dump)
            same = [regions[i].boxes.shape == ref[f"{i}_boxes"].shape
                    and np.allclose(regions[i].boxes.numpy(), ref[f"{i}_boxes"], atol=1e-2) for i in range(n)]
            parity = dict(same_boxes=f"{sum(same)}/{n}",
                          features=max((_relative_diff(regions[i].features.numpy(), ref[f"{i}_features"])
                                        for i in range(n) if same[i]), default=float("nan")))
            port.close()
    load_end = os.getloadavg()

    rate = _median(rates)
    floor_s = total["total"] / rate
    header = ["extractor", "passes", "s / pass (median)", "images/s", "GFLOP / image", "GFLOP/s",
              "% of matmul rate", "vs port", "vs floor"]
    rows = []
    vsl_s = _median(vsl_times)
    port_s = _median(port_times) if port_times else None
    gflop_image = total["total"] / n / 1e9
    rows.append([f"vsl.vision (torch {torch.__version__})", len(vsl_times), vsl_s, n / vsl_s, gflop_image,
                 total["total"] / vsl_s / 1e9, 100 * total["total"] / vsl_s / rate,
                 f"{port_s / vsl_s:.2f}x" if port_s else "-", f"{vsl_s / floor_s:.2f}x"])
    if port_s:
        rows.append([f"reference port (torch {port.info.get('torch')})", len(port_times), port_s, n / port_s,
                     gflop_image, total["total"] / port_s / 1e9, 100 * total["total"] / port_s / rate, "1.00x",
                     f"{port_s / floor_s:.2f}x"])
    rows.append([f"floor: FLOPs at the matmul rate", "-", floor_s, n / floor_s, gflop_image, rate / 1e9, 100.0,
                 f"{port_s / floor_s:.2f}x" if port_s else "-", "1.00x"])
    print("\n" + markdown_table(header, rows))
    print(f"\n- FLOPs per pass: backbone {total['backbone'] / 1e9:.0f} G, RPN {total['rpn'] / 1e9:.0f} G, "
          f"head {total['head'] / 1e9:.0f} G over {sum(counts)} proposals "
          f"({total['head'] / max(sum(counts), 1) / 1e9:.2f} GFLOP per proposal)")
    print(f"- matmul rate ({args.matmul_size}^2 float32, {args.threads} threads), measured {len(rates)} times: "
          f"median {rate / 1e9:.0f}, min {min(rates) / 1e9:.0f}, max {max(rates) / 1e9:.0f} GFLOP/s")
    print(f"- vsl passes (s): {', '.join(f'{t:.2f}' for t in vsl_times)}")
    if port_times:
        stages = {k: _median([s[k] for s in port_stages]) for k in port_stages[0]}
        print(f"- port passes (s): {', '.join(f'{t:.2f}' for t in port_times)}; its stages (median s / pass): "
              + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
        print(f"- targets: vsl / port {port_s / vsl_s:.2f}x (>= 1.2x: {'met' if port_s / vsl_s >= 1.2 else 'NOT met'}), "
              f"vsl / floor {vsl_s / floor_s:.2f}x (<= 1.5x: {'met' if vsl_s / floor_s <= 1.5 else 'NOT met'})")
    else:
        print(f"- target: vsl / floor {vsl_s / floor_s:.2f}x (<= 1.5x: {'met' if vsl_s / floor_s <= 1.5 else 'NOT met'})"
              "; the port was not run (no --port)")
    if parity:
        print(f"- same weights, vsl vs port: the same 36 kept boxes (within 0.01 px) on {parity['same_boxes']} images, "
              f"largest feature difference on those {parity['features']:.1e} (relative to the largest magnitude)")
    print(f"- load average (1, 5, 15 min): start {', '.join(f'{x:.2f}' for x in load_start)}; "
          f"end {', '.join(f'{x:.2f}' for x in load_end)}; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    _save_json(args, dict(device="cpu", threads=args.threads, width=width, images=[p.name for p in paths],
                          vsl_seconds=vsl_times, port_seconds=port_times, matmul_flops=rates, flops=total,
                          proposals=counts, parity=parity, load=[load_start, load_end]))
    return 0


# ------------------------------------------------------------------------------------------------
# CUDA: precisions
# ------------------------------------------------------------------------------------------------
def run_cuda(args) -> int:
    from common import markdown_table, matmul_rate
    from vsl.precision import precision_context
    from vsl.vision import BoxSelection, load_detector

    device = torch.device(args.device)
    if not torch.cuda.is_available():
        print(f"error: --device {args.device}, but torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    paths = photo_paths(args.images, args.num_images)
    photos = [read_rgb(p) for p in paths]
    images = [photos[i % len(photos)] for i in range(args.gpu_images)]
    selection = BoxSelection.parse("36")
    name = torch.cuda.get_device_name(device)
    rates = {p: matmul_rate(device, p, 8192, min_seconds=1.0) for p in ("fp32", "tf32", "bf16")}
    print(f"# bench_extract: {name}, torch {torch.__version__}, {len(images)} images ({len(photos)} photos repeated), "
          f"matmul TFLOP/s " + ", ".join(f"{p} {r / 1e12:.0f}" for p, r in rates.items()), flush=True)
    rows, reference, results = [], None, {}
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        weights = Path(args.weights) if args.weights else make_weights(args.width, Path(tmp), args.seed)
        for mode in args.dtype:
            dtype, precision = GPU_MODES[mode]
            detector = load_detector(weights, device=device, dtype=dtype)
            if args.head_chunk:
                detector.head_chunk = args.head_chunk
            with precision_context(precision, device):
                detector.extract(photos[:1], selection=selection)               # warm-up: cuDNN plans
                torch.cuda.synchronize(device)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    regions = detector.extract(images, selection=selection)      # returns CPU tensors: synced
                    times.append(time.perf_counter() - t0)
                counts = [int(detector.detect(rgb).proposals.shape[0]) for rgb in photos]
            seconds = _median(times)
            sizes = [network_input_size(*im.shape[:2]) for im in photos]
            per_photo = [detector_flops(h, w, r, detector.width)["total"] for (h, w), r in zip(sizes, counts)]
            flops = sum(per_photo[i % len(photos)] for i in range(len(images)))
            row = dict(mode=mode, seconds=seconds, images_per_s=len(images) / seconds, flops=flops,
                       fraction=flops / seconds / rates[MATMUL_OF_MODE[mode]], coco_s=COCO_IMAGES * seconds / len(images))
            firsts = regions[:len(photos)]
            if mode == "float32":
                reference = firsts
            elif reference is not None:
                agree = [i for i, (a, b) in enumerate(zip(firsts, reference))
                         if a.boxes.shape == b.boxes.shape and torch.allclose(a.boxes, b.boxes, atol=0.5)]
                row["agree"] = f"{len(agree)}/{len(photos)}"
                row["diff"] = max((_relative_diff(firsts[i].features.numpy(), reference[i].features.numpy())
                                   for i in agree), default=float("nan"))
            results[mode] = row
            rows.append([mode, len(times), seconds, row["images_per_s"], 100 * row["fraction"], _fmt_s(row["coco_s"]),
                         row.get("agree", "-"), f"{row['diff']:.1e}" if "diff" in row else "-"])
            del detector
            torch.cuda.empty_cache()
    header = ["dtype", "passes", f"s / {len(images)} images", "images/s", "% of matmul rate", "COCO 123,287 images",
              "kept boxes = fp32's", "max feature diff vs fp32 (rel.)"]
    print("\n" + markdown_table(header, rows))
    if "tf32" in results:
        print(f"\n- TF32: all of COCO in {_fmt_s(results['tf32']['coco_s'])} (target < 30 min: "
              f"{'met' if results['tf32']['coco_s'] < 1800 else 'NOT met'})")
    _save_json(args, dict(device=name, torch=torch.__version__, matmul_flops=rates, results=results,
                          images=[p.name for p in paths], gpu_images=len(images)))
    return 0


def _save_json(args, payload: dict) -> None:
    path = args.json or (str(Path(os.environ["OUT"]) / "bench_extract.json") if os.environ.get("OUT") else None)
    if not path:
        return
    from vsl.fileio import atomic_write_text
    payload.update(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), argv=sys.argv[1:])
    atomic_write_text(Path(path), json.dumps(payload, indent=1, default=float) + "\n")
    print(f"(written to {path})")


# ------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, or cuda[:N] for the precision comparison")
    p.add_argument("--dtype", nargs="+", default=["float32", "tf32", "bfloat16"], choices=sorted(GPU_MODES),
                   help="CUDA modes (float32 first: the reference of the differences)")
    p.add_argument("--images", nargs="*", help="image files or folders (default: scikit-image's shipped photos)")
    p.add_argument("--num_images", type=int, default=2, help="how many photos (0: all)")
    p.add_argument("--gpu_images", type=int, default=64, help="CUDA: the photos repeated to this many images")
    p.add_argument("--weights", help="a weights file in the port's format (default: random, written to a temp folder)")
    p.add_argument("--width", type=int, default=64, help="network width of the random weights (64: the real model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the images, per extractor")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of both extractors")
    p.add_argument("--head_chunk", type=int, default=0, help="regions per res5 batch in vsl (0: vsl's default)")
    p.add_argument("--matmul_size", type=int, default=2048)
    p.add_argument("--matmul_seconds", type=float, default=1.0)
    p.add_argument("--port", help="folder of the port's modeling_frcnn.py and utils.py (runs it as the baseline)")
    p.add_argument("--port_python", default=sys.executable, help="python of the port's environment")
    p.add_argument("--json", help="also write the numbers here (default $OUT/bench_extract.json when $OUT is set)")
    p.add_argument("--_port_worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device != "cpu" and args.dtype[0] != "float32":
        args.dtype = ["float32"] + [d for d in args.dtype if d != "float32"]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args._port_worker:
        return port_worker(args)
    if importlib.util.find_spec("vsl") is None:          # running from a checkout that is not installed
        sys.path.insert(0, str(HERE.parents[0] / "src"))
    sys.path.insert(0, str(HERE))
    return run_cpu(args) if args.device == "cpu" else run_cuda(args)


if __name__ == "__main__":
    sys.exit(main())
