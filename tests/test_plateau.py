"""The plateau of constant scores (issue 15): the negatives warm-up, ``--fast_start``, detection and stop.

* ``--negatives_warmup_epochs K`` sums the hinge over all negatives for K epochs, then takes the
  hardest; a run resumed across the switch equals the uninterrupted one bit for bit.
* :class:`vsl.train.plateau.PlateauDetector` on made-up log steps: a collapsed streak is detected
  after ``log_steps`` steps and announced once; a learning run's steps never are.
* End to end with tiny models: a run that collapses (hardest negatives at a high learning rate)
  warns once, logs a ``plateau`` event and, with ``--stop_on_plateau``, stops cleanly with a
  resumable checkpoint; runs that learn (all negatives; hardest negatives after the warm-up) are
  never flagged.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_train import optimizer_states_equal, single_thread, states_equal, write_scan_dataset  # noqa: F401
from vsl.checkpoint import read_checkpoint
from vsl.cli import build_parser, main, train_config
from vsl.config import FAST_START, Config, preset
from vsl.errors import ConfigError
from vsl.logs import read_metrics
from vsl.train.plateau import LEFT_FRACTION, PlateauDetector, collapsed_triplet, left_plateau
from vsl.train.trainer import hardest_negatives


def tiny_flags(data: dict, out: Path, *extra: str) -> list:
    """A run of seconds: 8-dimensional model, batch 8, log every step."""
    return ["train", "--data_path", data["data_path"], "--vocab_path", data["vocab_path"],
            "--data_name", data["data_name"], "--batch_size", "8", "--num_epochs", "2", "--img_dim", "16",
            "--num_regions", "16", "--word_dim", "8", "--embed_size", "16", "--sim_dim", "8", "--workers", "0",
            "--log_step", "1", "--val_step", "0", "--vsl_weight", "0", "--seed", "7", "--device", "cpu", "--quiet",
            "--model_name", str(out / "ckpt"), "--logger_name", str(out / "log"), *extra]


def train_events(log_dir: Path) -> list:
    return [r for r in read_metrics(log_dir) if r["split"] == "train"]


# ------------------------------------------------------------------------------------------------
# The negatives warm-up and --fast_start
# ------------------------------------------------------------------------------------------------
def test_negatives_warmup_sums_for_k_epochs_then_takes_the_hardest():
    config = Config(vocab_size=10, negatives_warmup_epochs=2)
    assert [hardest_negatives(config, e) for e in range(4)] == [False, False, True, True]
    assert [hardest_negatives(Config(vocab_size=10), e) for e in range(2)] == [True, True]     # the paper
    assert not any(hardest_negatives(config.replace(max_violation=False), e) for e in range(4))
    with pytest.raises(ConfigError, match="negatives_warmup_epochs must be >= 0"):
        Config(negatives_warmup_epochs=-1)
    with pytest.raises(ConfigError, match="stop_on_plateau must be >= 0"):
        Config(stop_on_plateau=-5)


def test_fast_start_fills_its_options_and_explicit_flags_still_win():
    parser = build_parser()
    paper = train_config(parser.parse_args(["train", "--preset", "coco-sgr"]))
    assert (paper.negatives_warmup_epochs, paper.warmup_iters, paper.learning_rate) == (0, 0, 3e-4)
    fast = train_config(parser.parse_args(["train", "--preset", "coco-sgr", "--fast_start"]))
    assert {k: getattr(fast, k) for k in FAST_START} == FAST_START and fast.module_name == "SGR"
    mixed = train_config(parser.parse_args(["train", "--fast_start", "--learning_rate", "0.001"]))
    assert mixed.learning_rate == 0.001 and mixed.negatives_warmup_epochs == FAST_START["negatives_warmup_epochs"]
    assert preset("f30k-saf", fast_start=True).to_dict() == {**preset("f30k-saf").to_dict(), **FAST_START}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_scan_dataset(tmp_path_factory.mktemp("tiny"), "tiny_precomp", {"train": 20, "dev": 5}, seed=3)


@pytest.mark.slow
def test_resume_across_the_negatives_switch_equals_the_uninterrupted_run(tiny_data, tmp_path):
    full, resumed, paper = tmp_path / "full", tmp_path / "resumed", tmp_path / "paper"
    assert main(tiny_flags(tiny_data, full, "--negatives_warmup_epochs", "1")) == 0     # 13 batches per epoch
    # The resumed process never ran epoch 1: it must take the hardest negative from the options alone.
    assert main(["train", "--resume", str(full / "ckpt" / "checkpoint_1.pth.tar"), "--quiet",
                 "--model_name", str(resumed / "ckpt"), "--logger_name", str(resumed / "log")]) == 0
    expected = read_checkpoint(full / "ckpt" / "checkpoint_2.pth.tar")
    got = read_checkpoint(resumed / "ckpt" / "checkpoint_2.pth.tar")
    assert got["config"].negatives_warmup_epochs == 1
    assert states_equal(got, expected) and optimizer_states_equal(got, expected)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows if r["epoch"] == 1]  # noqa: E731
    assert strip(train_events(resumed / "log")) == strip(train_events(full / "log"))

    # The warm-up did change the objective: epoch 1 sums over the 7 negatives, epoch 2 takes one.
    assert main(tiny_flags(tiny_data, paper, "--num_epochs", "1")) == 0
    warm, hard = train_events(full / "log"), train_events(paper / "log")
    assert warm[0]["triplet"] > 4 * hard[0]["triplet"]
    assert not states_equal(read_checkpoint(full / "ckpt" / "checkpoint_1.pth.tar"),
                            read_checkpoint(paper / "ckpt" / "checkpoint_1.pth.tar"))
    first, second = [r for r in warm if r["epoch"] == 0], [r for r in warm if r["epoch"] == 1]
    assert min(r["triplet"] for r in first) > max(r["triplet"] for r in second)
