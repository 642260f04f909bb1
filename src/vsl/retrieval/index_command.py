"""``vsl index``: options and output of :func:`vsl.retrieval.build_index` (one library call)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import INDEX_DTYPES
from .faiss_index import FACTORY
from .store import BLOCK_IMAGES

#: Where ``vsl index --images`` keeps the extracted features: ``OUT/photos/photos_precomp/``.
PHOTOS_DATA, PHOTOS_NAME = "photos", "photos_precomp"

DESCRIPTION = """\
Encode a split (or a folder of .npy region features: a pure image gallery) once into an index folder:
region embeddings (memory-mapped), shortlist vectors, FAISS indexes and a manifest (written last):

  vsl index --checkpoint SGR_sl.pth.tar --data_path DATA --split test --out index/
  vsl index --checkpoint SGR_sl.pth.tar --features FEATURES/ --out gallery/ --index_type hnsw
  vsl index --checkpoint SGR_sl.pth.tar --images PHOTOS/ --weights frcnn-vg-finetuned.bin --out photos/

--images extracts the photos' region features first (as vsl extract does, into OUT/photos/, resumable)
and indexes them as an image gallery whose page shows the photos and explains its matches.

The checkpoint needs a shortlist head (vsl fit-shortlist). An interrupted build resumes when the same
command runs again; under torchrun each process encodes its own blocks.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help="checkpoint with a shortlist head (required to build)")
    parser.add_argument("--out", required=True, default=argparse.SUPPRESS, help="index folder (required)")
    parser.add_argument("--data_path", default=None, help="data folder (default: the checkpoint's)")
    parser.add_argument("--split", default="test", help="split to index")
    parser.add_argument("--features", default=None,
                        help="a folder of N x regions x dim .npy files (or one file) to index instead of a "
                             "split: a pure image gallery without captions (default: none)")
    parser.add_argument("--images", default=None,
                        help="a folder (or list file) of photos to extract with --weights and index as an image "
                             "gallery (default: none)")
    parser.add_argument("--weights", default=None,
                        help="with --images: the BUTD detector's weights (the port's state dict; see vsl extract)")
    parser.add_argument("--vocab_path", default=None, help="vocabulary folder (default: the checkpoint's)")
    parser.add_argument("--data_name", default=None, help="dataset name (default: the checkpoint's)")
    parser.add_argument("--dtype", choices=INDEX_DTYPES, default="float16", help="storage of the embeddings")
    parser.add_argument("--index_type", default="flat",
                        help="FAISS index of the shortlist vectors: " + ", ".join(f"{k} ({v})" for k, v in FACTORY.items())
                             + " -- flat is exact, the others approximate, for large galleries -- or any FAISS "
                             "factory string, e.g. IVF1024,PQ16")
    parser.add_argument("--batch_size", type=int, default=128, help="images/captions per encoding batch")
    parser.add_argument("--block_images", type=int, default=BLOCK_IMAGES,
                        help="images per resumable block (and per torchrun share unit)")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    parser.add_argument("--add", action="store_true",
                        help="append the gallery (--data_path/--split, --features or --images) to the existing --out "
                             "index in a new generation, encoding only the new images; ids continue after the last "
                             "(run again: resumes an interrupted add, or does nothing once it finished)")
    parser.add_argument("--compact", action="store_true",
                        help="rewrite the --out index without the rows of its removed images, keeping ids")
    parser.add_argument("--remove", metavar="IDS_FILE", default=None,
                        help="hide the image ids of IDS_FILE (one a line) from an existing --out index in a new "
                             "generation, at once, re-encoding nothing (default: none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: off)")


def run(args: argparse.Namespace) -> int:
    from ..distributed import cleanup, launched_by_torchrun, setup_distributed
    from .build import build_index
    from .store import read_manifest

    from ..errors import ConfigError

    modes = [flag for flag, on in (("--add", args.add), ("--remove", args.remove is not None),
                                   ("--compact", args.compact)) if on]
    if len(modes) > 1:
        raise ConfigError(f"give one of {' / '.join(modes)} at a time")
    if args.remove is not None:
        from .grow import read_ids, remove_images

        ids = read_ids(args.remove)
        new = remove_images(args.out, ids)
        m = read_manifest(Path(args.out))
        print(f"index {args.out}: generation {new}, {len(set(ids.tolist())):,} images removed "
              f"({m['num_images'] - m['num_removed']:,} of {m['num_images']:,} searchable)")
        return 0
    if args.compact:
        from .append import compact_index

        new = compact_index(args.out, progress=not args.quiet)
        m = read_manifest(Path(args.out))
        print(f"index {args.out}: nothing to compact (no removed image holds space), generation "
              f"{m.get('generation', 0)}" if new is None else
              f"index {args.out}: generation {new}, compacted to {m['num_images'] - m['num_removed']:,} images, "
              f"{m['bytes_per_image']:,.0f} bytes per image")
        return 0
    if args.checkpoint is None:
        raise ConfigError("--checkpoint is required to build or add to an index (--remove and --compact go "
                          "without it)")
    if (args.images is None) != (args.weights is None):
        raise ConfigError("--images and --weights go together (photos to extract, and the detector's weights)")
    if args.images is not None and args.features is not None:
        raise ConfigError("give --images (photos) or --features (region features), not both")
    if args.add:
        read_manifest(Path(args.out))            # an index to add to, before any extraction
    info = setup_distributed(args.device) if launched_by_torchrun() else None
    try:
        features = args.features
        if args.images is not None:
            from ..extract import extract_images, final_paths

            photos = Path(args.out) / PHOTOS_DATA
            split = args.split if not args.add else photos_split(args.images)
            extract_images(args.images, args.weights, photos, PHOTOS_NAME, split, device=args.device,
                           progress=not args.quiet, distributed=info)
            features = final_paths(photos / PHOTOS_NAME, split)["ims"]
        if args.add:
            return _add(args, features, info)
        out = build_index(args.checkpoint, args.data_path, args.split, args.out, data_name=args.data_name,
                          vocab_path=args.vocab_path, features=features, dtype=args.dtype,
                          index_type=args.index_type, batch_size=args.batch_size, device=args.device,
                          progress=not args.quiet, distributed=info, block_images=args.block_images)
    finally:
        if info is not None:
            cleanup()
    if info is None or info.is_main:
        m = read_manifest(Path(out))
        print(f"index {out}: {m['num_images']:,} images, {m['num_captions']:,} captions, {m['index_type']} "
              f"{m['dtype']}, {m['bytes_per_image']:,.0f} bytes per image")
    return 0


def photos_split(images) -> str:
    """The split of ``OUT/photos/`` that ``--add --images PHOTOS`` extracts into: named after the
    photos' folder, so the same add run again resumes or reuses its extraction."""
    import hashlib

    return "add-" + hashlib.sha256(str(Path(images).resolve()).encode()).hexdigest()[:12]


def _add(args: argparse.Namespace, features, info) -> int:
    from ..errors import ConfigError
    from .append import add_to_index

    if info is not None and info.world_size > 1:
        raise ConfigError("vsl index --add runs in one process (start it without torchrun)")
    result = add_to_index(args.out, args.checkpoint, args.data_path, args.split, features=features,
                          batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                          block_images=args.block_images)
    last = result.first_image + result.images - 1
    if result.already:
        print(f"index {args.out}: already added in generation {result.generation} (image ids "
              f"{result.first_image:,}..{last:,}); nothing to do")
    else:
        print(f"index {args.out}: generation {result.generation}, {result.images:,} images added (ids "
              f"{result.first_image:,}..{last:,}), {result.captions:,} captions")
    return 0
