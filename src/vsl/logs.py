"""Run logging: the same scalars to a JSON-lines file and to TensorBoard, plus progress bars.

``{logger_name}/metrics.jsonl`` holds one JSON object per logging event::

    {"step": 1200, "epoch": 3, "split": "train", "loss": 1.93, "triplet": 1.51, "vsl": 0.42, "lr": 0.0003, "time": ...}

TensorBoard gets ``{split}/{name}`` scalars at ``step`` through :mod:`torch.utils.tensorboard`.
Only the main process writes (``enabled=False`` turns the logger into a no-op on other ranks).

On resume, events logged after the checkpoint's iteration (by the interrupted run) are dropped from
both files, so that a resumed run's logs read as if the run had never stopped.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from tqdm.auto import tqdm

from .errors import VSLError
from .fileio import atomic_write_text

PathLike = Union[str, os.PathLike]
METRICS_FILE = "metrics.jsonl"


class RunLogger:
    """JSON-lines + TensorBoard scalars under ``log_dir``.

    Args:
        log_dir: output folder (created).
        enabled: False on non-main ranks: every method does nothing.
        resume_step: when resuming, drop already-logged events with ``step > resume_step``.
        tensorboard: also write TensorBoard event files.
    """

    def __init__(self, log_dir: PathLike, enabled: bool = True, resume_step: Optional[int] = None,
                 tensorboard: bool = True):
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self._writer = None
        self._file = None
        if not enabled:
            return
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            path = self.log_dir / METRICS_FILE
            if resume_step is not None:
                _truncate_after(path, resume_step)
            elif path.exists():
                path.unlink()                      # a fresh run starts a fresh log
            self._file = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise VSLError(f"{self.log_dir}: cannot write the run log ({exc.strerror or exc})") from None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step hides events of the interrupted run past the resume point.
            self._writer = SummaryWriter(str(self.log_dir),
                                         purge_step=resume_step + 1 if resume_step is not None else None)

    def log(self, step: int, split: str, epoch: Optional[int] = None, **scalars: float) -> None:
        """Record ``scalars`` (Python numbers or 0-d tensors) at ``step`` under ``split``."""
        if not self.enabled:
            return
        values = {k: _number(v) for k, v in scalars.items()}
        record: Dict[str, Any] = {"step": int(step), "split": split}
        if epoch is not None:
            record["epoch"] = int(epoch)
        record.update(values)
        record["time"] = round(time.time(), 3)
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"{split}/{name}", value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_log(path: PathLike) -> List[Dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order; a line cut short (a run writing it right
    now, or killed mid-line) is skipped. OSError when the file cannot be read."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def read_metrics(log_dir: PathLike) -> List[Dict[str, Any]]:
    """All records of ``{log_dir}/metrics.jsonl`` (:func:`read_log`)."""
    return read_log(Path(log_dir) / METRICS_FILE)


def progress_bar(total: Optional[int], desc: str, enabled: bool = True, initial: int = 0,
                 unit: str = "it", unit_scale: bool = False, leave: bool = True) -> tqdm:
    """A tqdm bar with ETA on stderr; disabled on non-main ranks or when asked."""
    return tqdm(total=total, desc=desc, initial=initial, unit=unit, unit_scale=unit_scale,
                disable=not enabled, dynamic_ncols=True, file=sys.stderr, leave=leave)


def _number(value: Any) -> float:
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


def _truncate_after(path: Path, step: int) -> None:
    """Rewrite ``path`` (atomically) without the records whose step is beyond ``step``."""
    if not path.exists():
        return
    kept = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue                           # a line cut short by the interruption
    atomic_write_text(path, "".join(kept))
