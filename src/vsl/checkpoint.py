"""Checkpoints: the published ``.pth.tar`` format and our own, loaded by one function.

Published format (SGRAF/VSL ``torch.save``)::

    {"epoch": int, "best_rsum": float, "Eiters": int,
     "opt": argparse.Namespace(...),              # all options + vocab_size
     "model": [img_enc_state, txt_enc_state, sim_enc_state]}

Ours stores the configuration as plain data, never pickled classes::

    {"format": "vsl-1", "config": {...}, "model": [img, txt, sim state dicts],
     "epoch": int, "iteration": int, "best_rsum": float, "optimizer": state dict | None,
     "extra": {...},                              # RNG states, scheduler, anything plain
     "shortlist": state dict}                     # only when config.shortlist_dim > 0 (the shortlist head)

Both are read with ``torch.load(weights_only=True)``; only ``argparse.Namespace`` is allow-listed.
"""
from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .config import Config
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write
from .models import VSLModel, build_model

FORMAT = "vsl-1"
#: The checkpoints of a training run in its ``model_name`` folder: the latest state (also written
#: mid-epoch), the best dev rsum, and :func:`epoch_checkpoint` after each epoch.
LAST = "checkpoint_last.pth.tar"
BEST = "model_best.pth.tar"
PathLike = Union[str, os.PathLike]


def epoch_checkpoint(epoch: int) -> str:
    """File name of the checkpoint written after ``epoch`` epochs (1-based)."""
    return f"checkpoint_{epoch}.pth.tar"


def _torch_load(path: Path, map_location: Any = "cpu") -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: not a checkpoint of vsl or the published code ({_unpickler_reason(exc)}); "
                              "expected a torch.save file of tensors, plain data and argparse options") from None
    except Exception as exc:  # torch.load raises many types for damaged or foreign files
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unpickler_reason(exc: Exception) -> str:
    """The one informative line of a safe-loader refusal, without torch's advice to load unsafely."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = text.split(marker, 1)[1].strip().splitlines()[0].strip()
        # "Unsupported global: GLOBAL pkg.Cls was not an allowed global by default. Please use ..."
        reason = reason.split(" was not an allowed global")[0].replace("Unsupported global: GLOBAL ", "holds class ")
        if reason.startswith("Unsupported operand"):
            reason = "not a pickle stream"
        return reason
    return _first_line(exc)


def read_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read either format into ``{"format", "config": Config, "model": [3 state dicts], "epoch",
    "iteration", "best_rsum", "optimizer", "extra"}``."""
    path = Path(path)
    raw = _torch_load(path, map_location)
    if not isinstance(raw, dict) or "model" not in raw:
        raise CheckpointError(f"{path}: not a vsl checkpoint (expected a dict with 'model' and 'opt' or 'config')")
    states = raw["model"]
    if not (isinstance(states, (list, tuple)) and len(states) == 3 and all(isinstance(s, dict) for s in states)):
        raise CheckpointError(f"{path}: 'model' must be a list of 3 state dicts (image, text, similarity encoders)")
    try:
        if raw.get("format") == FORMAT:
            config = Config.from_dict(_legacy_head_options(raw["config"]))
            fmt = FORMAT
        elif "opt" in raw:
            opt = raw["opt"]
            values = dict(vars(opt)) if isinstance(opt, argparse.Namespace) else dict(opt)
            config = Config.from_dict(values)
            fmt = "published"
        else:
            raise CheckpointError(f"{path}: checkpoint has neither 'config' nor 'opt'")
    except ConfigError as exc:
        raise CheckpointError(f"{path}: invalid options in checkpoint: {exc}") from None
    return {
        "format": fmt,
        "config": config,
        "model": list(states),
        "epoch": int(raw.get("epoch", 0)),
        "iteration": int(raw.get("iteration", raw.get("Eiters", 0))),
        "best_rsum": float(raw.get("best_rsum", 0.0)),
        "optimizer": raw.get("optimizer"),
        "extra": raw.get("extra", {}) or {},
        "shortlist": _shortlist_state(raw, config, path),
    }


#: Parameter names of the linear shortlist head as written before ``shortlist_hidden`` existed.
_LEGACY_HEAD_KEYS = {"image_proj.": "image.proj.", "caption_proj.": "caption.proj."}


def _legacy_head_options(values: Dict[str, Any]) -> Dict[str, Any]:
    """A head written before ``shortlist_hidden`` existed is the linear head (``shortlist_hidden = 0``)."""
    if values.get("shortlist_dim") and "shortlist_hidden" not in values:
        return {**values, "shortlist_hidden": 0}
    return values


def _shortlist_state(raw: Dict[str, Any], config: Config, path: Path) -> Optional[Dict[str, Any]]:
    """The shortlist head's state dict, which a checkpoint whose config names a head must hold."""
    state = raw.get("shortlist")
    if config.shortlist_dim and not isinstance(state, dict):
        raise CheckpointError(f"{path}: options name a shortlist head (shortlist_dim {config.shortlist_dim}) "
                              "but the checkpoint holds no 'shortlist' weights")
    if not config.shortlist_dim:
        return None
    renamed = {}
    for key, value in state.items():
        old = next((p for p in _LEGACY_HEAD_KEYS if key.startswith(p)), None)
        renamed[_LEGACY_HEAD_KEYS[old] + key[len(old):] if old else key] = value
    return renamed


def load_state(model: VSLModel, states, source: PathLike, shortlist: Optional[Dict[str, Any]] = None) -> None:
    """Load the three published state dicts (and the shortlist head's, when the model has one) into
    ``model``; a one-line error when they do not fit."""
    for name, module, state in zip(("image encoder", "text encoder", "similarity encoder"),
                                   (model.img_enc, model.txt_enc, model.sim_enc), states):
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())
            if len(detail) > 300:
                detail = detail[:300] + "..."
            raise CheckpointError(f"{source}: {name} weights do not fit the model ({detail})") from None
    if model.shortlist is not None:
        if shortlist is None:
            raise CheckpointError(f"{source}: the model has a shortlist head but the checkpoint holds no weights for it")
        try:
            model.shortlist.load_state_dict(shortlist, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise CheckpointError(f"{source}: shortlist head weights do not fit the model ({detail})") from None


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu", **overrides: Any) -> VSLModel:
    """Rebuild the model stored in ``path`` (published or vsl format), in eval mode on ``device``.

    ``overrides`` replace configuration fields that do not change the weights (e.g. ``data_name``,
    ``score_chunk``).
    """
    ckpt = read_checkpoint(path)
    config = ckpt["config"].replace(**overrides) if overrides else ckpt["config"]
    model = build_model(config)
    load_state(model, ckpt["model"], path, ckpt["shortlist"])
    return model.to(device).eval()


def save_checkpoint(path: PathLike, model: VSLModel, config: Optional[Config] = None, *,
                    optimizer: Optional[torch.optim.Optimizer] = None, epoch: int = 0, iteration: int = 0,
                    best_rsum: float = 0.0, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write a vsl-format checkpoint atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = config or model.config
    payload = {
        "format": FORMAT,
        "config": config.to_dict(),
        "model": [_cpu_state(m) for m in (model.img_enc, model.txt_enc, model.sim_enc)],
        "epoch": int(epoch),
        "iteration": int(iteration),
        "best_rsum": float(best_rsum),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra or {},
    }
    if model.shortlist is not None:
        payload["shortlist"] = _cpu_state(model.shortlist)
    return atomic_write(path, lambda fh: torch.save(payload, fh), fsync=True)


def _cpu_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
