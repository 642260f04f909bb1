"""Running a study: one ``vsl train`` + ``vsl eval`` per arm x seed, in parallel, resumable.

A study folder (``--out``, default ``./vsl-ablate/STUDY``)::

    study.json                      what the folder holds: study, dataset, recipe, evaluation (checked)
    runs/ARM/seed_S/checkpoints/    the run's --model_name
    runs/ARM/seed_S/logs/           its --logger_name (metrics.jsonl)
    runs/ARM/seed_S/train.out       output of vsl train / vsl eval (the error line of a failed run)
    runs/ARM/seed_S/eval.out
    runs/ARM/seed_S/test.json       vsl eval --output (written last by a finished run)
    runs/ARM/seed_S/ranks.npz       vsl eval --save_ranks: per-query ranks for the paired bootstrap
    runs/ARM/seed_S/status.json     written by this runner after each stage
    runs.csv, runs.json, summary.json, summary.md, summary.png

The commands are ordinary command lines (``--dry_run`` prints them for any scheduler); this module
runs them as child processes: on a CPU ``jobs`` at a time with the cores split between them
(``OMP_NUM_THREADS``), on GPUs one run per GPU (``CUDA_VISIBLE_DEVICES``). A run whose
``test.json`` and ``ranks.npz`` exist is skipped; one with a ``checkpoint_last.pth.tar`` but no
finished training is resumed with ``--resume`` (exact, see :mod:`vsl.train`); a failed run is
tried again by the next invocation.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..checkpoint import BEST, LAST
from ..config import Config
from ..errors import ConfigError
from ..fileio import atomic_write_text, check_writable
from ..logs import read_log
from .studies import Arm, Study, arm_values

FORMAT = "vsl-ablate"
VERSION = 1
MANIFEST = "study.json"
#: Options that name a run's own files or seed: set per run, never by the recipe.
PER_RUN = ("seed", "model_name", "logger_name")
#: Options that change where or how fast a run computes, not what: a study may continue with others.
NOT_IDENTITY = ("device", "workers")


# ------------------------------------------------------------------------------------------------
# Command lines
# ------------------------------------------------------------------------------------------------
def train_flags(values: Mapping[str, Any]) -> List[str]:
    """``vsl train`` flags giving exactly ``values`` (Config fields; defaults are left out).

    Every option of ``vsl train`` is ``--FIELD``; the two features that the published flags turn
    off are written with their plain ``--no_max_violation`` / ``--no_bi_gru``. ``vocab_size`` has
    no flag (training reads it from the vocabulary).
    """
    defaults = {f.name: f.default for f in fields(Config)}
    out: List[str] = []
    for name in defaults:
        if name not in values or name == "vocab_size" or values[name] == defaults[name]:
            continue
        value = values[name]
        if isinstance(defaults[name], bool):
            if name in ("max_violation", "bi_gru"):
                if value:
                    raise ConfigError(f"{name}: no flag turns it on (it is on by default)")
                out.append(f"--no_{name}")
            elif value:
                out.append(f"--{name}")
        elif value is not None:
            out += [f"--{name}", str(value)]
    return out


def vsl_command(*args: str) -> List[str]:
    """``python -m vsl ARGS`` with this interpreter (so the same installation runs every job)."""
    return [sys.executable, "-m", "vsl", *args]


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One arm x seed: its folder and its training options (``values``: Config fields)."""

    arm: Arm
    label: str
    seed: int
    folder: Path
    values: Dict[str, Any]
    eval_split: str = "test"
    protocol: str = "full"

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    @property
    def test_json(self) -> Path:
        return self.folder / "test.json"

    @property
    def ranks(self) -> Path:
        return self.folder / "ranks.npz"

    @property
    def status_file(self) -> Path:
        return self.folder / "status.json"

    @property
    def log(self) -> Path:
        return self.folder / "logs" / "metrics.jsonl"

    def status(self) -> Dict[str, Any]:
        try:
            return json.loads(self.status_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def state(self) -> str:
        """``finished`` | ``trained`` (eval left) | ``partial`` (resumable) | ``new``."""
        if self.test_json.is_file() and self.ranks.is_file():
            return "finished"
        if self.status().get("trained") and (self.checkpoints / BEST).is_file():
            return "trained"
        return "partial" if (self.checkpoints / LAST).is_file() else "new"

    def train_argv(self) -> List[str]:
        values = {**self.values, "seed": self.seed, "model_name": str(self.checkpoints),
                  "logger_name": str(self.folder / "logs")}
        argv = vsl_command("train", *train_flags(values), "--quiet")
        if (self.checkpoints / LAST).is_file():
            argv += ["--resume", str(self.checkpoints / LAST)]
        return argv

    def eval_argv(self) -> List[str]:
        v = self.values
        return vsl_command("eval", "--checkpoint", str(self.checkpoints / BEST), "--data_path", str(v["data_path"]),
                           "--vocab_path", str(v["vocab_path"]), "--data_name", str(v["data_name"]),
                           "--split", self.eval_split, "--protocol", self.protocol,
                           "--device", str(v.get("device", "auto")), "--output", str(self.test_json),
                           "--save_ranks", str(self.ranks), "--quiet")

    def commands(self) -> List[List[str]]:
        """What is left to run: train (unless trained) and eval (unless finished)."""
        state = self.state()
        if state == "finished":
            return []
        return ([] if state == "trained" else [self.train_argv()]) + [self.eval_argv()]


def plan_runs(study: Study, arms: Sequence[Arm], seeds: Sequence[int], recipe: Mapping[str, Any], out: Path,
              eval_split: str = "test", protocol: str = "full") -> List[Run]:
    """Every arm x seed of the study, in seed-major order (seed 0 of every arm first)."""
    module = str(recipe.get("module_name", Config.module_name))
    runs = []
    for seed in seeds:
        for arm in arms:
            values = arm_values(study, arm, recipe)
            Config.from_dict({**values, "seed": seed})          # a bad combination fails here, not in a job
            runs.append(Run(arm, arm.title(module), seed, out / "runs" / arm.name / f"seed_{seed}", values,
                            eval_split, protocol))
    return runs


# ------------------------------------------------------------------------------------------------
# The study folder
# ------------------------------------------------------------------------------------------------
def dataset_fingerprint(data_path: Path, data_name: str, splits: Sequence[str]) -> Dict[str, Any]:
    """Names, sizes and caption hashes of the study's data files (what "the same dataset" means)."""
    folder = Path(data_path) / data_name
    files: Dict[str, Any] = {}
    for split in splits:
        ims, caps = folder / f"{split}_ims.npy", folder / f"{split}_caps.txt"
        files[ims.name] = ims.stat().st_size if ims.is_file() else None
        files[caps.name] = hashlib.sha1(caps.read_bytes()).hexdigest() if caps.is_file() else None
    return {"data_path": str(Path(data_path).resolve()), "data_name": data_name, "files": files}


def study_manifest(study: Study, recipe: Mapping[str, Any], dataset: Mapping[str, Any], eval_split: str,
                   protocol: str) -> Dict[str, Any]:
    identity = {k: v for k, v in recipe.items() if k not in NOT_IDENTITY}
    return {"format": FORMAT, "version": VERSION, "study": study.name, "dataset": dict(dataset),
            "recipe": json.loads(json.dumps(identity, sort_keys=True)),
            "evaluation": {"split": eval_split, "protocol": protocol}}


def claim_folder(out: Path, manifest: Mapping[str, Any], force: bool = False) -> None:
    """Make ``out`` this study's folder; refuse (naming it) a folder of another study or dataset.

    ``force``: start over instead — the folder's previous runs and summaries are deleted.
    """
    check_writable(out, "folder")
    path = out / MANIFEST
    previous: Optional[Dict[str, Any]] = None
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = {}
    elif (out / "runs").exists():
        previous = {}
    if previous is not None and previous != dict(manifest):
        if not force:
            raise ConfigError(f"{out}: {_difference(previous, manifest)}; use another --out, or --force to "
                              "delete its runs and start over")
        shutil.rmtree(out / "runs", ignore_errors=True)
        for name in ("runs.csv", "runs.json", "summary.json", "summary.md", "summary.png"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(dict(manifest), indent=1) + "\n")


def _difference(previous: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    if previous.get("format") != FORMAT:
        return "holds runs/ but no vsl ablate study.json (not a study folder)"
    if previous.get("study") != manifest["study"]:
        return f"holds the study {previous.get('study')!r}, not {manifest['study']!r}"
    if previous.get("dataset") != manifest["dataset"]:
        old = previous.get("dataset", {})
        return (f"was written for the dataset {old.get('data_name')!r} in {old.get('data_path')}"
                f"{' (other files)' if old.get('data_path') == manifest['dataset']['data_path'] else ''}, "
                f"not {manifest['dataset']['data_name']!r} in {manifest['dataset']['data_path']}")
    if previous.get("recipe") != manifest["recipe"]:
        old, new = previous.get("recipe", {}), manifest["recipe"]
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return "was written with other training options (" + ", ".join(
            f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4]) + ")"
    return "was written with another evaluation (split/protocol) or version"


@contextlib.contextmanager
def folder_lock(out: Path):
    """Hold ``OUT/.lock`` (this process's id) while a study runs; refuse a folder another live
    ``vsl ablate`` holds (two would train the same runs). A lock left by a dead process is taken over."""
    path = out / ".lock"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise ConfigError(f"{out}: another vsl ablate (process {pid}) is running this study; wait for it, "
                                  "or look at its results with --summary_only") from None
            path.unlink(missing_ok=True)                 # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        break
    else:
        raise ConfigError(f"{path}: cannot take the study's lock")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------------
# Execution
# ------------------------------------------------------------------------------------------------
@dataclass
class Slots:
    """Where jobs run: ``jobs`` slots, each with its threads and optionally a GPU."""

    jobs: int
    threads: int
    gpus: Tuple[Optional[str], ...] = ()

    def env(self, slot: int) -> Dict[str, str]:
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpus[slot % len(self.gpus)])
        return env

    def describe(self) -> str:
        where = (f"one per GPU ({', '.join(str(g) for g in self.gpus)})" if self.gpus
                 else f"on the CPU, {self.threads} thread(s) each")
        return f"{self.jobs} at a time, {where}"


def choose_slots(device: str, pending: int, jobs: Optional[int] = None) -> Slots:
    """CPU: ``jobs`` (default: one per core, at most one per pending run), cores split between them.
    GPUs (``--device auto``/``cuda``): one run per GPU; ``cuda:N``: one run at a time on it."""
    cores = os.cpu_count() or 1
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be positive, got {jobs}")
    gpus: Tuple[Optional[str], ...] = ()
    if device.startswith("cuda:"):                 # one named GPU: the runs take turns on it
        return Slots(jobs or 1, max(1, cores // (jobs or 1)))
    if device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            gpus = tuple(str(i) for i in range(torch.cuda.device_count()))
    if gpus:
        n = jobs or len(gpus)
        return Slots(max(1, min(n, max(1, pending))), max(1, cores // max(1, len(gpus))), gpus)
    n = jobs or max(1, min(cores, pending))
    return Slots(n, max(1, cores // n))


def error_line(output: Path) -> str:
    """The line that explains a failed command: its ``vsl: error:`` line, else its last line."""
    try:
        lines = [l.strip() for l in output.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
    except OSError:
        return "no output"
    for line in reversed(lines):
        if line.startswith("vsl: error:"):
            return line
    return lines[-1] if lines else "no output"


class Executor:
    """Runs the pending :class:`Run` s on the slots; ``on_done(run)`` is called after each."""

    def __init__(self, runs: Sequence[Run], slots: Slots, on_done=None):
        self.runs, self.slots, self.on_done = list(runs), slots, on_done
        self._stop = threading.Event()
        self._procs: Dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._busy = 0                                 # workers not yet returned
        #: CPU seconds (user + system) of the commands, per output file (train.out / eval.out).
        self.cpu_seconds: Dict[Path, float] = {}

    def _command(self, argv: List[str], env: Dict[str, str], output: Path) -> int:
        """Run one command, its output appended to ``output``; returns its exit status."""
        with open(output, "ab") as fh:
            fh.write(("$ " + shlex.join(argv) + "\n").encode())
            fh.flush()
            with self._lock:                           # no start after stop() has looked at _procs
                if self._stop.is_set():
                    return -1
                proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env})
                self._procs[proc.pid] = proc
            try:
                rc, cpu = _wait(proc)
            finally:
                with self._lock:
                    self._procs.pop(proc.pid, None)
        self.cpu_seconds[output] = self.cpu_seconds.get(output, 0.0) + cpu
        return rc

    def _run_one(self, run: Run, slot: int) -> None:
        env = self.slots.env(slot)
        run.folder.mkdir(parents=True, exist_ok=True)
        start = time.time()
        status = run.status()
        status.pop("error", None)
        status.update(status="running", started=start)
        _write_status(run, status)
        if run.state() not in ("trained", "finished"):
            output = run.folder / "train.out"
            rc = self._command(run.train_argv(), env, output)
            if self._stop.is_set():
                _write_status(run, {**status, "status": "interrupted"})
                return
            if rc != 0:
                _write_status(run, {**status, "status": "failed", "stage": "train", "error": error_line(output),
                                    "seconds": time.time() - start})
                return
            status.update(trained=True, train_seconds=status.get("train_seconds", 0.0) + time.time() - start,
                          train_cpu_seconds=status.get("train_cpu_seconds", 0.0)
                          + self.cpu_seconds.get(run.folder / "train.out", 0.0))
            _write_status(run, status)
        eval_start = time.time()
        output = run.folder / "eval.out"
        rc = self._command(run.eval_argv(), env, output)
        if self._stop.is_set():
            _write_status(run, {**status, "status": "interrupted"})
            return
        if rc != 0 or run.state() != "finished":
            _write_status(run, {**status, "status": "failed", "stage": "eval", "error": error_line(output),
                                "seconds": time.time() - start})
            return
        _write_status(run, {**status, "status": "finished", "eval_seconds": time.time() - eval_start,
                            "seconds": status.get("train_seconds", 0.0) + time.time() - eval_start,
                            "cpu_seconds": self._cpu(run, status)})

    def _cpu(self, run: Run, status: Mapping[str, Any]) -> float:
        """CPU seconds of the run: its training (all attempts) and this evaluation."""
        return float(status.get("train_cpu_seconds", 0.0)) + self.cpu_seconds.get(run.folder / "eval.out", 0.0)

    def _worker(self, slot: int, todo: "queue.Queue[Run]") -> None:
        with self._lock:
            self._busy += 1
        try:
            while not self._stop.is_set():
                try:
                    run = todo.get_nowait()
                except queue.Empty:
                    return
                self._run_one(run, slot)
                if self.on_done is not None and not self._stop.is_set():
                    self.on_done(run)
        finally:
            with self._lock:
                self._busy -= 1

    def run(self, poll=None, interval: float = 1.0) -> None:
        """Run everything; ``poll()`` is called every ``interval`` s meanwhile (progress)."""
        todo: "queue.Queue[Run]" = queue.Queue()
        for r in self.runs:
            todo.put(r)
        threads = [threading.Thread(target=self._worker, args=(s, todo), daemon=True)
                   for s in range(min(self.slots.jobs, len(self.runs)))]
        # A scheduler's SIGTERM stops the study like Ctrl-C: children terminated, runs resumable.
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                if poll is not None:
                    poll()
                for t in threads:
                    t.join(timeout=interval / max(1, len(threads)))
        except BaseException:
            self.stop()
            # Let each worker record its run as interrupted. (Not Thread.join: a join interrupted
            # by the signal can return at once afterwards, before the thread has finished.)
            deadline = time.time() + 60
            while self._busy and time.time() < deadline:
                time.sleep(0.05)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def stop(self) -> None:
        """Stop: no new commands; the running ones are terminated (they resume next time)."""
        with self._lock:
            self._stop.set()
            procs = list(self._procs.values())
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _wait(proc: subprocess.Popen) -> Tuple[int, float]:
    """Wait for ``proc``: its exit status and CPU seconds (user + system, where the OS reports them)."""
    if not hasattr(os, "wait4"):
        return proc.wait(), 0.0
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:                      # reaped by Executor.stop meanwhile
        return proc.wait(), 0.0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def _write_status(run: Run, status: Mapping[str, Any]) -> None:
    atomic_write_text(run.status_file, json.dumps(dict(status), indent=1) + "\n")


# ------------------------------------------------------------------------------------------------
# Progress: iterations logged by the runs' metrics.jsonl
# ------------------------------------------------------------------------------------------------
def run_iterations(values: Mapping[str, Any], train_captions: int) -> int:
    """Training iterations of a run: epochs x batches per epoch."""
    return int(values.get("num_epochs", Config.num_epochs)) * -(-train_captions // int(values.get("batch_size",
                                                                                                   Config.batch_size)))


def logged_iterations(log: Path) -> int:
    """The last training step in a run's ``metrics.jsonl`` (0 when there is none yet)."""
    try:
        events = read_log(log)
    except OSError:
        return 0
    return next((int(e.get("step", 0)) for e in reversed(events) if e.get("split") == "train"), 0)


def count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)
