"""A folder of real photos all the way to the search page: vsl extract -> vsl index -> vsl serve,
and the explanation of a match (the regions each query word attends to) in the API and on the page."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from test_extract import WEIGHTS, D8, copy_photos
from test_serve import CHROMIUM, CHROMIUM_ARGS, running
from vsl.checkpoint import save_checkpoint
from vsl.cli import main
from vsl.config import Config
from vsl.data import Vocabulary, vocab_file
from vsl.models import build_model
from vsl.retrieval import Index
from vsl.serve.app import create_app

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")
CAPTIONS = {
    "chelsea.png": "a cat with orange fur looks at the camera",
    "coffee.png": "a cup of coffee on a saucer with a spoon",
    "astronaut.png": "a woman astronaut in a white suit with a flag",
    "rocket.jpg": "a rocket on the launch pad under a blue sky",
}


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory):
    """The photos extracted with the width-8 test weights, and an index of them built with a
    (randomly initialised) SGR that reads their 256-dim features, through the command line."""
    root = tmp_path_factory.mktemp("photos")
    paths = copy_photos(root / "photos", PHOTOS)
    captions = root / "caps.txt"
    captions.write_text("".join((CAPTIONS[p.name] + "\n") * 5 for p in paths))
    assert main(["extract", "--images", str(root / "photos"), "--weights", str(WEIGHTS), "--out", str(root / "data"),
                 "--data_name", "photos_precomp", "--split", "test", "--captions", str(captions),
                 "--device", "cpu", "--quiet"]) == 0
    vocab = Vocabulary.build(CAPTIONS.values(), threshold=1)
    vocab.to_json(vocab_file(root / "vocab", "photos_precomp"))
    torch.manual_seed(0)
    config = Config(data_name="photos_precomp", data_path=str(root / "data"), vocab_path=str(root / "vocab"),
                    vocab_size=len(vocab), img_dim=D8, word_dim=16, embed_size=32, sim_dim=16, shortlist_dim=16)
    save_checkpoint(root / "model.pth.tar", build_model(config))
    assert main(["index", "--checkpoint", str(root / "model.pth.tar"), "--data_path", str(root / "data"),
                 "--split", "test", "--out", str(root / "index"), "--device", "cpu", "--quiet"]) == 0
    return root, Index.load(root / "index")


def test_the_index_explains_a_match_with_the_extracted_boxes(photo_index):
    root, index = photo_index
    assert index.can_explain and index.num_images == len(PHOTOS)
    (why,) = index.explain("a cat with orange fur", [0])
    boxes = np.load(root / "data" / "photos_precomp" / "test_boxes.npy")
    h, w = np.load(root / "data" / "photos_precomp" / "test_sizes.npy")[0]
    assert why["words"] == ["a", "cat", "with", "orange", "fur"] and why["image_size"] == [int(w), int(h)]
    np.testing.assert_allclose(why["boxes"], boxes[0], atol=0.05)
    attention = np.asarray(why["attention"])
    assert attention.shape == (5, boxes.shape[1]) and np.allclose(attention.sum(1), 1, atol=1e-3)


def test_the_api_explains_text_to_image_results_and_refuses_without_boxes(photo_index):
    root, index = photo_index
    with TestClient(create_app(index, workers=1)) as client:
        info = client.get("/api/info").json()
        assert info["explain"] and info["thumbnails"]
        body = client.get("/api/search", params={"q": "a rocket under a blue sky", "k": 4, "explain": 1}).json()
        assert [hit["id"] for hit in body["results"]] and all("explain" in hit for hit in body["results"])
        direct = index.explain("a rocket under a blue sky", [hit["id"] for hit in body["results"]])
        assert [hit["explain"] for hit in body["results"]] == json.loads(json.dumps(direct))
        plain = client.get("/api/search", params={"q": "a rocket", "k": 2}).json()
        assert all("explain" not in hit for hit in plain["results"])
        picture = client.get(body["results"][0]["thumbnail"])
        assert picture.status_code == 200 and picture.content[:4] == b"\x89PNG"
    boxes = root / "data" / "photos_precomp" / "test_boxes.npy"
    hidden = boxes.with_name("hidden_boxes.npy")
    boxes.rename(hidden)
    try:
        with TestClient(create_app(index, workers=1)) as client:
            answer = client.get("/api/search", params={"q": "a rocket", "k": 2, "explain": 1})
            assert answer.status_code == 422 and answer.json()["parameter"] == "explain"
            assert client.get("/api/info").json()["explain"] is False
    finally:
        hidden.rename(boxes)


@pytest.mark.slow
def test_photo_cards_and_explanation_boxes_in_headless_chromium(photo_index, tmp_path):
    from playwright.sync_api import sync_playwright

    root, index = photo_index
    with running(create_app(index)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url + "/?q=" + "a cat with orange fur")
            page.wait_for_selector(".card img", timeout=10000)
            page.wait_for_function("() => [...document.querySelectorAll('.card img')].every(i => i.complete)")
            assert page.locator(".card").count() == len(PHOTOS)
            assert page.evaluate("document.querySelector('.card img').naturalWidth") > 0      # a photo, loaded
            words = page.locator(".card >> nth=0 >> .explain .word")
            assert words.all_inner_texts() == ["cat", "orange", "fur"]                       # stopwords left out
            rects = page.locator(".card >> nth=0 >> svg.boxes rect")
            assert rects.count() == 3 * 2                                                     # 2 regions a word
            words.nth(0).hover()
            assert page.locator(".card >> nth=0 >> svg.boxes.focus rect.on").count() == 2
            page.screenshot(path=str(tmp_path / "photos.png"))
            assert not errors, errors
        finally:
            browser.close()
    assert (tmp_path / "photos.png").read_bytes()[:4] == b"\x89PNG"


def test_index_images_extracts_and_indexes_a_photo_gallery_in_one_command(photo_index, tmp_path, capsys):
    root, _ = photo_index
    out = tmp_path / "gallery"
    assert main(["index", "--checkpoint", str(root / "model.pth.tar"), "--images", str(root / "photos"),
                 "--weights", str(WEIGHTS), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    gallery = Index.load(out)
    assert gallery.num_images == len(PHOTOS) and gallery.num_captions == 0
    extracted = np.load(root / "data" / "photos_precomp" / "test_boxes.npy")
    assert gallery.can_explain and gallery.picture(0).parent == out / "photos" / "photos_precomp" / "test_thumbs"
    (why,) = gallery.explain("an orange cat", [0])
    np.testing.assert_allclose(why["boxes"], extracted[0], atol=0.05)       # the same photos, the same boxes
    (result,) = gallery.search_text(["an orange cat"], k=4, shortlist=4)
    assert sorted(hit.id for hit in result.hits) == list(range(len(PHOTOS)))
    assert main(["index", "--checkpoint", str(root / "model.pth.tar"), "--images", str(root / "photos"),
                 "--out", str(tmp_path / "x"), "--quiet"]) == 2                  # --weights missing
    assert "--images and --weights go together" in capsys.readouterr().err
    # Growing by more photos: extracted into their own split of OUT/photos/, pictures and boxes per photo.
    copy_photos(tmp_path / "more", ("horse.png", "coins.png"))
    add = ["index", "--checkpoint", str(root / "model.pth.tar"), "--images", str(tmp_path / "more"),
           "--weights", str(WEIGHTS), "--out", str(out), "--device", "cpu", "--quiet", "--add"]
    assert main(add) == 0
    grown = Index.load(out)
    assert grown.num_images == len(PHOTOS) + 2 and grown.generation == 1
    split = grown.picture(len(PHOTOS)).parent
    assert split.name.startswith("add-") and split.name.endswith("_thumbs") and grown.picture(0).parent.name == \
        "test_thumbs"
    added_boxes = np.load(split.with_name(split.name.replace("_thumbs", "_boxes.npy")))
    old, new = grown.explain("a horse", [0, len(PHOTOS)])
    np.testing.assert_allclose(old["boxes"], extracted[0], atol=0.05)
    np.testing.assert_allclose(new["boxes"], added_boxes[0], atol=0.05)
    capsys.readouterr()
    assert main(add) == 0
    assert "nothing to do" in capsys.readouterr().out
