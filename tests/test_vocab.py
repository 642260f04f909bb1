import json
import re

import pytest
from hypothesis import given, settings, strategies as st
from nltk.tokenize.punkt import PunktSentenceTokenizer

from vsl.data.vocab import SPECIAL_TOKENS, Vocabulary, sentence_tokenizer, sentences, tokenize, vocab_file
from vsl.errors import DataError, VSLError


# -- tokenization ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("A man riding a wave on top of a surfboard .",
     ["a", "man", "riding", "a", "wave", "on", "top", "of", "a", "surfboard", "."]),
    # Treebank conventions: clitics, n't, commas, final period detached, quotes -> `` ''
    ("The man's dog, can't catch it.", ["the", "man", "'s", "dog", ",", "ca", "n't", "catch", "it", "."]),
    ('A sign that reads "STOP".', ["a", "sign", "that", "reads", "``", "stop", "''", "."]),
    # a sentence-final period inside the caption is split off, as word_tokenize's Punkt step does
    ("A bird on a branch. The bird is yellow.", ["a", "bird", "on", "a", "branch", ".", "the", "bird", "is",
                                                 "yellow", "."]),
    ("Is it a cat? No!", ["is", "it", "a", "cat", "?", "no", "!"]),
    # abbreviations of the English Punkt model keep their period
    ("A statue of mr. lincoln", ["a", "statue", "of", "mr.", "lincoln"]),
    ("a statue of mr. lincoln . st. louis arch", ["a", "statue", "of", "mr.", "lincoln", ".", "st.", "louis",
                                                  "arch"]),
    ("  ", []),
    ("", []),
])
def test_tokenize_follows_treebank_conventions(text, expected):
    assert tokenize(text) == expected


# The captions of issue 12 on which a regular-expression imitation of Punkt differed from
# nltk.word_tokenize (expected tokens: nltk.word_tokenize with NLTK's English Punkt model).
@pytest.mark.parametrize("text, expected", [
    # "j.p" and "j.r" are abbreviations of the English model: no sentence break, the period stays
    ("people waiting to speak into a microphone at a j.p. morgan corporate challenge .",
     ["people", "waiting", "to", "speak", "into", "a", "microphone", "at", "a", "j.p.", "morgan", "corporate",
      "challenge", "."]),
    ("A boat named J.R. Tolkien is harbored along other boats",
     ["a", "boat", "named", "j.r.", "tolkien", "is", "harbored", "along", "other", "boats"]),
    # "l.a" too; Treebank turns both space-preceded '"' into ``
    ('a group of youths , one wearing a t-shirt labeled " l.a. city lounge south " , pose for a picture',
     ["a", "group", "of", "youths", ",", "one", "wearing", "a", "t-shirt", "labeled", "``", "l.a.", "city",
      "lounge", "south", "``", ",", "pose", "for", "a", "picture"]),
    # Punkt keeps the closing '' with the sentence it follows (boundary realignment), and Treebank reads
    # a space-preceded '' as an opening quote
    ("A frosted cake that reads `` congratulations kate and luke on your upcoming arrival . ''",
     ["a", "frosted", "cake", "that", "reads", "``", "congratulations", "kate", "and", "luke", "on", "your",
      "upcoming", "arrival", ".", "``"]),
    # "e.s.e" is not an abbreviation of the model: Punkt breaks after it, so Treebank detaches the period
    ("an african american man is posing in front of an e.s.e. electronics advertisement billboard .",
     ["an", "african", "american", "man", "is", "posing", "in", "front", "of", "an", "e.s.e", ".", "electronics",
      "advertisement", "billboard", "."]),
])
def test_tokenize_is_word_tokenize_with_english_punkt(text, expected):
    assert tokenize(text) == expected


def test_sentence_tokenizer_is_nltk_punkt_with_the_english_model():
    punkt = sentence_tokenizer()
    assert isinstance(punkt, PunktSentenceTokenizer) and punkt is sentence_tokenizer()    # built once
    params = punkt._params
    assert {"j.p", "j.r", "l.a", "mr", "st", "u.s"} <= params.abbrev_types and "e.s.e" not in params.abbrev_types
    assert len(params.abbrev_types) > 150 and len(params.ortho_context) > 20000
    assert ("##number##", "international") in params.collocations and "however" in params.sent_starters
    assert params.ortho_context["no-such-word"] == 0        # a defaultdict(int), as NLTK's loader makes it


def test_tokenize_needs_no_nltk_data(monkeypatch):
    """The model is built from the installed package: NLTK's data search (and so a download) is never hit."""
    import nltk.data

    def no_data(*args, **kwargs):
        raise AssertionError("nltk.data.find called")

    monkeypatch.setattr(nltk.data, "find", no_data)
    monkeypatch.setattr(nltk.data, "load", no_data)
    sentence_tokenizer.cache_clear()
    try:
        assert tokenize("A dog. A cat.") == ["a", "dog", ".", "a", "cat", "."]
    finally:
        sentence_tokenizer.cache_clear()


_PUNKT_ALPHABET = "ab.?!'\"`)( \t\n\x1c\u2019\u00a0"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=_PUNKT_ALPHABET, max_size=12))
def test_sentences_fast_path_is_punkt(text):
    """:func:`sentences` skips Punkt when it cannot break; on any text it returns what Punkt returns."""
    assert sentences(text) == sentence_tokenizer().tokenize(text)


def test_sentences_fast_path_is_punkt_on_coco(shared_data_dir):
    texts = []
    for split in ("testall", "dev"):
        path = shared_data_dir / "coco_precomp" / f"{split}_caps.txt"
        texts += path.read_text(encoding="utf-8").lower().splitlines()
    texts += [t + " " for t in texts[:1000]] + [t.replace(" .", ".") for t in texts[:1000]]
    punkt = sentence_tokenizer()
    assert [sentences(t) for t in texts] == [punkt.tokenize(t) for t in texts]


def _golden_tokens(shared_data_dir, shared_reference_dir, split):
    captions = (shared_data_dir / "coco_precomp" / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
    golden = (shared_reference_dir / f"coco_{split}_tokens.txt").read_text(encoding="utf-8").splitlines()
    assert len(captions) == len(golden) == {"testall": 25000, "dev": 5000}[split]
    return captions, golden


def _differences(captions, golden):
    return [(caption, expected) for caption, expected in zip(captions, golden)
            if " ".join(tokenize(caption)) != expected]


def test_tokenize_matches_golden_tokens_where_punkt_decides(shared_data_dir, shared_reference_dir):
    """The captions with a '.', '?' or '!' before their end (where Punkt decides), and every 50th caption."""
    captions, golden = _golden_tokens(shared_data_dir, shared_reference_dir, "testall")
    pick = [i for i, c in enumerate(captions) if i % 50 == 0 or re.search(r"[.?!]\s*\S", c)]
    assert len(pick) > 550
    assert _differences([captions[i] for i in pick], [golden[i] for i in pick]) == []


@pytest.mark.slow
@pytest.mark.parametrize("split", ["testall", "dev"])
def test_tokenize_matches_golden_tokens_on_every_caption(shared_data_dir, shared_reference_dir, split):
    """nltk.word_tokenize(caption.lower()) with the real Punkt model, for all 30,000 shared COCO captions."""
    captions, golden = _golden_tokens(shared_data_dir, shared_reference_dir, split)
    assert _differences(captions, golden) == []


# -- vocabulary --------------------------------------------------------------------------------
def test_build_threshold_and_special_ids():
    captions = ["a dog runs"] * 4 + ["a cat sits"] * 3 + ["A DOG ."]
    vocab = Vocabulary.build(captions, threshold=4)
    assert [vocab.idx2word[i] for i in range(4)] == list(SPECIAL_TOKENS)
    # counts: a 8, dog 5, runs 4, . 1, cat/sits 3 -> kept by decreasing count
    assert [vocab.idx2word[i] for i in range(4, len(vocab))] == ["a", "dog", "runs"]
    assert "cat" not in vocab and vocab("cat") == 3
    assert Vocabulary.build(captions, threshold=3)("cat") != 3
    assert vocab.encode("A dog sits") == [1, vocab("a"), vocab("dog"), 3, 2]


def test_build_does_not_depend_on_caption_order():
    captions = ["b a", "a b", "c c", "a c", "b", "c"] * 4
    assert Vocabulary.build(captions).word2idx == Vocabulary.build(captions[::-1]).word2idx


def test_from_caption_files(tmp_path):
    (tmp_path / "train_caps.txt").write_text("a dog\na dog\n")
    (tmp_path / "dev_caps.txt").write_text("a cat\na dog\n")
    vocab = Vocabulary.from_caption_files([tmp_path / "train_caps.txt", tmp_path / "dev_caps.txt"], threshold=2)
    assert set(vocab.word2idx) == {*SPECIAL_TOKENS, "a", "dog"}


def test_json_round_trip_atomic(tmp_path):
    vocab = Vocabulary.build(["x y z"] * 4)
    path = vocab_file(tmp_path / "vocab", "toy_precomp")
    assert path == tmp_path / "vocab" / "toy_precomp_vocab.json"
    vocab.to_json(path)
    data = json.loads(path.read_text())
    assert set(data) == {"word2idx", "idx2word", "idx"} and data["idx"] == len(vocab) == 7
    assert data["idx2word"]["0"] == "<pad>"
    assert Vocabulary.from_json(path) == vocab
    assert [p.name for p in path.parent.iterdir()] == [path.name]      # no temp file left behind


def test_published_vocabularies(shared_data_dir):
    coco = Vocabulary.from_json(vocab_file(shared_data_dir / "vocab", "coco_precomp"))
    f30k = Vocabulary.from_json(vocab_file(shared_data_dir / "vocab", "f30k_precomp"))
    assert (len(coco), len(f30k)) == (11353, 8481)            # the published vocab_size values
    assert [coco(w) for w in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert coco("no-such-word") == 3
    assert all(coco.idx2word[coco(w)] == w for w in ("dog", "surfboard", "wooden"))


def test_published_vocab_rewritten_identically(shared_data_dir, tmp_path):
    source = vocab_file(shared_data_dir / "vocab", "f30k_precomp")
    Vocabulary.from_json(source).to_json(tmp_path / "v.json")
    assert json.loads((tmp_path / "v.json").read_text()) == json.loads(source.read_text())


def test_out_of_vocabulary_rate_of_coco_testall(shared_data_dir):
    """About 0.5% of the tokens of the COCO 5K test captions are outside the published vocabulary."""
    vocab = Vocabulary.from_json(vocab_file(shared_data_dir / "vocab", "coco_precomp"))
    lines = (shared_data_dir / "coco_precomp" / "testall_caps.txt").read_text(encoding="utf-8").splitlines()
    ids = [vocab.encode(line) for line in lines]
    tokens = sum(len(i) - 2 for i in ids)
    unknown = sum(i.count(3) for i in ids)
    assert len(lines) == 25000
    assert tokens == 281943                                    # nltk.word_tokenize with the English Punkt model
    assert unknown == 1390                                     # 0.49%
    assert 0.004 < unknown / tokens < 0.006


# -- bad vocabulary files ------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ({"word2idx": {"<pad>": 0}, "idx": 1}, "'idx2word'"),
    ({"idx2word": {}, "idx": 0}, "'word2idx'"),
    ({"word2idx": {}, "idx2word": {}}, "'idx'"),
    ([1, 2, 3], "'word2idx'"),
    ({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "a": 4},
      "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "b"}, "idx": 5}, "inverse"),
    ({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "a": 9},
      "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "a"}, "idx": 5}, "inverse"),
    ({"word2idx": {"a": "x"}, "idx2word": {}, "idx": 1}, "integer ids"),
])
def test_bad_vocabulary_json(tmp_path, content, message):
    path = tmp_path / "bad_vocab.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError) as info:
        Vocabulary.from_json(path)
    text = str(info.value)
    assert str(path) in text and message in text and "\n" not in text


def test_vocabulary_file_missing_or_not_json(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Vocabulary.from_json(tmp_path / "absent.json")
    (tmp_path / "x.json").write_bytes(b"{not json")
    with pytest.raises(VSLError, match="not a JSON"):
        Vocabulary.from_json(tmp_path / "x.json")
