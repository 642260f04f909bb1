#!/usr/bin/env python
"""Does the page's explanation of a demo match point at the right object? (issue 23)

For every test image of a demo dataset and each of its captions that names the scene's subject
(or partner) by its noun, the exact model's text-to-image attention (:func:`vsl.models.explain`,
what ``vsl serve`` draws) of that noun over the image's regions: how often its most attended
region is one of that object's regions (so its box, ``make-demo-data``'s ``{split}_boxes.npy``, is
the object's drawn box), and how often one of its two most attended is (the page draws two).
Chance is the share of the image's regions that show the object. The baseline measured in the
same run is an untrained model of the same sizes (its attention is not about the objects).

Usage::

    python benchmarks/bench_demo_explain.py --checkpoint RUN/checkpoints/model_best.pth.tar --data DEMO_DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def noun_attention_hits(model, vocab, spec, data_dir: Path, split: str = "test", batch: int = 256) -> List[Dict]:
    """One row per entity (subject, partner): pairs, top-1 hit rate, top-2 hit rate, chance."""
    from vsl.data import PrecompDataset
    from vsl.data import demo as dd
    from vsl.models.explain import explain_pairs
    from vsl.runtime import pad_token_ids

    scenes = dd.sample_scenes(spec, split)
    dataset = PrecompDataset(data_dir / "data", dd.DATA_NAME, split, vocab)
    ids, lengths = pad_token_ids([vocab.encode(c) for c in dataset.captions])          # (5N, L)
    word_class = np.full(len(vocab), -1, dtype=np.int64)                               # word id -> class
    for c, nouns in enumerate(dd.CLASSES):
        for noun in nouns:
            if noun in vocab:
                word_class[vocab(noun)] = c
    image_of = np.arange(len(dataset.captions)) // dd.CAPTIONS_PER_IMAGE
    token_class = word_class[ids.numpy()]                                              # (5N, L)
    rows = []
    for name, slot in (("subject", dd.SUBJECT), ("partner", dd.PARTNER)):
        match = token_class == scenes.classes[image_of, slot][:, None]                   # (5N, L)
        named = match.any(1)
        caps, position = np.flatnonzero(named), match.argmax(1)[named]
        top1 = np.zeros(len(caps), dtype=bool)
        top2 = np.zeros(len(caps), dtype=bool)
        for lo in range(0, len(caps), batch):
            c = caps[lo:lo + batch]
            images = torch.from_numpy(np.asarray(dataset.images[image_of[c]], dtype=np.float32))
            with torch.no_grad():
                att = explain_pairs(model, images, ids[c], lengths[c])                  # (P, L, R)
            noun = att[torch.arange(len(c)), torch.from_numpy(position[lo:lo + batch])]   # (P, R)
            best = torch.topk(noun, 2, dim=1).indices.numpy()                           # (P, 2)
            owner = np.take_along_axis(scenes.region_owner[image_of[c]], best, 1) == slot
            top1[lo:lo + batch], top2[lo:lo + batch] = owner[:, 0], owner.any(1)
        chance = (scenes.region_owner[image_of[caps]] == slot).mean()
        rows.append({"entity": name, "pairs": int(len(caps)), "top1": float(top1.mean()),
                     "top2": float(top2.mean()), "chance": float(chance)})
    return rows


def main(argv=None) -> List[Dict]:
    import json

    from common import markdown_table

    from vsl.data.demo import DemoSpec
    from vsl.models import build_model
    from vsl.runtime import load_for_use

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a model trained on the demo data (vsl demo's SGR+VSL run)")
    p.add_argument("--data", required=True, help="the demo dataset folder (with demo_manifest.json)")
    p.add_argument("--split", default="test")
    args = p.parse_args(argv)
    data = Path(args.data)
    spec = DemoSpec(**json.loads((data / "demo_manifest.json").read_text())["spec"])
    loaded = load_for_use(args.checkpoint, torch.device("cpu"), vocab_path=data / "vocab")
    torch.manual_seed(0)
    untrained = build_model(loaded.config).eval()
    results = []
    for label, model in (("trained", loaded.model), ("untrained (baseline)", untrained)):
        for row in noun_attention_hits(model, loaded.vocab, spec, data, args.split):
            results.append({"model": label, **row})
    print(markdown_table(["model", "noun of", "captions", "top-1 region is the object's", "one of top 2", "chance"],
                         [[r["model"], r["entity"], r["pairs"], f"{100 * r['top1']:.1f} %", f"{100 * r['top2']:.1f} %",
                           f"{100 * r['chance']:.1f} %"] for r in results]))
    return results


if __name__ == "__main__":
    main()
