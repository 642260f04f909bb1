"""Peak resident memory of ``vsl extract`` after 20 and after 100 images (issue 23's memory target).

One ``vsl extract`` run over the photos shipped in the scikit-image wheel, repeated (copies, not
links: links to one file are duplicates and would be skipped) to ``--images`` entries, at
``--batch`` 4 on the CPU, is watched from outside: every ``--every`` seconds the script reads the
main process's ``VmRSS`` / ``VmHWM`` (the kernel's peak) and the proportional set size (PSS:
shared pages split between the processes that map them, so a worker's copy-on-write view of the
parent is not counted twice) of the main process plus its decoding workers, and the number of
images finished from the run's block log. The table gives the peaks reached by the time 20 images
were done and at the end; the target is the two equal within 10 % and under 3 GB.

``--width 64`` is the full-size architecture of the published model (ResNet-101, 2,048-d features)
with random weights made here in a temporary folder in the port's key layout (262 MB): a full-size
photo takes ~30 s of CPU, so 100 of them take most of an hour. ``--width 8`` uses the reduced-width
test weights of ``../shared/fixtures/butd`` (seconds per photo)::

    python benchmarks/bench_extract_memory.py --width 64 --images 20,100
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "butd" / "weights_w8_seed0.pth"
LIMIT_MB = 3 * 1024


def shipped_photos() -> list:
    import skimage

    data = Path(skimage.__file__).parent / "data"
    return sorted(p for p in data.iterdir() if p.suffix in (".png", ".jpg"))


def make_folder(folder: Path, count: int, order: str = "largest") -> None:
    """``count`` copies of the shipped photos, cycling through them in ``order``: ``largest`` (most
    pixels first, so that the first 20 images already hold the photo that needs the most memory and
    a later rise is accumulation, not content) or ``name``."""
    from PIL import Image

    photos = shipped_photos()
    if order == "largest":
        photos.sort(key=lambda p: (-Image.open(p).size[0] * Image.open(p).size[1], p.name))
    folder.mkdir(parents=True)
    for i in range(count):
        source = photos[i % len(photos)]
        shutil.copyfile(source, folder / f"{i:05d}_{source.name}")


def random_weights(path: Path, width: int, seed: int = 0) -> Path:
    """The detector at ``width`` with its random initialisation, saved as the port's state dict."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from vsl.vision import Detector

    torch.manual_seed(seed)
    torch.save(Detector(width).state_dict(), path)
    return path


def read_status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def images_done(log: Path, block: int) -> int:
    try:
        records = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    except (OSError, ValueError):
        return 0
    return block * len(records)


def measure(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    process = None
    try:
        count = max(args.images)
        make_folder(work / "img", count, args.order)
        weights = FIXTURE if args.width == 8 else random_weights(work / f"random_w{args.width}.pth", args.width)
        cmd = [sys.executable, "-m", "vsl", "extract", "--images", str(work / "img"), "--weights", str(weights),
               "--out", str(work / "data"), "--data_name", "bench_precomp", "--split", "test", "--device", "cpu",
               "--batch", str(args.batch), "--block", str(args.batch), "--workers", str(args.workers), "--quiet"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads)}
        log = work / "data" / "bench_precomp" / ".test_extract" / "blocks-r0.jsonl"
        started = time.time()
        process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))        # so that `finally` stops the run
        marks = sorted(args.images)
        peak_rss = peak_pss = 0.0
        rows, samples = [], 0
        while process.poll() is None:
            status = read_status(process.pid)
            tree = [process.pid] + children(process.pid)
            peak_rss = max(peak_rss, status.get("VmHWM", 0.0))
            peak_pss = max(peak_pss, sum(pss_mb(p) for p in tree))
            samples += 1
            done = images_done(log, args.batch)
            while marks and done >= marks[0]:
                rows.append({"images": marks.pop(0), "seconds": time.time() - started, "main_peak_rss_mb": peak_rss,
                             "tree_peak_pss_mb": peak_pss, "workers": len(tree) - 1})
                print(f"  {rows[-1]['images']} images after {rows[-1]['seconds']:.0f} s: main peak RSS "
                      f"{peak_rss:.0f} MB, peak PSS with workers {peak_pss:.0f} MB", flush=True)
            time.sleep(args.every)
        out, _ = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"vsl extract failed ({process.returncode}): {out[-2000:]}")
        # The last blocks can finish between two samples: such a mark gets the run's final peaks.
        for mark in marks:
            if mark <= count:
                rows.append({"images": mark, "seconds": time.time() - started, "main_peak_rss_mb": peak_rss,
                             "tree_peak_pss_mb": peak_pss, "workers": args.workers, "at_end": True})
                print(f"  {mark} images: reached between samples; the run's final peaks count", flush=True)
        return {"rows": rows, "end": {"main_peak_rss_mb": peak_rss, "tree_peak_pss_mb": peak_pss},
                "seconds": time.time() - started, "samples": samples, "stdout": out.strip()}
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=8, help="8: the fixture weights; 64: full size, random weights")
    parser.add_argument("--images", default="20,100", help="image counts at which to report the peaks")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the run")
    parser.add_argument("--every", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--order", choices=("largest", "name"), default="largest",
                        help="order of the photos in each cycle: most pixels first, or by file name")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    args.images = [int(x) for x in args.images.split(",")]
    what = "full-size architecture, random weights" if args.width == 64 else f"width {args.width}"
    print(f"vsl extract at batch {args.batch}, {args.workers} decoding workers, {args.threads} thread(s); "
          f"detector {what}; photos in {args.order} order", flush=True)
    result = measure(args)
    rows = result["rows"]
    print(f"\n{'images':>7} {'seconds':>8} {'main peak RSS MB':>17} {'peak PSS + workers MB':>22}")
    for r in rows:
        print(f"{r['images']:>7} {r['seconds']:>8.0f} {r['main_peak_rss_mb']:>17.0f} {r['tree_peak_pss_mb']:>22.0f}")
    end = result["end"]
    print(f"{'end':>7} {result['seconds']:>8.0f} {end['main_peak_rss_mb']:>17.0f} {end['tree_peak_pss_mb']:>22.0f}"
          f"   (with the final assembly)")
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        for key, name in (("main_peak_rss_mb", "main RSS"), ("tree_peak_pss_mb", "PSS with workers")):
            ratio = last[key] / first[key]
            print(f"{name}: {last['images']} / {first['images']} images = {ratio:.3f} "
                  f"({'within' if abs(ratio - 1) <= 0.10 else 'NOT within'} 10 %; "
                  f"{'under' if last[key] < LIMIT_MB else 'OVER'} 3 GB)")
    print(result["stdout"])
    if args.json:
        Path(args.json).write_text(json.dumps({**vars(args), **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
