"""Features simulated from real captions (vsl.demo.simulate): layout, determinism, main words dominating."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from vsl.data import PrecompDataset, Vocabulary, vocab_file
from vsl.demo.simulate import FUNCTION_WORDS, SimSpec, mention_matrix, region_words, simulate_from_captions
from vsl.errors import ConfigError, DataError

# 12 images: every caption names "dog" (a main word), one caption per image also names a rare word.
RARE = ("kite", "bench", "ball", "cake")
CAPTIONS = [f"a {'brown ' if k % 2 else ''}dog on the grass" + (f" with a {RARE[i % 4]}" if k == 0 else "")
            for i in range(12) for k in range(5)]


def write_captions(path, captions):
    path.write_text("\n".join(captions) + "\n")
    return path


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_main_words_own_most_regions_and_function_words_none():
    vocab = Vocabulary.build(CAPTIONS, threshold=1)
    mentions = mention_matrix(CAPTIONS, vocab)
    assert mentions.shape == (12, len(vocab))
    row = dict(zip((vocab.idx2word[i] for i in mentions[0].indices), mentions[0].data))
    assert row == {"dog": 5, "grass": 5, "brown": 2, "kite": 1}            # "a", "on", "the", "with": none
    assert not FUNCTION_WORDS & set(row)
    spec = SimSpec(num_regions=36, background_regions=6, main_power=2.0)
    words = region_words(mentions, spec, np.random.default_rng(0))
    assert words.shape == (12, 30)
    share = {w: float(np.mean(words == vocab(w))) for w in ("dog", "grass", "brown", "kite")}
    # Expected shares 25/55, 25/55, 4/55, 1/55 per region (mentions squared).
    assert share["dog"] > 0.35 and share["grass"] > 0.35 and share["kite"] < 0.06
    assert share["dog"] > 5 * share["kite"]
    # Every region's word is one of its own image's content words.
    for i in range(12):
        assert set(words[i]) <= set(mentions[i].indices)


def test_simulated_dataset_is_deterministic_and_loads(tmp_path):
    caps = write_captions(tmp_path / "caps.txt", CAPTIONS)
    spec = SimSpec(train_images=8, dev_images=2, test_images=2, img_dim=16, vocab_threshold=1)
    info = simulate_from_captions([caps], tmp_path / "a", spec)
    simulate_from_captions([caps], tmp_path / "b", spec)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    simulate_from_captions([caps], tmp_path / "c", SimSpec(seed=1, train_images=8, dev_images=2, test_images=2,
                                                            img_dim=16, vocab_threshold=1))
    assert digest(tmp_path / "a") != digest(tmp_path / "c")            # the seed matters
    vocab = Vocabulary.from_json(vocab_file(info["vocab_path"], info["data_name"]))
    splits = {s: PrecompDataset(info["data_path"], info["data_name"], s, vocab) for s in ("train", "dev", "test")}
    assert [d.num_images for d in splits.values()] == [8, 2, 2]
    assert splits["train"].images.shape == (8, 36, 16) and splits["train"].images.dtype == np.float32
    assert (np.asarray(splits["train"].images) >= 0).all()
    # Every image's 5 captions stay together and each caption is used once over the splits.
    used = sorted(c for d in splits.values() for c in d.captions)
    assert used == sorted(CAPTIONS)


def test_bad_requests_are_one_line_errors(tmp_path):
    caps = write_captions(tmp_path / "caps.txt", CAPTIONS[:7])
    with pytest.raises(DataError, match="expected 5 per image"):
        simulate_from_captions([caps], tmp_path / "x", SimSpec(train_images=1, dev_images=1, test_images=1))
    caps = write_captions(tmp_path / "caps.txt", CAPTIONS)
    with pytest.raises(ConfigError, match="13 images asked for, the caption files hold 12"):
        simulate_from_captions([caps], tmp_path / "x", SimSpec(train_images=11, dev_images=1, test_images=1))
    with pytest.raises(ConfigError, match="background_regions"):
        SimSpec(background_regions=36)


def test_simulated_from_the_real_coco_captions(shared_data_dir, tmp_path):
    files = [shared_data_dir / "coco_precomp" / name for name in ("dev_caps.txt", "testall_caps.txt")]
    spec = SimSpec(train_images=200, dev_images=20, test_images=20, img_dim=32)
    info = simulate_from_captions(files, tmp_path, spec)
    vocab = Vocabulary.from_json(vocab_file(info["vocab_path"], info["data_name"]))
    train = PrecompDataset(info["data_path"], info["data_name"], "train", vocab)
    assert train.images.shape == (200, 36, 32) and len(train.captions) == 1000
    assert info["vocab_size"] == len(vocab) > 100
