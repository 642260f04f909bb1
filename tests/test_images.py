"""Image files as a viewer shows them (vsl.data.images): every colour mode to RGB, EXIF orientation,
the refusals (empty, non-image, truncated, corrupt, tiny, decompression bombs) and the listings."""
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vsl.data.images import MAX_PIXELS, list_images, read_image, thumbnail_png
from vsl.errors import ImageError, VSLError


# ------------------------------------------------------------------------------------------------
# Makers of test files (shared with test_extract.py)
# ------------------------------------------------------------------------------------------------
def photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth (so JPEG keeps it close) RGB test picture, (h, w, 3) uint8, different in every corner."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=3)
    out = np.stack([base[0] + 50 * x / w, base[1] + 50 * y / h, base[2] + 25 * (x + y) / (w + h)], axis=2)
    return out.astype(np.uint8)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_chunks(width: int, height: int, bit_depth: int, color_type: int, data: bytes) -> bytes:
    """A PNG file from raw IHDR fields and the (already filtered) scanlines ``data``, written by hand:
    PIL cannot write 16-bit RGB, and a bomb's header must not need its pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def png16_rgb(values: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of ``values`` ((h, w, 3) uint16)."""
    h, w, _ = values.shape
    rows = values.astype(">u2").reshape(h, w * 6 // 2).view(np.uint8).reshape(h, w * 6)
    return png_chunks(w, h, 16, 2, b"".join(b"\x00" + row.tobytes() for row in rows))


def bomb_png(width: int, height: int) -> bytes:
    """The header of a ``width x height`` grayscale PNG with one scanline of data: a few hundred
    bytes that claim ``width * height`` pixels."""
    return png_chunks(width, height, 8, 0, b"\x00" + bytes(width))


def corrupt_jpeg(image: np.ndarray) -> bytes:
    """A JPEG whose Huffman table is zeroed: its header parses, its data cannot be decoded."""
    data = bytearray(encoded(Image.fromarray(image), "JPEG", quality=90))
    at = data.index(b"\xff\xc4")
    data[at + 4:at + 40] = bytes(36)
    return bytes(data)


def exif_rotated_jpeg(image: np.ndarray, orientation: int = 6) -> bytes:
    """``image`` stored as a JPEG with an EXIF orientation tag (6: the viewer turns it 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(Image.fromarray(image), "JPEG", quality=95, exif=exif.tobytes())


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------
# Conversions
# ------------------------------------------------------------------------------------------------
def test_rgb_png_is_read_exactly(tmp_path):
    image = photo()
    out = read_image(write(tmp_path / "a.png", encoded(Image.fromarray(image), "PNG")))
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    np.testing.assert_array_equal(out, image)


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    gray = photo()[:, :, 0]
    out = read_image(write(tmp_path / "g.png", encoded(Image.fromarray(gray, mode="L"), "PNG")))
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


def test_cmyk_jpeg_comes_out_as_its_colours(tmp_path):
    image = photo()
    cmyk = Image.fromarray(image).convert("CMYK")
    path = write(tmp_path / "c.jpg", encoded(cmyk, "JPEG", quality=95))
    assert Image.open(path).mode == "CMYK"
    out = read_image(path)
    assert out.shape == image.shape
    assert np.abs(out.astype(int) - image).mean() < 4          # JPEG loss only, not inverted or channel-swapped


def test_palette_image_goes_through_its_palette(tmp_path):
    image = photo()
    pal = Image.fromarray(image).quantize(colors=16)
    path = write(tmp_path / "p.png", encoded(pal, "PNG"))
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(read_image(path), np.asarray(pal.convert("RGB")))


def test_rgba_is_composited_on_white(tmp_path):
    image = photo()
    alpha = np.zeros(image.shape[:2], np.uint8)
    alpha[:, 16:32] = 128
    alpha[:, 32:] = 255
    rgba = np.concatenate([image, alpha[:, :, None]], axis=2)
    out = read_image(write(tmp_path / "t.png", encoded(Image.fromarray(rgba, mode="RGBA"), "PNG"))).astype(int)
    assert (out[:, :16] == 255).all()                                   # fully transparent: the white page
    np.testing.assert_array_equal(out[:, 32:], image[:, 32:])           # opaque: the colour
    blend = (image[:, 16:32].astype(int) * 128 + 255 * 127 + 127) // 255
    np.testing.assert_array_equal(out[:, 16:32], blend)


def test_palette_with_a_transparent_entry_is_composited_on_white(tmp_path):
    pal = Image.fromarray(photo()).quantize(colors=8)
    index = np.asarray(pal)[0, 0]
    path = write(tmp_path / "pt.png", encoded(pal, "PNG", transparency=int(index)))
    out = read_image(path)
    assert (out[np.asarray(pal) == index] == 255).all()
    assert (out[np.asarray(pal) != index] != 255).any()


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)       # up to 64,491
    path = write(tmp_path / "g16.png", encoded(Image.fromarray(values), "PNG"))
    assert Image.open(path).mode == "I;16"
    out = read_image(path)
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 0], expected)
    assert out[:, :, 0].max() > 240 and (out == out[:, :, :1]).all()


def test_16_bit_rgb_keeps_its_colours(tmp_path):
    image = photo()
    values = image.astype(np.uint16) * 257                                  # the 8-bit picture, widened
    out = read_image(write(tmp_path / "rgb16.png", png16_rgb(values)))
    np.testing.assert_array_equal(out, image)


def test_exif_orientation_is_applied_as_a_viewer_shows_it(tmp_path):
    image = photo(48, 64)
    image[:12, :16] = (250, 20, 20)                                  # a red top-left corner as stored
    out = read_image(write(tmp_path / "r.jpg", exif_rotated_jpeg(image, orientation=6)))
    assert out.shape == (64, 48, 3)                                  # turned a quarter: portrait
    plain = read_image(write(tmp_path / "plain.jpg", encoded(Image.fromarray(image), "JPEG", quality=95)))
    np.testing.assert_array_equal(out, np.rot90(plain, k=-1))        # 90 degrees clockwise
    assert out[2, -2, 0] > 200 and out[2, -2, 1] < 80                # the red corner is now top-right


# ------------------------------------------------------------------------------------------------
# Refusals: one line naming the file and what is wrong
# ------------------------------------------------------------------------------------------------
def refused(path: Path, match: str) -> str:
    with pytest.raises(ImageError, match=match) as err:
        read_image(path)
    message = str(err.value)
    assert isinstance(err.value, VSLError) and "\n" not in message and message.startswith(str(path))
    return message


def test_empty_file(tmp_path):
    refused(write(tmp_path / "empty.jpg", b""), "empty file")


def test_text_file_is_not_an_image(tmp_path):
    refused(write(tmp_path / "notes.txt", b"a dog on a sofa\n"), "not an image")


def test_missing_file(tmp_path):
    refused(tmp_path / "gone.png", "not found")


def test_truncated_jpeg_and_png(tmp_path):
    image = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    jpg = encoded(Image.fromarray(image), "JPEG", quality=90)
    png = encoded(Image.fromarray(image), "PNG")
    refused(write(tmp_path / "t.jpg", jpg[:len(jpg) // 2]), "truncated")
    refused(write(tmp_path / "t.png", png[:len(png) * 6 // 10]), "truncated")


def test_corrupt_jpeg_and_png(tmp_path):
    image = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    refused(write(tmp_path / "c.jpg", corrupt_jpeg(image)), "corrupt")
    png = encoded(Image.fromarray(image), "PNG")
    refused(write(tmp_path / "c.png", png[:100] + bytes(200) + png[300:]), "corrupt")


def test_image_under_32_pixels_a_side(tmp_path):
    message = refused(write(tmp_path / "tiny.png", encoded(Image.fromarray(photo(20, 20)), "PNG")), "too small")
    assert "20 x 20" in message
    assert read_image(write(tmp_path / "ok.png", encoded(Image.fromarray(photo(32, 300)), "PNG"))).shape == (32, 300, 3)


@pytest.mark.parametrize("width, height", [(10_001, 10_000), (20_000, 20_000)])
def test_decompression_bomb_is_refused_from_its_header(tmp_path, width, height):
    # 100.01 MP is over our limit but under PIL's own error (2 x 89.5 MP); 400 MP is over both.
    path = write(tmp_path / "bomb.png", bomb_png(width, height))
    assert path.stat().st_size < 1000 and width * height > MAX_PIXELS
    message = refused(path, "decompression bomb")
    assert "100,000,000" in message


# ------------------------------------------------------------------------------------------------
# Listings
# ------------------------------------------------------------------------------------------------
def test_folder_listing_is_recursive_sorted_and_skips_hidden(tmp_path):
    for name in ("b.png", "a/z.jpg", "a/b/c.png", ".hidden.png", ".cache/x.png", "A.txt"):
        write(tmp_path / name, b"x")
    listing = list_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in listing.paths] == ["A.txt", "a/b/c.png", "a/z.jpg", "b.png"]
    assert all(p.is_absolute() for p in listing.paths) and listing.duplicates == []


def test_list_file_resolves_relative_paths_and_names_duplicates(tmp_path):
    write(tmp_path / "img" / "x.png", b"x")
    write(tmp_path / "img" / "y.png", b"y")
    (tmp_path / "img" / "link.png").symlink_to(tmp_path / "img" / "x.png")
    lst = tmp_path / "list.txt"
    lst.write_text(f"img/x.png\n\nimg/y.png\n./img/sub/../x.png\n{tmp_path / 'img' / 'link.png'}\nimg/missing.png\n")
    listing = list_images(lst)
    assert len(listing) == 5 and listing.paths[0] == tmp_path / "img" / "x.png"
    assert listing.duplicates == [(2, 0), (3, 0)]


@pytest.mark.parametrize("content, match", [(b"", "lists no image"), (b"\n \n", "lists no image"),
                                            (b"\xff\xd8\xff\xe0 binary", "not a text file")])
def test_bad_list_files(tmp_path, content, match):
    with pytest.raises(ImageError, match=match):
        list_images(write(tmp_path / "l.txt", content))


def test_missing_source_and_empty_folder(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="holds no files"):
        list_images(tmp_path / "empty")


def test_thumbnail_keeps_the_aspect_and_never_enlarges():
    big = Image.open(io.BytesIO(thumbnail_png(photo(300, 600), side=256)))
    assert big.format == "PNG" and big.size == (256, 128)
    small = Image.open(io.BytesIO(thumbnail_png(photo(40, 50), side=256)))
    assert small.size == (50, 40)
