"""The plateau of constant scores (issue 15): the negatives warm-up, ``--fast_start``, detection and stop.

* ``--negatives_warmup_epochs K`` sums the hinge over all negatives for K epochs, then takes the
  hardest; a run resumed across the switch equals the uninterrupted one bit for bit.
* :class:`vsl.train.plateau.PlateauDetector` on made-up log steps: a collapsed streak is detected
  after ``log_steps`` steps and announced once; a learning run's steps never are.
* Issue 22: the logged values of a run that never left the plateau (its table, replayed) are
  detected by iteration 100, the epoch's short last batch neither fires nor resets the count; the
  logged values of runs that sit at the collapsed value and then leave it are not; end to end, the
  issue's run on features simulated from the real COCO captions warns by iteration 100 and
  ``--stop_on_plateau 40`` stops it in its second epoch, while the first epoch of the fast start
  on ``cocosim`` (at the collapsed value for 80 iterations) and of the demo recipe on the demo
  data are not flagged.
* End to end with tiny models: a run that collapses (hardest negatives at a high learning rate)
  warns once, logs a ``plateau`` event and, with ``--stop_on_plateau``, stops cleanly with a
  resumable checkpoint; runs that learn (all negatives; hardest negatives after the warm-up) are
  never flagged.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import optimizer_states_equal, states_equal, write_scan_dataset
from vsl.checkpoint import read_checkpoint
from vsl.cli import build_parser, main, train_config
from vsl.config import FAST_START, Config, preset
from vsl.errors import ConfigError
from vsl.logs import read_metrics
from vsl.train.plateau import LEFT_FRACTION, SPREAD, PlateauDetector, collapsed_triplet, left_plateau
from vsl.train.trainer import hardest_negatives, learning_rate


pytestmark = pytest.mark.usefixtures("single_thread")


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
    with pytest.raises(ConfigError, match="negatives_warmup_lr must be positive"):
        Config(negatives_warmup_lr=0.0)


def test_the_negatives_warmup_has_its_own_learning_rate():
    config = Config(vocab_size=10, learning_rate=3e-4, lr_update=10, negatives_warmup_epochs=1,
                    negatives_warmup_lr=4e-3, warmup_iters=4)
    assert [learning_rate(config, 0, i) for i in (0, 1, 3, 50)] == pytest.approx([1e-3, 2e-3, 4e-3, 4e-3])
    assert [learning_rate(config, e, 500) for e in (1, 9, 10)] == pytest.approx([3e-4, 3e-4, 3e-5])
    assert learning_rate(config.replace(negatives_warmup_lr=None), 0, 50) == pytest.approx(3e-4)


def test_fast_start_fills_its_options_and_explicit_flags_still_win():
    parser = build_parser()
    paper = train_config(parser.parse_args(["train", "--preset", "coco-sgr"]))
    assert (paper.negatives_warmup_epochs, paper.warmup_iters, paper.learning_rate) == (0, 0, 3e-4)
    fast = train_config(parser.parse_args(["train", "--preset", "coco-sgr", "--fast_start"]))
    assert {k: getattr(fast, k) for k in FAST_START} == FAST_START and fast.module_name == "SGR"
    mixed = train_config(parser.parse_args(["train", "--fast_start", "--negatives_warmup_lr", "0.001"]))
    assert mixed.negatives_warmup_lr == 0.001 and mixed.negatives_warmup_epochs == FAST_START["negatives_warmup_epochs"]
    assert mixed.learning_rate == 3e-4                   # after the warm-up: the paper's rate
    assert preset("f30k-saf", fast_start=True).to_dict() == {**preset("f30k-saf").to_dict(), **FAST_START}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_scan_dataset(tmp_path_factory.mktemp("tiny"), "tiny_precomp", {"train": 20, "dev": 5}, seed=3)


@pytest.mark.slow
def test_resume_across_the_negatives_switch_equals_the_uninterrupted_run(tiny_data, tmp_path):
    full, resumed, paper = tmp_path / "full", tmp_path / "resumed", tmp_path / "paper"
    warmup = ("--negatives_warmup_epochs", "1", "--negatives_warmup_lr", "0.003")
    assert main(tiny_flags(tiny_data, full, *warmup)) == 0     # 13 batches per epoch
    # The resumed process never ran epoch 1: it must take the hardest negative from the options alone.
    assert main(["train", "--resume", str(full / "ckpt" / "checkpoint_1.pth.tar"), "--quiet",
                 "--model_name", str(resumed / "ckpt"), "--logger_name", str(resumed / "log")]) == 0
    expected = read_checkpoint(full / "ckpt" / "checkpoint_2.pth.tar")
    got = read_checkpoint(resumed / "ckpt" / "checkpoint_2.pth.tar")
    assert (got["config"].negatives_warmup_epochs, got["config"].negatives_warmup_lr) == (1, 0.003)
    assert {r["lr"] for r in train_events(resumed / "log")} == {3e-4}
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


# ------------------------------------------------------------------------------------------------
# Detection on made-up log steps
# ------------------------------------------------------------------------------------------------
B, MARGIN = 64, 0.2
FLAT = collapsed_triplet(B, MARGIN, hardest=True)               # 2 * B * margin = 25.6


def test_collapsed_values_and_the_exit_criterion():
    assert FLAT == pytest.approx(25.6)
    assert collapsed_triplet(B, MARGIN, hardest=False) == pytest.approx(2 * B * (B - 1) * MARGIN)
    # Equal scores give exactly the collapsed value, both ways.
    from vsl.losses import triplet_loss
    scores = torch.full((B, B), 0.37)
    for hardest in (True, False):
        assert float(triplet_loss(scores, MARGIN, hardest)) == pytest.approx(collapsed_triplet(B, MARGIN, hardest))
    assert not left_plateau(FLAT * 0.95, B, MARGIN, True) and left_plateau(FLAT * LEFT_FRACTION * 0.99, B, MARGIN, True)


def test_a_collapsed_streak_is_detected_after_log_steps_and_announced_once():
    detector = PlateauDetector(spread=5e-4, log_steps=3)          # std <= 1e-4 at margin 0.2
    found = [detector.update(step, FLAT * 1.001, 2e-6, B, MARGIN, True) for step in (10, 20, 30, 40, 50)]
    assert found[:2] == [None, None]
    assert [(p.since, p.step, p.iterations) for p in found[2:]] == [(10, 30, 20), (10, 40, 30), (10, 50, 40)]
    assert [detector.announce() for _ in range(3)] == [True, False, False]
    # One step that is not collapsed ends the streak; the next plateau is announced again.
    assert detector.update(60, FLAT * 0.8, 2e-6, B, MARGIN, True) is None
    again = [detector.update(step, FLAT, 1e-7, B, MARGIN, True) for step in (70, 80, 90)]
    assert again[-1].since == 70 and detector.announce()
    # The last, smaller batch of an epoch and the all-negatives sum have their own collapsed values.
    sum_flat = collapsed_triplet(24, MARGIN, hardest=False)
    assert detector.collapsed(sum_flat, 1e-6, 24, MARGIN, False) and not detector.collapsed(FLAT, 1e-6, 24, MARGIN, False)
    assert "plateau" in again[-1].warning(1e-4) and "--fast_start" in again[-1].warning(1e-4)
    # The spread is judged against the margin: the same scores are constant for a larger margin.
    assert not detector.collapsed(FLAT, 2e-4, B, MARGIN, True)
    assert detector.collapsed(collapsed_triplet(B, 0.5, True), 2e-4, B, 0.5, True)


def test_log_steps_of_a_learning_run_are_never_flagged():
    detector = PlateauDetector(log_steps=2)
    # Near the collapsed value but with spread-out scores (the start of every run; a run that has
    # learned with hardest negatives whose hinges cancel on average) ...
    assert all(detector.update(s, FLAT * 1.002, 1e-3, B, MARGIN, True) is None for s in range(10, 200, 10))
    assert all(detector.update(s, FLAT, 0.25, B, MARGIN, True) is None for s in range(10, 200, 10))
    # ... and constant-looking scores whose loss falls: neither is the plateau.
    assert all(detector.update(s, FLAT * (0.98 - s / 1e4), 5e-5, B, MARGIN, True) is None for s in range(10, 200, 10))
    assert all(PlateauDetector(log_steps=0).update(s, FLAT, 0.0, B, MARGIN, True) is None for s in range(10, 100, 10))


# ------------------------------------------------------------------------------------------------
# End to end: a stuck run and runs that learn (60 images, batch 16: 19 batches per epoch)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return write_scan_dataset(tmp_path_factory.mktemp("small"), "small_precomp", {"train": 60, "dev": 10}, seed=3)


def small_flags(data: dict, out: Path, *extra: str) -> list:
    return tiny_flags(data, out, "--batch_size", "16", "--log_step", "2", "--num_epochs", "3", *extra)


@pytest.mark.slow
def test_a_stuck_run_warns_once_logs_the_event_and_stops_with_a_resumable_checkpoint(small_data, tmp_path, capsys):
    out = tmp_path / "stuck"
    # Hardest negatives at a high learning rate: the scores collapse within a few iterations.
    assert main(small_flags(small_data, out, "--learning_rate", "0.03", "--stop_on_plateau", "10")) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "plateau of constant scores" in warnings[0] and "--fast_start" in warnings[0]
    events = read_metrics(out / "log")
    plateau = [e for e in events if e["split"] == "plateau"]
    stop = [e for e in events if e["split"] == "plateau_stop"]
    assert len(plateau) == 1 and len(stop) == 1
    assert stop[0]["iterations"] >= 10 and stop[0]["step"] == stop[0]["since"] + stop[0]["iterations"]
    # The detected streak: plateau_log_steps (5) collapsed log steps, std tiny, loss = 2 * B * margin.
    streak = [e for e in events if e["split"] == "train" and plateau[0]["since"] <= e["step"] <= plateau[0]["step"]]
    assert len(streak) == 5 and all(e["score_std"] <= SPREAD * 0.2 for e in streak)
    assert all(abs(e["triplet"] - 2 * e["batch_size"] * 0.2) <= 0.01 * 2 * e["batch_size"] * 0.2 for e in streak)
    assert "stopped after" in captured.out and "checkpoint_last.pth.tar" in captured.out
    assert captured.out.count("\n") == 1
    # The run stopped early; checkpoint_last holds the state at the stop and resumes exactly from there.
    last = read_checkpoint(out / "ckpt" / "checkpoint_last.pth.tar")
    assert last["iteration"] == stop[0]["step"] < 3 * 19
    assert not (out / "ckpt" / "checkpoint_3.pth.tar").exists()
    assert main(["train", "--resume", str(out / "ckpt" / "checkpoint_last.pth.tar"), "--stop_on_plateau", "0",
                 "--quiet"]) == 0
    assert read_checkpoint(out / "ckpt" / "checkpoint_3.pth.tar")["iteration"] == 3 * 19


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [
    ("--no_max_violation", "--learning_rate", "0.01"),                            # all negatives throughout
    ("--negatives_warmup_epochs", "2", "--learning_rate", "0.01", "--lr_update", "2", "--num_epochs", "4"),
], ids=["all-negatives", "negatives-warmup-then-hardest"])
def test_runs_that_learn_are_never_flagged(small_data, tmp_path, capsys, recipe):
    out = tmp_path / "learning"
    assert main(small_flags(small_data, out, "--stop_on_plateau", "1", *recipe)) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "stopped" not in captured.out
    events = read_metrics(out / "log")
    assert not [e for e in events if e["split"].startswith("plateau")]
    train = train_events(out / "log")
    assert train[-1]["step"] == int(dict(zip(recipe, recipe[1:])).get("--num_epochs", 3)) * 19  # ran to the end
    assert min(e["score_std"] for e in train[len(train) // 2:]) > 100 * 1e-4      # the scores spread out


# ------------------------------------------------------------------------------------------------
# Issue 22: a run that never leaves the plateau, and runs that sit at it and then leave
# ------------------------------------------------------------------------------------------------
#: The issue's metrics.jsonl (Flickr30K captions, simulated features, 1,014 training images, batch
#: 64: 80 iterations per epoch, the last of 14 pairs): (iteration, triplet, score_std).
ISSUE_22 = [(10, 26.14, 24.8e-4), (20, 25.91, 17.6e-4), (30, 25.84, 12.1e-4), (40, 25.77, 8.0e-4),
            (50, 25.71, 5.8e-4), (60, 25.70, 3.9e-4), (70, 25.65, 2.8e-4), (80, 5.61, 1.7e-4),
            (90, 25.64, 1.7e-4), (100, 25.63, 1.3e-4), (110, 25.62, 1.3e-4), (120, 25.62, 1.2e-4),
            (130, 25.62, 1.05e-4), (140, 25.62, 1.01e-4), (150, 25.62, 1.04e-4), (160, 5.60, 0.91e-4)]
#: The fast start's first 100 iterations on the cocosim data of the slow tests below (measured,
#: seed 0): the summed hinge sits at its collapsed value 2*B*(B-1)*margin = 1612.8 (72.8 for the
#: short batch) for 80 iterations, the scores' spread dips to 9e-4, then the run leaves.
FAST_START_COCOSIM = [(10, 1611.89, 6.18e-3), (20, 1610.82, 6.31e-3), (30, 1612.75, 4.83e-3),
                      (40, 1613.44, 6.23e-3), (50, 1611.42, 5.04e-3), (60, 1613.11, 1.01e-2),
                      (70, 1612.33, 9.34e-4), (80, 72.788, 1.24e-3), (90, 1581.78, 1.22e-2),
                      (100, 1513.26, 0.154)]


def logged(values, per_epoch: int = 80, last: int = 14) -> list:
    return [{"split": "train", "step": s, "triplet": t, "score_std": sd,
             "batch_size": last if s % per_epoch == 0 else B} for s, t, sd in values]


def test_the_logged_run_of_issue_22_is_detected_by_iteration_100_and_the_short_batch_keeps_the_count():
    config = Config(vocab_size=10)
    detector = PlateauDetector(config.plateau_spread, config.plateau_log_steps)
    found = [detector.update(r["step"], r["triplet"], r["score_std"], r["batch_size"], MARGIN, True)
             for r in logged(ISSUE_22)]
    first = next(p for p in found if p is not None)
    assert first.since <= 100 and first.step <= 100                       # the warning by iteration 100
    assert first.since < 80 < first.step                                  # the short batch is inside the streak
    # Once detected it stays detected through the second short batch, with the same start.
    assert all(p is not None and p.since == first.since for p in found[found.index(first):])
    assert found[-1].collapsed == pytest.approx(collapsed_triplet(14, MARGIN, True))
    # The short batch is judged against its own size: at 2*64*margin it would break the streak.
    assert detector.collapsed(5.61, 1.7e-4, 14, MARGIN, True) and not detector.collapsed(5.61, 1.7e-4, B, MARGIN, True)
    # --stop_on_plateau 40: the first log step 40 iterations after `since` is in the second epoch.
    stop = next(p for p in found if p is not None and p.iterations >= 40)
    assert stop.step == first.since + 40 and 80 < stop.step <= 160
    # The old rule (an absolute std below 1e-4) never fired on this run.
    assert PlateauDetector(1e-4 / MARGIN, 5).replay(logged(ISSUE_22), MARGIN, hardest=True) is None
    assert PlateauDetector(config.plateau_spread, 5).replay(logged(ISSUE_22), MARGIN, hardest=True) == first


def test_the_logged_fast_start_that_sits_at_the_collapsed_value_and_leaves_is_not_detected():
    records = logged(FAST_START_COCOSIM)
    flat = [r for r in records if abs(r["triplet"] - collapsed_triplet(r["batch_size"], MARGIN, False))
            <= 0.01 * collapsed_triplet(r["batch_size"], MARGIN, False)]
    assert [r["step"] for r in flat] == list(range(10, 90, 10))         # the loss alone would fire
    assert PlateauDetector(log_steps=5).replay(records, MARGIN, hardest=False) is None
    assert PlateauDetector(log_steps=1).replay(records, MARGIN, hardest=False) is None   # not even one step


@pytest.fixture(scope="module")
def cocosim(shared_data_dir, tmp_path_factory):
    """The issue's size on features simulated from the real COCO captions: 1,014 training images."""
    from vsl.demo.simulate import SimSpec, simulate_from_captions
    files = [shared_data_dir / "coco_precomp" / "dev_caps.txt", shared_data_dir / "coco_precomp" / "testall_caps.txt"]
    return simulate_from_captions(files, tmp_path_factory.mktemp("cocosim"),
                                  SimSpec(seed=0, train_images=1014, dev_images=100, test_images=100))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from vsl.data.demo import DemoSpec, make_demo_data
    return make_demo_data(tmp_path_factory.mktemp("demo"), DemoSpec(seed=0, train_images=1014, dev_images=100,
                                                                     test_images=100))


def issue_flags(data: dict, out: Path, *extra: str) -> list:
    """The issue's run: word 32, embed 64, sim 32, batch 64, the paper's recipe, log every 10 iterations."""
    return ["train", "--data_path", str(data["data_path"]), "--vocab_path", str(data["vocab_path"]),
            "--data_name", data["data_name"], "--img_dim", str(data["img_dim"]), "--num_regions",
            str(data["num_regions"]), "--word_dim", "32", "--embed_size", "64", "--sim_dim", "32",
            "--batch_size", "64", "--num_epochs", "6", "--workers", "0", "--log_step", "10", "--val_step", "0",
            "--vsl_weight", "0", "--seed", "0", "--device", "cpu", "--quiet", "--model_name", str(out / "ckpt"),
            "--logger_name", str(out / "log"), *extra]


@pytest.mark.slow
def test_the_run_of_issue_22_warns_by_iteration_100_and_stops_in_its_second_epoch(cocosim, tmp_path, capsys):
    out = tmp_path / "issue22"
    assert main(issue_flags(cocosim, out, "--stop_on_plateau", "40")) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "plateau of constant scores" in warnings[0]
    events = read_metrics(out / "log")
    (plateau,) = [e for e in events if e["split"] == "plateau"]
    (stop,) = [e for e in events if e["split"] == "plateau_stop"]
    assert plateau["since"] <= 100 and plateau["step"] <= 100
    assert stop["since"] == plateau["since"] and stop["step"] == plateau["since"] + 40
    assert 80 < stop["step"] <= 160 and stop["epoch"] == 1                # within the second epoch
    train = train_events(out / "log")
    assert [e["batch_size"] for e in train if e["step"] == 80] == [14]   # the short batch was logged ...
    assert plateau["since"] < 80 <= plateau["step"]                      # ... and kept the count
    assert "stopped after 40 iterations" in captured.out
    assert read_checkpoint(out / "ckpt" / "checkpoint_last.pth.tar")["iteration"] == stop["step"]


FAST = [f"--{k}={v}" for k, v in FAST_START.items()]


def run_unflagged(data: dict, out: Path, capsys, *recipe: str) -> list:
    """Train one epoch with ``recipe`` and ``--stop_on_plateau 1``: no warning, no event, no stop."""
    assert main(issue_flags(data, out, *recipe, "--num_epochs", "1", "--stop_on_plateau", "1")) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "stopped" not in captured.out
    assert not [e for e in read_metrics(out / "log") if e["split"].startswith("plateau")]
    train = train_events(out / "log")
    assert train[-1]["step"] == 80                                          # ran to the end
    return train


@pytest.mark.slow
def test_the_fast_start_sitting_at_the_collapsed_value_in_its_first_epoch_is_not_flagged(cocosim, tmp_path, capsys):
    train = run_unflagged(cocosim, tmp_path / "fast", capsys, *FAST)
    # The summed hinge sat at its collapsed value for more than plateau_log_steps log steps (the
    # loss alone would have fired) while the scores kept their spread; it leaves in epoch 2.
    flat = [e for e in train if abs(e["triplet"] - collapsed_triplet(e["batch_size"], MARGIN, False))
            <= 0.01 * collapsed_triplet(e["batch_size"], MARGIN, False)]
    assert len(flat) >= 5
    assert min(e["score_std"] for e in flat) > SPREAD * MARGIN


@pytest.mark.slow
def test_the_demo_recipe_on_the_demo_data_is_never_flagged(demo_data, tmp_path, capsys):
    demo = ["--no_max_violation", "--learning_rate", "4e-3", "--warmup_iters", "50", "--word_dim", "64"]
    train = run_unflagged(demo_data, tmp_path / "demo", capsys, *demo)
    assert min(e["score_std"] for e in train[len(train) // 2:]) > 10 * SPREAD * MARGIN   # the scores spread out

# ------------------------------------------------------------------------------------------------
# benchmarks/bench_plateau.py
# ------------------------------------------------------------------------------------------------
def test_benchmark_exit_step_uses_the_collapsed_value_of_each_phase():
    from conftest import load_benchmark
    bench = load_benchmark("bench_plateau")
    # 100 captions, batch 64: 2 batches per epoch, the second holds 36. One warm-up epoch (sum).
    flat_sum, flat_hard_last = collapsed_triplet(64, 0.2, False), collapsed_triplet(36, 0.2, True)
    events = [{"split": "train", "step": 1, "epoch": 0, "triplet": 0.95 * flat_sum},
              {"split": "val", "step": 2, "epoch": 1, "rsum": 10.0},
              {"split": "train", "step": 2, "epoch": 0, "triplet": 0.95 * collapsed_triplet(36, 0.2, False)},
              {"split": "train", "step": 4, "epoch": 1, "triplet": 0.89 * flat_hard_last}]
    assert bench.plateau_exit(events, 100, 64, 0.2, negatives_warmup=1) == 4
    assert bench.plateau_exit(events[:3], 100, 64, 0.2, negatives_warmup=1) is None
    # Half the sum's collapsed value has left the plateau while summing, not when judged against the
    # hardest negative's 2 * B * margin (no warm-up).
    events[0]["triplet"] = 0.5 * flat_sum
    assert bench.plateau_exit(events, 100, 64, 0.2, negatives_warmup=1) == 1
    assert bench.plateau_exit(events, 100, 64, 0.2, negatives_warmup=0) == 4


@pytest.mark.slow
def test_benchmark_runs_and_prints_its_table(tmp_path, capsys):
    from conftest import load_benchmark
    bench = load_benchmark("bench_plateau")
    assert bench.main(["--datasets", "demo", "--images", "20", "--dev_images", "5", "--epochs", "1",
                       "--jobs", "1", "--workdir", str(tmp_path), "--json", str(tmp_path / "rows.json")]) == 0
    out = capsys.readouterr().out
    assert "| demo | paper |" in out and "| demo | fast |" in out
    import json
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["iterations"] == 2 for r in rows)
