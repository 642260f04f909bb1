"""The ``vsl`` command line: published flags, presets, resume defaults, help, errors, entry points."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vsl.cli import build_parser, main, train_config

PUBLISHED_README_COMMAND = ("train --data_path DATA --data_name coco_precomp --batch_size 128 --num_epochs 25 "
                            "--lr_update 10 --learning_rate 0.0003 --module_name SGR").split()


def parse_train(argv):
    return train_config(build_parser().parse_args(argv))


def test_the_papers_readme_command_parses_verbatim():
    config = parse_train(PUBLISHED_README_COMMAND)
    assert (config.data_path, config.data_name, config.module_name) == ("DATA", "coco_precomp", "SGR")
    assert (config.batch_size, config.num_epochs, config.lr_update, config.learning_rate) == (128, 25, 10, 0.0003)


def test_every_published_flag_reaches_the_config():
    argv = ("train --data_path D --vocab_path V --model_name M --logger_name L --margin 0.3 --grad_clip 1.5 "
            "--workers 3 --val_step 77 --log_step 9 --img_dim 64 --word_dim 50 --embed_size 96 --sim_dim 24 "
            "--num_layers 2 --sgr_step 2 --no_imgnorm --no_txtnorm --vsl_weight 0 --vsl_rank per-image "
            "--semantic cider --textual_semantic_loss --seed 4 --device cpu").split()
    config = parse_train(argv)
    expected = dict(data_path="D", vocab_path="V", model_name="M", logger_name="L", margin=0.3, grad_clip=1.5,
                    workers=3, val_step=77, log_step=9, img_dim=64, word_dim=50, embed_size=96, sim_dim=24,
                    num_layers=2, sgr_step=2, no_imgnorm=True, no_txtnorm=True, vsl_weight=0.0,
                    vsl_rank="per-image", semantic="cider", textual_semantic_loss=True, seed=4, device="cpu")
    assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize("flag, field", [("--max_violation", "max_violation"), ("--no_max_violation", "max_violation"),
                                         ("--bi_gru", "bi_gru"), ("--no_bi_gru", "bi_gru")])
def test_published_store_false_flags_turn_their_feature_off(flag, field):
    assert getattr(parse_train(["train"]), field) is True
    assert getattr(parse_train(["train", flag]), field) is False


def test_help_explains_the_published_store_false_quirk():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "passing --max_violation turns hardest-negative mining OFF" in text
    assert "passing --bi_gru turns the bidirectional GRU OFF" in text


def test_preset_sets_the_readme_settings_and_explicit_flags_win():
    config = parse_train(["train", "--preset", "f30k-saf", "--num_epochs", "3"])
    assert (config.data_name, config.module_name, config.lr_update, config.num_epochs) == ("f30k_precomp", "SAF", 15, 3)
    assert parse_train(["train", "--preset", "coco-sgr"]).num_epochs == 25


def test_resume_takes_the_checkpoints_options_as_defaults(fixtures_dir):
    ckpt = str(fixtures_dir / "SAF_checkpoint.pth.tar")                 # published format
    config = parse_train(["train", "--resume", ckpt, "--batch_size", "4"])
    assert (config.module_name, config.img_dim, config.embed_size, config.vocab_size) == ("SAF", 64, 32, 40)
    assert config.batch_size == 4 and config.workers == 10


def _option_helps(parser: argparse.ArgumentParser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield action.option_strings[0], formatter._expand_help(action)


@pytest.mark.parametrize("command", ["train", "eval", "make-demo-data", "demo", "ablate"])
def test_every_option_of_every_command_shows_its_default(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    helps = dict(_option_helps(sub))
    assert helps, command
    missing = [flag for flag, text in helps.items() if "default:" not in text]
    assert not missing, f"{command}: options without a default in --help: {missing}"
    if command == "train":
        assert "(default: 0.0003)" in helps["--learning_rate"] and "(default: 10.0)" in helps["--vsl_weight"]


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    rc = main(["train", "--data_path", str(tmp_path), "--vocab_path", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("vsl: error: ")
    assert "coco_precomp_vocab.json" in err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--module_name", "XYZ"])
    assert exc.value.code == 2


def test_make_demo_data_subcommand(tmp_path, capsys):
    rc = main(["make-demo-data", str(tmp_path / "demo"), "--images", "3", "--dev-images", "2",
               "--test-images", "2", "--img-dim", "8"])
    assert rc == 0
    assert (tmp_path / "demo" / "data" / "demo_precomp" / "train_caps.txt").read_text().count("\n") == 15
    assert "--data_path" in capsys.readouterr().out


@pytest.mark.slow
def test_python_dash_m_and_console_script(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "vsl", "--help"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "eval" in out.stdout
    script = shutil.which("vsl", path=str(Path(sys.executable).parent)) or shutil.which("vsl")
    assert script, "the vsl console script is not installed (pip install -e .)"
    out = subprocess.run([script, "eval", "--checkpoint", str(tmp_path / "missing.pth.tar")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 2 and "missing.pth.tar" in out.stderr and out.stderr.count("\n") == 1


def test_unknown_option_is_reported_by_its_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--checkpoint", "x.pth.tar", "--bogus_flag", "3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "vsl eval: error: unrecognized arguments: --bogus_flag 3" in err and "usage: vsl eval" in err


def test_hyphenated_spellings_are_silent_aliases_of_the_underscored_flags(tmp_path):
    """One flag style (--data_seed); vsl's earlier hyphenated spellings keep working, unlisted."""
    parser = build_parser()
    demo = parser.parse_args(["demo", str(tmp_path), "--data-seed", "3", "--no-plot"])
    assert (demo.data_seed, demo.no_plot) == (3, True)
    assert parser.parse_args(["demo", str(tmp_path), "--data_seed=4"]).data_seed == 4
    data = parser.parse_args(["make-demo-data", str(tmp_path), "--test-images=7", "--no-thumbnails"])
    assert (data.test_images, data.no_thumbnails) == (7, True)
    assert parse_train(["train", "--data-path", "D", "--batch-size", "4"]).batch_size == 4
    helps = " ".join(parser._subparsers._group_actions[0].choices[c].format_help()
                     for c in ("demo", "make-demo-data"))
    assert "--data_seed" in helps and "--no_thumbnails" in helps
    assert "--data-seed" not in helps and "--no-thumbnails" not in helps and "--test-images" not in helps
