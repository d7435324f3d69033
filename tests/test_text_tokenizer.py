"""Byte-level BPE: exact round trip on any UTF-8 text, persistence, the CLI."""

import json

import pytest

from cm3leon.errors import CM3LeonError
from cm3leon.tokenizers.text import TextTokenizer, resolve_vocab_size

CORPUS = [
    "a small red circle above a blue square",
    "a large green triangle in the top left",
    "two objects: a yellow diamond and a purple circle",
] * 20


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(CORPUS, vocab_size=300)


@pytest.mark.parametrize("text", [
    "a small red circle", "Ünïcödé — 日本語のテキスト 🙂", "  leading and trailing  ", "tabs\tand\nnewlines", "",
])
def test_round_trip_including_non_ascii(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_merges_learned_from_corpus(tok):
    assert tok.vocab_size > 256
    # frequent words compress: far fewer tokens than bytes
    assert len(tok.encode("a small red circle above a blue square")) < 20


def test_save_load_gives_identical_ids(tok, tmp_path):
    tok.save(tmp_path)
    again = TextTokenizer.load(tmp_path)
    s = "a large purple square below a green circle ✓"
    assert again.encode(s) == tok.encode(s)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        TextTokenizer.load(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CM3LeonError, match="tokenizer.json"):
        TextTokenizer.load(tmp_path)
    with pytest.raises(CM3LeonError, match="vocab-size"):
        resolve_vocab_size("huge")
    assert resolve_vocab_size("paper") == 56_320


def test_cli_trains_on_a_folder_dataset(tmp_path):
    from PIL import Image

    from cm3leon.cli import main

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    with open(data / "captions.jsonl", "w") as f:
        for i, text in enumerate(CORPUS):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(data / "images" / f"{i}.png")
            f.write(json.dumps({"image": f"images/{i}.png", "text": text, "split": "train"}) + "\n")
    assert main(["tokenizer", "text", "--data", str(data), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    tok = TextTokenizer.load(tmp_path / "tok")
    assert tok.decode(tok.encode(CORPUS[0])) == CORPUS[0]


def test_the_bpe_learns_the_instruction_texts_unless_captions_only(tmp_path, capsys):
    """A word that only the VQA file uses becomes one token; with --captions-only it is spelled."""
    from PIL import Image

    from cm3leon.cli import main

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    with open(data / "captions.jsonl", "w") as f, open(data / "vqa.jsonl", "w") as v:
        for i, text in enumerate(CORPUS):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(data / "images" / f"{i}.png")
            f.write(json.dumps({"image": f"images/{i}.png", "text": text, "split": "train"}) + "\n")
            for _ in range(20):
                v.write(json.dumps({"image": f"images/{i}.png", "question": "Is it zorbleflux?",
                                    "answer": "zorbleflux", "split": "train"}) + "\n")
    lengths = {}
    for flag in ([], ["--captions-only"]):
        out = tmp_path / ("tok" + "".join(flag))
        assert main(["tokenizer", "text", "--data", str(data), "--out", str(out), "--vocab-size", "400", *flag]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["num_extra_texts"] > 0) == (not flag)
        lengths[bool(flag)] = len(TextTokenizer.load(out).encode(" zorbleflux"))
    assert lengths[False] <= 2 < lengths[True]
