"""Numeric precision of scoring and training: exact float32, TF32 matrix products, or bf16 autocast.

``fp32`` is the reference: every matrix product in IEEE float32 (TF32 off for cuBLAS and cuDNN),
so scores match the published implementation to float32 rounding. ``tf32`` lets Ampere-and-later
GPUs round matrix-product inputs to a 10-bit mantissa (float32 accumulation). ``bf16`` runs the
autocast-eligible ops (linear, matmul, bmm, GRU) in bfloat16 with float32 accumulation; the ops that
autocast keeps in float32 (softmax, norms, reductions) stay exact. On a CPU, ``tf32`` changes
nothing and ``bf16`` autocasts to bfloat16 as on a GPU (useful for testing).

The reduced modes are options for speed only; their effect on the scores is measured by
``benchmarks/bench_gpu.py`` (max absolute score difference against ``fp32``). Scores should always be
handed on as float32 (:func:`scores_in_precision` does so), because the losses compare them at a
temperature (0.001) finer than bfloat16's resolution near 1 (2^-8).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple, Union

import torch

from .config import PRECISIONS
from .errors import ConfigError

#: ``torch.set_float32_matmul_precision`` value of each mode (bf16 keeps the non-autocast rest exact).
_MATMUL_PRECISION = {"fp32": "highest", "tf32": "high", "bf16": "highest"}


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`vsl.config.PRECISIONS`, else a :class:`ConfigError`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a mode (``torch.bfloat16`` for ``bf16``), or None when autocast is off."""
    return torch.bfloat16 if check_precision(precision) == "bf16" else None


def _tf32_settings() -> Tuple[str, bool, bool]:
    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)


def _apply_tf32_settings(settings: Tuple[str, bool, bool]) -> None:
    matmul_precision, cuda_tf32, cudnn_tf32 = settings
    # set_float32_matmul_precision also sets cuda.matmul.allow_tf32, so it goes first.
    torch.set_float32_matmul_precision(matmul_precision)
    torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


@contextlib.contextmanager
def precision_context(precision: str, device: Union[str, torch.device]) -> Iterator[None]:
    """Run the enclosed code in ``precision`` (``"fp32"``, ``"tf32"`` or ``"bf16"``) on ``device``.

    The global TF32 switches (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.backends.cudnn.allow_tf32``, ``torch.get_float32_matmul_precision()``) are set for the
    mode and restored on exit, also when the body raises. ``bf16`` additionally enters
    ``torch.autocast(device_type, dtype=torch.bfloat16)``; outputs of autocast ops are then bfloat16,
    so convert results with ``.float()`` (or use :func:`scores_in_precision`).
    """
    check_precision(precision)
    device_type = torch.device(device).type
    saved = _tf32_settings()
    tf32 = precision == "tf32"
    try:
        _apply_tf32_settings((_MATMUL_PRECISION[precision], tf32, tf32))
        if precision == "bf16":
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        _apply_tf32_settings(saved)


def scores_in_precision(score_fn: Callable[..., torch.Tensor], *args, precision: str = "fp32",
                        device: Optional[Union[str, torch.device]] = None, **kwargs) -> torch.Tensor:
    """``score_fn(*args, **kwargs)`` run in ``precision``, returned as float32.

    ``device`` defaults to the device of the first tensor argument. Example::

        sims = scores_in_precision(model.similarity, img_emb, cap_emb, lengths, precision="tf32")
    """
    if device is None:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    with precision_context(precision, device):
        scores = score_fn(*args, **kwargs)
    return scores.float()
