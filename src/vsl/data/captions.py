"""Caption files: one caption per line, strict UTF-8; the reader the vocabulary and the datasets share."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Union

from ..errors import DataError

PathLike = Union[str, os.PathLike]


def read_captions(path: PathLike) -> List[str]:
    """One caption per line, strict UTF-8; an empty or undecodable line is an error naming its number."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: caption file not found (expected one caption per line)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read caption file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 (expected UTF-8 text, one caption per line)") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    captions = [line.strip() for line in text.split("\n")]
    while captions and not captions[-1]:     # the newline that ends the last caption, and blank lines after it
        captions.pop()
    if not captions:
        raise DataError(f"{path}: no captions (expected one caption per line)")
    if not all(captions):
        line = captions.index("") + 1
        raise DataError(f"{path}: line {line} is an empty caption (expected one caption per line)")
    return captions
