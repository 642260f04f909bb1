"""The loading layer (vsl.runtime): one way to load a checkpoint for use, open a split, encode in batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_scan_dataset
from vsl.errors import CheckpointError, FitError
from vsl.runtime import (caption_batches, encode_split, image_batches, load_for_use, pad_token_ids,
                         padded_words)

NUM_IMAGES = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    return write_scan_dataset(root, "coco_precomp", {"test": NUM_IMAGES}, img_dim=64, num_regions=36,
                              extra_words=21, seed=3)


@pytest.fixture(scope="module")
def loaded(fixtures_dir, data):
    return load_for_use(fixtures_dir / "SGR_checkpoint.pth.tar", torch.device("cpu"), data["vocab_path"],
                        precision="fp32", score_chunk=None)


def test_load_for_use_gives_an_eval_model_its_vocabulary_and_options(loaded, fixtures_dir, data):
    assert not loaded.model.training and loaded.config.precision == "fp32" and len(loaded.vocab) == 40
    with pytest.raises(CheckpointError, match="vsl fit-shortlist"):
        load_for_use(fixtures_dir / "SGR_checkpoint.pth.tar", torch.device("cpu"), data["vocab_path"], shortlist=True)


def test_open_split_checks_the_model_and_encodes_its_captions(loaded, data, tmp_path):
    opened = loaded.open_split(data["data_path"], "test")
    assert opened.images.shape == (NUM_IMAGES, 36, 64) and len(opened.token_ids) == 5 * NUM_IMAGES
    assert opened.token_ids[0] == loaded.vocab.encode(opened.dataset.captions[0])
    other = write_scan_dataset(tmp_path, "coco_precomp", {"test": 2}, img_dim=32, num_regions=36, extra_words=21)
    with pytest.raises(FitError, match="img_dim 64 does not match the 32"):
        loaded.open_split(other["data_path"], "test")


@torch.inference_mode()
def test_the_batched_encoders_match_one_call_and_the_collected_split(loaded, data):
    opened = loaded.open_split(data["data_path"], "test")
    model, images = loaded.model, opened.images
    whole = model.encode_images(torch.from_numpy(np.array(images, dtype=np.float32)))
    parts = list(image_batches(model, images, batch_size=4))
    assert [(i, j) for i, j, _ in parts] == [(0, 4), (4, 6)]
    assert torch.allclose(torch.cat([e for _, _, e in parts]), whole, atol=1e-6)
    rows = np.array([5, 1])
    picked = [e for _, _, e in image_batches(model, images, rows=rows, batch_size=8)]
    assert torch.allclose(picked[0], whole[rows], atol=1e-6)
    ids, lengths = pad_token_ids(opened.token_ids)
    spans = [(i, j, e.shape[1], int(lens.max())) for i, j, e, lens in caption_batches(model, ids, lengths, batch_size=7)]
    assert spans[0][:2] == (0, 7) and spans[-1][1] == len(lengths) and all(w == m for *_, w, m in spans)
    emb = encode_split(model, images, opened.token_ids, batch_size=4, progress=False)
    assert torch.equal(emb.images, torch.cat([e for _, _, e in parts]).float()) and torch.equal(emb.lengths, lengths)


def test_padded_words_gathers_packed_captions():
    words = np.arange(20, dtype=np.float32).reshape(10, 2)
    out = padded_words(words, np.array([0, 4]), np.array([3, 2]))
    assert out.shape == (2, 3, 2) and out[1, 2].tolist() == [0.0, 0.0] and out[1, 0].tolist() == [8.0, 9.0]
