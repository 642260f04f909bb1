"""Two-stage retrieval (issue 13): the shortlist head, fit-shortlist, index/search, eval --shortlist.

Everything runs on the tiny published-format fixture checkpoint (SGR, embed 32) and a small
generated SCAN-layout split, so the module takes seconds; the head is fitted once per module.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import states_equal, write_scan_dataset
from vsl import Config, build_model
from vsl.checkpoint import load_checkpoint, read_checkpoint
from vsl.cli import main
from vsl.errors import CheckpointError, ConfigError, DataError
from vsl.evaluation import evaluate
from vsl.models.shortlist import ShortlistHead, masked_mean, shortlist_loss
from vsl.retrieval import Index, build_index, evaluate_shortlist, fit_shortlist, shortlist_ranks
from vsl.retrieval import index as index_mod
from vsl.retrieval.gallery import Gallery

TEST_IMAGES = 24
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval_data")
    return write_scan_dataset(root, "coco_precomp", {"train": 60, "dev": 12, "test": TEST_IMAGES}, img_dim=64,
                              num_regions=36, extra_words=21, seed=5)


@pytest.fixture(scope="module")
def published(fixtures_dir):
    return str(fixtures_dir / "SGR_checkpoint.pth.tar")


@pytest.fixture(scope="module")
def fitted(published, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fitted") / "sgr_sl.pth.tar"
    result = fit_shortlist(published, data["data_path"], out, vocab_path=data["vocab_path"], device="cpu",
                           dim=16, epochs=30, batch_size=64, learning_rate=0.001, progress=False)
    return out, result


@pytest.fixture(scope="module")
def index_dir(fitted, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(fitted[0], data["data_path"], "test", out, vocab_path=data["vocab_path"], device="cpu",
                progress=False)
    return out


def exhaustive_scores(checkpoint, data, tmp_path) -> np.ndarray:
    sims = tmp_path / "sims.npy"
    evaluate([str(checkpoint)], data["data_path"], "test", "full", vocab_path=data["vocab_path"], device="cpu",
             save_sims=sims, progress=False)
    return np.load(sims)


# --------------------------------------------------------------------------------------------
# The head and its loss
# --------------------------------------------------------------------------------------------
def test_the_head_is_optional_and_leaves_the_papers_model_untouched(published):
    model = load_checkpoint(published)
    assert model.shortlist is None                                # published checkpoints load as before
    with pytest.raises(CheckpointError, match="fit-shortlist"):
        model.encode_images_global(torch.zeros(1, 36, 64))
    base = Config(img_dim=16, word_dim=8, embed_size=16, sim_dim=8, vocab_size=20)
    torch.manual_seed(3)
    plain = build_model(base)
    torch.manual_seed(3)
    headed = build_model(base.replace(shortlist_dim=8))
    # Built after the three published modules: their initial weights do not move.
    for a, b in zip((plain.img_enc, plain.txt_enc, plain.sim_enc), (headed.img_enc, headed.txt_enc, headed.sim_enc)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert Config(shortlist_weight=1.0, vocab_size=20).shortlist_dim == 256      # weight implies a head


@pytest.mark.parametrize("hidden", [0, 16])
def test_global_vectors_are_unit_length_and_pool_only_real_words(hidden):
    torch.manual_seed(0)
    head = ShortlistHead(8, 4, hidden)
    words = torch.randn(3, 5, 8)
    lengths = torch.tensor([5, 2, 3])
    vec = head.captions(words, lengths)
    assert vec.shape == (3, 4) and torch.allclose(vec.norm(dim=1), torch.ones(3))
    padded = words.clone()
    padded[1, 2:] = 99.0                                          # padding must not matter
    assert torch.allclose(head.captions(padded, lengths), vec)
    assert torch.allclose(head.captions(words[1:2, :2], lengths[1:2]), vec[1:2], atol=1e-6)
    assert torch.allclose(masked_mean(words, lengths)[1], words[1, :2].mean(0))
    regions = torch.randn(2, 36, 8)
    assert head.images(regions).shape == (2, 4)
    # Pooled regions are a set: the order of the regions does not matter.
    assert torch.allclose(head.images(regions[:, torch.randperm(36)]), head.images(regions), atol=1e-6)


def test_the_element_wise_layer_tells_apart_sets_with_the_same_mean():
    # {a + b, 0} and {a, b} have the same mean: the linear head cannot tell them apart, a ReLU layer can.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    together, apart = torch.stack([a + b, torch.zeros(2)])[None], torch.stack([a, b])[None]
    linear = ShortlistHead(2, 2, 0)
    assert torch.allclose(linear.images(together), linear.images(apart))
    units = ShortlistHead(2, 2, 1)
    with torch.no_grad():
        units.image.element.weight.copy_(torch.tensor([[1.0, 1.0]]))
        units.image.element.bias.fill_(-1.5)                         # fires only for a region showing both
    # It starts as the linear head (the units' projection is zero) and tells them apart once it is not.
    assert torch.allclose(units.images(together), units.images(apart))
    with torch.no_grad():
        units.image.proj.weight[:, 0] = 1.0
    assert not torch.allclose(units.images(together), units.images(apart))


def test_heads_written_before_the_element_wise_layer_load_as_linear_heads(tmp_path):
    config = Config(img_dim=16, word_dim=8, embed_size=16, sim_dim=8, vocab_size=20, shortlist_dim=8,
                    shortlist_hidden=0)
    torch.manual_seed(1)
    model = build_model(config)
    path = tmp_path / "old.pth.tar"
    from vsl.checkpoint import save_checkpoint
    save_checkpoint(path, model, config)
    raw = torch.load(path, weights_only=False)
    del raw["config"]["shortlist_hidden"]                         # the options and names of that format
    raw["shortlist"] = {k.replace("image.proj.", "image_proj.").replace("caption.proj.", "caption_proj."): v
                        for k, v in raw["shortlist"].items()}
    torch.save(raw, path)
    loaded = load_checkpoint(path)
    assert loaded.config.shortlist_hidden == 0 and loaded.shortlist.image.element is None
    regions = torch.randn(3, 36, 16)
    with torch.no_grad():
        assert torch.equal(loaded.shortlist.images(regions), model.shortlist.images(regions))
    assert Config().shortlist_hidden > 0                          # new heads get the element-wise layer


def test_frozen_embeddings_pack_words_and_keep_a_seeded_subset_within_the_memory_budget(published, data):
    from vsl.data import PrecompDataset
    from vsl.evaluation import load_for_eval, pad_token_ids
    from vsl.retrieval.fit import frozen_embeddings

    loaded = load_for_eval(published, torch.device("cpu"), data["vocab_path"], "coco_precomp")
    model, vocab = loaded.model, loaded.vocab
    ds = PrecompDataset(data["data_path"], "coco_precomp", "train", vocab)
    tokens = [vocab.encode(c) for c in ds.captions]
    images = ds.images[:ds.num_images]
    full, kept = frozen_embeddings(model, images, tokens, 5, pooled=False, progress=False)
    assert kept == ds.num_images and full.images.shape == (ds.num_images, 36, 32)
    ids, lengths = pad_token_ids(tokens[7:10])
    with torch.no_grad():
        expected = model.encode_captions(ids, lengths)
    words, lens = full.captions(torch.arange(7, 10))
    assert torch.equal(lens, lengths)
    torch.testing.assert_close(words, expected, atol=2e-3, rtol=1e-2)   # float16 storage
    assert (words[lens.argmin(), int(lens.min()):] == 0).all()        # padding is zero
    pooled, _ = frozen_embeddings(model, images, tokens, 5, pooled=True, progress=False)
    assert pooled.images.shape == (ds.num_images, 1, 32) and (pooled.lengths == 1).all()
    budget = full.images[:10].numel() * 2 * 1.5 / 2 ** 30              # room for about 10 images of 60
    small, kept = frozen_embeddings(model, images, tokens, 5, pooled=False, max_memory_gb=budget, progress=False)
    again, _ = frozen_embeddings(model, images, tokens, 5, pooled=False, max_memory_gb=budget, progress=False)
    assert 1 <= kept < ds.num_images and small.num_captions == 5 * kept and torch.equal(small.images, again.images)
    assert (small.image_of == torch.arange(kept).repeat_interleave(5)).all()


@pytest.mark.parametrize("loss", ["infonce", "hinge"])
def test_shortlist_loss_rewards_alignment_and_ignores_captions_of_the_same_image(loss):
    torch.manual_seed(0)
    vecs = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    ids = torch.arange(6)
    aligned = shortlist_loss(vecs, vecs, ids, loss=loss)
    shuffled = shortlist_loss(vecs, vecs.roll(1, 0), ids, loss=loss)
    assert aligned < shuffled
    # Rows 0 and 1 are two captions of one image (identical vectors): masked, they are no negatives of
    # each other and the loss stays that of a perfectly aligned batch; unmasked, each ties with the other.
    dup = vecs.clone()
    dup[1] = dup[0]
    masked = shortlist_loss(dup, dup, torch.tensor([0, 0, 2, 3, 4, 5]), loss=loss)
    unmasked = shortlist_loss(dup, dup, ids, loss=loss)
    assert masked == pytest.approx(float(aligned), abs=0.05)
    assert unmasked > masked + (0.2 if loss == "infonce" else 0.1)


def test_shortlist_ranks_count_ties_against_the_query():
    images = torch.eye(3)
    captions = torch.eye(3).repeat_interleave(2, dim=0)           # 2 captions per image, exactly aligned
    i2t, t2i = shortlist_ranks(images, captions, 2)
    assert i2t.tolist() == [1, 1, 1]                              # its other own caption ties: rank 1
    assert t2i.tolist() == [0] * 6
    i2t, t2i = shortlist_ranks(images, captions.roll(2, 0), 2)    # captions describe the next image
    assert (i2t > 1).all() and (t2i > 0).all()


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
def test_score_pairs_equals_the_all_pairs_scores(module_name):
    torch.manual_seed(0)
    model = build_model(Config(module_name=module_name, img_dim=16, word_dim=8, embed_size=32, sim_dim=16,
                               vocab_size=30, num_regions=36)).eval()
    lengths = torch.randint(2, 9, (20,))
    with torch.no_grad():
        img = model.encode_images(torch.randn(7, 36, 16))
        cap = model.encode_captions(torch.randint(4, 30, (20, 9)), lengths)
        full = model.similarity(img, cap, lengths)
        ii, cc = torch.randint(0, 7, (60,)), torch.randint(0, 20, (60,))
        pairs = model.sim_enc.score_pairs(img, cap, lengths, ii, cc, chunk_elements=3000)
    torch.testing.assert_close(pairs, full[ii, cc], atol=1e-6, rtol=0)


@pytest.mark.parametrize("module_name", ["SGR", "SAF"])
@pytest.mark.parametrize("chunk_elements", [None, 2000])
def test_score_pairs_of_shortlists_equal_the_all_pairs_scores(module_name, chunk_elements):
    # Shortlist unions: images with many and with few captions of a length, so that score_pairs pads
    # groups (and drops the padding) and, with the small budget, splits a length over several calls.
    from vsl.rerank import shortlist_pairs

    torch.manual_seed(1)
    model = build_model(Config(module_name=module_name, img_dim=16, word_dim=8, embed_size=32, sim_dim=16,
                               vocab_size=30, num_regions=36)).eval()
    lengths = torch.randint(2, 6, (40,))
    with torch.no_grad():
        img = model.encode_images(torch.randn(12, 36, 16))
        cap = model.encode_captions(torch.randint(4, 30, (40, 6)), lengths)
        full = model.similarity(img, cap, lengths)
        *_, ii, cc = shortlist_pairs(torch.randn(12, 3), torch.randn(40, 3), 5)
        pairs = model.sim_enc.score_pairs(img, cap, lengths, ii, cc, chunk_elements=chunk_elements)
    counts = torch.unique(lengths[cc] * 12 + ii, return_counts=True)[1]
    assert counts.min() < counts.max()                                # groups of unequal size
    torch.testing.assert_close(pairs, full[ii, cc], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# fit-shortlist
# --------------------------------------------------------------------------------------------
def test_fit_shortlist_on_a_published_checkpoint_keeps_its_weights_and_scores(fitted, published, data, tmp_path):
    out, result = fitted
    before, after = read_checkpoint(published), read_checkpoint(out)
    assert states_equal(before, after)                            # the paper's model is untouched
    assert after["config"].shortlist_dim == 16 and after["shortlist"] is not None
    assert result["loss_history"][-1] < result["loss_history"][0]
    recall = result["recall"]
    assert set(recall) == {"i2t", "t2i"} and set(recall["t2i"]) == {"10", "50", "100", "200"}
    assert recall["t2i"]["10"] == 100.0                           # dev has 12 images: top 10 of 12 for the 5 captions
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    np.testing.assert_array_equal(exhaustive_scores(out, data, tmp_path / "a"),
                                  exhaustive_scores(published, data, tmp_path / "b"))
    model = load_checkpoint(out)
    vec = model.encode_captions_global(torch.tensor([[1, 5, 6, 2]]), torch.tensor([4]))
    assert vec.shape == (1, 16) and torch.allclose(vec.norm(), torch.tensor(1.0))


def test_fit_shortlist_cli_reports_recall_and_writes_the_checkpoint(published, data, tmp_path, capsys):
    out = tmp_path / "ck2.pth.tar"
    rc = main(["fit-shortlist", "--checkpoint", published, "--data_path", data["data_path"], "--vocab_path",
               data["vocab_path"], "--out", str(out), "--epochs", "2", "--shortlist_dim", "8", "--quiet",
               "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file() and "shortlist recall on dev" in text and "t2i" in text
    assert read_checkpoint(out)["config"].shortlist_dim == 8 and "512-unit" in text
    small = tmp_path / "ck3.pth.tar"
    rc = main(["fit-shortlist", "--checkpoint", published, "--data_path", data["data_path"], "--vocab_path",
               data["vocab_path"], "--out", str(small), "--epochs", "1", "--shortlist_hidden", "0", "--quiet",
               "--device", "cpu", "--max_memory_gb", "0.00002"])
    captured = capsys.readouterr()
    assert rc == 0 and "linear" in captured.out and "training images" in captured.err
    ckpt = read_checkpoint(small)
    assert ckpt["config"].shortlist_hidden == 0 and ckpt["extra"]["shortlist_fit"]["train_images"] < 60


@pytest.mark.slow
def test_joint_training_adds_the_head_loss_and_saves_the_head(data, tmp_path):
    from vsl.logs import read_metrics

    flags = ["--data_path", data["data_path"], "--vocab_path", data["vocab_path"], "--data_name", "coco_precomp",
             "--batch_size", "20", "--num_epochs", "1", "--img_dim", "64", "--word_dim", "8", "--embed_size", "16",
             "--sim_dim", "8", "--workers", "0", "--log_step", "1", "--val_step", "0", "--vsl_weight", "0",
             "--device", "cpu", "--quiet", "--model_name", str(tmp_path / "ck"), "--logger_name", str(tmp_path / "log")]
    assert main(["train", *flags, "--shortlist_weight", "0.5", "--shortlist_dim", "8"]) == 0
    ckpt = read_checkpoint(tmp_path / "ck" / "checkpoint_last.pth.tar")
    assert ckpt["config"].shortlist_dim == 8 and ckpt["shortlist"] is not None
    records = [r for r in read_metrics(tmp_path / "log") if r["split"] == "train"]
    assert all("shortlist" in r and r["loss"] == pytest.approx(r["triplet"] + 0.5 * r["shortlist"], rel=1e-5)
               for r in records)
    assert load_checkpoint(tmp_path / "ck" / "checkpoint_last.pth.tar").shortlist is not None


# --------------------------------------------------------------------------------------------
# index and search
# --------------------------------------------------------------------------------------------
def test_index_holds_what_the_manifest_says(index_dir, fitted):
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["num_images"] == TEST_IMAGES and manifest["num_captions"] == 5 * TEST_IMAGES
    assert manifest["checkpoint_sha256"] == index_mod.sha256_file(fitted[0])
    regions = np.load(index_dir / "images.regions.npy", mmap_mode="r")
    assert regions.dtype == np.float16 and regions.shape == (TEST_IMAGES, 36, 32)
    assert not list(index_dir.glob("progress-*.json"))
    index = Index.load(index_dir)
    info = index.info()
    assert info["num_images"] == TEST_IMAGES and info["model"] == "SGR" and info["dtype"] == "float16"
    assert len(index.captions_of_image(3)) == 5


def test_text_search_reranks_the_shortlist_with_exact_scores(index_dir, fitted, data, tmp_path):
    index = Index.load(index_dir)
    query = "a red dog and a blue car"
    full = index.search_text([query], k=TEST_IMAGES, shortlist=0)[0]
    assert [h.rank for h in full.hits] == list(range(1, TEST_IMAGES + 1))
    scores = [h.score for h in full.hits]
    assert scores == sorted(scores, reverse=True)
    # A shortlist as large as the gallery re-ranks everything: the exhaustive order (float16 regions).
    whole = index.search_text([query], k=5, shortlist=TEST_IMAGES)[0]
    assert [h.id for h in whole.hits] == [h.id for h in full.hits[:5]]
    short = index.search_text([query, "a white cat near a green boat"], k=3, shortlist=6)
    assert len(short) == 2 and all(len(r.hits) == 3 and r.shortlist == 6 for r in short)
    # Exact scores agree with vsl eval's exhaustive matrix to float16 storage precision.
    model = load_checkpoint(fitted[0])
    with torch.no_grad():
        ids = torch.tensor([index.vocab.encode(query)])
        cap = model.encode_captions(ids, torch.tensor([ids.size(1)]))
        imgs = model.encode_images(torch.from_numpy(np.load(Path(data["data_path"]) / "coco_precomp" / "test_ims.npy")))
        exact = model.similarity(imgs, cap, torch.tensor([ids.size(1)]))[:, 0]
    np.testing.assert_allclose([h.score for h in full.hits], exact[[h.id for h in full.hits]].numpy(), atol=2e-3)
    assert full.hits[0].captions == index.captions_of_image(full.hits[0].id)


def test_image_search_returns_captions(index_dir):
    index = Index.load(index_dir)
    result = index.search_image([2], k=4, shortlist=20)[0]
    assert result.query == 2 and len(result.hits) == 4
    assert all(h.captions == [index.captions[h.id]] for h in result.hits)
    exhaustive = index.search_image([2], k=4, shortlist=0)[0]
    assert exhaustive.hits[0].score >= result.hits[0].score - 1e-6
    d = result.to_dict()
    assert set(d["results"][0]) == {"rank", "id", "score", "exact_score", "shortlist_score", "captions"}


def test_search_cli_json_and_clamping(index_dir, capsys):
    rc = main(["search", "--index", str(index_dir), "--text", "a red dog", "--k", "500", "--shortlist", "900",
               "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    obj = json.loads(captured.out.strip().splitlines()[0])
    assert obj["k"] == TEST_IMAGES and len(obj["results"]) == TEST_IMAGES and obj["shortlist"] == TEST_IMAGES
    assert captured.err.count("clamped") == 1


def test_queries_file_is_batched_and_unknown_words_warn(index_dir, tmp_path, capsys):
    queries = tmp_path / "q.txt"
    queries.write_text("a red dog\n\nzebra giraffe\n")
    assert main(["search", "--index", str(index_dir), "--queries", str(queries), "--k", "2", "--json"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.strip().splitlines()]
    assert [x["query"] for x in lines] == ["a red dog", "zebra giraffe"]
    assert lines[1]["unknown_words"] == ["zebra", "giraffe"] and len(lines[1]["results"]) == 2
    assert "unknown words zebra, giraffe" in captured.err


def test_interrupted_build_resumes_at_the_block_where_it_stopped(fitted, data, tmp_path, monkeypatch, index_dir):
    calls = {"n": 0}
    original = Gallery.read

    def failing_read(self, start, stop):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, start, stop)

    monkeypatch.setattr(Gallery, "read", failing_read)
    out = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        build_index(fitted[0], data["data_path"], "test", out, vocab_path=data["vocab_path"], device="cpu",
                    progress=False, batch_size=5, block_images=5)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="did not finish"):
        Index.load(out)
    done = json.loads((out / "progress-images-r0.json").read_text())["blocks"]
    assert done == [0, 1]
    read = []
    monkeypatch.setattr(Gallery, "read", lambda self, a, b: read.append(a) or original(self, a, b))
    build_index(fitted[0], data["data_path"], "test", out, vocab_path=data["vocab_path"], device="cpu",
                progress=False, batch_size=5, block_images=5)
    assert min(read) == 10                                        # blocks 0 and 1 were not encoded again
    # The resumed build equals one that was never interrupted (same batches: bit for bit).
    whole = tmp_path / "whole"
    build_index(fitted[0], data["data_path"], "test", whole, vocab_path=data["vocab_path"], device="cpu",
                progress=False, batch_size=5, block_images=5)
    for name in ("images.regions.npy", "images.global.npy", "captions.words.npy", "captions.global.npy"):
        np.testing.assert_array_equal(np.load(out / name), np.load(whole / name))
        np.testing.assert_allclose(np.load(out / name).astype(np.float32),
                                   np.load(index_dir / name).astype(np.float32), atol=1e-5)


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_approximate_indexes_find_the_flat_shortlist(fitted, data, tmp_path, index_type, index_dir):
    out = build_index(fitted[0], data["data_path"], "test", tmp_path / index_type, vocab_path=data["vocab_path"],
                      device="cpu", progress=False, index_type=index_type, dtype="float32")
    approx, flat = Index.load(out), Index.load(index_dir)
    assert np.load(out / "images.regions.npy", mmap_mode="r").dtype == np.float32
    a = approx.search_text(["a red dog and a blue car"], k=3, shortlist=10)[0]
    f = flat.search_text(["a red dog and a blue car"], k=3, shortlist=10)[0]
    assert [h.id for h in a.hits] == [h.id for h in f.hits]


def test_pure_image_gallery_from_a_folder_of_features(fitted, data, tmp_path):
    feats = np.load(Path(data["data_path"]) / "coco_precomp" / "test_ims.npy")
    folder = tmp_path / "feats"
    folder.mkdir()
    np.save(folder / "a.npy", feats[:10])
    np.save(folder / "b.npy", feats[10:])
    out = build_index(fitted[0], features=folder, out=tmp_path / "gallery", vocab_path=data["vocab_path"],
                      device="cpu", progress=False)
    index = Index.load(out)
    assert index.num_images == TEST_IMAGES and index.num_captions == 0 and index.captions_of_image(0) == []
    hits = index.search_text(["a red dog"], k=4, shortlist=8)[0].hits
    assert len(hits) == 4 and all(h.captions == [] for h in hits)
    with pytest.raises(ConfigError, match="pure image gallery"):
        index.search_image([0])


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing half-written
# --------------------------------------------------------------------------------------------
def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vsl: error: ")
    return err[0]


def test_index_refuses_a_checkpoint_without_a_head(published, data, tmp_path, capsys):
    rc = main(["index", "--checkpoint", published, "--data_path", data["data_path"], "--vocab_path",
               data["vocab_path"], "--out", str(tmp_path / "idx"), "--quiet"])
    assert rc == 2 and "vsl fit-shortlist" in _error(capsys)
    assert not (tmp_path / "idx" / "manifest.json").exists()


def test_index_of_another_checkpoint_is_refused(index_dir, published, capsys):
    rc = main(["search", "--index", str(index_dir), "--text", "a dog", "--checkpoint", published])
    assert rc == 2 and "does not match the checkpoint the index" in _error(capsys)


def test_missing_or_truncated_index_files(index_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(index_dir, broken)
    with open(broken / "images.regions.npy", "r+b") as fh:
        fh.truncate(1000)
    assert main(["search", "--index", str(broken), "--text", "a dog"]) == 2
    assert "images.regions.npy: 1000 bytes, expected" in _error(capsys)
    shutil.copy(index_dir / "images.regions.npy", broken / "images.regions.npy")
    (broken / "images.faiss").unlink()
    assert main(["search", "--index", str(broken), "--text", "a dog"]) == 2
    assert "missing index file" in _error(capsys)
    assert main(["search", "--index", str(tmp_path / "nothing"), "--text", "a dog"]) == 2
    assert "no such index folder" in _error(capsys)


@pytest.mark.parametrize("args, message", [
    (["--text", "   "], "empty query"),
    (["--text", "..."], None),                         # punctuation is a word of the vocabulary's tokenizer
    (["--image_id", "24"], "out of range: the index has 24 images"),
    (["--image_id", "-1"], "out of range"),
    (["--text", "a dog", "--k", "0"], "k must be a positive integer"),
    (["--text", "a dog", "--shortlist", "-1"], "shortlist must be a non-negative integer"),
])
def test_search_bad_input(index_dir, capsys, args, message):
    rc = main(["search", "--index", str(index_dir), *args])
    if message is None:
        assert rc == 0
        capsys.readouterr()
        return
    assert rc == 2 and message in _error(capsys)


# --------------------------------------------------------------------------------------------
# eval --shortlist
# --------------------------------------------------------------------------------------------
def test_eval_shortlist_of_the_whole_gallery_equals_exhaustive(fitted, data, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["eval", "--checkpoint", str(fitted[0]), "--data_path", data["data_path"], "--vocab_path",
               data["vocab_path"], "--split", "test", "--shortlist", str(5 * TEST_IMAGES), "--compare_exhaustive",
               "--output", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0 and "shortlist recall at K" in capsys.readouterr().out
    result = json.loads(out.read_text())
    sl = result["shortlist"]
    assert sl["pairs_scored"] == sl["pairs_total"] == TEST_IMAGES * 5 * TEST_IMAGES
    assert sl["recall_i2t"] == sl["recall_t2i"] == 100.0
    for d in ("i2t", "t2i"):
        for key in ("r1", "r5", "r10", "medr"):
            assert result[d][key] == pytest.approx(result["exhaustive"][d][key])


def test_eval_shortlist_scores_only_the_shortlists(fitted, data):
    k = 3
    result = evaluate_shortlist([str(fitted[0])], data["data_path"], "test", shortlist=k,
                                vocab_path=data["vocab_path"], device="cpu", progress=False)
    sl = result["shortlist"]
    n, m = TEST_IMAGES, 5 * TEST_IMAGES
    assert max(n * k, m * k) <= sl["pairs_scored"] <= n * k + m * k
    # A query whose match is outside its shortlist cannot be ranked first: R@1 <= shortlist recall.
    assert result["t2i"]["r1"] <= sl["recall_t2i"] + 1e-9 and result["i2t"]["r1"] <= sl["recall_i2t"] + 1e-9


def test_eval_shortlist_needs_a_head(published, data, capsys):
    rc = main(["eval", "--checkpoint", published, "--data_path", data["data_path"], "--vocab_path",
               data["vocab_path"], "--shortlist", "10", "--quiet"])
    assert rc == 2 and "vsl fit-shortlist" in _error(capsys)


@pytest.mark.slow
def test_torchrun_index_splits_the_blocks_and_matches_one_process(fitted, data, tmp_path, index_dir):
    from test_distributed import torchrun

    out = tmp_path / "idx"
    torchrun("index", "--checkpoint", str(fitted[0]), "--data_path", data["data_path"], "--vocab_path",
             data["vocab_path"], "--out", str(out), "--block_images", "5", "--quiet", "--device", "cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_images"] == TEST_IMAGES and not list(out.glob("progress-*.json"))
    for name in ("images.regions.npy", "images.global.npy", "captions.words.npy", "captions.global.npy"):
        np.testing.assert_allclose(np.load(out / name), np.load(index_dir / name), atol=1e-6)
    assert Index.load(out).search_text(["a red dog"], k=3)[0].hits


def test_fit_shortlist_names_a_training_image_with_nan_features(published, tmp_path):
    data = write_scan_dataset(tmp_path, "coco_precomp", {"train": 20, "dev": 4}, img_dim=64, num_regions=36,
                              extra_words=21, seed=6)
    path = Path(data["data_path"]) / "coco_precomp" / "train_ims.npy"
    features = np.load(path)
    features[13, 2, 5] = np.nan
    np.save(path, features)
    out = tmp_path / "out.pth.tar"
    with pytest.raises(DataError, match=r"train_ims\.npy.*13"):
        fit_shortlist(published, data["data_path"], out, vocab_path=data["vocab_path"], device="cpu", dim=8,
                      epochs=1, progress=False, max_memory_gb=1e-4)     # a subset: rows are not contiguous
    assert not out.exists()


def test_concurrent_faiss_searches_with_different_depths_match_sequential_ones():
    """Search depth is passed per call (not set on the shared index): threads searching one HNSW or
    IVF index with different shortlist sizes get exactly what each gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from vsl.retrieval import faiss_index

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:40] + 0.1 * rng.standard_normal((40, 16)).astype(np.float32)
    for kind in ("hnsw", "ivf", "IVF16,PQ4"):
        index = faiss_index.make_faiss(vectors, kind)
        sizes = [5, 400, 20, 300, 10, 500] * 4
        alone = [faiss_index.search(index, queries, s) for s in sizes]
        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda s: faiss_index.search(index, queries, s), sizes))
        for (d1, i1), (d2, i2), s in zip(alone, together, sizes):
            assert i1.shape == (40, s) and np.array_equal(i1, i2) and np.array_equal(d1, d2), (kind, s)
    hnsw = faiss_index.make_faiss(vectors, "hnsw")
    assert faiss_index.search_parameters(hnsw, 700).efSearch == 1400 and hnsw.hnsw.efSearch != 1400


def test_search_depth_is_a_per_call_option_with_the_library_defaults():
    """ef_search / nprobe / k_factor given to one search reach FAISS for that call only (the shared
    index is untouched); omitted, the module defaults; deeper search finds at least as much of the
    exact top 50; a bad depth is a one-line ConfigError."""
    import faiss

    from vsl.retrieval import faiss_index

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((4000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:30] + 0.3 * rng.standard_normal((30, 16)).astype(np.float32)
    _, exact = faiss_index.search(faiss_index.make_faiss(vectors, "flat"), queries, 50)
    recall = lambda ids: np.mean([len(np.intersect1d(a, b)) / 50 for a, b in zip(exact, ids)])

    hnsw = faiss_index.make_faiss(vectors, "hnsw")
    assert faiss_index.search_parameters(hnsw, 10).efSearch == faiss_index.HNSW_EF_SEARCH
    assert faiss_index.search_parameters(hnsw, 10, ef_search=700).efSearch == 700
    assert faiss_index.search_parameters(hnsw, 400, ef_search=16).efSearch == 800      # never below 2 x shortlist
    assert faiss_index.search_parameters(hnsw, 700).efSearch == 1400
    shallow = recall(faiss_index.search(hnsw, queries, 50, ef_search=16)[1])
    deep = recall(faiss_index.search(hnsw, queries, 50, ef_search=2000)[1])
    assert deep >= shallow and deep > 0.99 and hnsw.hnsw.efSearch != 2000

    ivf = faiss_index.make_faiss(vectors, "IVF64,Flat")
    assert faiss_index.search_parameters(ivf, 10).nprobe == faiss_index.IVF_NPROBE
    assert faiss_index.search_parameters(ivf, 10, nprobe=5).nprobe == 5
    assert faiss_index.search_parameters(ivf, 10, nprobe=10_000).nprobe == 64              # at most its lists
    one = recall(faiss_index.search(ivf, queries, 50, nprobe=1)[1])
    assert one < 0.9 and recall(faiss_index.search(ivf, queries, 50, nprobe=64)[1]) == 1.0
    assert faiss.extract_index_ivf(ivf).nprobe == 1                                        # the index's own setting

    refined = faiss_index.make_faiss(vectors, "IVF64,PQ8x4fs,RFlat")
    params = faiss_index.search_parameters(refined, 10, nprobe=7, k_factor=9)
    assert params.k_factor == 9 and params.base_index_params is not None
    assert faiss_index.search_parameters(refined, 10).k_factor == faiss_index.REFINE_K_FACTOR
    low = recall(faiss_index.search(refined, queries, 50, nprobe=64, k_factor=1)[1])
    high = recall(faiss_index.search(refined, queries, 50, nprobe=64, k_factor=16)[1])
    assert high > low and high > 0.97
    assert recall(faiss_index.search(refined, queries, 50, nprobe=1, k_factor=16)[1]) < high   # nprobe reaches the base
    assert faiss_index.search_parameters(faiss_index.make_faiss(vectors, "flat"), 10, ef_search=5) is None
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ConfigError, match="nprobe must be a positive integer") as err:
            faiss_index.search(ivf, queries, 5, nprobe=bad)
        assert "\n" not in str(err.value)


def test_index_types_are_faiss_factory_strings_and_a_bad_one_is_one_line(tmp_path):
    from vsl.retrieval import faiss_index

    assert faiss_index.factory_string("hnsw", 100) == "HNSW32"
    assert faiss_index.factory_string("ivf", 10_000) == "IVF256,Flat"
    assert faiss_index.factory_string("IVF64,PQ8", 10) == "IVF64,PQ8"
    with pytest.raises(ConfigError, match="'NotAnIndex'") as err:
        faiss_index.check_index_type("NotAnIndex")
    assert "\n" not in str(err.value) and "index_factory.cpp" not in str(err.value)
    few = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    with pytest.raises(ConfigError, match="cannot train it on 50 vectors") as err:
        faiss_index.make_faiss(few, "IVF4,PQ2")                       # PQ needs 256 training points
    assert "\n" not in str(err.value) and "Clustering.cpp" not in str(err.value)


def test_refined_ivf_pq_index_searches_with_per_call_parameters():
    """A factory string with refinement ("IVF..,PQ..,RFlat") searches: FAISS refuses IVF parameters
    given to the refine wrapper, so search_parameters wraps them; exact re-scoring finds the query."""
    import numpy as np
    from vsl.retrieval.faiss_index import make_faiss, search
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = make_faiss(x, "IVF16,PQ16x4fs,RFlat")
    scores, ids = search(index, x[:10], 20)
    assert ids.shape == (10, 20) and (ids[:, 0] == np.arange(10)).all()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)     # refined: exact inner products
