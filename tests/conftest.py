"""Shared test fixtures and helpers (import helpers with ``from conftest import ...``).

Tests that need the real COCO captions and published vocabularies read them from the folder named
by ``VSL_DATA_DIR`` (``.ci/run`` points it at ``../shared/data``), and the published pipeline's outputs
on them (golden tokens) from ``fixtures/reference`` beside that folder; without it they are skipped
with the reason shown in pytest's summary.
"""
import importlib.util
import os
import sys
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch

from vsl.data import Vocabulary

FIXTURES = Path(__file__).parent / "fixtures"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
DATA_ENV = "VSL_DATA_DIR"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real-data folder (``coco_precomp/``, ``vocab/``), or skip with the reason."""
    value = os.environ.get(DATA_ENV)
    if not value:
        pytest.skip(f"real captions/vocabularies not available: set {DATA_ENV} to the shared data folder")
    path = Path(value)
    if not (path / "vocab").is_dir() or not (path / "coco_precomp").is_dir():
        pytest.skip(f"{DATA_ENV}={value} does not hold vocab/ and coco_precomp/")
    return path


@pytest.fixture(scope="session")
def shared_reference_dir(shared_data_dir) -> Path:
    """``fixtures/reference`` of the shared folder (beside the data folder), or skip with the reason."""
    path = shared_data_dir.parent / "fixtures" / "reference"
    if not path.is_dir():
        pytest.skip(f"{DATA_ENV}={shared_data_dir}: no golden fixtures folder {path}")
    return path


# ------------------------------------------------------------------------------------------------
# A learnable SCAN-layout dataset and checkpoint comparisons (training, evaluation, distributed tests)
# ------------------------------------------------------------------------------------------------
COLORS = ("red", "blue", "green", "white")
OBJECTS = ("dog", "cat", "car", "bus", "man", "tree", "boat", "bird")
GRAMMAR_WORDS = COLORS + OBJECTS + ("a", "and", "near")


def write_scan_dataset(root: Path, data_name: str, splits: dict, img_dim: int = 16, num_regions: int = 16,
                       extra_words: int = 0, seed: int = 0) -> dict:
    """A learnable dataset in the SCAN layout: ``root/data/{data_name}/{split}_ims.npy``/``_caps.txt``
    and ``root/vocab/{data_name}_vocab.json``.

    Every image shows two coloured objects; half of its regions are the first object's prototype
    (+ colour, + noise), half the second's; its 5 captions name both ("a red dog and a blue car").
    The vocabulary has the grammar's words plus ``extra_words`` unused fillers.
    """
    rng = np.random.default_rng(seed)
    objects = rng.normal(size=(len(OBJECTS), img_dim))
    colors = rng.normal(size=(len(COLORS), img_dim)) * 0.5
    folder = root / "data" / data_name
    folder.mkdir(parents=True, exist_ok=True)
    half = num_regions // 2
    for split, n in splits.items():
        obj = rng.integers(0, len(OBJECTS), size=(n, 2))
        col = rng.integers(0, len(COLORS), size=(n, 2))
        parts = objects[obj] + colors[col]                                     # (n, 2, dim)
        feats = np.repeat(parts, [half, num_regions - half], axis=1)           # (n, R, dim)
        feats = (feats + rng.normal(size=feats.shape) * 0.3).astype(np.float32)
        np.save(folder / f"{split}_ims.npy", feats)
        first = [f"a {COLORS[c]} {OBJECTS[o]}" for o, c in zip(obj[:, 0], col[:, 0])]
        second = [f"a {COLORS[c]} {OBJECTS[o]}" for o, c in zip(obj[:, 1], col[:, 1])]
        captions = [f"{a} and {b}" if k % 2 == 0 else f"{b} near {a}"
                    for a, b in zip(first, second) for k in range(5)]
        (folder / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    words = list(GRAMMAR_WORDS) + [f"filler{i}" for i in range(extra_words)]
    Vocabulary(words).to_json(root / "vocab" / f"{data_name}_vocab.json")
    return {"data_path": str(root / "data"), "vocab_path": str(root / "vocab"), "data_name": data_name,
            "vocab_size": len(words) + 4}


def chance_rsum(num_images: int, captions_per_image: int = 5) -> float:
    """Expected rsum of random scores: i2t R@K = P(one of the 5 right captions in the top K)."""
    m = num_images * captions_per_image
    i2t = [1 - comb(m - captions_per_image, k) / comb(m, k) for k in (1, 5, 10)]
    t2i = [k / num_images for k in (1, 5, 10)]
    return 100 * (sum(i2t) + sum(t2i))


def states_equal(a: dict, b: dict) -> bool:
    """The three state dicts of two checkpoints hold bit-identical tensors."""
    return all(sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
               for sa, sb in zip(a["model"], b["model"]))


def optimizer_states_equal(a: dict, b: dict) -> bool:
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[p][k], sb[p][k]) for p in sa for k in sa[p])


@pytest.fixture(scope="module")
def single_thread():
    """The models here are tiny: one intra-op thread is faster than two fighting over the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_benchmark(name: str):
    """Import ``benchmarks/{name}.py`` as a module (benchmarks are scripts, not a package)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))          # for their ``from common import ...``
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
