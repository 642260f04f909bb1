"""A procedural, deterministic demo dataset in the SCAN precomputed-feature layout.

Each image is a small scene: a *main subject* and a *main partner* object joined by a spatial
relation ("a red dog sitting on a green bench"), one to three *secondary* objects, and a
background. Every object has a class and a colour.

* Region features (``num_regions`` x ``img_dim``, like bottom-up-attention features): each region
  shows one entity, built from that entity's prototype (class + colour, the relation, or the
  background) plus noise and a per-image style offset. The main objects own most regions, the
  secondary objects only a few.
* Five captions per image from a small grammar with synonyms: the subject is named by every
  caption and the partner by most, while each secondary object is named by few captions. This is
  the situation the Visual Semantic Loss is designed for: the TF-IDF semantics of an image's
  captions are dominated by its main objects.

Retrieval is learnable (captions are faithful to the regions) but not trivial: many images share
their main objects, captions often omit colours, and a region mixes class, colour and noise.

Layout written under ``out_dir`` (exactly what the SCAN/SGRAF data loaders read)::

    data/demo_precomp/{train,dev,test}_ims.npy    float32, N x num_regions x img_dim
    data/demo_precomp/{train,dev,test}_caps.txt   5N lines; lines 5i..5i+4 describe image i
    data/demo_precomp/{train,dev,test}_boxes.npy  float32, N x num_regions x 4: each region's box (x1 y1 x2 y2)
                                                  on the scene's picture, that of the object it shows
                                                  (:func:`scene_boxes`; also without thumbnails)
    data/demo_precomp/{train,dev,test}_sizes.npy  int64, N x 2: the picture's height, width (as vsl extract)
    data/demo_precomp/{train,dev,test}_thumbs/    {i}.png: a schematic picture of image i's scene
                                                  (:mod:`.thumbnails`; for ``vsl serve``'s page)
    vocab/demo_precomp_vocab.json                 word2idx / idx2word / idx (published format)
    demo_manifest.json                            spec + version, written last (cache key)

Everything is a function of :class:`DemoSpec`: the same spec gives byte-identical files.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..fileio import atomic_write, atomic_write_text, temporary_sibling
from .precomp import SPLITS
from .vocab import SPECIAL_TOKENS, Vocabulary
from .thumbnails import LAYOUT_PARTS, SIZE, SceneObject, draw_scene, layout_table, write_pictures

DATA_NAME = "demo_precomp"
DEMO_SPLITS = SPLITS[:3]      # train, dev, test; an index here seeds its split's streams
CAPTIONS_PER_IMAGE = 5
MANIFEST = "demo_manifest.json"
#: Bump when the generator changes so that cached datasets are regenerated.
VERSION = 3                  # 2: thumbnails; 3: region boxes
#: Images per feature chunk. Each chunk has its own random stream, so features do not depend on
#: how they are written (whole split in memory or streamed with a progress bar).
CHUNK = 512
#: Test images of the demo dataset of ``vsl demo`` / ``vsl serve`` (5 captions each): enough for
#: stable recalls, quick to score.
DEMO_TEST_IMAGES = 500

# --- the grammar's world ----------------------------------------------------------------------
# Object classes and the nouns captions use for them. Nouns are unique across classes, so a
# caption's mention of a class can be read back from its words.
CLASSES: Tuple[Tuple[str, ...], ...] = (
    ("dog", "puppy"), ("cat", "kitten"), ("horse",), ("cow",), ("sheep",), ("bird",),
    ("elephant",), ("man", "guy"), ("woman", "lady"), ("child", "kid"), ("car",), ("bus",),
    ("truck",), ("bicycle", "bike"), ("motorcycle", "motorbike"), ("boat",), ("bench",),
    ("table",), ("chair",), ("couch", "sofa"), ("umbrella",), ("kite",), ("ball",),
    ("suitcase", "bag"),
)
COLORS: Tuple[str, ...] = ("red", "blue", "green", "yellow", "white", "black", "brown", "orange",
                           "pink", "gray", "purple")
# Spatial relations between subject and partner, each with the phrases captions use for it.
RELATIONS: Tuple[Tuple[str, ...], ...] = (
    ("on", "sitting on", "on top of"),
    ("next to", "beside", "near"),
    ("under", "below", "underneath"),
    ("behind", "in back of"),
    ("in front of",),
)
SCENES: Tuple[Tuple[str, ...], ...] = (
    ("in a park", "in the park"), ("on a street", "on the street"), ("in a kitchen",),
    ("on a beach", "on the beach"), ("in a field", "in a grassy field"),
    ("in a room", "in a living room"), ("in a yard", "in the yard"),
)
OPENERS: Tuple[str, ...] = ("", "there is", "a photo of", "a picture of", "an image of", "this is")
OPENER_P = (0.5, 0.1, 0.1, 0.1, 0.1, 0.1)

# Per-caption probabilities of naming each part of the scene (independently per caption).
P_PARTNER = 0.8            # the subject is always named
P_SECONDARY = 0.2
P_SCENE = 0.4
P_SUBJECT_COLOR = 0.5
P_OTHER_COLOR = 0.5
P_THE = 0.25               # "the" instead of "a/an" for partner and secondary objects
P_PERIOD = 0.6

MAX_SECONDARY = 3
# Visual strength of colour relative to class (both prototypes are Gaussian; class has unit std).
COLOR_SCALE = 0.6
# Entity slots of a scene, in this order; region_owner and caption mentions use these indices.
SUBJECT, PARTNER, RELATION, SECONDARY0, BACKGROUND = 0, 1, 2, 3, 3 + MAX_SECONDARY
NUM_ENTITIES = BACKGROUND + 1
#: The part of a scene's picture that each slot's regions show (:data:`.thumbnails.LAYOUT_PARTS`).
SLOT_PARTS = ("subject", "partner", "union", *(f"secondary{j}" for j in range(MAX_SECONDARY)), "picture")

# Families of look-alike classes and colours (indices into CLASSES / COLORS): at difficulty
# "hard" the prototypes of a family share a common component, so a noisy region of a dog looks
# more like a cat than like a bus, and red more like orange than like blue.
CLASS_FAMILIES: Tuple[Tuple[int, ...], ...] = (
    (0, 1, 2, 3, 4, 5, 6),          # animals
    (7, 8, 9),                      # people
    (10, 11, 12, 13, 14, 15),       # vehicles
    (16, 17, 18, 19),               # furniture
    (20, 21, 22, 23),               # carried things
)
COLOR_FAMILIES: Tuple[Tuple[int, ...], ...] = (
    (0, 3, 7, 8),                   # red, yellow, orange, pink
    (1, 2, 10),                     # blue, green, purple
    (4, 5, 6, 9),                   # white, black, brown, gray
)


@dataclass(frozen=True)
class Difficulty:
    """The knobs of a difficulty level (``default`` = the constants above, unchanged).

    class_similarity / color_similarity: share of a prototype's variance common to its family
    (0 = independent prototypes); color_scale: visual strength of colour relative to class;
    p_secondary: per-caption probability of naming each secondary object; feature_noise and
    train_images: the :class:`DemoSpec` defaults of the level.
    """

    class_similarity: float = 0.0
    color_similarity: float = 0.0
    color_scale: float = COLOR_SCALE
    p_secondary: float = P_SECONDARY
    feature_noise: float = 2.0
    train_images: int = 3000


#: Named levels. "hard" is not tuned towards either arm of an ablation: every knob makes the
#: task harder for any retrieval model (confusable prototypes, more noise, less data, captions
#: that name more of the secondary content).
DIFFICULTIES: Dict[str, Difficulty] = {
    "default": Difficulty(),
    "hard": Difficulty(class_similarity=0.4, color_similarity=0.4, color_scale=0.45, p_secondary=0.45,
                       feature_noise=2.5, train_images=1500),
}


def vocabulary_words() -> List[str]:
    """Every word the grammar can emit (sorted), without the special tokens."""
    phrases = [w for c in CLASSES for w in c] + list(COLORS) + [p for r in RELATIONS for p in r]
    phrases += [p for s in SCENES for p in s] + list(OPENERS) + ["a", "an", "the", "with", "and", "."]
    return sorted({w for p in phrases for w in p.split()})


WORDS = vocabulary_words()
WORD_ID = {w: i for i, w in enumerate(WORDS)}   # grammar-internal ids; -1 = no word


# --- the specification --------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoSpec:
    """Everything the generated files depend on (the manifest stores it as the cache key)."""

    seed: int = 0
    train_images: int = 3000
    dev_images: int = 300
    test_images: int = 1000
    img_dim: int = 128
    num_regions: int = 36
    feature_noise: float = 2.0      # std of per-region noise (class prototypes have unit std)
    difficulty: str = "default"     # a key of DIFFICULTIES: prototype similarity, caption mentions

    def __post_init__(self) -> None:
        if self.difficulty not in DIFFICULTIES:
            raise ConfigError(f"demo data: difficulty must be one of {', '.join(DIFFICULTIES)}, "
                              f"got {self.difficulty!r}")
        for name in ("train_images", "dev_images", "test_images"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"demo data: {name} must be positive, got {getattr(self, name)}")
        if self.img_dim < 8:
            raise ConfigError(f"demo data: img_dim must be at least 8, got {self.img_dim}")
        if self.num_regions < 16:
            raise ConfigError(f"demo data: num_regions must be at least 16, got {self.num_regions}")
        if not self.feature_noise >= 0:
            raise ConfigError(f"demo data: feature_noise must be >= 0, got {self.feature_noise}")
        if not 0 <= self.seed < 2 ** 63:
            raise ConfigError(f"demo data: seed must be a non-negative integer, got {self.seed}")

    @classmethod
    def at(cls, difficulty: str = "default", **values) -> "DemoSpec":
        """The spec of a difficulty level, with that level's noise and training images unless given."""
        if difficulty not in DIFFICULTIES:
            raise ConfigError(f"demo data: difficulty must be one of {', '.join(DIFFICULTIES)}, "
                              f"got {difficulty!r}")
        level = DIFFICULTIES[difficulty]
        defaults = dict(feature_noise=level.feature_noise, train_images=level.train_images)
        given = {k: v for k, v in values.items() if v is not None}
        return cls(difficulty=difficulty, **{**defaults, **given})

    @property
    def level(self) -> Difficulty:
        return DIFFICULTIES[self.difficulty]

    def images(self, split: str) -> int:
        return int(getattr(self, f"{split}_images"))

    def to_dict(self) -> Dict[str, Union[int, float]]:
        return dataclasses.asdict(self)


def _rng(spec: DemoSpec, *key: int) -> np.random.Generator:
    """An independent stream per (purpose, split, chunk): stable under any change of write order."""
    return np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=key))


# --- scenes -------------------------------------------------------------------------------------
@dataclass
class Scenes:
    """The ground truth of N images (``-1`` marks an absent secondary object).

    classes:  (N, 2 + MAX_SECONDARY) int — subject, partner, secondary classes (all distinct)
    colors:   (N, 2 + MAX_SECONDARY) int — colour of each object
    relation: (N,) int; scene: (N,) int
    region_owner: (N, num_regions) int — entity slot shown by each region (SUBJECT ... BACKGROUND)
    """

    classes: np.ndarray
    colors: np.ndarray
    relation: np.ndarray
    scene: np.ndarray
    region_owner: np.ndarray

    @property
    def present(self) -> np.ndarray:
        """(N, 2 + MAX_SECONDARY) bool: which object slots exist."""
        return self.classes >= 0


def sample_scenes(spec: DemoSpec, split: str) -> Scenes:
    """The objects, colours, relation, background and region layout of every image of ``split``."""
    rng = _rng(spec, 0, DEMO_SPLITS.index(split))
    n, objects = spec.images(split), 2 + MAX_SECONDARY
    # Distinct classes per image: the first columns of a random permutation of all classes.
    classes = np.argsort(rng.random((n, len(CLASSES))), axis=1)[:, :objects]
    num_secondary = rng.integers(1, MAX_SECONDARY + 1, size=n)
    secondary = classes[:, 2:]                                  # a view: edits classes
    secondary[np.arange(MAX_SECONDARY)[None, :] >= num_secondary[:, None]] = -1
    colors = rng.integers(0, len(COLORS), size=(n, objects))
    colors[classes < 0] = -1
    relation = rng.integers(0, len(RELATIONS), size=n)
    scene = rng.integers(0, len(SCENES), size=n)

    # Region budget as fractions of num_regions: main objects dominate, secondary objects are small,
    # the background takes what is left.
    r = spec.num_regions
    frac = np.concatenate([
        rng.uniform(0.28, 0.39, size=(n, 1)),                 # subject
        rng.uniform(0.17, 0.25, size=(n, 1)),                 # partner
        np.full((n, 1), 2 / 36),                              # relation ("union box") regions
        rng.uniform(0.055, 0.085, size=(n, MAX_SECONDARY)),   # secondary objects
    ], axis=1)
    counts = np.maximum(1, np.rint(frac * r)).astype(np.int64)
    counts[:, SECONDARY0:][secondary < 0] = 0
    counts = np.concatenate([counts, r - counts.sum(1, keepdims=True)], axis=1)  # background
    assert (counts[:, BACKGROUND] >= 1).all()
    # Region k belongs to the entity whose cumulative budget first exceeds k; then shuffle the
    # regions of each image (detector outputs are not grouped by object).
    ends = np.cumsum(counts, axis=1)
    owner = (np.arange(r)[None, :, None] >= ends[:, None, :]).sum(-1)
    order = np.argsort(rng.random((n, r)), axis=1)
    owner = np.take_along_axis(owner, order, axis=1)
    return Scenes(classes=classes, colors=colors, relation=relation, scene=scene, region_owner=owner)


# --- region features ----------------------------------------------------------------------------
@dataclass
class Prototypes:
    """Visual prototypes shared by all splits: (num_items, img_dim) float64 each."""

    classes: np.ndarray
    colors: np.ndarray
    relations: np.ndarray
    scenes: np.ndarray


def sample_prototypes(spec: DemoSpec) -> Prototypes:
    rng = _rng(spec, 1)
    d, level = spec.img_dim, spec.level
    protos = Prototypes(classes=rng.standard_normal((len(CLASSES), d)),
                        colors=level.color_scale * rng.standard_normal((len(COLORS), d)),
                        relations=0.8 * rng.standard_normal((len(RELATIONS), d)),
                        scenes=rng.standard_normal((len(SCENES), d)))
    # Family components come from their own stream, so the default level's draws are unchanged.
    family_rng = _rng(spec, 4)
    protos.classes = _share_family(protos.classes, CLASS_FAMILIES, level.class_similarity, family_rng)
    protos.colors = _share_family(protos.colors, COLOR_FAMILIES, level.color_similarity, family_rng)
    return protos


def _share_family(own: np.ndarray, families: Sequence[Sequence[int]], similarity: float,
                  rng: np.random.Generator) -> np.ndarray:
    """``sqrt(1 - s) * own + sqrt(s) * family`` for each row (same variance): (items, d)."""
    if similarity == 0:
        return own
    scale = own.std()
    member = np.empty(len(own), np.int64)
    for f, items in enumerate(families):
        member[list(items)] = f
    family = scale * rng.standard_normal((len(families), own.shape[1]))
    return np.sqrt(1 - similarity) * own + np.sqrt(similarity) * family[member]


def render_regions(spec: DemoSpec, split: str, scenes: Scenes, protos: Prototypes,
                   chunk: int) -> np.ndarray:
    """Region features of images ``chunk*CHUNK ...``: (n, num_regions, img_dim) float32.

    A region of an object shows ``visibility * (class + colour)``; a relation region shows the
    mean of both main classes plus the relation; background regions show the scene. Every region
    gets Gaussian noise and each image a shared style offset, and features are rectified
    (non-negative, like pooled CNN activations).
    """
    sl = slice(chunk * CHUNK, min((chunk + 1) * CHUNK, spec.images(split)))
    rng = _rng(spec, 2, DEMO_SPLITS.index(split), chunk)
    classes, colors = scenes.classes[sl], scenes.colors[sl]
    n, r, d = classes.shape[0], spec.num_regions, spec.img_dim

    # Prototype of every entity slot: (n, NUM_ENTITIES, d). Absent objects own no region, so
    # their (arbitrary) class/colour index never shows up.
    objects = protos.classes[classes] + protos.colors[colors]            # (n, 2 + S, d)
    relation = (0.5 * (protos.classes[classes[:, SUBJECT]] + protos.classes[classes[:, PARTNER]])
                + protos.relations[scenes.relation[sl]])
    entity = np.concatenate([objects[:, :2], relation[:, None], objects[:, 2:],
                             protos.scenes[scenes.scene[sl]][:, None]], axis=1)

    owner = scenes.region_owner[sl]                                       # (n, r)
    content = np.take_along_axis(entity, owner[:, :, None], axis=1)      # (n, r, d)
    visibility = rng.uniform(0.5, 1.0, size=(n, r, 1))
    style = 0.3 * rng.standard_normal((n, 1, d))
    noise = spec.feature_noise * rng.standard_normal((n, r, d))
    return np.maximum(visibility * content + style + noise, 0.0).astype(np.float32)


# --- captions -----------------------------------------------------------------------------------
def _phrase_table(variants: Sequence[Sequence[str]]) -> np.ndarray:
    """Word ids of phrase variants: (items, max_variants, max_words), -1 padded."""
    width = max(len(p.split()) for v in variants for p in v)
    table = np.full((len(variants), max(len(v) for v in variants), max(width, 1)), -1, np.int64)
    for i, v in enumerate(variants):
        for j, phrase in enumerate(v):
            ids = [WORD_ID[w] for w in phrase.split()]
            table[i, j, :len(ids)] = ids
    return table


def _pick(rng: np.random.Generator, variants: Sequence[Sequence[str]], item: np.ndarray) -> np.ndarray:
    """Word ids of a uniformly chosen phrase variant of each item: (*item.shape, max_words)."""
    table = _phrase_table(variants)
    num = np.array([len(v) for v in variants])[np.maximum(item, 0)]
    choice = np.floor(rng.random(item.shape) * num).astype(np.int64)
    return table[np.maximum(item, 0), choice]


def _mask(ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Blank (-1) the words of captions whose ``keep`` is False: ids (M, W), keep (M,)."""
    return np.where(keep[:, None], ids, -1)


_VOWEL_START = np.array([w[0] in "aeiou" for w in WORDS] + [False])   # index -1 -> no word


def _noun_phrase(rng: np.random.Generator, cls: np.ndarray, color: np.ndarray,
                 p_color: float, p_the: float) -> np.ndarray:
    """``det [colour] noun`` for each caption: (M, 3) word ids; "an" before a vowel."""
    noun = _pick(rng, CLASSES, cls)[..., 0]
    col = np.where(rng.random(cls.shape) < p_color, np.array([WORD_ID[c] for c in COLORS])[color], -1)
    first = np.where(col >= 0, col, noun)
    det = np.where(_VOWEL_START[first], WORD_ID["an"], WORD_ID["a"])
    det = np.where(rng.random(cls.shape) < p_the, WORD_ID["the"], det)
    return np.stack([det, col, noun], axis=-1)


@dataclass
class Captions:
    """captions: 5N strings; mentions: (5N, NUM_ENTITIES) bool — entities each caption names."""

    captions: List[str]
    mentions: np.ndarray


def write_captions(spec: DemoSpec, split: str, scenes: Scenes) -> Captions:
    """Five captions per image from the grammar, built slot by slot over all captions at once."""
    rng = _rng(spec, 3, DEMO_SPLITS.index(split))
    rep = lambda a: np.repeat(a, CAPTIONS_PER_IMAGE, axis=0)     # image rows -> caption rows
    classes, colors = rep(scenes.classes), rep(scenes.colors)
    m = classes.shape[0]

    mentions = np.zeros((m, NUM_ENTITIES), bool)
    mentions[:, SUBJECT] = True
    mentions[:, PARTNER] = rng.random(m) < P_PARTNER
    mentions[:, RELATION] = mentions[:, PARTNER]
    mentions[:, SECONDARY0:BACKGROUND] = (rng.random((m, MAX_SECONDARY)) < spec.level.p_secondary) & (classes[:, 2:] >= 0)
    mentions[:, BACKGROUND] = rng.random(m) < P_SCENE

    opener = rng.choice(len(OPENERS), size=m, p=OPENER_P)
    blocks = [_pick(rng, [[o] for o in OPENERS], opener),
              _noun_phrase(rng, classes[:, SUBJECT], colors[:, SUBJECT], P_SUBJECT_COLOR, 0.0),
              _mask(_pick(rng, RELATIONS, rep(scenes.relation)), mentions[:, RELATION]),
              _mask(_noun_phrase(rng, classes[:, PARTNER], colors[:, PARTNER], P_OTHER_COLOR, P_THE),
                    mentions[:, PARTNER])]
    # Secondary objects: "with X", further ones "and Y".
    sec = mentions[:, SECONDARY0:BACKGROUND]
    first = sec & (np.cumsum(sec, axis=1) == 1)
    for j in range(MAX_SECONDARY):
        conj = np.where(first[:, j], WORD_ID["with"], WORD_ID["and"])[:, None]
        phrase = _noun_phrase(rng, classes[:, 2 + j], colors[:, 2 + j], P_OTHER_COLOR, P_THE)
        blocks.append(_mask(np.concatenate([conj, phrase], axis=1), sec[:, j]))
    blocks.append(_mask(_pick(rng, SCENES, rep(scenes.scene)), mentions[:, BACKGROUND]))
    blocks.append(np.where(rng.random(m) < P_PERIOD, WORD_ID["."], -1)[:, None])
    ids = np.concatenate(blocks, axis=1)                        # (m, slots), -1 = empty slot

    # Join the words column by column (a loop over slots, not over captions).
    words = np.array([" " + w for w in WORDS] + [""])          # id -1 -> ""
    text = reduce(np.char.add, (words[ids[:, k]] for k in range(ids.shape[1])))
    return Captions(captions=[s[1:] for s in text.tolist()], mentions=mentions)


# --- one split in memory ------------------------------------------------------------------------
@dataclass
class DemoSplit:
    images: np.ndarray          # (N, num_regions, img_dim) float32
    captions: List[str]         # 5N
    scenes: Scenes
    mentions: np.ndarray        # (5N, NUM_ENTITIES) bool


def sample_split(spec: DemoSpec, split: str) -> DemoSplit:
    """One split, entirely in memory: exactly what :func:`make_demo_data` writes for it."""
    if split not in DEMO_SPLITS:
        raise ConfigError(f"demo data: split must be one of {DEMO_SPLITS}, got {split!r}")
    scenes = sample_scenes(spec, split)
    protos = sample_prototypes(spec)
    chunks = -(-spec.images(split) // CHUNK)
    images = np.concatenate([render_regions(spec, split, scenes, protos, c) for c in range(chunks)])
    caps = write_captions(spec, split, scenes)
    return DemoSplit(images=images, captions=caps.captions, scenes=scenes, mentions=caps.mentions)


def demo_vocabulary() -> Vocabulary:
    """The vocabulary of the grammar: ``<pad> <start> <end> <unk>`` then :data:`WORDS`."""
    return Vocabulary(WORDS)


# --- writing ------------------------------------------------------------------------------------
def _paths(out_dir: Path) -> Dict[str, Path]:
    data = out_dir / "data" / DATA_NAME
    files = {f"{s}_{kind}": data / f"{s}_{kind}.{ext}" for s in DEMO_SPLITS
             for kind, ext in (("ims", "npy"), ("caps", "txt"), ("boxes", "npy"), ("sizes", "npy"))}
    files["vocab"] = out_dir / "vocab" / f"{DATA_NAME}_vocab.json"
    return files


def split_thumbnails(data_path: Union[str, os.PathLike], data_name: str, split: str) -> Path:
    """Where a dataset in the SCAN layout keeps pictures of a split's images, ``{i}.png`` for image i
    (beside ``{split}_ims.npy``; the demo data writes them, ``vsl serve`` shows them)."""
    return Path(data_path) / data_name / f"{split}_thumbs"


def thumbnails_dir(out_dir: Union[str, os.PathLike], split: str) -> Path:
    """The folder of ``{i}.png`` thumbnails of ``split`` in a demo dataset written to ``out_dir``."""
    return split_thumbnails(Path(out_dir) / "data", DATA_NAME, split)


def draw_thumbnail(scenes: Scenes, i: int):
    """The schematic picture of image ``i`` of ``scenes`` (a PIL image, :func:`.thumbnails.draw_scene`)."""
    def obj(slot: int) -> SceneObject:
        return SceneObject(CLASSES[scenes.classes[i, slot]][0], COLORS[scenes.colors[i, slot]])

    return draw_scene(obj(SUBJECT), obj(PARTNER), RELATIONS[scenes.relation[i]][0],
                      SCENES[scenes.scene[i]][0].split()[-1],
                      [obj(2 + j) for j in range(MAX_SECONDARY) if scenes.classes[i, 2 + j] >= 0])


def write_thumbnails(folder: Path, scenes: Scenes, bar: Optional[tqdm] = None) -> int:
    """Write ``{i}.png`` for every image of ``scenes`` to ``folder`` (replaced as a whole); ``bar``
    advances once per :data:`CHUNK` images. Returns the number of pictures."""
    return write_pictures(folder, len(scenes.scene), lambda i: draw_thumbnail(scenes, i), CHUNK, bar)


def scene_boxes(scenes: Scenes, size: Tuple[int, int] = SIZE) -> np.ndarray:
    """The box of every region on its scene's picture: ``(N, num_regions, 4)`` float32 x1 y1 x2 y2.

    A region shows one entity (``region_owner``): an object's regions get its drawn box, the
    relation's the union of the two main objects' boxes, the background's the whole picture
    (:data:`SLOT_PARTS`); the layout depends on the relation only, so this is one table lookup.
    """
    table = layout_table([phrases[0] for phrases in RELATIONS], size)                   # (relations, parts, 4)
    table = table[:, [LAYOUT_PARTS.index(part) for part in SLOT_PARTS]]                # (relations, slots, 4)
    return table[scenes.relation[:, None], scenes.region_owner]


def _result(out_dir: Path, spec: DemoSpec) -> Dict[str, object]:
    return {"data_path": str(out_dir / "data"), "vocab_path": str(out_dir / "vocab"),
            "data_name": DATA_NAME, "vocab_size": len(SPECIAL_TOKENS) + len(WORDS),
            "img_dim": spec.img_dim, "num_regions": spec.num_regions}


def _manifest(spec: DemoSpec, out_dir: Path, thumbnails: Dict[str, int]) -> Dict[str, object]:
    return {"format": "vsl-demo-data", "version": VERSION, "spec": spec.to_dict(),
            "files": {k: [str(p.relative_to(out_dir)), p.stat().st_size]
                      for k, p in sorted(_paths(out_dir).items())},
            "thumbnails": {s: [str(thumbnails_dir(out_dir, s).relative_to(out_dir)), n]
                           for s, n in thumbnails.items()}}


def demo_data_ready(out_dir: Union[str, os.PathLike], spec: Optional[DemoSpec] = None,
                    thumbnails: bool = False) -> bool:
    """True when ``out_dir`` holds a complete dataset generated from ``spec`` by this version
    (with every split's thumbnails when ``thumbnails``)."""
    out_dir, spec = Path(out_dir), spec or DemoSpec()
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("version") != VERSION or manifest.get("spec") != spec.to_dict():
            return False
        if thumbnails and (set(manifest["thumbnails"]) != set(DEMO_SPLITS) or not all(
                len(os.listdir(out_dir / rel)) == n for rel, n in manifest["thumbnails"].values())):
            return False
        return all((out_dir / rel).is_file() and (out_dir / rel).stat().st_size == size
                   for rel, size in manifest["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def make_demo_data(out_dir: Union[str, os.PathLike], spec: Optional[DemoSpec] = None,
                   progress: bool = False, force: bool = False, thumbnails: bool = True) -> Dict[str, object]:
    """Write the demo dataset under ``out_dir`` (skipped when the same spec is already there).

    ``thumbnails``: also draw every image's schematic picture (a few ms each; off for very
    large generated galleries). Returns ``{"data_path", "vocab_path", "data_name", "vocab_size",
    "img_dim", "num_regions"}``: the first three are the data options of :class:`vsl.config.Config`.
    """
    out_dir, spec = Path(out_dir), spec or DemoSpec()
    if not force and demo_data_ready(out_dir, spec, thumbnails=thumbnails):
        return _result(out_dir, spec)
    paths = _paths(out_dir)
    try:
        for p in paths.values():
            p.parent.mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST).unlink(missing_ok=True)     # invalidate the cache before rewriting
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create the demo dataset folders ({e.strerror or e})") from e

    protos = sample_prototypes(spec)
    chunks = {s: -(-spec.images(s) // CHUNK) for s in DEMO_SPLITS}
    bar = tqdm(total=sum(chunks.values()) * (2 if thumbnails else 1), desc="demo data", unit="chunk",
               disable=not progress)
    drawn: Dict[str, int] = {}
    try:
        for split in DEMO_SPLITS:
            scenes = sample_scenes(spec, split)
            if thumbnails:
                drawn[split] = write_thumbnails(thumbnails_dir(out_dir, split), scenes, bar)
            boxes = scene_boxes(scenes)
            sizes = np.tile(np.array([[SIZE[1], SIZE[0]]], dtype=np.int64), (len(boxes), 1))   # height, width
            atomic_write(paths[f"{split}_boxes"], lambda fh: np.save(fh, boxes))
            atomic_write(paths[f"{split}_sizes"], lambda fh: np.save(fh, sizes))
            atomic_write_text(paths[f"{split}_caps"],
                               "\n".join(write_captions(spec, split, scenes).captions) + "\n")
            target = paths[f"{split}_ims"]
            tmp = temporary_sibling(target)           # the memmap is written in place, then renamed
            try:
                ims = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                shape=(spec.images(split), spec.num_regions, spec.img_dim))
                for c in range(chunks[split]):
                    ims[c * CHUNK:(c + 1) * CHUNK] = render_regions(spec, split, scenes, protos, c)
                    bar.update(1)
                ims.flush()
                del ims
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        demo_vocabulary().to_json(paths["vocab"])          # atomic, with ordinary file permissions
        atomic_write_text(out_dir / MANIFEST, json.dumps(_manifest(spec, out_dir, drawn), indent=1) + "\n")
    except OSError as e:
        raise DataError(f"{out_dir}: cannot write the demo dataset ({e.strerror or e})") from e
    finally:
        bar.close()
    return _result(out_dir, spec)
