"""``vsl extract``: photos -> the SCAN layout with the width-8 test weights of the BUTD detector.

The layout and thumbnails, every bad input of issue 23 (skipped and listed, or a one-line error with
nothing written), rows equal to ``Detector.extract`` called directly, the precomp loader reading the
output, the adaptive layout, resumption after an interruption and after a SIGKILL, and torchrun.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vsl.extract.pipeline as pipeline
from test_images import (bomb_png, corrupt_jpeg, encoded, exif_rotated_jpeg, photo, png16_rgb, write)
from vsl.cli import main
from vsl.data import PrecompDataset, Vocabulary
from vsl.data.images import read_image
from vsl.extract import extract_images
from vsl.vision import BoxSelection, load_detector

ROOT = Path(__file__).resolve().parents[1]
BUTD = Path(os.environ.get("VSL_DATA_DIR", ROOT.parent / "shared" / "data")).parent / "fixtures" / "butd"
WEIGHTS = BUTD / "weights_w8_seed0.pth"
SKIMAGE_DATA = Path(__import__("skimage").__file__).parent / "data"
PHOTOS = ("chelsea.png", "coffee.png", "camera.png")
D8 = 256                                                      # feature_dim of the width-8 weights


def run_extract(images, out, *extra, data_name="ph_precomp", split="test"):
    return main(["extract", "--images", str(images), "--weights", str(WEIGHTS), "--out", str(out),
                 "--data_name", data_name, "--split", split, "--device", "cpu", "--quiet", *extra])


def outputs(folder: Path, split: str = "test") -> dict:
    return {k: np.load(folder / f"{split}_{k}.npy") for k in ("ims", "boxes", "counts", "sizes")}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Every extraction here on one torch thread, as the child processes of the resume and torchrun
    tests run (OMP_NUM_THREADS=1; torchrun's default): the convolutions' sums are bit-identical only
    at the same thread count, and those tests compare bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def detector():
    assert WEIGHTS.is_file(), f"the test weights {WEIGHTS} are missing (see ../shared/fixtures/butd/README.md)"
    return load_detector(WEIGHTS, device="cpu")


def copy_photos(folder: Path, names=PHOTOS) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes((SKIMAGE_DATA / name).read_bytes())
    return sorted(folder / n for n in names)


# ------------------------------------------------------------------------------------------------
# A folder with every bad input of the issue, extracted once through the command line
# ------------------------------------------------------------------------------------------------
BAD = {   # file -> what its line in {split}_failed.txt says
    "broken/corrupt.jpg": "corrupt", "broken/corrupt.png": "corrupt", "broken/truncated.jpg": "truncated",
    "broken/truncated.png": "truncated", "empty.jpg": "empty file", "notes.txt": "not an image",
    "tiny.png": "too small", "bomb.png": "decompression bomb",
}
CONVERTED = ("cmyk.jpg", "gray.png", "gray16.png", "palette.png", "rgb16.png", "rgba.png", "rotated.jpg")


def make_bad_folder(folder: Path) -> None:
    noise = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    jpg, png = encoded(Image.fromarray(noise), "JPEG", quality=90), encoded(Image.fromarray(noise), "PNG")
    image = photo(48, 64)
    files = {
        "broken/corrupt.jpg": corrupt_jpeg(noise), "broken/corrupt.png": png[:100] + bytes(200) + png[300:],
        "broken/truncated.jpg": jpg[:len(jpg) // 2], "broken/truncated.png": png[:len(png) * 6 // 10],
        "empty.jpg": b"", "notes.txt": b"captions go elsewhere\n",
        "tiny.png": encoded(Image.fromarray(photo(20, 20)), "PNG"), "bomb.png": bomb_png(10_001, 10_000),
        "cmyk.jpg": encoded(Image.fromarray(image).convert("CMYK"), "JPEG", quality=95),
        "gray.png": encoded(Image.fromarray(image[:, :, 1]), "PNG"),
        "gray16.png": encoded(Image.fromarray(image[:, :, 0].astype(np.uint16) * 257), "PNG"),
        "palette.png": encoded(Image.fromarray(image).quantize(colors=32), "PNG"),
        "rgb16.png": png16_rgb(image.astype(np.uint16) * 257),
        "rgba.png": encoded(Image.fromarray(np.concatenate([image, np.full((48, 64, 1), 128, np.uint8)], 2)), "PNG"),
        "rotated.jpg": exif_rotated_jpeg(image, orientation=6),
    }
    for name, data in files.items():
        write(folder / name, data)
    copy_photos(folder, PHOTOS[:1])


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    make_bad_folder(root / "img")
    code = run_extract(root / "img", root / "data", "--workers", "2", "--block", "4", "--batch", "3")
    return root, code


def test_bad_inputs_are_skipped_listed_and_the_run_exits_0(bad_run):
    root, code = bad_run
    folder = root / "data" / "ph_precomp"
    assert code == 0
    failed = [line.split("\t") for line in (folder / "test_failed.txt").read_text().splitlines()]
    assert {Path(p).relative_to(root / "img").as_posix(): why for p, why in failed}.keys() == BAD.keys()
    for path, why in failed:
        assert BAD[Path(path).relative_to(root / "img").as_posix()] in why, (path, why)
    rows = [Path(p).name for p in (folder / "test_images.txt").read_text().splitlines()]
    assert rows == sorted(CONVERTED + PHOTOS[:1])              # the readable ones, in listing order
    out = outputs(folder)
    n = len(rows)
    assert out["ims"].shape == (n, 36, D8) and out["ims"].dtype == np.float32
    assert out["boxes"].shape == (n, 36, 4) and out["counts"].tolist() == [36] * n
    assert np.isfinite(out["ims"]).all() and (np.abs(out["ims"]).sum(axis=2) > 0).all()
    sizes = dict(zip(rows, out["sizes"].tolist()))
    assert sizes["rotated.jpg"] == [64, 48] and sizes["gray.png"] == [48, 64]     # EXIF turned it upright
    assert sizes["chelsea.png"] == [300, 451]
    # Boxes lie in the original image's pixels.
    hw = out["sizes"][:, None, :]
    assert (out["boxes"] >= -1e-3).all() and (out["boxes"][..., 2] <= hw[..., 1] + 1e-3).all()
    assert (out["boxes"][..., 3] <= hw[..., 0] + 1e-3).all()
    assert not list(folder.glob(".*")), "the staging folder is removed at the end"


def test_thumbnails_are_where_vsl_serve_looks_for_them(bad_run):
    from vsl.data.demo import split_thumbnails

    root, _ = bad_run
    folder = root / "data" / "ph_precomp"
    thumbs = split_thumbnails(root / "data", "ph_precomp", "test")
    rows = (folder / "test_images.txt").read_text().splitlines()
    assert sorted(p.name for p in thumbs.iterdir()) == sorted(f"{i}.png" for i in range(len(rows)))
    for i, path in enumerate(rows):
        thumb = Image.open(thumbs / f"{i}.png")
        h, w = read_image(path).shape[:2]
        assert thumb.format == "PNG" and thumb.mode == "RGB"
        assert max(thumb.size) == min(256, max(h, w)) and (thumb.size[0] >= thumb.size[1]) == (w >= h)


def test_rows_equal_the_detector_called_directly(bad_run, detector):
    root, _ = bad_run
    folder = root / "data" / "ph_precomp"
    rows = (folder / "test_images.txt").read_text().splitlines()
    out = outputs(folder)
    pick = [i for i, p in enumerate(rows) if Path(p).name in ("rotated.jpg", "rgba.png", "chelsea.png")]
    direct = detector.extract([read_image(rows[i]) for i in pick], selection=BoxSelection.parse("36"))
    for i, regions in zip(pick, direct):
        torch.testing.assert_close(torch.from_numpy(out["ims"][i]), regions.features, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(out["boxes"][i]), regions.boxes, rtol=0, atol=1e-4)
        assert tuple(out["sizes"][i]) == tuple(regions.image_size)


def test_output_is_read_by_the_precomp_loader(bad_run):
    root, _ = bad_run
    folder = root / "data" / "ph_precomp"
    n = len((folder / "test_images.txt").read_text().splitlines())
    (folder / "test_caps.txt").write_text("".join(f"a photo number {i}\n" for i in range(5 * n)))
    data = PrecompDataset(root / "data", "ph_precomp", "test", Vocabulary(["a", "photo", "number"]))
    assert (data.num_images, data.num_regions, data.img_dim, data.captions_per_image) == (n, 36, D8, 5)
    np.testing.assert_array_equal(data.read_image(n - 1), np.load(folder / "test_ims.npy")[n - 1])
    (folder / "test_caps.txt").unlink()


def test_the_same_command_again_does_nothing(bad_run, capsys):
    root, _ = bad_run
    before = (root / "data" / "ph_precomp" / "test_ims.npy").stat().st_mtime_ns
    assert run_extract(root / "img", root / "data", "--workers", "2", "--block", "4", "--batch", "3") == 0
    assert "already extracted" in capsys.readouterr().out
    assert (root / "data" / "ph_precomp" / "test_ims.npy").stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------------------
# Errors: one line, exit 2, nothing written
# ------------------------------------------------------------------------------------------------
def one_line_error(capsys, match: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("vsl: error: ") and "\n" not in err and match in err, err
    return err


def test_nothing_readable_exits_2_and_writes_nothing(tmp_path, capsys):
    write(tmp_path / "img" / "a.txt", b"text")
    write(tmp_path / "img" / "b.jpg", b"")
    assert run_extract(tmp_path / "img", tmp_path / "data") == 2
    one_line_error(capsys, "none of its 2 entries could be read")
    assert not (tmp_path / "data" / "ph_precomp").exists()


def test_wrong_weights_exit_2_naming_the_key_and_write_nothing(tmp_path, capsys):
    copy_photos(tmp_path / "img", PHOTOS[:1])
    bad = tmp_path / "other.pth"
    torch.save({"backbone.conv1.weight": torch.zeros(3)}, bad)
    code = main(["extract", "--images", str(tmp_path / "img"), "--weights", str(bad), "--out", str(tmp_path / "data"),
                 "--data_name", "ph_precomp", "--device", "cpu", "--quiet"])
    assert code == 2
    one_line_error(capsys, str(bad))
    assert not (tmp_path / "data").exists()


def test_unwritable_output_folder_exits_2(tmp_path, capsys):
    copy_photos(tmp_path / "img", PHOTOS[:1])
    (tmp_path / "data").write_text("a file, not a folder")
    assert run_extract(tmp_path / "img", tmp_path / "data") == 2
    one_line_error(capsys, "is a file")


def test_wrong_caption_count_exits_2_and_writes_nothing(tmp_path, capsys):
    copy_photos(tmp_path / "img", PHOTOS[:2])
    caps = tmp_path / "caps.txt"
    caps.write_text("".join(f"caption {i}\n" for i in range(9)))
    assert run_extract(tmp_path / "img", tmp_path / "data", "--captions", str(caps)) == 2
    one_line_error(capsys, "9 captions for the 2 entries")
    assert not (tmp_path / "data").exists()


def test_duplicates_are_named_and_dropped_with_their_captions(tmp_path, capsys):
    a, b = copy_photos(tmp_path / "img", PHOTOS[:2])
    lst = tmp_path / "list.txt"
    lst.write_text(f"img/{a.name}\nimg/{b.name}\n./img/../img/{a.name}\n")
    caps = tmp_path / "caps.txt"
    caps.write_text("".join(f"entry {i // 5} caption {i % 5}\n" for i in range(15)))
    assert run_extract(lst, tmp_path / "data", "--captions", str(caps), "--workers", "0") == 0
    folder = tmp_path / "data" / "ph_precomp"
    assert (folder / "test_images.txt").read_text().splitlines() == [str(a), str(b)]
    assert (folder / "test_failed.txt").read_text() == f"{a}\tduplicate of {a}\n"
    assert (folder / "test_caps.txt").read_text().splitlines() == [f"entry {i // 5} caption {i % 5}" for i in range(10)]
    assert np.load(folder / "test_ims.npy").shape == (2, 36, D8)
    # Extracted again without captions: the previous run's captions do not stay beside the new rows.
    assert run_extract(lst, tmp_path / "data", "--workers", "0") == 0
    assert not (folder / "test_caps.txt").exists() and (folder / "test_ims.npy").is_file()


# ------------------------------------------------------------------------------------------------
# The adaptive layout
# ------------------------------------------------------------------------------------------------
def test_adaptive_boxes_are_zero_padded_with_counts(tmp_path, detector):
    (path,) = copy_photos(tmp_path / "img", PHOTOS[:1])
    out = tmp_path / "data"
    extract_images(tmp_path / "img", WEIGHTS, out, "ph_precomp", "test", boxes="10:100", workers=0,
                   device="cpu", progress=False)
    arrays = outputs(out / "ph_precomp")
    (regions,) = detector.extract([read_image(path)], selection=BoxSelection.parse("10:100"))
    k = regions.features.shape[0]
    assert 10 <= k <= 100 and arrays["counts"].tolist() == [k]
    assert arrays["ims"].shape == (1, 100, D8) and arrays["boxes"].shape == (1, 100, 4)
    torch.testing.assert_close(torch.from_numpy(arrays["ims"][0, :k]), regions.features, rtol=0, atol=1e-5)
    assert not arrays["ims"][0, k:].any() and not arrays["boxes"][0, k:].any()


# ------------------------------------------------------------------------------------------------
# Interrupted runs resume at the first unfinished block, with nothing torn
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    copy_photos(root / "img", PHOTOS + ("astronaut.png",))
    whole = root / "whole"
    extract_images(root / "img", WEIGHTS, whole, "ph_precomp", "test", workers=0, batch_size=1, block_images=1,
                   device="cpu", progress=False)
    return root, outputs(whole / "ph_precomp")


def test_interrupted_run_resumes_at_the_block_where_it_stopped(four_photos, tmp_path, monkeypatch):
    root, whole = four_photos
    original = pipeline._write_batch
    calls = []

    def failing(detector, selection, pending, files):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append([e for e, _ in pending])
        return original(detector, selection, pending, files)

    monkeypatch.setattr(pipeline, "_write_batch", failing)
    out = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        extract_images(root / "img", WEIGHTS, out, "ph_precomp", "test", workers=0, batch_size=1, block_images=1,
                       device="cpu", progress=False)
    folder = out / "ph_precomp"
    assert not (folder / "test_ims.npy").exists() and not (folder / "test_extract.json").exists()
    log = (folder / ".test_extract" / "blocks-r0.jsonl").read_text().splitlines()
    assert [json.loads(line)["block"] for line in log[1:]] == [0, 1]
    calls.clear()
    monkeypatch.setattr(pipeline, "_write_batch",
                        lambda d, s, p, f: calls.append([e for e, _ in p]) or original(d, s, p, f))
    result = extract_images(root / "img", WEIGHTS, out, "ph_precomp", "test", workers=0, batch_size=1,
                            block_images=1, device="cpu", progress=False)
    assert calls == [[2], [3]] and result.resumed_images == 2 and result.num_images == 4
    for name, array in outputs(folder).items():
        np.testing.assert_array_equal(array, whole[name], err_msg=name)       # same batches: bit for bit


def test_an_interrupted_new_run_leaves_the_previous_output_whole(four_photos, tmp_path, monkeypatch):
    root, whole = four_photos
    out = tmp_path / "data"
    extract_images(root / "img", WEIGHTS, out, "ph_precomp", "test", workers=0, batch_size=2, block_images=2,
                   device="cpu", progress=False, boxes="10:20")
    before = outputs(out / "ph_precomp")
    monkeypatch.setattr(pipeline, "_write_batch", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        extract_images(root / "img", WEIGHTS, out, "ph_precomp", "test", workers=0, device="cpu", progress=False)
    for name, array in outputs(out / "ph_precomp").items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)


@pytest.mark.slow
def test_a_killed_run_resumes_and_equals_an_uninterrupted_one(four_photos, tmp_path):
    root, whole = four_photos
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "vsl", "extract", "--images", str(root / "img"), "--weights", str(WEIGHTS),
           "--out", str(tmp_path / "data"), "--data_name", "ph_precomp", "--split", "test", "--device", "cpu",
           "--batch", "1", "--block", "1", "--workers", "1"]
    log = tmp_path / "data" / "ph_precomp" / ".test_extract" / "blocks-r0.jsonl"
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):       # one block done
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "data" / "ph_precomp" / "test_ims.npy").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr and "wrote 4 images" in done.stdout
    for name, array in outputs(tmp_path / "data" / "ph_precomp").items():
        np.testing.assert_array_equal(array, whole[name], err_msg=name)


@pytest.mark.slow
def test_torchrun_shares_the_blocks_and_equals_one_process(four_photos, tmp_path):
    root, whole = four_photos
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vsl",
           "extract", "--images", str(root / "img"), "--weights", str(WEIGHTS), "--out", str(tmp_path / "data"),
           "--data_name", "ph_precomp", "--device", "cpu", "--batch", "1", "--block", "1", "--workers", "0"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote 4 images") == 1                           # rank 0 reports
    for name, array in outputs(tmp_path / "data" / "ph_precomp").items():
        np.testing.assert_array_equal(array, whole[name], err_msg=name)


# ------------------------------------------------------------------------------------------------
# The scikit-image photos
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_layout_of_the_scikit_image_photos(tmp_path):
    photos = sorted(p.name for p in SKIMAGE_DATA.iterdir() if p.suffix in (".png", ".jpg"))
    paths = copy_photos(tmp_path / "img", photos)
    assert run_extract(tmp_path / "img", tmp_path / "data", "--batch", "4") == 0
    folder = tmp_path / "data" / "ph_precomp"
    assert (folder / "test_images.txt").read_text().splitlines() == [str(p) for p in paths]
    assert (folder / "test_failed.txt").read_text() == ""
    out = outputs(folder)
    n = len(paths)
    assert out["ims"].shape == (n, 36, D8) and out["boxes"].shape == (n, 36, 4) and out["sizes"].shape == (n, 2)
    assert out["sizes"].tolist() == [list(read_image(p).shape[:2]) for p in paths]
    assert len(list((folder / "test_thumbs").iterdir())) == n
    record = json.loads((folder / "test_extract.json").read_text())
    assert record["num_images"] == n and record["failed"] == []


@pytest.mark.slow
def test_memory_benchmark_reports_both_marks(tmp_path, capsys):
    from conftest import load_benchmark

    bench = load_benchmark("bench_extract_memory")
    weights = bench.random_weights(tmp_path / "w8.pth", 8)
    assert load_detector(weights).feature_dim == D8                # the port's key layout, loadable
    assert bench.main(["--width", "8", "--images", "4,8", "--json", str(tmp_path / "m.json")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert [r["images"] for r in result["rows"]] == [4, 8]
    assert all(0 < r["main_peak_rss_mb"] <= result["end"]["main_peak_rss_mb"] for r in result["rows"])
    assert "wrote 8 images" in result["stdout"] and "main RSS: 8 / 4 images" in capsys.readouterr().out


# --- --fetch: the weights by their Hub name, only when asked ------------------------------------
def _extract_named(tmp_path, name, *extra):
    copy_photos(tmp_path / "img", PHOTOS[:1])
    return main(["extract", "--images", str(tmp_path / "img"), "--weights", name, "--out", str(tmp_path / "data"),
                 "--data_name", "ph_precomp", "--device", "cpu", "--quiet", "--workers", "0", *extra])


def test_fetch_downloads_the_hub_file_through_huggingface_hub_only_when_asked(tmp_path, monkeypatch, capsys):
    import sys
    import types

    from vsl.vision.weights import HUB_FILE, HUB_REPO

    calls = []
    hub = types.ModuleType("huggingface_hub")
    hub.hf_hub_download = lambda repo_id, filename: calls.append((repo_id, filename)) or str(WEIGHTS)
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    assert _extract_named(tmp_path, HUB_REPO) == 2                        # not asked: nothing downloads
    assert calls == [] and "--fetch downloads it" in capsys.readouterr().err
    assert _extract_named(tmp_path, HUB_REPO, "--fetch") == 0
    assert calls == [(HUB_REPO, HUB_FILE)]
    assert (tmp_path / "data" / "ph_precomp" / "test_ims.npy").is_file()
    assert _extract_named(tmp_path / "local", str(WEIGHTS), "--fetch") == 0 and len(calls) == 1   # a file: as is


def test_fetch_without_the_library_or_the_network_is_one_line_naming_what_to_do(tmp_path, monkeypatch, capsys):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)             # not installed: import fails
    assert _extract_named(tmp_path, "unc-nlp/frcnn-vg-finetuned", "--fetch") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install huggingface_hub" in err and "resolve/main/pytorch_model.bin" in err

    def offline(repo_id, filename):
        raise OSError("Connection refused\nmore detail")

    hub = types.ModuleType("huggingface_hub")
    hub.hf_hub_download = offline
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    assert _extract_named(tmp_path, "unc-nlp/frcnn-vg-finetuned", "--fetch") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Connection refused" in err and "cannot fetch" in err
    assert _extract_named(tmp_path, "not-a-name", "--fetch") == 2                # neither a file nor owner/name
    assert "neither a weights file nor a Hub repository name" in capsys.readouterr().err
    assert not (tmp_path / "data" / "ph_precomp" / "test_ims.npy").exists()
