import pickle
import types

import numpy as np
import pytest
import torch

from vsl.config import Config
from vsl.data import (
    Batch,
    Collate,
    EpochSampler,
    PrecompDataset,
    check_fits,
    default_max_captions,
    make_loader,
    open_features,
    read_captions,
    split_files,
)
from vsl.data.semantics import build_semantics
from vsl.data.vocab import Vocabulary
from vsl.errors import ConfigError, DataError, FitError, VSLError

WORDS = "a man woman dog cat riding sitting on the bench surfboard wave red blue".split()


def write_split(root, split="train", num_images=6, per_image=5, regions=4, dim=8, data_name="toy_precomp",
                seed=0):
    """A tiny SCAN-layout split; image i's features are all i + region/100 so samples are recognisable."""
    folder = root / data_name
    folder.mkdir(parents=True, exist_ok=True)
    ims = np.arange(num_images, dtype=np.float32)[:, None, None] + np.zeros((1, regions, dim), np.float32)
    ims += (np.arange(regions, dtype=np.float32) / 100)[None, :, None]
    np.save(folder / f"{split}_ims.npy", ims)
    rng = np.random.default_rng(seed)
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) + " ." for _ in range(num_images * per_image)]
    (folder / f"{split}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    return ims, captions


@pytest.fixture
def toy(tmp_path):
    ims, captions = write_split(tmp_path)
    vocab = Vocabulary.build(captions, threshold=1)
    return types.SimpleNamespace(root=tmp_path, ims=ims, captions=captions, vocab=vocab,
                                 dataset=PrecompDataset(tmp_path, "toy_precomp", "train", vocab))


# -- files and dataset ---------------------------------------------------------------------------
def test_split_files_layout(tmp_path):
    assert split_files(tmp_path, "coco_precomp", "testall") == (tmp_path / "coco_precomp" / "testall_ims.npy",
                                                                tmp_path / "coco_precomp" / "testall_caps.txt")


def test_dataset_samples(toy):
    ds = toy.dataset
    assert (len(ds), ds.num_images, ds.captions_per_image, ds.num_regions, ds.img_dim) == (30, 6, 5, 4, 8)
    assert isinstance(ds.images, np.memmap) and ds.images.shape == (6, 4, 8)
    image, caption, index, image_id = ds[17]
    assert (index, image_id) == (17, 3)
    assert image.dtype == torch.float32 and torch.equal(image, torch.from_numpy(toy.ims[3]))
    assert caption.dtype == torch.int64 and caption.tolist() == toy.vocab.encode(toy.captions[17])
    assert caption[0] == 1 and caption[-1] == 2
    with pytest.raises(IndexError):
        ds[30]


def test_one_caption_per_image(tmp_path):
    ims, captions = write_split(tmp_path, "test", num_images=5, per_image=1)
    ds = PrecompDataset(tmp_path, "toy_precomp", "test", Vocabulary.build(captions, 1))
    assert (ds.captions_per_image, ds.num_images) == (1, 5)
    assert torch.equal(ds[4][0], torch.from_numpy(ims[4])) and ds[4][3] == 4


def test_dev_keeps_first_5000_captions_unless_val_all(tmp_path):
    assert default_max_captions("dev") == 5000
    assert default_max_captions("dev", val_all=True) is None
    assert default_max_captions("train") is None and default_max_captions("testall") is None
    _, captions = write_split(tmp_path, "dev", num_images=1014, regions=1, dim=2)   # Flickr30K dev: 1,014 images
    vocab = Vocabulary.build(captions[:50], 1)
    ds = PrecompDataset(tmp_path, "toy_precomp", "dev", vocab, max_captions=default_max_captions("dev"))
    assert (len(ds), ds.num_images, ds.captions[-1]) == (5000, 1000, captions[4999])
    assert len(PrecompDataset(tmp_path, "toy_precomp", "dev", vocab, default_max_captions("dev", True))) == 5070


def test_dataset_pickles_without_features(toy):
    ds = toy.dataset
    ds[0]                                                       # opens the file descriptor
    blob = pickle.dumps(ds)
    assert len(blob) < 4096 + sum(len(c) for c in ds.captions) + 40 * len(toy.vocab)
    assert b"surfboard" in blob and toy.ims.tobytes() not in blob
    clone = pickle.loads(blob)
    assert clone._images is None and clone._fd is None
    assert torch.equal(clone[12][0], ds[12][0]) and clone.images.shape == ds.images.shape


def test_read_image_does_not_map_pages(toy):
    out = toy.dataset.read_image(5)
    assert out.flags.owndata and out.flags.writeable and np.array_equal(out, toy.ims[5])


# -- batches -------------------------------------------------------------------------------------
def test_collate_pads_and_keeps_order(toy):
    ds = toy.dataset
    batch = Collate()([ds[i] for i in (3, 25, 7)])
    assert isinstance(batch, Batch) and len(batch) == 3
    lengths = [len(toy.vocab.encode(toy.captions[i])) for i in (3, 25, 7)]
    assert batch.lengths.tolist() == lengths and batch.lengths.dtype == torch.int64
    assert batch.captions.shape == (3, max(lengths)) and batch.captions.dtype == torch.int64
    for row, i in enumerate((3, 25, 7)):
        assert batch.captions[row, :lengths[row]].tolist() == toy.vocab.encode(toy.captions[i])
        assert (batch.captions[row, lengths[row]:] == 0).all()
    assert batch.caption_ids.tolist() == [3, 25, 7] and batch.image_ids.tolist() == [0, 5, 1]
    assert batch.images.shape == (3, 4, 8) and torch.equal(batch.images[1], torch.from_numpy(toy.ims[5]))
    assert batch.image_semantic is None and batch.caption_semantic is None
    moved = batch.to("cpu")
    assert torch.equal(moved.captions, batch.captions) and moved.image_semantic is None


@pytest.mark.parametrize("kind", ["tfidf", "cider"])
def test_collate_semantic_matrices(toy, kind):
    semantics = build_semantics(kind, toy.dataset.captions, toy.dataset.captions_per_image)
    ids = [3, 25, 7, 4]
    batch = Collate(semantics, textual=True)([toy.dataset[i] for i in ids])
    assert batch.image_semantic.dtype == torch.float32 and batch.image_semantic.shape == (4, 4)
    np.testing.assert_array_equal(batch.image_semantic.numpy(), semantics.image_semantic(np.array(ids), 5))
    np.testing.assert_array_equal(batch.caption_semantic.numpy(), semantics.caption_semantic(np.array(ids)))
    # captions 3 and 4 belong to the same image: identical image rows
    np.testing.assert_array_equal(batch.image_semantic[0].numpy(), batch.image_semantic[3].numpy())
    assert Collate(semantics)([toy.dataset[i] for i in ids]).caption_semantic is None


def test_collate_rejects_mismatched_semantics(toy):
    semantics = build_semantics("tfidf", toy.dataset.captions, 1)
    with pytest.raises(ValueError, match="captions per image"):
        Collate(semantics)([toy.dataset[i] for i in (3, 9)])
    with pytest.raises(ConfigError):
        Collate(None, textual=True)


# -- sampling ------------------------------------------------------------------------------------
def test_sampler_seeded_permutation():
    sampler = EpochSampler(100, 32, seed=3)
    sampler.set_epoch(2)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 4 and [len(b) for b in batches] == [32, 32, 32, 4]
    expected = torch.randperm(100, generator=torch.Generator().manual_seed(3 * 1000003 + 2)).tolist()
    assert sum(batches, []) == expected
    sampler.set_epoch(3)
    assert sum(list(sampler), []) != expected
    assert sum(list(EpochSampler(10, 4, shuffle=False)), []) == list(range(10))
    assert len(EpochSampler(100, 32, drop_last=True)) == 3


def test_sampler_shards_equal_one_process():
    single = EpochSampler(200, 16, seed=1)
    ranks = [EpochSampler(200, 16, seed=1, rank=r, world_size=4) for r in range(4)]
    for s in (single, *ranks):
        s.set_epoch(5)
    per_rank = [list(s) for s in ranks]
    assert all(len(p) == len(single) == 13 for p in per_rank)
    for b, batch in enumerate(single):
        assert sum((p[b] for p in per_rank), []) == batch                   # contiguous slices, in rank order
    assert [len(per_rank[r][-1]) for r in range(4)] == [2, 2, 2, 2]         # last global batch of 8 split evenly


def test_sampler_resumes_mid_epoch():
    sampler = EpochSampler(100, 8, seed=0)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, start_batch=5)
    assert len(sampler) == len(full) - 5 and list(sampler) == full[5:]
    with pytest.raises(ValueError):
        sampler.set_epoch(4, start_batch=99)
    with pytest.raises(ConfigError):
        EpochSampler(100, 10, world_size=3)


def test_loader_with_workers_matches_in_process(toy):
    semantics = build_semantics("tfidf", toy.dataset.captions, 5)
    kwargs = dict(shuffle=True, seed=7, epoch=1, semantics=semantics, start_batch=1)
    in_process = list(make_loader(toy.dataset, 8, workers=0, **kwargs))
    workers = list(make_loader(toy.dataset, 8, workers=2, **kwargs))
    assert len(in_process) == 3                                              # 4 batches of 30, first skipped
    for a, b in zip(in_process, workers):
        assert torch.equal(a.caption_ids, b.caption_ids) and torch.equal(a.images, b.images)
        assert torch.equal(a.image_semantic, b.image_semantic)
    expected = EpochSampler(30, 8, seed=7)
    expected.set_epoch(1, 1)
    assert [b.caption_ids.tolist() for b in in_process] == list(expected)


# -- bad input: one-line errors naming the file ---------------------------------------------------
def assert_one_line(info, *parts):
    text = str(info.value)
    assert "\n" not in text and isinstance(info.value, VSLError)
    for part in parts:
        assert str(part) in text, (part, text)


@pytest.mark.parametrize("missing", ["train_ims.npy", "train_caps.txt"])
def test_missing_split_file(toy, missing):
    (toy.root / "toy_precomp" / missing).unlink()
    with pytest.raises(DataError) as info:
        PrecompDataset(toy.root, "toy_precomp", "train", toy.vocab)
    assert_one_line(info, toy.root / "toy_precomp" / missing, "missing")


def test_caption_count_mismatch(toy):
    path = toy.root / "toy_precomp" / "train_caps.txt"
    path.write_text("\n".join(toy.captions[:29]) + "\n")
    with pytest.raises(DataError) as info:
        PrecompDataset(toy.root, "toy_precomp", "train", toy.vocab)
    assert_one_line(info, path, "29 captions for 6 images", "expected 30")


@pytest.mark.parametrize("array, message", [
    (np.zeros((6, 32), np.float32), "rank-3"),
    (np.zeros((6, 4, 8), np.int32), "floating-point"),
    (np.zeros((6, 4, 8), np.complex64), "floating-point"),
    (np.zeros((0, 4, 8), np.float32), "at least one image"),
])
def test_bad_feature_array(tmp_path, array, message):
    path = tmp_path / "x_ims.npy"
    np.save(path, array)
    with pytest.raises(DataError) as info:
        open_features(path)
    assert_one_line(info, path, message)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, ">f4"])
def test_other_float_widths_are_read_as_float32(toy, dtype):
    """As the published loader (torch.Tensor(array)) does: any float file gives float32 samples."""
    path = toy.root / "toy_precomp" / "train_ims.npy"
    np.save(path, toy.ims.astype(dtype))
    dataset = PrecompDataset(toy.root, "toy_precomp", "train", toy.vocab)
    image = dataset[17][0]
    assert image.dtype == torch.float32
    assert torch.equal(image, torch.from_numpy(toy.ims[3].astype(dtype).astype(np.float32)))


def test_non_finite_features_name_the_file_and_image(toy):
    path = toy.root / "toy_precomp" / "train_ims.npy"
    ims = toy.ims.copy()
    ims[4, 1, 2] = np.nan
    np.save(path, ims)
    dataset = PrecompDataset(toy.root, "toy_precomp", "train", toy.vocab)
    dataset[0]                                                              # image 0 is fine
    with pytest.raises(DataError) as info:
        dataset[4 * 5]
    assert_one_line(info, path, "image 4", "non-finite")
    # Through DataLoader workers the same one-line message arrives, without the worker's traceback.
    loader = make_loader(dataset, batch_size=30, shuffle=False, workers=1)
    with pytest.raises(DataError) as info:
        for _ in loader:
            pass
    assert_one_line(info, path, "image 4", "non-finite")
    assert "Traceback" not in str(info.value)


def test_truncated_or_foreign_feature_file(toy):
    path = toy.root / "toy_precomp" / "train_ims.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(DataError) as info:
        PrecompDataset(toy.root, "toy_precomp", "train", toy.vocab)
    assert_one_line(info, path, "truncated", f"expected {len(data)}")
    path.write_bytes(b"not an array at all")
    with pytest.raises(DataError) as info:
        open_features(path)
    assert_one_line(info, path, "not a .npy")
    path.write_bytes(data[:40])                                               # header cut short
    with pytest.raises(DataError) as info:
        open_features(path)
    assert_one_line(info, path)


def test_empty_caption_line(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_text("a dog .\na cat .\n   \na bird .\n")
    with pytest.raises(DataError) as info:
        read_captions(path)
    assert_one_line(info, path, "line 3", "empty")
    path.write_text("a dog .\n\na cat .\n")
    with pytest.raises(DataError, match="line 2 is an empty caption"):
        read_captions(path)
    path.write_text("")
    with pytest.raises(DataError, match="no captions"):
        read_captions(path)
    path.write_text("a dog .\na cat .\n\n  \n\n")                    # blank lines after the last caption
    assert read_captions(path) == ["a dog .", "a cat ."]


def test_non_utf8_caption_line(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_bytes("a dog .\na café .\n".encode() + b"a \xff\xfe cat .\n")
    with pytest.raises(DataError) as info:
        read_captions(path)
    assert_one_line(info, path, "line 3", "UTF-8")


def test_caption_file_details(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_bytes("\ufeffa dog .\r\nA café .  \r\nlast line without newline".encode())
    assert read_captions(path) == ["a dog .", "A café .", "last line without newline"]
    with pytest.raises(DataError, match="not found"):
        read_captions(tmp_path / "absent.txt")


def test_checkpoint_must_fit_vocabulary_and_features(toy):
    source = toy.root / "model_best.pth.tar"
    good = Config(vocab_size=len(toy.vocab), img_dim=8, num_regions=toy.dataset.num_regions)
    check_fits(good, toy.dataset, toy.vocab, source=source)
    with pytest.raises(FitError) as info:
        check_fits(good.replace(vocab_size=11353), toy.dataset, toy.vocab, source=source)
    assert_one_line(info, source, "11353", str(len(toy.vocab)))
    with pytest.raises(FitError) as info:
        check_fits(good.replace(img_dim=2048), toy.dataset, toy.vocab, source=source)
    assert_one_line(info, source, "2048", " 8 ")
    with pytest.raises(FitError) as info:
        check_fits(good.replace(num_regions=36), toy.dataset, toy.vocab, source=source)
    assert_one_line(info, source, "num_regions 36", f" {toy.dataset.num_regions} ")
