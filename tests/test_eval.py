"""Evaluation on the published-format checkpoints: scores, ensemble, protocols, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_scan_dataset

from vsl import metrics
from vsl.checkpoint import load_checkpoint
from vsl.cli import main
from vsl.data.vocab import Vocabulary, vocab_file
from vsl.errors import ConfigError
from vsl.evaluation import evaluate, pad_token_ids
from vsl.evaluation import run as evaluate_mod
from vsl.metrics import fold_slices, mean_over_folds
from vsl.models.reference import published_similarity

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_IMAGES = 12


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    """A test split matching the fixture checkpoints: coco_precomp, 36 x 64 features, 40 words."""
    root = tmp_path_factory.mktemp("coco_like")
    return write_scan_dataset(root, "coco_precomp", {"test": NUM_IMAGES}, img_dim=64, num_regions=36,
                              extra_words=21, seed=11)


@pytest.fixture(scope="module")
def checkpoints(fixtures_dir):
    return {name: str(fixtures_dir / f"{name}_checkpoint.pth.tar") for name in ("SGR", "SAF")}


def reference_scores(checkpoint: str, data: dict) -> torch.Tensor:
    """Published pipeline: encode each caption alone, score with the one-caption-at-a-time loop."""
    model = load_checkpoint(checkpoint)
    vocab = Vocabulary.from_json(vocab_file(data["vocab_path"], "coco_precomp"))
    folder = f"{data['data_path']}/coco_precomp"
    images = torch.from_numpy(np.load(f"{folder}/test_ims.npy"))
    captions = open(f"{folder}/test_caps.txt").read().splitlines()
    with torch.no_grad():
        ids, lengths = pad_token_ids([vocab.encode(c) for c in captions])
        cap_emb = torch.zeros(len(captions), ids.size(1), model.config.embed_size)
        for j, n in enumerate(lengths.tolist()):
            cap_emb[j, :n] = model.encode_captions(ids[j:j + 1, :n], lengths[j:j + 1])[0]
        return published_similarity(model.sim_enc, model.encode_images(images), cap_emb, lengths)


@pytest.mark.parametrize("name", ["SGR", "SAF"])
def test_published_checkpoint_scores_match_the_published_loop(name, checkpoints, coco_like, tmp_path):
    sims_path = tmp_path / "sims.npy"
    result = evaluate([checkpoints[name]], coco_like["data_path"], "test", "full",
                      vocab_path=coco_like["vocab_path"], save_sims=sims_path, progress=False)
    sims = np.load(sims_path)
    assert sims.shape == (NUM_IMAGES, 5 * NUM_IMAGES) and sims.dtype == np.float32
    np.testing.assert_allclose(sims, reference_scores(checkpoints[name], coco_like).numpy(), atol=1e-5)
    expected = metrics.retrieval_metrics(sims)
    assert result["rsum"] == pytest.approx(expected["rsum"]) and result["i2t"] == expected["i2t"]
    assert (result["images"], result["captions"]) == (NUM_IMAGES, 5 * NUM_IMAGES)


def test_ensemble_is_the_mean_of_the_two_models_scores(checkpoints, coco_like, tmp_path, capsys):
    sims = {}
    for name in ("SGR", "SAF"):
        evaluate([checkpoints[name]], coco_like["data_path"], "test", vocab_path=coco_like["vocab_path"],
                 save_sims=tmp_path / f"{name}.npy", progress=False)
        sims[name] = np.load(tmp_path / f"{name}.npy")
    assert not np.allclose(sims["SGR"], sims["SAF"], atol=1e-3)     # two different models
    out = tmp_path / "ensemble.json"
    rc = main(["eval", "--checkpoint", checkpoints["SGR"], "--checkpoint", checkpoints["SAF"],
               "--data_path", coco_like["data_path"], "--vocab_path", coco_like["vocab_path"],
               "--split", "test", "--protocol", "coco5k", "--output", str(out),
               "--save_sims", str(tmp_path / "ensemble.npy")])
    assert rc == 0
    ensemble = np.load(tmp_path / "ensemble.npy")
    np.testing.assert_allclose(ensemble, (sims["SGR"] + sims["SAF"]) / 2, rtol=0, atol=1e-7)
    result = json.loads(out.read_text())
    assert result["rsum"] == pytest.approx(metrics.retrieval_metrics(ensemble)["rsum"])
    assert result["checkpoints"] == [checkpoints["SGR"], checkpoints["SAF"]]
    captured = capsys.readouterr()
    assert "rsum" in captured.out and "pair" in captured.err          # table printed, progress shown


def test_coco1k_scores_only_the_fold_blocks_and_matches_the_full_matrix_protocol(checkpoints, coco_like,
                                                                                    tmp_path, monkeypatch):
    # 5 folds of 2 images stand in for 5 folds of 1,000 (the folding logic does not depend on size).
    data = write_scan_dataset(tmp_path, "coco_precomp", {"testall": 10}, img_dim=64, num_regions=36,
                              extra_words=21, seed=5)
    monkeypatch.setattr(metrics, "COCO1K_FOLD_IMAGES", 2)
    assert fold_slices("coco1k", 10, 5) == [(slice(2 * f, 2 * f + 2), slice(10 * f, 10 * f + 10))
                                             for f in range(5)]
    calls = []
    real_score = evaluate_mod.score
    monkeypatch.setattr(evaluate_mod, "score", lambda model, emb, **kw: calls.append(emb.images.shape[0])
                        or real_score(model, emb, **kw))
    blocks = evaluate([checkpoints["SGR"]], data["data_path"], "testall", "coco1k", progress=False,
                      vocab_path=data["vocab_path"])
    assert calls == [2] * 5                                          # 5 blocks of 2 x 10, not 10 x 50
    full = evaluate([checkpoints["SGR"]], data["data_path"], "testall", "coco1k", progress=False,
                    vocab_path=data["vocab_path"], save_sims=tmp_path / "full.npy")   # -> metrics.evaluate_protocol
    expected = metrics.evaluate_protocol(np.load(tmp_path / "full.npy"), "coco1k")
    for result in (blocks, full):
        assert result["rsum"] == pytest.approx(expected["rsum"])
        assert result["i2t"] == pytest.approx(expected["i2t"]) and result["t2i"] == pytest.approx(expected["t2i"])
        assert len(result["folds"]) == 5
        assert [f["rsum"] for f in result["folds"]] == pytest.approx([f["rsum"] for f in expected["folds"]])


def test_mean_over_folds_averages_every_metric():
    fold = lambda x: {"i2t": {"r1": x, "r5": 2 * x, "r10": 3 * x, "medr": 1.0, "meanr": x},
                      "t2i": {"r1": x, "r5": x, "r10": x, "medr": x, "meanr": 4.0}, "rsum": 10 * x}
    result = mean_over_folds([fold(1.0), fold(3.0)])
    assert result["i2t"] == {"r1": 2.0, "r5": 4.0, "r10": 6.0, "medr": 1.0, "meanr": 2.0}
    assert result["t2i"]["meanr"] == 4.0 and result["rsum"] == 20.0 and len(result["folds"]) == 2


def test_coco1k_needs_5000_images(checkpoints, coco_like, capsys):
    with pytest.raises(ConfigError, match="coco1k"):
        fold_slices("coco1k", NUM_IMAGES, 5)
    rc = main(["eval", "--checkpoint", checkpoints["SGR"], "--data_path", coco_like["data_path"], "--vocab_path",
               coco_like["vocab_path"], "--split", "test", "--protocol", "coco1k", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "coco1k" in err and "5000" in err


def test_vocabulary_that_does_not_fit_the_checkpoint_is_a_one_line_error(checkpoints, coco_like, tmp_path,
                                                                          capsys):
    Vocabulary([f"w{i}" for i in range(30)]).to_json(tmp_path / "coco_precomp_vocab.json")
    rc = main(["eval", "--checkpoint", checkpoints["SAF"], "--data_path", coco_like["data_path"],
               "--vocab_path", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("vsl: error: ") and "SAF_checkpoint.pth.tar" in err and "40" in err and "34" in err


def test_missing_checkpoint_and_missing_split_are_one_line_errors(checkpoints, coco_like, tmp_path, capsys):
    rc = main(["eval", "--checkpoint", str(tmp_path / "nope.pth.tar"), "--data_path", coco_like["data_path"]])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.pth.tar" in err and err.count("\n") == 1
    rc = main(["eval", "--checkpoint", checkpoints["SGR"], "--data_path", coco_like["data_path"],
               "--vocab_path", coco_like["vocab_path"], "--split", "dev", "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "dev_ims.npy" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())                              # no output written


def test_data_name_override_reads_another_dataset_folder(checkpoints, tmp_path):
    data = write_scan_dataset(tmp_path, "other_precomp", {"test": 4}, img_dim=64, num_regions=36,
                              extra_words=21, seed=2)
    result = evaluate([checkpoints["SGR"]], data["data_path"], "test", data_name="other_precomp",
                      vocab_path=data["vocab_path"], output=tmp_path / "out" / "r.json", progress=False)
    assert json.loads((tmp_path / "out" / "r.json").read_text())["rsum"] == pytest.approx(result["rsum"])
    assert result["captions"] == 20


def test_eval_precision_and_chunk_options(checkpoints, coco_like, tmp_path):
    """--precision bf16 scores stay close to fp32; --score_chunk does not change fp32 scores."""
    common = ["eval", "--checkpoint", checkpoints["SGR"], "--data_path", coco_like["data_path"],
              "--vocab_path", coco_like["vocab_path"], "--split", "test", "--quiet"]
    paths = {}
    for name, extra in {"fp32": [], "chunk": ["--score_chunk", "4096"], "bf16": ["--precision", "bf16"]}.items():
        paths[name] = tmp_path / f"{name}.npy"
        assert main(common + extra + ["--save_sims", str(paths[name])]) == 0
    fp32, chunk, bf16 = (np.load(paths[k]) for k in ("fp32", "chunk", "bf16"))
    np.testing.assert_allclose(chunk, fp32, atol=1e-6)
    assert 0 < np.abs(bf16 - fp32).max() < 2e-2
    with pytest.raises(SystemExit) as err:       # argparse rejects an unknown precision
        main(common + ["--precision", "fp16"])
    assert err.value.code == 2


def test_unwritable_output_paths_fail_before_scoring(checkpoints, coco_like, tmp_path, capsys, monkeypatch):
    """--output / --save_sims that cannot be written are reported at once, with nothing scored or written."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    scored = []
    monkeypatch.setattr(evaluate_mod, "score", lambda *a, **k: scored.append(1))
    common = ["eval", "--checkpoint", checkpoints["SGR"], "--data_path", coco_like["data_path"],
              "--vocab_path", coco_like["vocab_path"], "--quiet"]
    for flag, target, words in (("--save_sims", tmp_path, "is a folder"),
                                ("--output", blocker / "r.json", "a_file is a file")):
        rc = main(common + [flag, str(target)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and err.startswith("vsl: error: ") and words in err
    assert not scored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_non_finite_features_are_a_one_line_error_naming_the_image(checkpoints, tmp_path, capsys):
    data = write_scan_dataset(tmp_path, "coco_precomp", {"test": 4}, img_dim=64, num_regions=36,
                              extra_words=21, seed=3)
    path = next(tmp_path.rglob("test_ims.npy"))
    ims = np.load(path)
    ims[2, 5, 7] = np.inf
    np.save(path, ims)
    rc = main(["eval", "--checkpoint", checkpoints["SGR"], "--data_path", data["data_path"],
               "--vocab_path", data["vocab_path"], "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "test_ims.npy" in err and "image 2 has non-finite" in err


def test_float64_features_give_the_float32_scores(checkpoints, tmp_path):
    data = write_scan_dataset(tmp_path, "coco_precomp", {"test": 4}, img_dim=64, num_regions=36,
                              extra_words=21, seed=3)
    sims32, sims64 = tmp_path / "s32.npy", tmp_path / "s64.npy"
    evaluate([checkpoints["SAF"]], data["data_path"], "test", vocab_path=data["vocab_path"], save_sims=sims32,
             progress=False)
    path = next(tmp_path.rglob("test_ims.npy"))
    np.save(path, np.load(path).astype(np.float64))
    evaluate([checkpoints["SAF"]], data["data_path"], "test", vocab_path=data["vocab_path"], save_sims=sims64,
             progress=False)
    assert np.array_equal(np.load(sims32), np.load(sims64))
