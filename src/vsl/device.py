"""Which device computations run on: ``--device auto|cpu|cuda|cuda:N`` resolved and checked once."""
from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` if available, else ``cpu``; otherwise ``torch.device(device)``, checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device (expected auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return resolved

