"""Reading the detector's weights file and checking that it is the BUTD Faster R-CNN's, at any width.

The file is the reference port's state dict (``unc-nlp/frcnn-vg-finetuned``'s
``pytorch_model.bin``: 640 tensors, 262 MB) read with ``torch.load(weights_only=True)``, which
executes no code from the file. The width (stem channels: 64 in the real model) is read from the
stem convolution, so reduced-width test weights load with the same code; anything else that does
not fit is refused with a :class:`DetectorError` naming the first missing or unexpected key or the
first wrong shape.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Tuple, Union

import torch

from ..errors import VSLError

#: The stem convolution: (width, 3, 7, 7); its first dimension is the width of the whole network.
WIDTH_KEY = "backbone.stem.conv1.weight"
#: The real model's width (torchvision's / Caffe's ResNet-101).
FULL_WIDTH = 64
WHAT = "the BUTD Faster R-CNN weights (the unc-nlp/frcnn-vg-finetuned state dict)"


class DetectorError(VSLError):
    """A detector weights file is missing, unreadable, or not the BUTD Faster R-CNN's state dict."""


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type's name when empty), for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


#: Where the published weights live on the Hugging Face Hub: repository and file.
HUB_REPO, HUB_FILE = "unc-nlp/frcnn-vg-finetuned", "pytorch_model.bin"


def fetch_weights(name: str) -> Path:
    """The local path of the weights ``name``: an existing file as it is, else a Hub repository
    (``owner/name``, e.g. :data:`HUB_REPO`) whose :data:`HUB_FILE` is downloaded once into the
    Hub's cache through ``huggingface_hub`` (only when the user asks: ``vsl extract --fetch``)."""
    path = Path(name)
    if path.is_file():
        return path
    by_hand = f"or download https://huggingface.co/{HUB_REPO}/resolve/main/{HUB_FILE} and pass its path"
    if name.count("/") != 1 or not all(name.split("/")):
        raise DetectorError(f"{name}: neither a weights file nor a Hub repository name like {HUB_REPO} ({by_hand})")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DetectorError(f"fetching {name} needs huggingface_hub (pip install huggingface_hub), {by_hand}") from None
    try:
        return Path(hf_hub_download(repo_id=name, filename=HUB_FILE))
    except Exception as exc:  # noqa: BLE001 - network, missing repository, cache: one user error
        raise DetectorError(f"{name}: cannot fetch {HUB_FILE} from the Hub ({_first_line(exc)}); {by_hand}") from None


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The tensors of a weights file, or a one-line :class:`DetectorError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DetectorError(f"{path}: no such weights file (expected {WHAT})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
        raise DetectorError(f"{path}: not a readable PyTorch weights file ({_first_line(exc)})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DetectorError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors ({WHAT})")
    return dict(state)


def width_of(state: Mapping[str, torch.Tensor]) -> int:
    """The network width stored in ``state`` (the stem's output channels), :data:`FULL_WIDTH` if absent."""
    stem = state.get(WIDTH_KEY)
    if isinstance(stem, torch.Tensor) and stem.ndim == 4 and stem.shape[0] > 0 and stem.shape[0] % 8 == 0:
        return int(stem.shape[0])
    return FULL_WIDTH


def layout_mismatch(expected: Mapping[str, Tuple[int, ...]], state: Mapping[str, torch.Tensor]) -> str:
    """'' if ``state`` has exactly the keys and shapes of ``expected``, else what differs first."""
    for key in expected:
        if key not in state:
            return f"missing key {key!r}"
    for key in state:
        if key not in expected:
            return f"unexpected key {key!r}"
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            return f"key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(shape)}"
    return ""


def check_layout(path: Union[str, Path], expected: Mapping[str, Tuple[int, ...]],
                 state: Mapping[str, torch.Tensor]) -> None:
    """Raise a :class:`DetectorError` naming ``path`` and the first difference, if any."""
    problem = layout_mismatch(expected, state)
    if problem:
        raise DetectorError(f"{path}: not {WHAT}: {problem}")
