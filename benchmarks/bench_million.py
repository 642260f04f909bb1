"""A large gallery on one machine: the shortlist tier and memory-mapped re-ranking at scale (issue 21, part 3).

    python benchmarks/bench_million.py --images 1000000 --out /work/million-data/1m --structure scenes
    python benchmarks/bench_million.py --tiny            # seconds; what tests/test_benchmarks.py runs

What it measures, per index type (``flat`` = the exact shortlist, the baseline of the same run;
``hnsw``; an IVF-PQ factory string with refinement) and search depth (``--ef_search`` for HNSW,
``--nprobe`` x ``--k_factor`` for IVF), in both directions (text->image: caption queries against
the image vectors; image->text: image queries against the caption vectors), each measured separately:

* build time of the FAISS index (:func:`vsl.retrieval.faiss_index.make_faiss`, the code ``vsl index``
  runs) and its size on disk (the serialized index);
* query latency p50 / p99 at K = 100, one query at a time: shortlist search
  (:func:`faiss_index.search` with this row's depth) plus the re-ranking of the 100 candidates against
  their embeddings **read from a memory-mapped float16 file** (regions of images, words of captions);
  ``*_search_ms`` is the shortlist search alone (median). The queries run twice: ``*_first_*`` is
  the first pass (the candidates' rows partly not yet in the page cache: the first row of a run is
  the cold case), ``*_p50_ms`` / ``*_p99_ms`` the second (warm page cache, as a busy server's);
* shortlist recall@100 against flat (fraction of flat's top 100 found) and R@100 of the ground truth
  (the query's own item);
* resident memory (from /proc/self/status) of a process that measures one index type with both
  directions' indexes loaded: peak (VmHWM), and at the end anonymous (RssAnon: the indexes and
  buffers) and file-backed (RssFile: page cache of the memory-mapped files, reclaimable) memory.
  Without ``--in_process`` every index type runs in its own child process, so one type's peak is
  not another's.

The gallery is synthetic, at the demo feature sizes (36 regions x 128 dims, shortlist vectors of 128
dims, one caption per image), written block by block to memory-mapped files under ``--out``
(bounded memory, resumable: a complete file is reused, and so is a built index with its recorded
build time). ``--structure`` chooses the shortlist vectors (see :func:`scene_vectors`):

* ``scenes``: derived from the demo generator (:mod:`vsl.data.demo`): each image is a demo scene
  (its subject, partner, relation, secondary objects, background and region layout drawn by
  :func:`~vsl.data.demo.sample_scenes`, its prototypes by :func:`~vsl.data.demo.sample_prototypes`);
  its vector is the mean of its 36 regions' features in expectation plus the demo's style offset and
  the pooled region noise, i.e. the input of the linear shortlist head; its caption names what the
  demo's grammar names (subject always, partner 80 %, colours 50 %, ...). Clustered the way real
  galleries are (many images of a dog on a bench), which is what approximate indexes rely on.
* ``uniform``: near-uniform unit vectors (2,048 weak topics under heavy noise), the adversarial
  worst case of every approximate index: all top-100 neighbours nearly tied.

The re-ranking score is a stand-in for the trained exact model's (max over regions of the
word-region cosine, mean over words) on structure-free embeddings (shared by both structures): it
has the exact model's memory access pattern (36 x d float16 per candidate from the mmap), not its
arithmetic cost.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
if importlib.util.find_spec("vsl") is None:      # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import markdown_table  # noqa: E402

REGIONS, EMBED, DIM, WORDS = 36, 128, 128, 12
BLOCK = 16384
K = 100
STRUCTURES = ("scenes", "uniform")
#: Noise of a caption's shortlist vector (per dimension, the scale of the demo's per-image style
#: offset): word choice, synonyms, openers -- what the text side adds that the scene does not say.
CAPTION_NOISE = 0.3


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _array(path: Path, shape, dtype, fill) -> np.ndarray:
    """A memory-mapped array written block by block by ``fill(lo, hi) -> block``; reused when complete."""
    done = path.with_suffix(".done")
    if path.is_file() and done.is_file():
        return np.load(path, mmap_mode="r")
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    for lo in range(0, shape[0], BLOCK):
        hi = min(lo + BLOCK, shape[0])
        arr[lo:hi] = fill(lo, hi)
    arr.flush()
    del arr
    done.write_text("ok\n")
    return np.load(path, mmap_mode="r")


def uniform_vectors(seed: int, lo: int, hi: int, topics: int = 2048):
    """Images ``lo..hi``: ``(image (n, DIM), caption (n, DIM))`` float32 unit vectors, near-uniform
    (weak topic centres under noise of 3.6x their norm); a caption is a noisy copy of its image."""
    centers = _unit(np.random.default_rng(seed).standard_normal((topics, DIM)))
    rng = np.random.default_rng([seed, 1, lo])     # each block its own stream: files do not depend on order
    t = rng.integers(0, topics, hi - lo)
    img = _unit(centers[t] + 3.6 * rng.standard_normal((hi - lo, DIM)) / np.sqrt(DIM))
    cap = _unit(img + 0.8 * rng.standard_normal((hi - lo, DIM)) / np.sqrt(DIM))
    return img, cap


def scene_vectors(seed: int, lo: int, hi: int):
    """Images ``lo..hi`` as demo scenes: ``(image (n, DIM), caption (n, DIM))`` float32 unit vectors.

    Image: ``E[visibility] * sum_e share_e * entity_e + style + pooled noise`` -- the mean over the
    image's regions of :func:`vsl.data.demo.render_regions`' features before rectification (share_e:
    the fraction of regions entity slot e owns; noise ``feature_noise / sqrt(regions)``). Caption:
    the entities the demo grammar names in one caption (subject; partner and relation with
    ``P_PARTNER``; each secondary with its ``p_secondary``; background with ``P_SCENE``; colours
    with ``P_SUBJECT_COLOR`` / ``P_OTHER_COLOR``), weighted by the mean region budget of their slot,
    plus :data:`CAPTION_NOISE`.
    """
    from vsl.data import demo as dd

    spec = dd.DemoSpec(seed=seed, num_regions=REGIONS, img_dim=DIM)
    protos = dd.sample_prototypes(spec)                              # shared by every block
    block = dd.DemoSpec(seed=seed * 1_000_003 + 1 + lo // BLOCK, test_images=hi - lo, num_regions=REGIONS, img_dim=DIM)
    sc = dd.sample_scenes(block, "test")
    rng = np.random.default_rng([seed, 5, lo])
    n, d = hi - lo, DIM
    cls, col = sc.classes, sc.colors
    present = cls >= 0
    rel = 0.5 * (protos.classes[cls[:, dd.SUBJECT]] + protos.classes[cls[:, dd.PARTNER]]) + protos.relations[sc.relation]

    def entities(color_on: np.ndarray) -> np.ndarray:               # (n, NUM_ENTITIES, d); absent slots 0
        objects = protos.classes[np.maximum(cls, 0)] + color_on[:, :, None] * protos.colors[np.maximum(col, 0)]
        objects = objects * present[:, :, None]
        return np.concatenate([objects[:, :2], rel[:, None], objects[:, 2:], protos.scenes[sc.scene][:, None]], axis=1)

    share = np.eye(dd.NUM_ENTITIES)[sc.region_owner].mean(axis=1)   # (n, NUM_ENTITIES)
    img = (0.75 * np.einsum("ne,ned->nd", share, entities(np.ones(cls.shape)))
           + 0.3 * rng.standard_normal((n, d)) + spec.feature_noise / np.sqrt(REGIONS) * rng.standard_normal((n, d)))

    mentioned = np.zeros((n, dd.NUM_ENTITIES), bool)
    mentioned[:, dd.SUBJECT] = True
    mentioned[:, dd.PARTNER] = mentioned[:, dd.RELATION] = rng.random(n) < dd.P_PARTNER
    mentioned[:, dd.SECONDARY0:dd.BACKGROUND] = (rng.random((n, dd.MAX_SECONDARY)) < spec.level.p_secondary) & present[:, 2:]
    mentioned[:, dd.BACKGROUND] = rng.random(n) < dd.P_SCENE
    color_p = np.array([dd.P_SUBJECT_COLOR] + [dd.P_OTHER_COLOR] * (1 + dd.MAX_SECONDARY))
    budget = np.array([0.335, 0.21, 2 / 36] + [0.07] * dd.MAX_SECONDARY + [0.0])
    budget[-1] = 1 - 0.335 - 0.21 - 2 / 36 - 2 * 0.07               # background: the rest (2 secondaries on average)
    cap = (np.einsum("ne,ned->nd", mentioned * budget, entities(rng.random(cls.shape) < color_p))
           + CAPTION_NOISE * rng.standard_normal((n, d)))
    return _unit(img), _unit(cap)


def make_gallery(out: Path, n: int, seed: int = 0, structure: str = "scenes") -> dict:
    """Shortlist vectors (n, DIM) float32 of images and captions under ``out/structure``, and the float16
    region (n, REGIONS, EMBED) and word (n, WORDS, EMBED) embeddings under ``out`` (structure-free)."""
    make = {"scenes": scene_vectors, "uniform": uniform_vectors}[structure]
    (out / structure).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    img = _array(out / structure / "image_global.npy", (n, DIM), np.float32, lambda lo, hi: make(seed, lo, hi)[0])
    cap = _array(out / structure / "caption_global.npy", (n, DIM), np.float32, lambda lo, hi: make(seed, lo, hi)[1])

    def embeddings(rows, salt):
        return lambda lo, hi: _unit(np.random.default_rng([seed, salt, lo]).standard_normal(
            (hi - lo, rows, EMBED), dtype=np.float32)).astype(np.float16)

    regions = _array(out / "regions.npy", (n, REGIONS, EMBED), np.float16, embeddings(REGIONS, 3))
    words = _array(out / "words.npy", (n, WORDS, EMBED), np.float16, embeddings(WORDS, 4))
    return {"image_global": img, "caption_global": cap, "regions": regions, "words": words,
            "seconds": time.perf_counter() - t0}


def rerank(query: np.ndarray, gallery: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Scores of ``ids`` (S,) for one query's embeddings ``(L, d)`` against ``gallery[ids]`` ``(S, R, d)``
    (memory-mapped float16): max over the gallery rows, mean over the query rows."""
    ids = ids[ids >= 0]
    order = np.argsort(ids)                                 # sorted reads from the mmap
    cand = np.asarray(gallery[ids[order]], dtype=np.float32)  # (S, R, d)
    sims = np.einsum("ld,srd->slr", query.astype(np.float32), cand)
    scores = np.empty(len(ids), np.float32)
    scores[order] = sims.max(axis=2).mean(axis=1)
    return ids[np.argsort(-scores)]


def depths(index_type: str, args) -> list:
    """The search depths measured for ``index_type``: dicts of :func:`faiss_index.search` options."""
    from vsl.retrieval.faiss_index import factory_string

    name = factory_string(index_type, args.images)
    ints = lambda text: [int(v) for v in str(text).split(",") if v]
    if "HNSW" in name:
        return [{"ef_search": v} for v in ints(args.ef_search)] or [{}]
    if name.startswith("IVF") or ",IVF" in name:
        kfs = ints(args.k_factor) if "RFlat" in name or "Refine" in name else [None]
        return [{"nprobe": p, **({} if kf is None else {"k_factor": kf})} for p in ints(args.nprobe) for kf in kfs] or [{}]
    return [{}]


def _index(vectors: np.ndarray, index_type: str, path: Path, seed: int, build_threads: int, threads: int):
    """The index of ``vectors`` at ``path`` (read, with its recorded build time, when complete) or built."""
    import faiss

    from vsl.retrieval.faiss_index import make_faiss, read_faiss, write_faiss

    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        return read_faiss(path), json.loads(meta.read_text())["build_s"], False
    faiss.omp_set_num_threads(build_threads)
    t0 = time.perf_counter()
    index = make_faiss(vectors, index_type, seed=seed)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(threads)
    write_faiss(path, index)
    meta.write_text(json.dumps({"build_s": build_s, "build_threads": build_threads}) + "\n")
    return index, build_s, True


def measure(g: dict, index_type: str, args, work: Path) -> list:
    """One row per search depth of ``index_type``, both directions; flat's top ids are stored under
    ``work`` (recall of the others is measured against them)."""
    from vsl.retrieval.faiss_index import search

    rng = np.random.default_rng(args.seed + 7)
    n = len(g["image_global"])
    q = np.sort(rng.choice(n, size=min(args.queries, n), replace=False))
    settings = depths(index_type, args)
    rows = [{"index": index_type, **s} for s in settings]
    keep = []
    for direction, gallery_vecs, query_vecs, gallery_emb, query_emb in (
            ("t2i", g["image_global"], g["caption_global"], g["regions"], g["words"]),
            ("i2t", g["caption_global"], g["image_global"], g["words"], g["regions"])):
        path = work / f"{direction}-{index_type.replace(',', '_')}.faiss"
        index, build_s, built = _index(gallery_vecs, index_type, path, args.seed, args.build_threads, args.threads)
        keep.append(index)                                   # both directions stay loaded, as in a server
        flat_path = work / f"flat-top-{direction}.npy"
        flat_top = np.load(flat_path) if index_type != "flat" else None
        qv = np.ascontiguousarray(query_vecs[q])
        for row, depth in zip(rows, settings):
            row.update({f"{direction}_build_s": build_s, f"{direction}_built_now": built,
                        f"{direction}_disk_mb": path.stat().st_size / 2**20})
            search(index, qv[:5], K, **depth)                # warm-up
            for first in (True, False):                      # cold-ish page cache, then warm
                lat, alone, top = [], [], np.empty((len(q), K), np.int64)
                for i in range(len(q)):
                    t1 = time.perf_counter()
                    _, ids = search(index, qv[i:i + 1], K, **depth)
                    t2 = time.perf_counter()
                    rerank(np.asarray(query_emb[q[i]]), gallery_emb, ids[0])
                    lat.append(time.perf_counter() - t1)
                    alone.append(t2 - t1)
                    top[i] = ids[0]
                if first:
                    row[f"{direction}_first_p50_ms"] = 1e3 * float(np.median(lat))
                    row[f"{direction}_first_p99_ms"] = 1e3 * float(np.percentile(lat, 99))
            row[f"{direction}_p50_ms"] = 1e3 * float(np.median(lat))
            row[f"{direction}_p99_ms"] = 1e3 * float(np.percentile(lat, 99))
            row[f"{direction}_search_ms"] = 1e3 * float(np.median(alone))
            row[f"{direction}_R@100"] = float(np.mean([qi in t for qi, t in zip(q, top)]))   # own item = ground truth
            if flat_top is None:
                np.save(flat_path, top)
            else:
                row[f"{direction}_recall_vs_flat"] = float(np.mean(
                    [len(np.intersect1d(a, b[b >= 0])) / K for a, b in zip(flat_top, top)]))
    for row in rows:
        row.update(peak_rss_mb=_status_mb("VmHWM"), rss_anon_mb=_status_mb("RssAnon"), rss_file_mb=_status_mb("RssFile"))
    del keep
    return rows


def _child(args, structure: str, index_type: str) -> list:
    """``measure`` in a fresh process (its own resident-memory peak); rows come back as JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--images", str(args.images), "--out", str(args.out),
               "--structure", structure, "--index_types", index_type, "--queries", str(args.queries),
               "--threads", str(args.threads), "--build_threads", str(args.build_threads), "--seed", str(args.seed),
               "--ef_search", args.ef_search, "--nprobe", args.nprobe, "--k_factor", args.k_factor,
               "--child", tmp.name]
        subprocess.run(cmd, check=True)
        return json.loads(Path(tmp.name).read_text())


COLUMNS = ["structure", "index", "ef_search", "nprobe", "k_factor", "t2i_build_s", "t2i_disk_mb", "t2i_p50_ms",
           "t2i_p99_ms", "t2i_first_p50_ms", "t2i_search_ms", "t2i_vs_flat", "t2i_recall_vs_flat", "t2i_R@100", "i2t_build_s",
           "i2t_p50_ms", "i2t_p99_ms", "i2t_search_ms", "i2t_recall_vs_flat", "i2t_R@100", "peak_rss_mb",
           "rss_anon_mb", "rss_file_mb"]


def run(args) -> list:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    structures = STRUCTURES if args.structure == "both" else (args.structure,)
    if args.child:
        g = make_gallery(out, args.images, args.seed, structures[0])
        rows = measure(g, args.index_types, args, out / structures[0])
        Path(args.child).write_text(json.dumps(rows))
        return rows
    rows = []
    for structure in structures:
        g = make_gallery(out, args.images, args.seed, structure)
        size = sum(f.stat().st_size for f in (out / structure / "image_global.npy", out / structure / "caption_global.npy",
                                               out / "regions.npy", out / "words.npy"))
        print(f"{structure} gallery of {args.images:,} images: {g['seconds']:.1f} s to write (0 = reused), "
              f"{size / 2**30:.2f} GiB", flush=True)
        del g
        mine = []
        for index_type in ["flat"] + [t for t in args.index_types.split(";") if t and t != "flat"]:
            if args.in_process:
                got = measure(make_gallery(out, args.images, args.seed, structure), index_type, args, out / structure)
            else:
                got = _child(args, structure, index_type)
            for r in got:
                r["structure"] = structure
                print(json.dumps(r), flush=True)
            mine += got
        for r in mine:                                       # ratio to flat of the same run
            r["t2i_vs_flat"] = r["t2i_p50_ms"] / mine[0]["t2i_p50_ms"]
        rows += mine
    print(markdown_table(COLUMNS, [[r.get(c, "-") for c in COLUMNS] for r in rows]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--out", default=None, help="folder of the generated gallery (default: a temporary one)")
    parser.add_argument("--structure", choices=STRUCTURES + ("both",), default="both")
    parser.add_argument("--index_types", default="hnsw;IVF4096,PQ32x4fs,RFlat",
                        help="';'-separated index types after the flat baseline")
    parser.add_argument("--ef_search", default="", help="comma-separated HNSW efSearch values (default: the library's)")
    parser.add_argument("--nprobe", default="", help="comma-separated IVF nprobe values (default: the library's)")
    parser.add_argument("--k_factor", default="", help="comma-separated refine k_factor values (default: the library's)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads of the queries")
    parser.add_argument("--build_threads", type=int, default=1, help="FAISS threads of the index builds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--in_process", action="store_true", help="measure every index type in this process")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="2,000 images, 20 queries, small IVF, in process: seconds")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.queries, args.index_types, args.in_process = 2000, 20, "hnsw;IVF16,PQ32x4fs,RFlat", True
    tmp = None
    if args.out is None:
        tmp = args.out = tempfile.mkdtemp(prefix="bench-million-")
    try:
        return run(args)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
