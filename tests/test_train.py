"""Training loop: schedule, RNG checkpointing, and the end-to-end acceptance test.

End to end (issue 4): generate a small SCAN-layout dataset, train 2 epochs on CPU through the
``vsl train`` command line with the published flags, resume a second run from the first run's
epoch-1 checkpoint and get bit-identical final weights, then ``vsl eval`` the result: rsum well
above chance, JSON written. A second, smaller pair of runs injects a NaN loss mid-epoch: the run
stops with a one-line error, the last good (mid-epoch) checkpoint is intact, and resuming from it
again reproduces the uninterrupted run exactly, logs included.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    chance_rsum,
    optimizer_states_equal,
    states_equal,
    write_scan_dataset,
)

from vsl import metrics
from vsl.checkpoint import read_checkpoint
from vsl.cli import main
from vsl.config import Config
from vsl.logs import read_metrics
from vsl.train import learning_rate, rng_state, set_rng_state

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------
def test_learning_rate_steps_down_every_lr_update_epochs_with_optional_warmup():
    config = Config(learning_rate=0.0003, lr_update=10, vocab_size=10)
    assert [learning_rate(config, e, 10_000) for e in (0, 9, 10, 19, 20)] == pytest.approx(
        [3e-4, 3e-4, 3e-5, 3e-5, 3e-6])
    warm = config.replace(warmup_iters=4)
    assert [learning_rate(warm, 0, i) for i in range(5)] == pytest.approx([0.75e-4, 1.5e-4, 2.25e-4, 3e-4, 3e-4])


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    torch.save({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


# ------------------------------------------------------------------------------------------------
# End to end: 2 epochs through `vsl train` with the published flags, resume, `vsl eval`
# ------------------------------------------------------------------------------------------------
TRAIN_IMAGES, TEST_IMAGES, BATCH = 100, 100, 8
STEPS_PER_EPOCH = TRAIN_IMAGES * 5 // BATCH + 1          # 63 (the last batch holds 4 captions)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    return write_scan_dataset(root, "easy_precomp", {"train": TRAIN_IMAGES, "dev": 20, "test": TEST_IMAGES})


def published_flags(data: dict, out: Path) -> list:
    return ["--data_path", data["data_path"], "--vocab_path", data["vocab_path"], "--data_name", data["data_name"],
            "--batch_size", str(BATCH), "--num_epochs", "2", "--lr_update", "10", "--learning_rate", "0.004",
            "--module_name", "SGR", "--img_dim", "16", "--num_regions", "16", "--word_dim", "16",
            "--embed_size", "32", "--sim_dim", "16", "--num_layers", "1", "--sgr_step", "3", "--workers", "0",
            "--log_step", "5", "--val_step", "40", "--margin", "0.2", "--grad_clip", "2.0",
            "--max_violation",                 # published meaning: hardest negatives OFF (learns faster here)
            "--seed", "1", "--device", "cpu",
            "--model_name", str(out / "ckpt"), "--logger_name", str(out / "log")]


@pytest.fixture(scope="module")
def run_a(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a")
    assert main(["train", *published_flags(dataset, out)]) == 0
    return out


@pytest.mark.slow
def test_training_writes_checkpoints_and_logs(run_a):
    ckpt = run_a / "ckpt"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["checkpoint_1.pth.tar", "checkpoint_2.pth.tar", "checkpoint_last.pth.tar",
                     "model_best.pth.tar"]                  # no temporary files left behind
    last = read_checkpoint(ckpt / "checkpoint_2.pth.tar")
    assert (last["epoch"], last["iteration"]) == (2, 2 * STEPS_PER_EPOCH)
    assert last["extra"]["batch"] == 0 and last["optimizer"] is not None
    config = last["config"]
    assert config.max_violation is False and config.vocab_size == 19 and config.img_dim == 16
    records = read_metrics(run_a / "log")
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert {"loss", "triplet", "vsl", "lr"} <= set(train[0]) and train[0]["lr"] == pytest.approx(0.004)
    assert all(r["loss"] == pytest.approx(r["triplet"] + r["vsl"], rel=1e-5) for r in train)
    assert [r["step"] for r in val] == [40, STEPS_PER_EPOCH, 80, 120, 2 * STEPS_PER_EPOCH]
    assert last["best_rsum"] == pytest.approx(max(r["rsum"] for r in val))
    assert train[-1]["loss"] < train[0]["loss"]
    assert list((run_a / "log").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_from_epoch_1_checkpoint_reproduces_the_uninterrupted_run(run_a, tmp_path):
    # Only the output folders are given: every other option comes from the checkpoint.
    rc = main(["train", "--resume", str(run_a / "ckpt" / "checkpoint_1.pth.tar"), "--quiet",
               "--model_name", str(tmp_path / "ckpt"), "--logger_name", str(tmp_path / "log")])
    assert rc == 0
    expected = read_checkpoint(run_a / "ckpt" / "checkpoint_2.pth.tar")
    resumed = read_checkpoint(tmp_path / "ckpt" / "checkpoint_2.pth.tar")
    assert states_equal(resumed, expected)
    assert optimizer_states_equal(resumed, expected)
    assert (resumed["iteration"], resumed["best_rsum"]) == (expected["iteration"], expected["best_rsum"])
    assert not (tmp_path / "ckpt" / "checkpoint_1.pth.tar").exists()


@pytest.mark.slow
def test_eval_of_the_trained_model_is_well_above_chance(run_a, dataset, tmp_path, capsys):
    out, sims_path = tmp_path / "result.json", tmp_path / "sims.npy"
    rc = main(["eval", "--checkpoint", str(run_a / "ckpt" / "checkpoint_2.pth.tar"), "--data_path",
               dataset["data_path"], "--split", "test", "--protocol", "full", "--output", str(out),
               "--save_sims", str(sims_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["i2t"]) == set(result["t2i"]) == {"r1", "r5", "r10", "medr", "meanr"}
    assert result["rsum"] > 3 * chance_rsum(TEST_IMAGES)          # chance: about 31.6
    sims = np.load(sims_path)
    assert sims.shape == (TEST_IMAGES, 5 * TEST_IMAGES) and sims.dtype == np.float32
    assert metrics.retrieval_metrics(sims)["rsum"] == pytest.approx(result["rsum"])
    assert f"{result['rsum']:.1f}" in printed


# ------------------------------------------------------------------------------------------------
# NaN loss: clear stop, intact checkpoint, exact mid-epoch resume
# ------------------------------------------------------------------------------------------------
class PoisonAt:
    """Wraps VSLObjective so that its ``n``-th call (1-based) returns a NaN loss."""

    def __init__(self, n):
        from vsl.losses import VSLObjective
        self.base, self.n, self.calls = VSLObjective, n, 0

    def __call__(self, *args, **kwargs):
        objective = self.base(*args, **kwargs)
        forward, owner = objective.forward, self

        def poisoned(*a, **k):
            owner.calls += 1
            out = forward(*a, **k)
            if owner.calls == owner.n:
                out["loss"] = out["loss"] * float("nan")
            return out
        objective.forward = poisoned
        return objective


def small_flags(data: dict, out: Path) -> list:
    return ["--data_path", data["data_path"], "--vocab_path", data["vocab_path"], "--data_name", data["data_name"],
            "--batch_size", "8", "--num_epochs", "2", "--img_dim", "16", "--num_regions", "16", "--word_dim", "8",
            "--embed_size", "16", "--sim_dim", "8", "--workers", "0", "--log_step", "1", "--val_step", "4",
            "--semantic", "cider", "--textual_semantic_loss", "--seed", "7", "--device", "cpu", "--quiet",
            "--model_name", str(out / "ckpt"), "--logger_name", str(out / "log")]


@pytest.mark.slow
def test_nan_loss_stops_cleanly_and_mid_epoch_resume_is_exact(tmp_path, monkeypatch, capsys):
    import vsl.train.trainer

    data = write_scan_dataset(tmp_path / "data", "tiny_precomp", {"train": 20, "dev": 10}, seed=3)
    assert main(["train", *small_flags(data, tmp_path / "full")]) == 0     # 13 batches per epoch

    monkeypatch.setattr(vsl.train.trainer, "VSLObjective", PoisonAt(7))
    broken = tmp_path / "broken"
    assert main(["train", *small_flags(data, broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("vsl: error:") and "loss is nan" in err
    assert "checkpoint_last.pth.tar is intact" in err
    last = read_checkpoint(broken / "ckpt" / "checkpoint_last.pth.tar")    # written at iteration 4
    assert (last["epoch"], last["extra"]["batch"], last["iteration"]) == (0, 4, 4)
    assert sorted(p.name for p in (broken / "ckpt").iterdir()) == ["checkpoint_last.pth.tar", "model_best.pth.tar"]

    monkeypatch.undo()
    assert main(["train", "--resume", str(broken / "ckpt" / "checkpoint_last.pth.tar"), "--quiet"]) == 0
    expected = read_checkpoint(tmp_path / "full" / "ckpt" / "checkpoint_2.pth.tar")
    resumed = read_checkpoint(broken / "ckpt" / "checkpoint_2.pth.tar")
    assert states_equal(resumed, expected) and optimizer_states_equal(resumed, expected)
    # The resumed log reads as if the run had never stopped (the interrupted tail is dropped).
    strip = [({k: v for k, v in r.items() if k != "time"}) for r in read_metrics(tmp_path / "full" / "log")]
    again = [({k: v for k, v in r.items() if k != "time"}) for r in read_metrics(broken / "log")]
    assert again == strip
    assert {"tsl", "vsl", "triplet"} <= set(strip[0])


def test_output_folder_that_is_a_file_fails_at_once_creating_nothing(dataset, tmp_path, capsys):
    (tmp_path / "ckpt").write_text("not a folder")
    rc = main(["train", *published_flags(dataset, tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "ckpt" in err and "not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]      # no log folder left behind
