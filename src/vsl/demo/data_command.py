"""``vsl make-demo-data OUT``: options and output of :func:`vsl.data.demo.make_demo_data`."""
from __future__ import annotations

import argparse

from ..data.demo import DIFFICULTIES, DemoSpec, demo_data_ready, make_demo_data

DESCRIPTION = "Write a small procedural dataset in the SCAN layout, with its vocabulary."

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vsl make-demo-data OUT``."""
    d = DemoSpec()
    parser.add_argument("out", help="output folder (gets data/, vocab/ and a manifest)")
    parser.add_argument("--difficulty", choices=sorted(DIFFICULTIES), default=d.difficulty,
                        help="hard: look-alike classes and colours, more noise, 1,500 training images, "
                             "secondary objects named more often")
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed of the generator")
    parser.add_argument("--images", type=int, default=None,
                        help=f"training images (default: the difficulty's, {d.train_images:,} by default)")
    parser.add_argument("--dev_images", type=int, default=d.dev_images, help="validation images")
    parser.add_argument("--test_images", type=int, default=d.test_images, help="test images")
    parser.add_argument("--img_dim", type=int, default=d.img_dim, help="region feature size")
    parser.add_argument("--num_regions", type=int, default=d.num_regions, help="regions per image")
    parser.add_argument("--feature_noise", type=float, default=None,
                        help=f"std of the noise of each region feature (default: the difficulty's, "
                             f"{d.feature_noise} by default)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the folder is up to date")
    parser.add_argument("--no_thumbnails", action="store_true",
                        help="skip the schematic PNG picture of every image (a few ms each)")


def run(args: argparse.Namespace) -> int:
    """Run ``vsl make-demo-data`` from parsed :func:`add_arguments` options; returns exit status."""
    spec = DemoSpec.at(args.difficulty, seed=args.seed, train_images=args.images, dev_images=args.dev_images,
                       test_images=args.test_images, img_dim=args.img_dim,
                       num_regions=args.num_regions, feature_noise=args.feature_noise)
    thumbnails = not args.no_thumbnails
    cached = not args.force and demo_data_ready(args.out, spec, thumbnails=thumbnails)
    info = make_demo_data(args.out, spec, progress=True, force=args.force, thumbnails=thumbnails)
    print(("up to date: " if cached else "wrote: ")
          + f"--data_path {info['data_path']} --vocab_path {info['vocab_path']} "
          f"--data_name {info['data_name']} --img_dim {info['img_dim']} --vocab_size {info['vocab_size']}")
    return 0
