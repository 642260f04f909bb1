"""A gallery that grows and compacts in place (:mod:`vsl.retrieval.append`): ``vsl index --add`` /
``--compact`` against fresh builds of the same images, resume, refusals, crashes at any point.

Runs on the retrieval tests' small fitted checkpoint and split (their module fixtures, re-imported);
the gallery grows from the dev split (12 images) by the test split (24), compared with a fresh build
of a split holding both.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_retrieval import _error, data, fitted, published  # noqa: F401
from vsl.cli import main
from vsl.retrieval import Index, build_index
from vsl.retrieval.grow import writer_lock

pytestmark = pytest.mark.usefixtures("single_thread")
QUERIES = ["a red dog", "a blue car near a green cat", "a dog"]
#: float16 storage: scores of the same pair from two builds agree to its rounding.
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def both(data, tmp_path_factory):
    """A data folder whose split ``both`` is the dev split followed by the test split."""
    root = tmp_path_factory.mktemp("both")
    src, dst = Path(data["data_path"]) / "coco_precomp", root / "coco_precomp"
    shutil.copytree(src, dst)
    np.save(dst / "both_ims.npy", np.concatenate([np.load(src / "dev_ims.npy"), np.load(src / "test_ims.npy")]))
    (dst / "both_caps.txt").write_text((src / "dev_caps.txt").read_text() + (src / "test_caps.txt").read_text())
    return str(root)


def _build(fitted, data, out, split="dev", **kw):
    build_index(fitted[0], data["data_path"], split, out, vocab_path=data["vocab_path"], device="cpu",
                progress=False, **kw)
    return out


def _add_args(fitted, data, out, split="test"):
    return ["index", "--out", str(out), "--add", "--checkpoint", str(fitted[0]), "--data_path", data["data_path"],
            "--split", split, "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def fresh(fitted, data, both, tmp_path_factory):
    return _build(fitted, {**data, "data_path": both}, tmp_path_factory.mktemp("fresh") / "idx", split="both")


def _hits(index, shortlist):
    text = [[(h.id, h.score, tuple(h.captions)) for h in r.hits]
            for r in index.search_text(QUERIES, k=index.num_images, shortlist=shortlist)]
    image = [[(h.id, h.score, tuple(h.captions)) for h in r.hits]
             for r in index.search_image([0, index.num_images // 2, index.num_images - 1], k=20,
                                                 shortlist=shortlist)]
    return text + image


def _same(a, b):
    """The same results: scores rank by rank within float16 rounding, the same captions, and the same
    id at every rank whose score no other result shares (a caption the split repeats ties), nor the last."""
    assert len(a) == len(b)
    compared = []
    for ra, rb in zip(a, b):
        scores = np.array([s for _, s, _ in ra])
        np.testing.assert_allclose(scores, [s for _, s, _ in rb], atol=TOLERANCE)
        assert sorted(c for _, _, c in ra) == sorted(c for _, _, c in rb)
        alone = ((np.abs(scores[:, None] - scores[None, :]) <= 1e-6).sum(1) == 1) & \
            (np.abs(scores - scores[-1]) > 1e-6)                 # a twin of the last may be the one cut off
        assert [x[0] for x, keep in zip(ra, alone) if keep] == [y[0] for y, keep in zip(rb, alone) if keep]
        compared += alone.tolist()
    assert np.mean(compared) > 0.3                               # most ranks are compared by their ids


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_an_added_split_searches_as_a_fresh_build_of_both(fitted, data, both, fresh, tmp_path, capsys, index_type):
    out = _build(fitted, data, tmp_path / "idx", index_type=index_type)
    assert main(_add_args(fitted, data, out)) == 0
    assert "generation 1, 24 images added (ids 12..35), 120 captions" in capsys.readouterr().out
    grown = Index.load(out)
    assert (grown.num_images, grown.num_captions, grown.generation) == (36, 180, 1)
    assert grown.captions_of_image(20) == Index.load(fresh).captions_of_image(20)
    reference = fresh if index_type == "flat" else _build(fitted, {**data, "data_path": both}, tmp_path / "f",
                                                          split="both", index_type=index_type)
    # Exhaustive and flat two-stage search are exact: the same as the fresh build. HNSW graphs grown
    # in two steps differ from one built at once, but a shortlist covering the gallery is exact too.
    for shortlist in (0, 36 * 5):
        _same(_hits(grown, shortlist), _hits(Index.load(reference), shortlist))
    if index_type == "flat":
        _same(_hits(grown, 10), _hits(Index.load(fresh), 10))


def test_the_same_add_again_does_nothing_and_says_so(fitted, data, tmp_path, capsys):
    out = _build(fitted, data, tmp_path / "idx")
    assert main(_add_args(fitted, data, out)) == 0
    capsys.readouterr()
    manifest = (out / "manifest.json").read_text()
    files = sorted(p.name for p in out.iterdir())
    assert main(_add_args(fitted, data, out)) == 0
    assert "already added in generation 1 (image ids 12..35); nothing to do" in capsys.readouterr().out
    assert (out / "manifest.json").read_text() == manifest and sorted(p.name for p in out.iterdir()) == files
    # Growing twice: ids continue, generations count, every segment is searched.
    assert main(_add_args(fitted, data, out, split="train")) == 0
    grown = Index.load(out)
    assert (grown.num_images, grown.generation) == (96, 2)
    train = Path(data["data_path"]) / "coco_precomp" / "train_caps.txt"
    assert grown.captions_of_image(36) == train.read_text().split("\n")[:5]


def test_add_refuses_another_checkpoint_other_dimensions_and_mixed_captions(fitted, data, tmp_path, capsys):
    out = _build(fitted, data, tmp_path / "idx")
    manifest = (out / "manifest.json").read_text()
    other = tmp_path / "other.pth.tar"
    other.write_bytes(Path(fitted[0]).read_bytes() + b"\0")
    args = _add_args(fitted, data, out)
    args[args.index("--checkpoint") + 1] = str(other)
    assert main(args) == 2
    err = _error(capsys)
    assert str(other) in err and str(Path(fitted[0]).resolve()) in err and "built from" in err
    feats = tmp_path / "feats"
    feats.mkdir()
    np.save(feats / "a.npy", np.zeros((3, 36, 32), np.float32))
    base = ["index", "--out", str(out), "--add", "--checkpoint", str(fitted[0]), "--quiet", "--device", "cpu"]
    assert main(base + ["--features", str(feats)]) == 2
    err = _error(capsys)
    assert "img_dim 64" in err and "have 32" in err and str(feats) in err
    np.save(feats / "a.npy", np.zeros((3, 36, 64), np.float32))
    assert main(base + ["--features", str(feats)]) == 2
    assert "0 captions per image, the index" in _error(capsys)
    assert main(base + ["--features", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in _error(capsys)
    with writer_lock(out):
        assert main(_add_args(fitted, data, out)) == 2
        assert "another vsl index is writing" in _error(capsys)
    assert main(["index", "--out", str(tmp_path / "none"), "--add", "--checkpoint", str(fitted[0]),
                 "--split", "test"]) == 2
    assert "no such index folder" in _error(capsys)
    assert (out / "manifest.json").read_text() == manifest and Index.load(out).generation == 0


def test_a_truncated_feature_file_is_refused_and_nothing_changes(fitted, data, tmp_path, capsys):
    feats = tmp_path / "g"
    feats.mkdir()
    np.save(feats / "a.npy", np.load(Path(data["data_path"]) / "coco_precomp" / "test_ims.npy")[:6])
    gallery = tmp_path / "gallery"
    build_index(fitted[0], out=gallery, features=feats, vocab_path=data["vocab_path"], device="cpu", progress=False)
    manifest = (gallery / "manifest.json").read_text()
    more = tmp_path / "more"
    more.mkdir()
    np.save(more / "b.npy", np.load(Path(data["data_path"]) / "coco_precomp" / "dev_ims.npy"))
    raw = (more / "b.npy").read_bytes()
    (more / "b.npy").write_bytes(raw[:len(raw) // 2])
    assert main(["index", "--out", str(gallery), "--add", "--checkpoint", str(fitted[0]), "--features", str(more),
                 "--quiet", "--device", "cpu"]) == 2
    assert "b.npy" in _error(capsys)
    assert (gallery / "manifest.json").read_text() == manifest
    (more / "b.npy").write_bytes(raw)
    assert main(["index", "--out", str(gallery), "--add", "--checkpoint", str(fitted[0]), "--features", str(more),
                 "--quiet", "--device", "cpu"]) == 0
    grown = Index.load(gallery)
    assert grown.num_images == 18 and grown.num_captions == 0
    assert [h.id for h in grown.search_text(["a dog"], k=18, shortlist=18)[0].hits] == \
        [h.id for h in grown.search_text(["a dog"], k=18, shortlist=0)[0].hits]


def test_compact_reclaims_removed_rows_keeping_ids_and_results(fitted, data, tmp_path, capsys):
    out = _build(fitted, data, tmp_path / "idx")
    assert main(_add_args(fitted, data, out)) == 0
    index = Index.load(out)
    gone = [h.id for h in index.search_text(["a dog"], k=6, shortlist=20)[0].hits][::2] + [14]
    (tmp_path / "ids.txt").write_text("".join(f"{i}\n" for i in gone))
    assert main(["index", "--out", str(out), "--remove", str(tmp_path / "ids.txt")]) == 0
    removed = Index.load(out)
    size = sum(json.loads((out / "manifest.json").read_text())["files"].values())
    capsys.readouterr()
    assert main(["index", "--out", str(out), "--compact", "--quiet"]) == 0
    assert "generation 3, compacted to 32 images" in capsys.readouterr().out
    compacted = Index.load(out)
    listed = json.loads((out / "manifest.json").read_text())["files"]
    assert sum(listed.values()) < size * 0.95 and not any(".s1." in f for f in listed)
    # The space is reclaimed now: only the new generation's files are left.
    assert {p.name for p in out.iterdir()} == set(listed) | {"manifest.json", "coco_precomp_vocab.json", ".lock"}
    # A reader that read generation 2's manifest but opens its files only now gets generation 3.
    late = Index._open(out, removed.manifest, removed.model, removed.vocab, removed.device)
    assert late.generation == 3 and late.num_images == 36
    assert len(compacted.regions) == 32 and compacted.image_faiss.ntotal == 32
    for shortlist in (0, 10, 200):
        _same(_hits(compacted, shortlist), _hits(removed, shortlist))
    with pytest.raises(Exception, match="was removed"):
        compacted.search_image([gone[0]])
    assert main(["index", "--out", str(out), "--compact", "--quiet"]) == 0
    assert "nothing to compact" in capsys.readouterr().out
    # Growing after a compaction: ids continue after the last id, not the last row.
    assert main(_add_args(fitted, data, out, split="train")) == 0
    grown = Index.load(out)
    assert grown.num_images == 96 and grown.generation == 4
    train = (Path(data["data_path"]) / "coco_precomp" / "train_caps.txt").read_text().split("\n")
    assert grown.captions_of_image(37) == train[5:10]
    hits = grown.search_text(["a dog"], k=90, shortlist=0)[0].hits
    assert not {h.id for h in hits} & set(gone) and len(hits) == 90
    assert [h.id for h in grown.search_text(["a dog"], k=90, shortlist=96)[0].hits] == [h.id for h in hits]


KILLER = """
import os, random, signal, sys
import vsl.fileio as fileio
random.seed(int(sys.argv[4]))
calls = [0]
limit = int(sys.argv[5])
real = fileio.atomic_write
def dying(path, write, fsync=False):
    calls[0] += 1
    if calls[0] == limit:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, write, fsync)
for name in ("vsl.fileio", "vsl.retrieval.store", "vsl.retrieval.append", "vsl.retrieval.faiss_index",
             "vsl.retrieval.build", "vsl.retrieval.grow"):
    module = __import__(name, fromlist=["x"])
    if hasattr(module, "atomic_write"):
        module.atomic_write = dying
    if hasattr(module, "atomic_write_text"):
        module.atomic_write_text = lambda p, t: dying(p, lambda fh: fh.write(t.encode()))
from vsl.cli import main
sys.exit(main(["index", "--out", sys.argv[1], "--add", "--checkpoint", sys.argv[2], "--data_path", sys.argv[3],
               "--split", "test", "--quiet", "--device", "cpu", "--block_images", "5"]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_an_add_killed_at_any_point_leaves_the_previous_generation_and_resumes(fitted, data, fresh, tmp_path, seed):
    """Killed at a random one of its atomic writes (progress files, FAISS files, captions, the manifest):
    the index still reads as generation 0 with its results, and the same command finishes the add."""
    out = _build(fitted, data, tmp_path / "idx", block_images=5)
    before = _hits(Index.load(out), 10)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # An add of 24 images in blocks of 5 makes about 12 atomic writes; the manifest is the last.
    limit = int(np.random.default_rng(seed).integers(1, 13))
    proc = subprocess.run([sys.executable, "-c", KILLER, str(out), str(fitted[0]), data["data_path"], str(seed),
                           str(limit)], env=env, capture_output=True)
    assert proc.returncode in (-9, 0), proc.stderr.decode()[-2000:]
    still = Index.load(out)
    if proc.returncode == -9:
        assert still.generation == 0
        _same(_hits(still, 10), before)
    assert main(_add_args(fitted, data, out)) == 0
    grown = Index.load(out)
    assert grown.generation == 1 and grown.num_images == 36
    _same(_hits(grown, 0), _hits(Index.load(fresh), 0))
    assert not list(out.glob("progress-*.json"))
    manifest = json.loads((out / "manifest.json").read_text())
    generation_0 = {"images.faiss", "captions.faiss"}             # a reader of generation 0 may hold them
    listed = set(manifest["files"]) | generation_0 | {"manifest.json", "coco_precomp_vocab.json", ".lock"}
    assert {p.name for p in out.iterdir()} <= listed


def test_serve_follows_the_manifest_and_adds_and_removes_by_api(fitted, data, tmp_path):
    """A server picks up a generation another process writes, without failing a request; its admin
    routes add and remove (token checked, a second writer 409, bad ids one line, nothing changed)."""
    import threading
    import time

    from fastapi.testclient import TestClient

    from vsl.serve.app import create_app

    out = _build(fitted, data, tmp_path / "idx")
    auth = {"Authorization": "Bearer s3cret"}
    with TestClient(create_app(Index.load(out), workers=2, admin_token="s3cret", watch_s=0.05),
                    raise_server_exceptions=False) as client:
        failures, stop = [], threading.Event()

        def pound():
            while not stop.is_set():
                r = client.get("/api/search", params={"q": "a dog", "k": 5, "shortlist": 20})
                if r.status_code != 200:
                    failures.append(r.text)

        threads = [threading.Thread(target=pound) for _ in range(2)]
        for t in threads:
            t.start()
        assert main(_add_args(fitted, data, out)) == 0                 # another process's write
        deadline = time.monotonic() + 20
        while client.get("/api/info").json()["generation"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
        info = client.get("/api/info").json()
        assert (info["generation"], info["num_images"]) == (1, 36) and not failures
        assert client.get("/api/search", params={"image_id": 30}).status_code == 200

        assert client.post("/api/remove", json={"ids": [3]}).status_code == 401
        assert client.post("/api/add", json={"features": "x"}, headers={"Authorization": "Bearer no"}).status_code == 401
        r = client.post("/api/remove", json={"ids": [3, 999]}, headers=auth)
        assert r.status_code == 422 and "unknown image ids 999" in r.json()["error"] and "\n" not in r.json()["error"]
        with writer_lock(out):
            r = client.post("/api/remove", json={"ids": [3]}, headers=auth)
            assert r.status_code == 409 and "another vsl index is writing" in r.json()["error"]
        assert client.get("/api/info").json()["generation"] == 1
        r = client.post("/api/remove", json={"ids": [3, 20]}, headers=auth)
        assert r.status_code == 200 and r.json() == {"generation": 2, "previous": 1, "removed": 2}
        hits = client.get("/api/search", params={"q": "a dog", "k": 34, "shortlist": 0}).json()["results"]
        assert len(hits) == 34 and not {h["id"] for h in hits} & {3, 20}
        assert client.post("/api/add", json={"split": "train"}, headers=auth).status_code == 422
        r = client.post("/api/add", json={"data_path": data["data_path"], "split": "train"}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json() == {"generation": 3, "previous": 2, "images": 60, "captions": 300, "first_image": 36,
                            "already": False}
        assert client.get("/api/info").json()["num_images"] == 96
        r = client.post("/api/add", json={"data_path": data["data_path"], "split": "train"}, headers=auth)
        assert r.json()["already"] is True and r.json()["generation"] == 3


def test_packed_tokens_pad_a_block_as_the_whole_list_would():
    """Tokens.padded(lo, hi) equals pad_token_ids of those captions' id lists (four bytes a word kept)."""
    from vsl.data import Vocabulary
    from vsl.retrieval.build import Tokens
    from vsl.runtime import pad_token_ids

    vocab = Vocabulary(["a", "dog", "red", "car", "near"])
    captions = ["a dog", "a red car near a dog", "car", "a zebra near a red red dog", "dog dog"] * 3
    tokens = Tokens.encode(vocab, captions, chunk=4)
    assert tokens.ids.dtype == np.int32 and len(tokens) == len(captions)
    for lo, hi in ((0, 15), (3, 8), (14, 15)):
        ids, lengths = tokens.padded(lo, hi)
        want_ids, want_lengths = pad_token_ids([vocab.encode(c) for c in captions[lo:hi]])
        assert ids.tolist() == want_ids.tolist() and lengths.tolist() == want_lengths.tolist()


@pytest.mark.parametrize("index_type", ["hnsw", "IVF4,Flat", "IVF4,PQ4x4fs,RFlat"])
def test_an_id_mapped_index_searches_with_the_same_depth_and_selector(index_type):
    """A compacted gallery's FAISS index (an id map around the index type) takes the search depth and
    the removed-id selector of its inner index, and answers in ids, not rows."""
    import faiss

    from vsl.retrieval.faiss_index import excluding, make_faiss, search, search_parameters

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(0, 800, 2, dtype=np.int64)
    index = make_faiss(x, index_type, ids=ids)
    params = search_parameters(index, 10, ef_search=77, nprobe=3, k_factor=5)
    if index_type == "hnsw":
        assert params.efSearch == 77
    elif "RFlat" in index_type:
        assert params.k_factor == 5 and faiss.downcast_index(index.index).k_factor is not None
    else:
        assert params.nprobe == 3
    _, found = search(index, x[:5], 5, nprobe=4, ef_search=400, k_factor=50)
    assert found[:, 0].tolist() == ids[:5].tolist()                 # each vector's own id, not its row
    _, found = search(index, x[:5], 5, excluding(ids[:5]), nprobe=4, ef_search=400, k_factor=50)
    assert not set(found.ravel().tolist()) & set(ids[:5].tolist()) and (found >= 0).all()
