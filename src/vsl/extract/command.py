"""Options and output of ``vsl extract`` (the CLI registers :func:`add_arguments` and :func:`run`).

:func:`run` joins the torchrun process group when launched by torchrun, makes one library call
(:func:`vsl.extract.extract_images`) and prints what it wrote; errors are
:class:`vsl.errors.VSLError` lines, reported by :func:`vsl.cli.main` with exit status 2.
"""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Extract bottom-up-attention region features (the BUTD Faster R-CNN of SCAN's features) from a
folder of photos, or a file listing one image path per line, into the SCAN layout that every other
command reads with --data_path DATA --data_name NAME_precomp:

  vsl extract --images photos/ --weights frcnn-vg-finetuned.pth --out DATA --data_name photos_precomp \\
              --split test [--captions captions.txt]

Writes DATA/NAME_precomp/{split}_ims.npy (N x 36 x 2048 float32), _boxes.npy (N x 36 x 4, original
pixels), _counts.npy, _sizes.npy (N x 2: height, width), _images.txt (the source of every row),
_failed.txt (every skipped file and why), _caps.txt (with --captions: 5 lines per listed image, in
the listing's order: a folder's files sorted by relative path, recursively) and _thumbs/ for
vsl serve. Unreadable files are skipped and listed; the exit status is 0 when at least one image
was extracted, 2 when none could be read or for a wrong weights file or output folder. Run the
same command again after an interruption to resume; under torchrun each process takes its share.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .pipeline import BLOCK_IMAGES, DTYPES

    parser.add_argument("--images", required=True, metavar="DIR|LIST",
                        help="folder of images (recursive, sorted) or a text file of image paths "
                             "(required) (default: none)")
    parser.add_argument("--weights", required=True, metavar="PATH",
                        help="the detector's weights: the PyTorch conversion of the BUTD Visual Genome model "
                             "(unc-nlp/frcnn-vg-finetuned), a local file; with --fetch also that Hub name "
                             "(required) (default: none)")
    parser.add_argument("--fetch", action="store_true",
                        help="when --weights is not a file, download it by its Hub name through huggingface_hub "
                             "(pip install huggingface_hub; needs a network); nothing is downloaded without it")
    parser.add_argument("--out", required=True, metavar="DATA",
                        help="data folder: writes DATA/{data_name}/ (required) (default: none)")
    parser.add_argument("--data_name", required=True,
                        help="dataset folder name, e.g. photos_precomp (required) (default: none)")
    parser.add_argument("--split", default="test", help="split name of the files ({split}_ims.npy, ...)")
    parser.add_argument("--captions", metavar="FILE", default=None,
                        help="captions, 5 (or 1) lines per listed image in the listing's order (default: none)")
    parser.add_argument("--batch", type=int, default=4, help="images per detector batch")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu; or cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="the detector's arithmetic (the files are float32 either way)")
    parser.add_argument("--boxes", default="36",
                        help="regions per image: 36 (SCAN's fixed layout) or MIN:MAX, e.g. 10:100 (adaptive, "
                             "rows zero-padded to MAX, counts in {split}_counts.npy)")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes (0 = in the main process)")
    parser.add_argument("--block", type=int, default=BLOCK_IMAGES,
                        help="images per block: an interrupted run resumes at its first unfinished block")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no line per skipped file")


def run(args: argparse.Namespace) -> int:
    from ..distributed import cleanup, setup_distributed
    from .pipeline import extract_images

    weights = args.weights
    if args.fetch:
        from ..vision.weights import fetch_weights

        weights = fetch_weights(args.weights)
    info = setup_distributed(args.device, timeout_s=24 * 3600.0)   # ranks wait for each other at the end
    try:
        result = extract_images(args.images, weights, args.out, args.data_name, args.split,
                                captions=args.captions, batch_size=args.batch, device=args.device,
                                dtype=args.dtype, boxes=args.boxes, workers=args.workers, block_images=args.block,
                                progress=not args.quiet, distributed=info)
    finally:
        cleanup()
    if not info.is_main:
        return 0
    where = result.folder / f"{result.split}_ims.npy"
    if result.already_complete:
        print(f"{where}: already extracted with these options ({result.num_images} images); nothing to do")
        return 0
    skipped = (f"; {len(result.failed)} skipped, listed in {result.folder / (result.split + '_failed.txt')}"
               if result.failed else "")
    rate = result.num_images / result.seconds if result.seconds > 0 else 0.0
    print(f"wrote {result.num_images} images to {where} in {result.seconds:.1f} s ({rate:.2f} images/s){skipped}")
    return 0
