"""Image files as a viewer shows them, and the listings of a gallery's photos.

:func:`read_image` decodes one file into the ``(H, W, 3)`` uint8 RGB array that a region detector
(:mod:`vsl.vision`) takes: PIL's decoder, the EXIF orientation applied, every colour mode converted
to 8-bit RGB the way an image viewer displays it. Whatever cannot be shown is an
:class:`vsl.errors.ImageError` whose one line names the file and what was wrong: an empty file, a
file that is not an image, a truncated or corrupt one, one under :data:`MIN_SIDE` pixels a side,
or a decompression bomb of more than :data:`MAX_PIXELS` pixels (refused from its header, before
anything is decoded).

:func:`list_images` turns ``--images DIR|LIST`` into the ordered entries of a gallery, with the
duplicate paths found; :func:`thumbnail_png` makes the small picture that ``vsl serve`` shows.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageError

PathLike = Union[str, os.PathLike]

#: Images with more pixels than this are refused from their header (decompression bombs): 100 MP is
#: about 4x a 24-megapixel camera's photo, and 300 MB once decoded.
MAX_PIXELS = 100_000_000
#: Images under this many pixels on a side are refused: the detector's 16-pixel stride leaves them
#: one or two feature cells, and the box selection would repeat one region 36 times.
MIN_SIDE = 32
#: Longest side of a thumbnail, in pixels (the page shows them at most ~240 pixels wide).
THUMBNAIL_SIDE = 256
#: The background a transparent image is composited on (white, as viewers and browsers show it).
BACKGROUND = 255

# PIL's own errors for a file it cannot decode: broken streams, bad chunks, short reads.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
                  MemoryError, Image.DecompressionBombError)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WIDE_GRAY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def read_image(path: PathLike) -> np.ndarray:
    """The image in ``path`` as a viewer shows it: ``(H, W, 3)`` uint8 RGB, H x W after EXIF orientation.

    Conversions: grayscale and bilevel are replicated to three channels; CMYK (also Adobe's inverted
    CMYK JPEGs, which PIL's decoder undoes), YCbCr, LAB and HSV by PIL's ``convert("RGB")``; palette
    images through their palette; anything with transparency (RGBA, LA, a palette's transparent
    entry) is **composited on white**, as a browser shows it on a white page, rather than having its
    alpha dropped (which turns transparent pixels into their arbitrary stored colour, often black);
    16-bit grayscale (``I;16``, and 32-bit ``I`` read as 16-bit) is scaled by 255 / 65535 with
    rounding; 16-bit RGB(A) is reduced to 8 bits by PIL's decoder; float images (``F``) are clipped
    to 0..255. A multi-frame file (GIF, TIFF) gives its first frame.

    Raises :class:`ImageError` (one line naming ``path``) for a missing, empty, non-image,
    truncated or corrupt file, an image under :data:`MIN_SIDE` pixels a side, or one over
    :data:`MAX_PIXELS` pixels.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file")
    if size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Between PIL's own limit (~89 MP: a warning) and ours we decide; beyond twice PIL's it raises.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                _check_size(path, width, height)
                img.load()
                image = _to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused as a decompression bomb ({_pixels_of(exc)}; the limit is "
                         f"{MAX_PIXELS:,} pixels)") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (no image format recognised in its "
                         f"{size:,} bytes)") from None
    except _DECODE_ERRORS as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        what = "truncated" if "truncated" in reason.lower() else "corrupt"
        raise ImageError(f"{path}: {what} image file, cannot decode it ({reason})") from None
    return image


def _check_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(f"{path}: refused as a decompression bomb ({width} x {height} = "
                         f"{width * height:,} pixels; the limit is {MAX_PIXELS:,} pixels)")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{path}: image too small ({width} x {height} pixels; at least {MIN_SIDE} "
                         f"pixels a side expected)")


def _pixels_of(exc: BaseException) -> str:
    """PIL's bomb message names the size: keep its numbers, not its advice."""
    text = str(exc)
    return text.split(" exceeds")[0].replace("Image size ", "") if " exceeds" in text else "too many pixels"


def _to_rgb(img: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of a loaded PIL image in any mode (see :func:`read_image`)."""
    mode = img.mode
    if mode in _WIDE_GRAY_MODES:
        gray = np.asarray(img).astype(np.int64)
        gray = ((np.clip(gray, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[:, :, 3:]
        # Premultiplied blend with the background: c * a + bg * (1 - a), in integers with rounding.
        out = (rgba[:, :, :3] * alpha + BACKGROUND * (255 - alpha) + 127) // 255
        return out.astype(np.uint8)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)        # a copy: PIL's buffer goes with the image


def thumbnail_png(image: np.ndarray, side: int = THUMBNAIL_SIDE) -> bytes:
    """PNG bytes of ``image`` ((H, W, 3) uint8) scaled to at most ``side`` pixels on its longer side
    (Lanczos; never enlarged), for the search page's cards (``{split}_thumbs/{i}.png``)."""
    img = Image.fromarray(image)
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Listings
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageList:
    """The entries of ``--images``: ``paths`` in order (absolute, duplicates included) and, for
    each, ``first[i]``, the index of the first entry naming the same file (``i`` itself when it is
    the first), so that duplicates can be named and dropped while captions stay aligned."""

    source: Path
    paths: Tuple[Path, ...]
    first: Tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def duplicates(self) -> List[Tuple[int, int]]:
        """``(entry, first entry of the same file)`` for every repeated entry."""
        return [(i, f) for i, f in enumerate(self.first) if f != i]


def list_images(source: PathLike) -> ImageList:
    """The entries of a gallery: ``source`` is a folder or a list file.

    * A folder: every regular file below it, **recursively**, sorted by its path relative to the
      folder (POSIX, so the order is the same on every machine); hidden files and folders (names
      starting with ``.``) are left out, symbolic links to files are followed, links to folders
      are not descended. Non-image files are entries too: they fail to decode and are reported.
    * A list file: UTF-8 text, one image path per line, relative paths relative to the list
      file's folder; blank lines are ignored.

    Two entries naming the same file (after resolving links and ``..``) are duplicates: the first
    is kept. Raises :class:`ImageError` when ``source`` does not exist, is not readable text, or
    lists nothing.
    """
    source = Path(source)
    if source.is_dir():
        paths = _walk(source)
        if not paths:
            raise ImageError(f"{source}: the folder holds no files (expected image files)")
    elif source.is_file():
        paths = _read_list(source)
    elif source.exists():
        raise ImageError(f"{source}: not a folder or a list file")
    else:
        raise ImageError(f"{source}: not found (expected a folder of images or a file listing one image "
                         f"path per line)")
    seen: dict = {}
    first = []
    for i, path in enumerate(paths):
        key = os.path.realpath(path)
        first.append(seen.setdefault(key, i))
    return ImageList(source=source, paths=tuple(paths), first=tuple(first))


def _walk(folder: Path) -> List[Path]:
    root = folder.absolute()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=None):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_list(path: Path) -> List[Path]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ImageError(f"{path}: not a text file (expected a folder, or a UTF-8 file listing one image "
                         f"path per line)") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    base = path.absolute().parent
    lines = [line.strip() for line in text.lstrip("\ufeff").splitlines()]
    paths = [Path(os.path.normpath(base / line)) for line in lines if line]
    if not paths:
        raise ImageError(f"{path}: lists no image paths (expected one per line)")
    return paths
