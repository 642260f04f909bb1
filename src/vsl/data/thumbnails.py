"""Schematic thumbnails of demo scenes: each object a labelled, coloured shape on its background.

A demo image has no pixels, only a scene description (objects with classes and colours, the
relation between the main subject and its partner, a background). For a person looking at search
results, :func:`draw_scene` turns that description into a small picture: the background as sky
and ground, every object as a shape of its kind (animals ellipses, people figures, vehicles with
wheels, furniture on legs, small things as simple signs) filled with its colour and labelled with
its noun, placed as the relation says (``on``: the subject stands on the partner, ``under``: the
partner hangs above it, ``behind``/``in front of``: depth and drawing order). Only drawing lives
here; the scenes themselves are owned by :mod:`vsl.data.demo`.
"""
from __future__ import annotations

import functools
import io
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from PIL import Image, ImageDraw, ImageFont

#: Thumbnail size in pixels (width, height): small enough that thousands are written in seconds.
SIZE = (192, 144)

RGB = Tuple[int, int, int]
PALETTE: Dict[str, RGB] = {
    "red": (214, 48, 49), "blue": (41, 98, 255), "green": (39, 174, 96), "yellow": (241, 196, 15),
    "white": (250, 250, 250), "black": (35, 35, 35), "brown": (141, 94, 56), "orange": (243, 133, 33),
    "pink": (240, 128, 170), "gray": (140, 140, 140), "purple": (142, 68, 173),
}
# Sky (top) and ground (bottom) of each background.
BACKGROUNDS: Dict[str, Tuple[RGB, RGB]] = {
    "park": ((204, 228, 247), (150, 200, 120)), "street": ((214, 222, 230), (160, 160, 165)),
    "kitchen": ((244, 236, 220), (214, 196, 170)), "beach": ((190, 224, 250), (240, 222, 170)),
    "field": ((204, 230, 250), (178, 212, 120)), "room": ((240, 232, 222), (196, 160, 120)),
    "yard": ((210, 232, 245), (140, 190, 110)),
}
# Shape of each noun; a noun not listed is drawn as a box.
SHAPES: Dict[str, str] = {
    **dict.fromkeys(("dog", "cat", "horse", "cow", "sheep", "bird", "elephant"), "animal"),
    **dict.fromkeys(("man", "woman", "child"), "person"),
    **dict.fromkeys(("car", "bus", "truck", "bicycle", "motorcycle"), "vehicle"),
    "boat": "boat", **dict.fromkeys(("bench", "table", "chair", "couch"), "furniture"),
    "umbrella": "dome", "kite": "diamond", "ball": "circle", "suitcase": "box",
}
HORIZON = 0.55          # ground starts at this fraction of the height


@dataclass(frozen=True)
class SceneObject:
    noun: str
    color: str


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _shape(draw: ImageDraw.ImageDraw, kind: str, box: Tuple[float, float, float, float], fill: RGB) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    edge = tuple(int(c * 0.55) for c in fill)
    if kind == "animal":
        draw.ellipse((x0, y0 + 0.15 * h, x1, y1 - 0.2 * h), fill=fill, outline=edge, width=2)
        draw.ellipse((x1 - 0.35 * w, y0, x1 + 0.05 * w, y0 + 0.4 * h), fill=fill, outline=edge, width=2)
        for lx in (x0 + 0.2 * w, x1 - 0.3 * w):
            draw.rectangle((lx, y1 - 0.3 * h, lx + 0.1 * w, y1), fill=edge)
    elif kind == "person":
        r = 0.18 * w + 0.1 * h
        cx = (x0 + x1) / 2
        draw.ellipse((cx - r / 2, y0, cx + r / 2, y0 + r), fill=fill, outline=edge, width=2)
        draw.rounded_rectangle((x0 + 0.15 * w, y0 + r, x1 - 0.15 * w, y1), radius=0.2 * w, fill=fill,
                               outline=edge, width=2)
    elif kind == "vehicle":
        draw.rounded_rectangle((x0, y0 + 0.2 * h, x1, y1 - 0.2 * h), radius=0.15 * h, fill=fill,
                               outline=edge, width=2)
        r = 0.22 * h
        for cx in (x0 + 0.25 * w, x1 - 0.25 * w):
            draw.ellipse((cx - r, y1 - 2 * r, cx + r, y1), fill=(40, 40, 40))
    elif kind == "boat":
        draw.polygon(((x0, y0 + 0.4 * h), (x1, y0 + 0.4 * h), (x1 - 0.2 * w, y1), (x0 + 0.2 * w, y1)),
                     fill=fill, outline=edge, width=2)
        draw.polygon(((x0 + 0.5 * w, y0), (x0 + 0.5 * w, y0 + 0.38 * h), (x0 + 0.8 * w, y0 + 0.38 * h)),
                     fill=(250, 250, 250), outline=edge)
    elif kind == "furniture":
        draw.rectangle((x0, y0 + 0.3 * h, x1, y0 + 0.55 * h), fill=fill, outline=edge, width=2)
        for lx in (x0 + 0.05 * w, x1 - 0.15 * w):
            draw.rectangle((lx, y0 + 0.55 * h, lx + 0.1 * w, y1), fill=edge)
    elif kind == "dome":
        draw.pieslice((x0, y0, x1, y1 + 0.6 * h), 180, 360, fill=fill, outline=edge, width=2)
        draw.line(((x0 + x1) / 2, y0 + 0.8 * h, (x0 + x1) / 2, y1), fill=edge, width=2)
    elif kind == "diamond":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon(((cx, y0), (x1, cy), (cx, y1), (x0, cy)), fill=fill, outline=edge, width=2)
    elif kind == "circle":
        d = min(w, h)
        cx, cy = (x0 + x1) / 2, y1 - d / 2
        draw.ellipse((cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2), fill=fill, outline=edge, width=2)
    else:
        draw.rounded_rectangle((x0, y0 + 0.2 * h, x1, y1), radius=4, fill=fill, outline=edge, width=2)
        draw.arc((x0 + 0.3 * w, y0, x1 - 0.3 * w, y0 + 0.4 * h), 180, 360, fill=edge, width=2)


@functools.lru_cache(maxsize=None)
def _label_image(text: str, size: int) -> Image.Image:
    """A rendered label (RGBA, white pill with dark text); cached: the nouns repeat in every scene."""
    font = _font(size)
    l, t, r, b = font.getbbox(text)
    w, h = r - l + 6, b - t + 4
    img = Image.new("RGBA", (w + 1, h + 1), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle((0, 0, w, h), radius=3, fill=(255, 255, 255, 255), outline=(90, 90, 90, 255))
    draw.text((3 - l, 2 - t), text, font=font, fill=(20, 20, 20, 255))
    return img


def _label(img: Image.Image, text: str, center: Tuple[float, float], size: int) -> None:
    label = _label_image(text, size)
    img.paste(label, (int(center[0] - label.width / 2), int(center[1] - label.height / 2)), label)


Box = Tuple[float, float, float, float]


@dataclass(frozen=True)
class SceneLayout:
    """Where a scene's objects are drawn, as boxes ``(x1, y1, x2, y2)`` in the picture's pixels.

    ``order`` lists the two main objects ("subject", "partner") in drawing order (back to front);
    ``secondary`` holds the boxes of the up to three small objects, in the order they are given.
    """

    subject: Box
    partner: Box
    order: Tuple[str, str]
    secondary: Tuple[Box, ...]


def scene_layout(relation: str, size: Tuple[int, int] = SIZE) -> SceneLayout:
    """The layout of a scene with ``relation`` ("on", "next to", "under", "behind", "in front of"):
    it depends on the relation and the picture's size only, so it is known without drawing."""
    W, H = size
    gy = HORIZON * H

    def box(cx: float, bottom: float, w: float, h: float) -> Box:
        return (cx - w / 2, bottom - h, cx + w / 2, bottom)

    sw, sh = 0.30 * W, 0.34 * H     # subject
    pw, ph = 0.34 * W, 0.30 * H     # partner
    floor = 0.93 * H
    if relation == "on":
        p = box(0.5 * W, floor, pw, ph)
        s = box(0.5 * W, p[1] + 0.05 * ph, sw * 0.9, sh * 0.9)
        order = ("partner", "subject")
    elif relation == "under":
        s = box(0.5 * W, floor, sw, sh)
        p = box(0.5 * W, s[1] - 2, pw * 1.2, ph * 0.9)
        order = ("partner", "subject")
    elif relation == "behind":
        p = box(0.45 * W, floor, pw, ph)
        s = box(0.62 * W, floor - 0.16 * H, sw * 0.8, sh * 0.8)
        order = ("subject", "partner")
    elif relation == "in front of":
        p = box(0.62 * W, floor - 0.16 * H, pw * 0.8, ph * 0.8)
        s = box(0.45 * W, floor, sw, sh)
        order = ("partner", "subject")
    else:                                   # next to
        s = box(0.3 * W, floor, sw, sh)
        p = box(0.7 * W, floor, pw, ph)
        order = ("subject", "partner")
    slots = ((0.1 * W, gy + 0.12 * H), (0.9 * W, gy + 0.12 * H), (0.88 * W, 0.3 * H))
    secondary = tuple(box(cx, bottom, 0.15 * W, 0.15 * H) for cx, bottom in slots)
    return SceneLayout(subject=s, partner=p, order=order, secondary=secondary)


#: The parts of a scene's picture that :func:`layout_table` gives a box: the two main objects, their
#: union (a relationship's "union box"), the three secondary slots and the whole picture.
LAYOUT_PARTS = ("subject", "partner", "union", "secondary0", "secondary1", "secondary2", "picture")


def layout_table(relations: Sequence[str], size: Tuple[int, int] = SIZE) -> np.ndarray:
    """The box of every part of :data:`LAYOUT_PARTS` for each relation: ``(len(relations), 7, 4)``
    float32 x1 y1 x2 y2 (a lookup table: the layout does not depend on anything else)."""
    W, H = size
    table = np.empty((len(relations), len(LAYOUT_PARTS), 4), dtype=np.float32)
    for r, relation in enumerate(relations):
        layout = scene_layout(relation, size)
        s, p = np.array(layout.subject), np.array(layout.partner)
        union = np.concatenate([np.minimum(s, p)[:2], np.maximum(s, p)[2:]])
        table[r] = np.stack([s, p, union, *map(np.array, layout.secondary), np.array([0, 0, W, H])])
    return table


def draw_scene(subject: SceneObject, partner: SceneObject, relation: str, background: str,
               secondary: Sequence[SceneObject] = (), size: Tuple[int, int] = SIZE) -> Image.Image:
    """The schematic picture of one scene (an RGB image of ``size``), drawn as :func:`scene_layout` says.

    ``relation`` is the canonical phrase ("on", "next to", "under", "behind", "in front of") and
    ``background`` the scene's noun ("park", "street", ...).
    """
    W, H = size
    sky, ground = BACKGROUNDS.get(background, ((230, 230, 230), (200, 200, 200)))
    img = Image.new("RGB", size, sky)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, HORIZON * H, W, H), fill=ground)
    layout = scene_layout(relation, size)
    main = {"subject": (subject, layout.subject), "partner": (partner, layout.partner)}
    labels = []
    for obj, b in zip(secondary, layout.secondary):
        _shape(draw, SHAPES.get(obj.noun, "box"), b, PALETTE.get(obj.color, (128, 128, 128)))
        labels.append((obj.noun, ((b[0] + b[2]) / 2, b[3] + 6), 9))
    for obj, b in (main[name] for name in layout.order):
        _shape(draw, SHAPES.get(obj.noun, "box"), b, PALETTE.get(obj.color, (128, 128, 128)))
        labels.append((obj.noun, ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2), 11))
    for text, center, fs in labels:
        _label(img, text, center, fs)
    return img


def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding of ``img`` (palette-quantised: flat schematic colours compress well)."""
    buf = io.BytesIO()
    img.quantize(colors=64, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_pictures(folder: Path, n: int, draw: Callable[[int], Image.Image], every: int = 1,
                   bar=None) -> int:
    """Write ``draw(i)`` as ``{i}.png`` for ``i < n`` into ``folder``, replacing it as a whole (drawn in
    a temporary sibling folder, then renamed); ``bar`` advances once per ``every`` pictures. Returns ``n``."""
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir(parents=True)                     # ordinary folder permissions (umask)
        for i in range(n):                          # one picture per image: drawing has no batched form
            (tmp / f"{i}.png").write_bytes(png_bytes(draw(i)))
            if bar is not None and ((i + 1) % every == 0 or i + 1 == n):
                bar.update(1)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return n
