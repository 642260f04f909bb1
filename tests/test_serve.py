"""`vsl serve`: the JSON API (FastAPI's test client), bad input, micro-batching, the page.

The API tests run against a small fake index (word-overlap scores over a captioned gallery) with the
interface of :class:`vsl.retrieval.Index`, so that they test the server alone and take milliseconds;
``test_real_index_through_the_api`` serves a real index built from a tiny model, and
``test_page_in_headless_chromium`` drives the page in a real browser.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Union

import pytest
from fastapi.testclient import TestClient

from vsl.errors import ConfigError
from vsl.serve.app import MAX_QUERY_CHARS, create_app
from vsl.serve.batching import QueryBatcher

CAPTIONS = [
    ["a red dog sitting on a bench", "a puppy on a bench", "the dog on a red bench"],
    ["a cat next to a blue car", "a kitten beside the car", "a cat near a car"],
    ["a man riding a horse", "a guy on a brown horse", "a horse with a man"],
    ["a boat on the beach", "a white boat", "a boat near the water"],
]


@dataclass
class Hit:
    rank: int
    id: int
    score: float
    shortlist_score: float
    captions: List[str]


@dataclass
class Result:
    query: Union[str, int]
    hits: List[Hit]
    unknown_words: List[str] = field(default_factory=list)
    k: int = 10
    shortlist: int = 100
    seconds: float = 0.0

    def to_dict(self):
        return {"query": self.query, "results": [asdict(h) for h in self.hits], "unknown_words": self.unknown_words,
                "k": self.k, "shortlist": self.shortlist, "seconds": self.seconds}


class FakeIndex:
    """The interface of vsl.retrieval.Index over CAPTIONS: score = shared words / caption length."""

    def __init__(self, captions=CAPTIONS, delay: float = 0.0, fail_on: str = ""):
        self.captions = captions
        self.flat = [c for cs in captions for c in cs]
        self.num_images, self.num_captions = len(captions), len(self.flat)
        self.vocab = {w for c in self.flat for w in c.split()}
        self.delay, self.fail_on = delay, fail_on
        self.calls: List[int] = []          # batch size of every search call
        self.lock = threading.Lock()

    def info(self):
        return {"model": "FAKE", "checkpoint_sha256": "ab" * 32, "num_images": self.num_images,
                "num_captions": self.num_captions, "index_type": "flat", "dtype": "float16", "split": "test",
                "data_name": "fake_precomp", "vsl_version": "0.1.0"}

    def captions_of_image(self, image_id):
        return list(self.captions[image_id])

    @staticmethod
    def _rank(words, docs, k):
        scores = [len(words & set(d.split())) / len(d.split()) for d in docs]
        return sorted(range(len(docs)), key=lambda i: (-scores[i], i))[:k], scores

    def _call(self, n):
        with self.lock:
            self.calls.append(n)
        time.sleep(self.delay)

    def search_text(self, queries, k=10, shortlist=100):
        self._call(len(queries))
        out = []
        for q in queries:
            if self.fail_on and self.fail_on in q:
                raise (ConfigError if self.fail_on == "bad" else RuntimeError)(f"query {q!r} failed")
            words = set(q.lower().split())
            order, s = self._rank(words, [" ".join(c) for c in self.captions], min(k, self.num_images))
            out.append(Result(q, [Hit(r + 1, i, s[i], s[i] / 2, self.captions_of_image(i)) for r, i in enumerate(order)],
                              sorted(words - self.vocab), len(order), min(shortlist, self.num_images)))
        return out

    def search_image(self, image_ids, k=10, shortlist=100):
        self._call(len(image_ids))
        out = []
        for i in image_ids:
            order, s = self._rank(set(" ".join(self.captions[i]).split()), self.flat, min(k, self.num_captions))
            out.append(Result(i, [Hit(r + 1, j, s[j], s[j] / 2, [self.flat[j]]) for r, j in enumerate(order)],
                              [], len(order), min(shortlist, self.num_captions)))
        return out


@pytest.fixture()
def thumbs(tmp_path: Path) -> Path:
    from PIL import Image

    for i in range(len(CAPTIONS)):
        Image.new("RGB", (8, 6), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    return tmp_path


@pytest.fixture()
def client(thumbs: Path):
    with TestClient(create_app(FakeIndex(), thumbnails=thumbs), raise_server_exceptions=False) as c:
        yield c


def test_text_search_ranks_images_with_scores_captions_and_thumbnails(client):
    r = client.get("/api/search", params={"q": "a red dog on a bench", "k": 2, "shortlist": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["direction"] == "text_to_image" and body["query"] == "a red dog on a bench"
    assert [h["rank"] for h in body["results"]] == [1, 2] and body["results"][0]["id"] == 0
    top = body["results"][0]
    assert top["captions"] == CAPTIONS[0] and top["score"] >= body["results"][1]["score"]
    assert set(top) >= {"rank", "id", "score", "shortlist_score", "captions", "thumbnail"}
    assert top["thumbnail"] == "/api/thumbnail/0"
    assert body["k"] == 2 and body["shortlist"] == 3 and body["batch_size"] == 1
    assert body["server_seconds"] > 0


def test_default_k_is_clamped_to_a_small_gallery(client):
    body = client.get("/api/search", params={"q": "a horse"}).json()
    assert len(body["results"]) == len(CAPTIONS) and body["results"][0]["id"] == 2


def test_unknown_words_are_reported_and_results_still_come(client):
    body = client.get("/api/search", params={"q": "zebra dog"}).json()
    assert body["unknown_words"] == ["zebra"] and body["results"][0]["id"] == 0


def test_image_search_ranks_captions_and_names_their_images(client):
    r = client.get("/api/search", params={"image_id": 2, "k": 4})
    assert r.status_code == 200
    body = r.json()
    assert body["direction"] == "image_to_text" and body["image"]["id"] == 2
    assert body["image"]["captions"] == CAPTIONS[2] and body["image"]["thumbnail"] == "/api/thumbnail/2"
    assert len(body["results"]) == 4
    top = body["results"][0]
    assert top["captions"][0] in CAPTIONS[2] and top["image_id"] == 2      # 3 captions per image: id // 3
    assert [h["image_id"] for h in body["results"]] == [h["id"] // 3 for h in body["results"]]


def test_health_info_docs_and_page(client):
    assert client.get("/api/health").json()["status"] == "ok"
    info = client.get("/api/info").json()
    assert info["model"] == "FAKE" and info["checkpoint_sha256"] == "ab" * 32
    assert info["num_images"] == 4 and info["num_captions"] == 12 and info["index_type"] == "flat"
    assert info["thumbnails"] is True and info["examples"][0] == CAPTIONS[0][0]
    assert info["server"]["workers"] >= 1
    assert "/api/search" in client.get("/openapi.json").json()["paths"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text   # no CDN
    assert "cdn" not in docs.text.lower()
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="q"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200


def test_thumbnails(client):
    r = client.get("/api/thumbnail/1")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    assert client.get("/api/thumbnail/9").status_code == 404
    assert client.get("/api/thumbnail/x").status_code == 422


def test_without_thumbnails_hits_have_none():
    with TestClient(create_app(FakeIndex())) as c:
        assert c.get("/api/search", params={"q": "dog"}).json()["results"][0]["thumbnail"] is None
        assert c.get("/api/info").json()["thumbnails"] is False
        assert c.get("/api/thumbnail/0").status_code == 404


BAD = [
    ("q=", 422, "q"),
    ("q=%20%20%20", 422, "q"),
    ("q=" + "a" * 10_000, 422, "q"),
    ("q=" + "b" * (MAX_QUERY_CHARS + 1), 422, "q"),
    ("q=%FF%FEdog", 400, "q"),
    ("q=dog&k=%C3%28", 400, "k"),
    ("q=dog&k=abc", 422, "k"),
    ("q=dog&k=1.5", 422, "k"),
    ("q=dog&k=0", 422, "k"),
    ("q=dog&k=-3", 422, "k"),
    ("q=dog&k=5", 422, "k"),                     # beyond the gallery (4 images)
    ("q=dog&k=99999999999999999999999", 422, "k"),
    ("image_id=0&k=13", 422, "k"),               # beyond the gallery's 12 captions
    ("q=dog&shortlist=-1", 422, "shortlist"),
    ("q=dog&shortlist=many", 422, "shortlist"),
    ("image_id=4", 404, "image_id"),
    ("image_id=-1", 404, "image_id"),
    ("image_id=one", 422, "image_id"),
    ("image_id=", 422, "image_id"),
    ("", 422, "q"),
    ("q=dog&image_id=1", 422, "q"),
]


@pytest.mark.parametrize("query,status,parameter", BAD, ids=[b[0][:24] or "none" for b in BAD])
def test_bad_input_is_a_4xx_json_error_naming_the_parameter(client, query, status, parameter):
    r = client.get("/api/search?" + query)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["parameter"] == parameter and parameter in body["error"]
    assert "\n" not in body["error"] and "Traceback" not in r.text and len(r.text) < 500
    # ... and the server keeps serving
    assert client.get("/api/search", params={"q": "a cat"}).json()["results"][0]["id"] == 1


def test_an_internal_error_is_a_500_without_traceback_and_serving_goes_on(thumbs):
    with TestClient(create_app(FakeIndex(fail_on="boom")), raise_server_exceptions=False) as c:
        r = c.get("/api/search", params={"q": "boom"})
        assert r.status_code == 500 and r.json() == {"error": "internal server error", "parameter": None}
        assert "Traceback" not in r.text and "RuntimeError" not in r.text
        assert c.get("/api/search", params={"q": "a horse"}).status_code == 200


def test_an_index_user_error_is_a_422(thumbs):
    with TestClient(create_app(FakeIndex(fail_on="bad"))) as c:
        r = c.get("/api/search", params={"q": "bad query"})
        assert r.status_code == 422 and "bad query" in r.json()["error"] and r.json()["parameter"] == "q"


# --- micro-batching ------------------------------------------------------------------------------
def _submit_all(batcher, index, queries, k=3, shortlist=5):
    async def go():
        return await asyncio.gather(*(batcher.submit(("text", k, shortlist), index.search_text, q, k, shortlist)
                                      for q in queries), return_exceptions=True)
    return asyncio.run(go())


def test_queries_arriving_together_share_one_batched_call_and_get_their_own_results():
    index = FakeIndex(delay=0.05)
    queries = ["a red dog", "a cat", "a man on a horse", "a boat", "a kitten", "a bench", "a car", "a guy"]
    with ThreadPoolExecutor(1) as pool:
        batcher = QueryBatcher(pool, workers=1, window_s=0.01, max_batch=32)
        out = _submit_all(batcher, index, queries)
    assert [r.query for r, _ in out] == queries                  # each query its own result
    expected = [index.search_text([q], 3, 5)[0] for q in queries]
    assert [[h.id for h in r.hits] for r, _ in out] == [[h.id for h in e.hits] for e in expected]
    assert index.calls[:-len(queries)] == [len(queries)]        # one call for all eight
    assert {size for _, size in out} == {len(queries)}


def test_max_batch_caps_batches_and_1_turns_batching_off():
    index = FakeIndex()
    queries = [f"dog {i}" for i in range(10)]
    with ThreadPoolExecutor(2) as pool:
        _submit_all(QueryBatcher(pool, workers=2, window_s=0.01, max_batch=4), index, queries)
        assert sorted(index.calls) == [2, 4, 4]
        index.calls.clear()
        _submit_all(QueryBatcher(pool, workers=2, window_s=0.0, max_batch=1), index, queries)
        assert index.calls == [1] * 10


def test_different_k_or_direction_are_not_mixed_in_one_batch():
    index = FakeIndex()

    async def go(batcher):
        return await asyncio.gather(
            batcher.submit(("text", 1, 5), index.search_text, "a dog", 1, 5),
            batcher.submit(("text", 2, 5), index.search_text, "a cat", 2, 5),
            batcher.submit(("image", 2, 5), index.search_image, 3, 2, 5))

    with ThreadPoolExecutor(1) as pool:
        a, b, c = asyncio.run(go(QueryBatcher(pool, workers=1, window_s=0.01)))
    assert len(a[0].hits) == 1 and len(b[0].hits) == 2 and c[0].query == 3
    assert sorted(index.calls) == [1, 1, 1]


def test_batches_of_different_shortlist_sizes_run_side_by_side():
    """The search depth is a per-call FAISS parameter, so batches of any shortlist sizes may overlap
    (no batch waits for another size's batches to finish), and each query still gets its own size."""
    running, overlaps = {}, []
    lock = threading.Lock()

    def search(queries, k, shortlist):
        with lock:
            if any(s != shortlist and n for s, n in running.items()):
                overlaps.append(shortlist)
            running[shortlist] = running.get(shortlist, 0) + 1
        time.sleep(0.02)
        with lock:
            running[shortlist] -= 1
        return [Result(q, [], [], k, shortlist) for q in queries]

    async def go(batcher):
        return await asyncio.gather(*(batcher.submit(("text", 1, s), search, f"q{i}", 1, s)
                                      for i, s in enumerate([10, 10, 50, 10, 50, 100, 10] * 3)))

    with ThreadPoolExecutor(4) as pool:
        out = asyncio.run(go(QueryBatcher(pool, workers=4, window_s=0.0, max_batch=2)))
    assert [r.shortlist for r, _ in out] == [10, 10, 50, 10, 50, 100, 10] * 3 and overlaps


def test_a_user_error_in_a_batch_fails_only_its_query():
    index = FakeIndex(fail_on="bad")
    with ThreadPoolExecutor(1) as pool:
        out = _submit_all(QueryBatcher(pool, workers=1, window_s=0.01), index, ["a dog", "bad one", "a cat"])
    assert isinstance(out[1], ConfigError)
    assert out[0][0].query == "a dog" and out[2][0].query == "a cat"


def test_concurrent_requests_through_the_app_are_batched(thumbs):
    index = FakeIndex(delay=0.05)
    app = create_app(index, workers=1, batch_window_ms=5, max_batch=16)
    with TestClient(app) as c, ThreadPoolExecutor(8) as clients:
        responses = list(clients.map(lambda i: c.get("/api/search", params={"q": f"a dog {i}", "k": 1}),
                                     range(8)))
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["query"] for r in responses] == [f"a dog {i}" for i in range(8)]
    assert max(r.json()["batch_size"] for r in responses) > 1 and len(index.calls) < 8


# --- the server and the page in a real browser ----------------------------------------------------
CHROMIUM = "/usr/bin/chromium"           # Debian's chromium package (.ci/run installs it)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextlib.contextmanager
def running(app):
    """``app`` served by uvicorn on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    from vsl.serve.server import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_bind_refuses_a_port_in_use():
    from vsl.serve.server import bind

    first = bind("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match=f"--port {first.getsockname()[1]}"):
            bind("127.0.0.1", first.getsockname()[1])
        with pytest.raises(ConfigError, match="--port"):
            bind("127.0.0.1", 70000)
    finally:
        first.close()


@pytest.mark.slow
def test_page_in_headless_chromium(tmp_path):
    """Type a query on the page in a real browser, see result cards with pictures, click one."""
    from playwright.sync_api import sync_playwright

    from vsl.data.demo import DemoSpec, make_demo_data, sample_split, thumbnails_dir

    spec = DemoSpec(seed=1, train_images=20, dev_images=10, test_images=24, img_dim=16)
    make_demo_data(tmp_path / "demo", spec)
    captions = sample_split(spec, "test").captions
    index = FakeIndex([captions[5 * i:5 * i + 5] for i in range(spec.test_images)])
    query = captions[0].rstrip(" .")
    with running(create_app(index, thumbnails=thumbnails_dir(tmp_path / "demo", "test"))) as url, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url + "/")
            page.wait_for_selector("#examples .chip")                 # the empty state, from /api/info
            page.screenshot(path=str(tmp_path / "empty.png"))
            page.fill("#q", query)
            page.press("#q", "Enter")
            page.wait_for_selector(".card img")
            cards = page.locator(".card")
            assert cards.count() == 10
            assert cards.first.get_attribute("data-id") == "0"         # the caption's own image first
            page.wait_for_function("() => [...document.querySelectorAll('.card img')].every(i => i.complete)")
            assert page.evaluate("document.querySelector('.card img').naturalWidth") > 0   # the picture loaded
            marked = {m.lower() for m in page.locator(".card >> nth=0 >> mark").all_inner_texts()}
            assert marked and marked <= set(query.lower().split())
            assert "10 images" in page.inner_text("#status") and " ms" in page.inner_text("#status")
            page.screenshot(path=str(tmp_path / "results.png"))
            cards.nth(1).click()                                       # image -> text from a result
            page.wait_for_selector(".caption-row")
            assert page.locator(".caption-row").count() == 10
            assert "Captions for image" in page.inner_text("#query-image")
            page.screenshot(path=str(tmp_path / "captions.png"))
            page.goto(url + "/?q=" + "x" * 1500)                       # an error is shown, not a crash
            page.wait_for_selector("#error:not([hidden])")
            assert "at most" in page.inner_text("#error")
            page.goto(url + "/docs")                                   # Swagger UI renders offline
            page.wait_for_selector(".opblock-summary-path")
            assert "/api/search" in page.inner_text(".swagger-ui")
            assert not errors, errors
        finally:
            browser.close()
    for name in ("empty", "results", "captions"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


# --- a real index -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_index(fixtures_dir, tmp_path_factory):
    """A small real index: the published-format fixture SGR with a shortlist head fitted in seconds."""
    import torch

    from test_train import write_scan_dataset
    from vsl.retrieval import Index, build_index, fit_shortlist

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve_index")
    data = write_scan_dataset(root, "coco_precomp", {"train": 60, "dev": 12, "test": 24}, img_dim=64,
                              num_regions=36, extra_words=21, seed=5)
    checkpoint = root / "sgr_sl.pth.tar"
    fit_shortlist(fixtures_dir / "SGR_checkpoint.pth.tar", data["data_path"], checkpoint,
                  vocab_path=data["vocab_path"], device="cpu", dim=16, epochs=30, batch_size=64,
                  learning_rate=0.001, progress=False)
    out = build_index(checkpoint, data["data_path"], "test", root / "index", vocab_path=data["vocab_path"],
                      device="cpu", progress=False)
    return Index.load(out)


@pytest.mark.slow
def test_real_index_through_the_api(real_index):
    queries = ["a red dog and a blue car", "a green boat", "a white cat near a red dog", "a dog"]
    with TestClient(create_app(real_index, workers=1, batch_window_ms=20), raise_server_exceptions=False) as c, \
            ThreadPoolExecutor(len(queries)) as clients:
        single = [c.get("/api/search", params={"q": q, "k": 5, "shortlist": 10}).json() for q in queries]
        batched = list(clients.map(lambda q: c.get("/api/search", params={"q": q, "k": 5, "shortlist": 10}).json(),
                                   queries))
        direct = real_index.search_text(queries, k=5, shortlist=10)
        assert max(b["batch_size"] for b in batched) > 1
        for one, many, lib in zip(single, batched, direct):      # batching changes nothing in the answers
            assert [h["id"] for h in one["results"]] == [h["id"] for h in many["results"]] == [h.id for h in lib.hits]
            for a, b in zip(one["results"], many["results"]):
                assert a["score"] == pytest.approx(b["score"], abs=1e-5)
                assert a["captions"] == real_index.captions_of_image(a["id"])
        i2t = c.get("/api/search", params={"image_id": 3, "k": 7}).json()
        assert i2t["image"]["captions"] == real_index.captions_of_image(3) and len(i2t["results"]) == 7
        assert all(h["image_id"] == h["id"] // 5 for h in i2t["results"])
        info = c.get("/api/info").json()
        assert info["num_images"] == 24 and info["checkpoint_sha256"] == real_index.info()["checkpoint_sha256"]
        for params, status, parameter in [({"q": "a dog", "k": 25}, 422, "k"), ({"image_id": 24}, 404, "image_id"),
                                          ({"q": " "}, 422, "q"), ({"image_id": 0, "k": 121}, 422, "k")]:
            r = c.get("/api/search", params=params)
            assert r.status_code == status and r.json()["parameter"] == parameter
        assert c.get("/api/search", params={"q": "zebra dog", "k": 2}).json()["unknown_words"] == ["zebra"]


def test_serve_cli_bad_index_is_one_line_exit_2(tmp_path, capsys):
    from vsl.cli import main

    assert main(["serve", "--index", str(tmp_path / "nowhere"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vsl: error:") and "nowhere" in err and "\n" not in err
    assert main(["serve", "--index", str(tmp_path), "--thumbnails", str(tmp_path / "none"), "--port", "0"]) == 2
    assert "--thumbnails" in capsys.readouterr().err
    assert main(["serve", "--index", str(tmp_path), "--max_batch", "0", "--port", "0"]) == 2
    assert "--max_batch" in capsys.readouterr().err


def test_the_served_demo_model_is_vsl_demos_own_run_when_it_is_there(tmp_path, monkeypatch, capsys):
    """`vsl serve` after `vsl demo` trains nothing: the demo's finished SGR+VSL run (same data,
    recipe and seed, :meth:`vsl.ablate.run.Prepared.finished_checkpoint`) is the served model."""
    import vsl.demo
    from vsl.data import demo as dd
    from vsl.serve import demo as serve_demo

    seen = {}
    best = tmp_path / "runs" / "vsl" / "seed_0" / "checkpoints" / "model_best.pth.tar"
    monkeypatch.setattr(dd, "make_demo_data", lambda out, spec, **k: seen.setdefault("spec", spec) and {"data": 1})
    monkeypatch.setattr(vsl.demo, "prepare_demo", lambda out, **k: seen.setdefault("prepare", (out, k)))
    monkeypatch.setattr(vsl.demo, "demo_vsl_checkpoint", lambda prepared, seed=0: best)
    monkeypatch.setattr("vsl.train.Trainer", None)                       # training would fail
    data, model = serve_demo.demo_model(tmp_path, device="cpu", progress=True)
    assert model == best and seen["prepare"] == (tmp_path, {"seed": 0, "device": "cpu", "dry_run": True})
    assert seen["spec"].test_images == dd.DEMO_TEST_IMAGES and "the SGR+VSL run of `vsl demo`" in capsys.readouterr().out
