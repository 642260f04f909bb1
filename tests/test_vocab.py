import json

import pytest

from vsl.data.vocab import SPECIAL_TOKENS, Vocabulary, tokenize, vocab_file
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
    # abbreviations keep their period
    ("A statue of mr. lincoln", ["a", "statue", "of", "mr.", "lincoln"]),
    ("  ", []),
])
def test_tokenize_follows_treebank_conventions(text, expected):
    assert tokenize(text) == expected


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
    assert tokens == 281950
    assert unknown == 1386                                     # 0.49%
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
