"""The procedural demo dataset: SCAN layout, determinism, caching, and the properties VSL relies on."""
import json
import re

import numpy as np
import pytest

from vsl.data.vocab import Vocabulary, tokenize
from vsl.data import demo as dd
from vsl.data.demo import DemoSpec, demo_data_ready, make_demo_data, sample_split
from vsl.data.demo import scene_boxes
from vsl.errors import ConfigError, DataError

SPEC = DemoSpec(seed=3, train_images=800, dev_images=40, test_images=200, img_dim=48)
TINY = DemoSpec(seed=5, train_images=30, dev_images=10, test_images=20, img_dim=16)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, make_demo_data(out, SPEC)


@pytest.fixture(scope="module")
def splits():
    return {s: sample_split(SPEC, s) for s in dd.DEMO_SPLITS}


def _files(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# --- layout -------------------------------------------------------------------------------------
def test_layout_shapes_and_dtypes(demo):
    out, info = demo
    assert info["data_name"] == "demo_precomp" and info["img_dim"] == 48 and info["num_regions"] == 36
    folder = out / "data" / "demo_precomp"
    assert info["data_path"] == str(out / "data") and info["vocab_path"] == str(out / "vocab")
    for split in dd.DEMO_SPLITS:
        ims = np.load(folder / f"{split}_ims.npy")
        assert ims.shape == (SPEC.images(split), 36, 48) and ims.dtype == np.float32
        assert np.isfinite(ims).all() and (ims >= 0).all() and ims.std() > 0.1
        lines = (folder / f"{split}_caps.txt").read_text(encoding="utf-8").split("\n")
        assert lines[-1] == "" and len(lines[:-1]) == 5 * SPEC.images(split) and all(lines[:-1])
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


def test_vocab_file_is_published_format_and_covers_every_token(demo):
    out, info = demo
    raw = json.loads((out / "vocab" / "demo_precomp_vocab.json").read_text())
    assert set(raw) == {"word2idx", "idx2word", "idx"} and raw["idx"] == info["vocab_size"]
    assert [raw["idx2word"][str(i)] for i in range(4)] == ["<pad>", "<start>", "<end>", "<unk>"]
    vocab = Vocabulary.from_json(out / "vocab" / "demo_precomp_vocab.json")
    for split in dd.DEMO_SPLITS:
        captions = (out / "data" / "demo_precomp" / f"{split}_caps.txt").read_text().splitlines()
        assert all(re.fullmatch(r"[a-z]+( [a-z]+)*( \.)?", c) for c in captions)
        for caption in captions[:1000]:                           # the same grammar in every split
            assert caption.split() == tokenize(caption)           # what the loader's tokenizer sees
            assert 3 not in vocab.encode(caption), caption        # no <unk>
    used = {t for s in dd.DEMO_SPLITS for c in sample_split(TINY, s).captions for t in c.split()}
    assert used <= set(dd.WORDS)


def test_loads_with_the_project_dataset(demo):
    from vsl.data import PrecompDataset

    out, info = demo
    vocab = Vocabulary.from_json(out / "vocab" / "demo_precomp_vocab.json")
    ds = PrecompDataset(info["data_path"], info["data_name"], "test", vocab)
    assert len(ds) == 5 * SPEC.test_images and ds.captions_per_image == 5 and ds.img_dim == 48


def test_articles_agree_with_the_next_word(splits):
    for caption in splits["train"].captions:
        words = caption.split()
        for det, nxt in zip(words, words[1:]):
            if det in ("a", "an") and nxt not in ("photo", "picture"):
                assert (det == "an") == (nxt[0] in "aeiou"), caption


# --- determinism and caching --------------------------------------------------------------------
def test_written_files_equal_the_in_memory_split(demo, splits):
    out, _ = demo
    for split in dd.DEMO_SPLITS:
        folder = out / "data" / "demo_precomp"
        np.testing.assert_array_equal(np.load(folder / f"{split}_ims.npy"), splits[split].images)
        assert (folder / f"{split}_caps.txt").read_text().splitlines() == splits[split].captions


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path):
    make_demo_data(tmp_path / "a", TINY)
    make_demo_data(tmp_path / "b", TINY)
    make_demo_data(tmp_path / "c", DemoSpec(**{**TINY.to_dict(), "seed": TINY.seed + 1}))
    a, b, c = (_files(tmp_path / k) for k in "abc")
    assert a == b
    for name in ("data/demo_precomp/train_ims.npy", "data/demo_precomp/train_caps.txt"):
        key = next(k for k in a if str(k) == name)
        assert a[key] != c[key]


def test_cached_unless_spec_or_files_change(tmp_path):
    info = make_demo_data(tmp_path, TINY)
    assert demo_data_ready(tmp_path, TINY)
    ims = tmp_path / "data" / "demo_precomp" / "train_ims.npy"
    stamp = ims.stat().st_mtime_ns
    assert make_demo_data(tmp_path, TINY) == info and ims.stat().st_mtime_ns == stamp   # skipped
    assert not demo_data_ready(tmp_path, DemoSpec(**{**TINY.to_dict(), "img_dim": 17}))
    assert not demo_data_ready(tmp_path / "nowhere", TINY)

    ims.write_bytes(ims.read_bytes()[:-4])                          # a truncated file
    assert not demo_data_ready(tmp_path, TINY)
    make_demo_data(tmp_path, TINY)
    assert demo_data_ready(tmp_path, TINY) and np.load(ims).shape == (30, 36, 16)

    (tmp_path / dd.MANIFEST).write_text("{not json")
    assert not demo_data_ready(tmp_path, TINY)


def test_bad_spec_and_unwritable_folder(tmp_path):
    with pytest.raises(ConfigError, match="train_images"):
        DemoSpec(train_images=0)
    with pytest.raises(ConfigError, match="num_regions"):
        DemoSpec(num_regions=8)
    with pytest.raises(ConfigError, match="feature_noise"):
        DemoSpec(feature_noise=float("nan"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match=str(blocker)):
        make_demo_data(blocker, TINY)


def test_cli_writes_then_reports_up_to_date(tmp_path, capsys):
    from vsl.cli import main

    argv = ["make-demo-data", str(tmp_path), "--images", "30", "--dev-images", "10", "--test-images", "20",
            "--img-dim", "16", "--seed", "5"]
    assert main(argv) == 0 and "wrote" in capsys.readouterr().out
    assert demo_data_ready(tmp_path, TINY)
    assert main(argv) == 0 and "up to date" in capsys.readouterr().out
    assert main(argv[:2] + ["--images", "0"]) == 2
    assert "train_images" in capsys.readouterr().err


# --- the properties the demo relies on ----------------------------------------------------------
def _named(captions, classes):
    """(5N, objects) bool: does caption 5i+k name object j of image i (any of its nouns)?"""
    nouns = [set(c) for c in dd.CLASSES]
    words = [set(c.split()) for c in captions]
    cls = np.repeat(classes, 5, axis=0)
    return np.array([[c >= 0 and bool(nouns[c] & w) for c in row] for row, w in zip(cls, words)])


def test_main_objects_are_named_by_most_captions_secondary_by_few(splits):
    split = splits["train"]
    named = _named(split.captions, split.scenes.classes)              # read back from the text
    present = np.repeat(split.scenes.present, 5, axis=0)
    rate = named.sum(0) / present.sum(0)                             # per object slot
    subject, partner, secondary = rate[0], rate[1], named[:, 2:].sum() / present[:, 2:].sum()
    assert subject == 1.0 and 0.7 < partner < 0.9 and 0.1 < secondary < 0.3
    # Per image: the subject is named by all 5 captions, a secondary object by about one.
    per_image = named.reshape(-1, 5, named.shape[1]).sum(1)
    assert per_image[:, 0].min() == 5
    assert per_image[:, 1].mean() > 3.5 and per_image[:, 2:][split.scenes.present[:, 2:]].mean() < 1.5
    np.testing.assert_array_equal(named, split.mentions[:, [0, 1, 3, 4, 5]])   # text == ground truth


def test_main_objects_own_more_regions_than_secondary(splits):
    scenes = splits["train"].scenes
    counts = np.stack([(scenes.region_owner == k).sum(1) for k in range(dd.NUM_ENTITIES)], axis=1)
    assert (counts.sum(1) == 36).all()
    secondary = counts[:, dd.SECONDARY0:dd.BACKGROUND]
    assert (counts[:, [dd.SUBJECT]] > secondary).all() and (counts[:, [dd.PARTNER]] > secondary).all()
    np.testing.assert_array_equal(secondary > 0, scenes.present[:, 2:])
    assert counts[:, :2].sum(1).mean() / 36 > 0.45 > secondary.sum(1).mean() / 36


def test_images_share_main_objects_but_stay_distinguishable(splits):
    s = splits["test"].scenes
    subjects = np.bincount(s.classes[:, 0], minlength=len(dd.CLASSES))
    assert subjects.max() >= 5                                       # many images per main object
    keys = np.c_[s.classes[:, :2], s.colors[:, :2], s.relation]
    assert len(np.unique(keys, axis=0)) > 0.95 * len(keys)          # attributes/relations tell them apart


def test_regions_are_recognisable_by_nearest_prototype(splits):
    """Each object region is closest to its own class prototype far more often than chance."""
    split, protos = splits["test"], dd.sample_prototypes(SPEC)
    owner = split.scenes.region_owner
    obj = (owner != dd.RELATION) & (owner != dd.BACKGROUND)
    slot = np.where(owner > dd.RELATION, owner - 1, owner)           # entity slot -> object column
    truth = np.take_along_axis(split.scenes.classes, np.where(obj, slot, 0), axis=1)[obj]
    x = split.images[obj]
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    accuracy = ((x @ protos.classes.T).argmax(1) == truth).mean()
    assert accuracy > 0.35, accuracy                                 # chance: 1/24


def _bag_of_words(captions):
    index = {w: i for i, w in enumerate(dd.WORDS)}
    rows = np.repeat(np.arange(len(captions)), [len(c.split()) for c in captions])
    cols = [index[w] for c in captions for w in c.split()]
    out = np.zeros((len(captions), len(dd.WORDS)))
    out[rows, cols] = 1.0
    return out


def test_bag_of_words_baseline_learns_but_is_far_from_perfect(splits):
    """Ridge regression from pooled regions to caption words retrieves far above chance, not perfectly."""
    train, test = splits["train"], splits["test"]
    pool = lambda ims: np.concatenate([ims.mean(1), ims.max(1)], axis=1)
    x, x_test = pool(train.images), pool(test.images)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_test = np.c_[(x - mu) / sd, np.ones(len(x))], np.c_[(x_test - mu) / sd, np.ones(len(x_test))]
    y = _bag_of_words(train.captions).reshape(len(x), 5, -1).mean(1)
    w = np.linalg.solve(x.T @ x + 10 * np.eye(x.shape[1]), x.T @ y)
    idf = np.log(len(train.captions) / (1 + _bag_of_words(train.captions).sum(0)))
    img = x_test @ w * idf
    cap = _bag_of_words(test.captions) * idf
    scores = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (cap / np.linalg.norm(cap, axis=1, keepdims=True)).T
    n = len(img)
    i2t_r1 = (scores.argmax(1) // 5 == np.arange(n)).mean()
    t2i_r1 = (scores.argmax(0) == np.arange(5 * n) // 5).mean()
    # chance: 1/n = 0.5% for both directions
    assert 0.2 < t2i_r1 < 0.9 and 0.2 < i2t_r1 < 0.95, (i2t_r1, t2i_r1)


# --- difficulty ---------------------------------------------------------------------------------
def _digest(folder):
    import hashlib

    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):           # features, captions and vocabulary; not thumbnails
        if p.is_file() and p.name != dd.MANIFEST and not any(part.endswith("_thumbs") for part in p.parts) \
                and not p.name.endswith(("_boxes.npy", "_sizes.npy")):      # the region boxes came later
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_default_difficulty_writes_the_files_of_the_generator_before_difficulty_levels(tmp_path):
    # The digest of TINY's data files as written by the generator before `difficulty` existed.
    make_demo_data(tmp_path, TINY)
    assert _digest(tmp_path) == "9c8d539500cbc796537c4e75d2df1d4d61d86c6d476dfa8610e266f63f41549e"
    assert DemoSpec.at("default", seed=5, train_images=30, dev_images=10, test_images=20, img_dim=16) == TINY


def test_hard_difficulty_is_harder_in_every_knob():
    hard = DemoSpec.at("hard", test_images=50)
    assert (hard.train_images, hard.feature_noise, hard.difficulty) == (1500, 2.5, "hard")
    assert DemoSpec.at("hard", train_images=99, feature_noise=1.0).train_images == 99    # given values win
    easy, harder = dd.sample_prototypes(DemoSpec(img_dim=64)), dd.sample_prototypes(DemoSpec.at("hard", img_dim=64))

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    dog, cat, bus = 0, 1, 11                                   # same family (animals) and another
    assert cos(harder.classes[dog], harder.classes[cat]) > cos(easy.classes[dog], easy.classes[cat]) + 0.2
    assert cos(harder.classes[dog], harder.classes[cat]) > cos(harder.classes[dog], harder.classes[bus]) + 0.2
    assert np.linalg.norm(harder.colors, axis=1).mean() < np.linalg.norm(easy.colors, axis=1).mean()
    # Secondary objects are named more often (0.45 instead of 0.2 of the captions).
    rates = []
    for spec in (DemoSpec(dev_images=200), DemoSpec.at("hard", dev_images=200)):
        split = sample_split(spec, "dev")
        present = np.repeat(split.scenes.present[:, 2:], 5, axis=0)
        rates.append(split.mentions[:, dd.SECONDARY0:dd.BACKGROUND][present].mean())
    assert rates[0] == pytest.approx(0.2, abs=0.03) and rates[1] == pytest.approx(0.45, abs=0.03)
    with pytest.raises(ConfigError, match="difficulty must be one of default, hard"):
        DemoSpec(difficulty="extreme")
    with pytest.raises(ConfigError, match="difficulty must be one of"):
        DemoSpec.at("extreme")


def test_cli_difficulty_hard(tmp_path, capsys):
    from vsl.cli import main

    rc = main(["make-demo-data", str(tmp_path / "h"), "--difficulty", "hard", "--images", "3", "--dev-images", "2",
               "--test-images", "2", "--img-dim", "8"])
    assert rc == 0
    manifest = json.loads((tmp_path / "h" / dd.MANIFEST).read_text())
    assert manifest["spec"]["difficulty"] == "hard" and manifest["spec"]["feature_noise"] == 2.5


# --- thumbnails ---------------------------------------------------------------------------------
def test_every_image_gets_a_thumbnail_of_its_scene(demo):
    from PIL import Image

    from vsl.data.thumbnails import PALETTE, SIZE

    out, _ = demo
    scenes = dd.sample_scenes(SPEC, "test")
    for split in dd.DEMO_SPLITS:
        folder = dd.thumbnails_dir(out, split)
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{i}.png" for i in range(SPEC.images(split)))
    for i in range(5):
        img = Image.open(dd.thumbnails_dir(out, "test") / f"{i}.png")
        assert img.format == "PNG" and img.size == SIZE
        colours = {rgb for _, rgb in img.convert("RGB").getcolors(SIZE[0] * SIZE[1])}
        shown = {dd.COLORS[c] for c in scenes.colors[i] if c >= 0}
        for name in shown:          # each object's colour is on the picture (up to quantisation)
            assert min(sum(abs(a - b) for a, b in zip(PALETTE[name], rgb)) for rgb in colours) < 30, (i, name)
    pictures = {(dd.thumbnails_dir(out, "test") / f"{i}.png").read_bytes() for i in range(20)}
    assert len(pictures) == 20                                     # different scenes, different pictures


def test_thumbnails_are_optional_and_part_of_the_cache_key(tmp_path):
    make_demo_data(tmp_path, TINY, thumbnails=False)
    assert not dd.thumbnails_dir(tmp_path, "test").exists()
    assert demo_data_ready(tmp_path, TINY) and not demo_data_ready(tmp_path, TINY, thumbnails=True)
    make_demo_data(tmp_path, TINY)                                  # thumbnails asked for: drawn now
    assert demo_data_ready(tmp_path, TINY, thumbnails=True)
    (dd.thumbnails_dir(tmp_path, "dev") / "3.png").unlink()         # a missing picture
    assert not demo_data_ready(tmp_path, TINY, thumbnails=True)
    make_demo_data(tmp_path, TINY)
    assert (dd.thumbnails_dir(tmp_path, "dev") / "3.png").is_file()
    assert not list(tmp_path.rglob("*.tmp")), "temporary folders left behind"


# --- region boxes -------------------------------------------------------------------------------
def test_every_region_gets_the_drawn_box_of_the_object_it_shows(demo):
    from PIL import Image

    from vsl.data.thumbnails import PALETTE, SIZE, scene_layout

    out, _ = demo
    folder = out / "data" / "demo_precomp"
    W, H = SIZE
    for split in dd.DEMO_SPLITS:
        scenes = dd.sample_scenes(SPEC, split)
        boxes, sizes = np.load(folder / f"{split}_boxes.npy"), np.load(folder / f"{split}_sizes.npy")
        n = SPEC.images(split)
        assert boxes.shape == (n, 36, 4) and boxes.dtype == np.float32
        assert sizes.shape == (n, 2) and (sizes == [H, W]).all()                     # height, width
        assert (boxes[..., 0] >= 0).all() and (boxes[..., 2] <= W).all() and (boxes[..., 3] <= H).all()
        assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
        assert np.array_equal(boxes, scene_boxes(scenes))
    scenes = dd.sample_scenes(SPEC, "test")
    boxes = np.load(folder / "test_boxes.npy")
    for i in range(12):                                   # each slot's regions: that slot's drawn box
        layout = scene_layout(dd.RELATIONS[scenes.relation[i]][0])
        owner = scenes.region_owner[i]
        expect = {dd.SUBJECT: layout.subject, dd.PARTNER: layout.partner, dd.BACKGROUND: (0, 0, W, H),
                  **{dd.SECONDARY0 + j: layout.secondary[j] for j in range(dd.MAX_SECONDARY)}}
        for slot, box in expect.items():
            assert np.allclose(boxes[i][owner == slot], box, atol=1e-4), (i, slot)
        union = boxes[i][owner == dd.RELATION]           # the relation's regions: the union of both objects
        assert np.allclose(union, [min(layout.subject[0], layout.partner[0]), min(layout.subject[1], layout.partner[1]),
                                   max(layout.subject[2], layout.partner[2]), max(layout.subject[3], layout.partner[3])],
                           atol=1e-4)
        # On the picture, each secondary object's colour is denser inside its box than outside it.
        img = np.asarray(Image.open(dd.thumbnails_dir(out, "test") / f"{i}.png").convert("RGB")).astype(int)
        for j in range(dd.MAX_SECONDARY):
            if scenes.classes[i, 2 + j] < 0:
                continue
            x1, y1, x2, y2 = (int(round(v)) for v in layout.secondary[j])
            colour = np.array(PALETTE[dd.COLORS[scenes.colors[i, 2 + j]]])
            match = np.abs(img - colour).sum(-1) < 30                   # (H, W) pixels of its colour
            inside = np.zeros_like(match)
            inside[y1:y2, x1:x2] = True
            assert match[inside].mean() > 0.04 and match[inside].mean() > 2 * match[~inside].mean(), (i, j)


def test_boxes_are_written_without_thumbnails_too(tmp_path):
    make_demo_data(tmp_path, TINY, thumbnails=False)
    folder = tmp_path / "data" / "demo_precomp"
    for split in dd.DEMO_SPLITS:
        assert np.load(folder / f"{split}_boxes.npy").shape == (TINY.images(split), 36, 4)
    (folder / "dev_boxes.npy").unlink()                  # part of the dataset: a missing one regenerates it
    assert not demo_data_ready(tmp_path, TINY)


def test_an_index_of_the_demo_data_explains_its_matches_with_the_drawn_boxes(tmp_path):
    import torch

    from vsl.checkpoint import save_checkpoint
    from vsl.cli import main
    from vsl.config import Config
    from vsl.models import build_model
    from vsl.retrieval import Index

    info = make_demo_data(tmp_path / "demo", TINY, thumbnails=False)
    torch.manual_seed(0)
    config = Config(data_name=info["data_name"], data_path=info["data_path"], vocab_path=info["vocab_path"],
                    vocab_size=info["vocab_size"], img_dim=TINY.img_dim, word_dim=16, embed_size=32, sim_dim=16,
                    shortlist_dim=16)
    save_checkpoint(tmp_path / "model.pth.tar", build_model(config))
    assert main(["index", "--checkpoint", str(tmp_path / "model.pth.tar"), "--data_path", info["data_path"],
                 "--split", "test", "--out", str(tmp_path / "index"), "--device", "cpu", "--quiet"]) == 0
    index = Index.load(tmp_path / "index")
    assert index.can_explain
    first, second = index.explain("a red dog on a bench", [3, 0])
    boxes = scene_boxes(dd.sample_scenes(TINY, "test"))
    assert np.allclose(first["boxes"], boxes[3], atol=0.05) and np.allclose(second["boxes"], boxes[0], atol=0.05)
    assert first["image_size"] == [192, 144] and first["words"] == ["a", "red", "dog", "on", "a", "bench"]
    assert np.allclose(np.asarray(first["attention"]).sum(1), 1, atol=1e-3)
