"""Checkpoint loading: published format through the safe loader, our format, clear errors."""
import argparse
import pickle

import numpy as np
import pytest
import torch

import vsl
from vsl.checkpoint import read_checkpoint, save_checkpoint
from vsl.config import Config
from vsl.errors import CheckpointError
from vsl.models import build_model


def test_published_checkpoint_options_rebuild_model(fixtures_dir):
    ckpt = read_checkpoint(fixtures_dir / "SAF_checkpoint.pth.tar")
    cfg = ckpt["config"]
    assert ckpt["format"] == "published"
    assert (cfg.module_name, cfg.img_dim, cfg.embed_size, cfg.sim_dim, cfg.vocab_size) == ("SAF", 64, 32, 16, 40)
    assert ckpt["epoch"] == 7 and ckpt["iteration"] == 4321 and ckpt["best_rsum"] == pytest.approx(123.4)


def test_roundtrip_own_format_is_plain_data(tmp_path, fixtures_dir):
    model = vsl.load_checkpoint(fixtures_dir / "SGR_checkpoint.pth.tar")
    path = save_checkpoint(tmp_path / "m.pth.tar", model, epoch=3, iteration=17, best_rsum=1.5,
                           extra={"note": "x", "rng": torch.get_rng_state()})
    # Loadable with the strictest loader and no allow-list: no pickled classes inside.
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "vsl-1" and isinstance(raw["config"], dict)
    again = vsl.load_checkpoint(path)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    info = read_checkpoint(path)
    assert (info["epoch"], info["iteration"], info["best_rsum"]) == (3, 17, 1.5)
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_file_gives_one_line_error(tmp_path, fixtures_dir):
    data = (fixtures_dir / "SGR_checkpoint.pth.tar").read_bytes()
    bad = tmp_path / "cut.pth.tar"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        vsl.load_checkpoint(bad)
    msg = str(err.value)
    assert str(bad) in msg and "\n" not in msg


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt"):
        vsl.load_checkpoint(bad)
    np.save(tmp_path / "arr.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match="arr.npy"):
        vsl.load_checkpoint(tmp_path / "arr.npy")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="other.pth"):
        vsl.load_checkpoint(tmp_path / "other.pth")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        vsl.load_checkpoint(tmp_path / "nope.pth.tar")


class Evil:
    """An arbitrary class: the loader must never unpickle it."""


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({"model": [{}, {}, {}], "opt": argparse.Namespace(), "evil": Evil()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="evil.pth.tar"):
        vsl.load_checkpoint(path)


def test_state_dict_that_does_not_fit(tmp_path, fixtures_dir):
    ckpt = torch.load(fixtures_dir / "SGR_checkpoint.pth.tar", weights_only=False)
    ckpt["opt"].embed_size = 48  # options now disagree with the weights
    path = tmp_path / "mismatch.pth.tar"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as err:
        vsl.load_checkpoint(path)
    assert "mismatch.pth.tar" in str(err.value) and "\n" not in str(err.value)


def test_fresh_model_config_roundtrip(tmp_path):
    cfg = Config(module_name="SAF", img_dim=8, word_dim=4, embed_size=6, sim_dim=5, vocab_size=11)
    model = build_model(cfg)
    save_checkpoint(tmp_path / "a.pth.tar", model)
    assert read_checkpoint(tmp_path / "a.pth.tar")["config"] == cfg


def test_refusals_name_the_reason_without_torchs_unsafe_advice(tmp_path):
    """The one-line error says what is wrong with the file, not how to load it unsafely."""
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"garbage\n")
    with pytest.raises(CheckpointError) as err:
        vsl.load_checkpoint(garbage)
    assert "garbage.pth.tar" in str(err.value) and "weights_only" not in str(err.value)
    evil = tmp_path / "evil.pth.tar"
    torch.save({"model": [{}, {}, {}], "evil": Evil()}, evil)
    with pytest.raises(CheckpointError) as err:
        vsl.load_checkpoint(evil)
    msg = str(err.value)
    assert "Evil" in msg and "weights_only" not in msg and "\n" not in msg
