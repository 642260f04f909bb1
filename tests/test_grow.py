"""A gallery that shrinks without rebuilding (:mod:`vsl.retrieval.grow`): generations, tombstones, the lock.

Runs on the retrieval tests' small fitted checkpoint and split (their module fixtures, re-imported).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from test_retrieval import _error, data, exhaustive_scores, fitted, index_dir, published  # noqa: F401
from vsl.cli import main
from vsl.retrieval import Index, build_index
from vsl.retrieval.grow import writer_lock

pytestmark = pytest.mark.usefixtures("single_thread")


def _copy(index_dir, tmp_path):
    out = tmp_path / "idx"
    shutil.copytree(index_dir, out)
    return out


def _ids(tmp_path, ids):
    path = tmp_path / "ids.txt"
    path.write_text("".join(f"{i}\n" for i in ids))
    return str(path)


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_removed_images_and_their_captions_never_come_out_of_search(fitted, data, tmp_path, index_type, capsys):
    out = tmp_path / "idx"
    build_index(fitted[0], data["data_path"], "test", out, vocab_path=data["vocab_path"], device="cpu",
                progress=False, index_type=index_type)
    before = Index.load(out)
    assert before.generation == 0 and before.info()["generation"] == 0
    n = before.num_images
    top = [h.id for h in before.search_text(["a dog"], k=n, shortlist=n)[0].hits]
    gone = top[:3]
    assert main(["index", "--out", str(out), "--remove", _ids(tmp_path, gone)]) == 0
    assert "generation 1" in capsys.readouterr().out
    after = Index.load(out)
    assert after.generation == 1
    for shortlist in (n, 5, 0):
        hits = [h.id for h in after.search_text(["a dog"], k=n, shortlist=shortlist)[0].hits]
        assert not set(hits) & set(gone) and len(hits) == n - 3   # k = n lifts the shortlist to n
    # The rest keeps its order and scores: removal re-encodes nothing.
    assert [h.id for h in after.search_text(["a dog"], k=n - 3, shortlist=0)[0].hits] == \
        [i for i in [h.id for h in before.search_text(["a dog"], k=n, shortlist=0)[0].hits] if i not in gone]
    cpi = after.captions_per_image
    hidden = {c for i in gone for c in range(cpi * i, cpi * (i + 1))}
    for shortlist in (after.num_captions, 0):
        caps = [h.id for h in after.search_image([top[5]], k=after.num_captions - len(hidden),
                                                 shortlist=shortlist)[0].hits]
        assert not set(caps) & hidden and len(caps) == after.num_captions - len(hidden)
    with pytest.raises(Exception, match="was removed"):
        after.search_image([gone[0]])


def test_removing_unknown_or_removed_ids_changes_nothing(index_dir, tmp_path, capsys):
    out = _copy(index_dir, tmp_path)
    manifest = (out / "manifest.json").read_text()
    assert main(["index", "--out", str(out), "--remove", _ids(tmp_path, [1, 999, 1000, -4, 5000, 6001, 7])]) == 2
    err = _error(capsys)
    assert "unknown image ids -4, 999, 1000, 5000, 6001" in err and "nothing removed" in err
    assert (out / "manifest.json").read_text() == manifest
    assert main(["index", "--out", str(out), "--remove", _ids(tmp_path, [2])]) == 0
    capsys.readouterr()
    manifest = (out / "manifest.json").read_text()
    assert main(["index", "--out", str(out), "--remove", _ids(tmp_path, [3, 2])]) == 2
    assert "already removed: 2;" in _error(capsys)
    assert (out / "manifest.json").read_text() == manifest
    (tmp_path / "bad.txt").write_text("3\nseven\n")
    assert main(["index", "--out", str(out), "--remove", str(tmp_path / "bad.txt")]) == 2
    assert "'seven'" in _error(capsys)
    # Generation 2 keeps generation 1's tombstones and cleans nothing a reader of generation 1 still lists.
    assert main(["index", "--out", str(out), "--remove", _ids(tmp_path, [3])]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["generation"] == 2 and np.load(out / m["removed_images"]).tolist() == [2, 3]
    assert (out / "removed-g1.npy").exists()


def test_a_second_writer_is_refused_in_one_line(index_dir, tmp_path, capsys):
    out = _copy(index_dir, tmp_path)
    with writer_lock(out):
        assert main(["index", "--out", str(out), "--remove", _ids(tmp_path, [1])]) == 2
        assert f"another vsl index is writing {out} (pid {os.getpid()})" in _error(capsys)
    assert main(["index", "--out", str(out), "--remove", _ids(tmp_path, [1])]) == 0


def test_an_old_manifest_without_generation_reads_as_generation_0(index_dir, tmp_path):
    out = _copy(index_dir, tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    m.pop("generation", None)
    (out / "manifest.json").write_text(json.dumps(m))
    index = Index.load(out)
    assert index.generation == 0 and len(index.removed) == 0


KILLER = """
import os, random, signal, sys
import numpy as np
import vsl.fileio as fileio
random.seed(int(sys.argv[3]))
left = [random.randint(1, 2)]
real = fileio.atomic_write
def dying(path, write, fsync=False):
    left[0] -= 1
    if left[0] == 0:
        tmp = fileio.temporary_sibling(path)
        with open(tmp, "wb") as fh:
            write(fh)
            fh.truncate(max(0, fh.tell() // 2))      # half-written, then killed
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, write, fsync)
fileio.atomic_write = dying
import vsl.retrieval.grow as grow
grow.atomic_write = dying
import vsl.retrieval.store as store
store.atomic_write_text = lambda p, t: dying(p, lambda fh: fh.write(t.encode()))
grow.write_manifest = lambda path, m: store.atomic_write_text(path / store.MANIFEST, __import__("json").dumps(m))
from vsl.cli import main
sys.exit(main(["index", "--out", sys.argv[1], "--remove", sys.argv[2]]))
"""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_remove_killed_at_any_point_leaves_the_previous_generation_and_reruns(index_dir, tmp_path, seed):
    out = _copy(index_dir, tmp_path)
    before = Index.load(out)
    expect = [(h.id, h.score) for h in before.search_text(["a dog"], k=10, shortlist=20)[0].hits]
    ids = _ids(tmp_path, [expect[0][0], expect[1][0]])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(out), ids, str(seed)], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    still = Index.load(out)
    assert still.generation == 0
    assert [(h.id, h.score) for h in still.search_text(["a dog"], k=10, shortlist=20)[0].hits] == expect
    assert main(["index", "--out", str(out), "--remove", ids]) == 0
    done = Index.load(out)
    assert done.generation == 1
    assert [(h.id, h.score) for h in done.search_text(["a dog"], k=8, shortlist=20)[0].hits] == expect[2:]


def test_serve_reload_swaps_generations_under_concurrent_queries_and_needs_the_token(index_dir, tmp_path):
    import threading

    from fastapi.testclient import TestClient

    from vsl.serve.app import create_app

    out = _copy(index_dir, tmp_path)
    index = Index.load(out)
    gone = [h.id for h in index.search_text(["a dog"], k=2, shortlist=20)[0].hits]
    with TestClient(create_app(Index.load(out), workers=2, admin_token="s3cret", watch_s=0),
                    raise_server_exceptions=False) as client:
        assert client.get("/api/info").json()["generation"] == 0
        assert client.post("/api/reload").status_code == 401
        assert client.post("/api/reload", headers={"Authorization": "Bearer nope"}).json()["error"].startswith("wrong")
        failures, seen, stop = [], set(), threading.Event()

        def pound():
            while not stop.is_set():
                r = client.get("/api/search", params={"q": "a dog", "k": 2, "shortlist": 20})
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    seen.add(tuple(h["id"] for h in r.json()["results"]))

        threads = [threading.Thread(target=pound) for _ in range(3)]
        for t in threads:
            t.start()
        assert main(["index", "--out", str(out), "--remove", _ids(tmp_path, gone)]) == 0
        r = client.post("/api/reload", headers={"Authorization": "Bearer s3cret"})
        after = [h["id"] for h in client.get("/api/search", params={"q": "a dog", "k": 2}).json()["results"]]
        stop.set()
        for t in threads:
            t.join()
        assert r.status_code == 200 and r.json() == {"generation": 1, "previous": 0}
        assert client.get("/api/info").json()["generation"] == 1
        assert not failures and tuple(gone) in seen and not set(after) & set(gone)
    with TestClient(create_app(Index.load(out))) as client:
        r = client.post("/api/reload")
        assert r.status_code == 403 and "--admin_token" in r.json()["error"]
        assert client.post("/api/remove", json={"ids": [1]}).status_code == 403
