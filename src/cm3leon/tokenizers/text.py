"""Text tokenizer: byte-level BPE trained with HF `tokenizers`, saved as `tokenizer.json`.

Byte-level, so any UTF-8 text round-trips exactly. The tokenizer knows no special tokens:
those live in the unified vocabulary (`vocab.py`), which offsets the BPE ids."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from cm3leon.errors import CM3LeonError
from cm3leon.utils.io import atomic_path
from cm3leon.utils.presets import lookup

# Named vocabulary sizes. The paper's is 56,320; the small default suits small data.
VOCAB_PRESETS = {"paper": 56_320, "small": 1_024, "tiny": 512}
DEFAULT_VOCAB_SIZE = VOCAB_PRESETS["small"]
TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    def __init__(self, tokenizer):
        self._tok = tokenizer

    # --- training / persistence ----------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2) -> "TextTokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise CM3LeonError(f"--vocab-size must be at least 257 (256 bytes + 1 merge), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_nonempty(texts), trainer=trainer)
        return cls(tok)

    def save(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
            self._tok.save(str(tmp))
        return out_dir / TOKENIZER_FILE

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer not found: {path}")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise CM3LeonError(f"{path}: not a valid tokenizers JSON file ({e})") from None

    # --- use ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(map(int, ids)))


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


def resolve_vocab_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return lookup(VOCAB_PRESETS, value, "vocabulary size (--vocab-size: a number or a preset)")


def train_text_tokenizer(data: str | Path, out: str | Path, vocab_size: int | str = DEFAULT_VOCAB_SIZE,
                         split: str | None = "train", extra_texts: Iterable[str] = ()) -> dict:
    """Train a BPE on the captions of a dataset (any reader format) and `extra_texts` (e.g.
    the instruction-tuning texts the model will also read and write), and save it in `out`."""
    from cm3leon.data.readers import iter_texts

    size = resolve_vocab_size(vocab_size)
    texts = list(iter_texts(data, split=split))
    if not texts:
        raise CM3LeonError(f"{data}: no captions found to train the text tokenizer (split={split!r})")
    extra = [t for t in extra_texts if t.strip()]
    tok = TextTokenizer.train(texts + extra, vocab_size=size)
    path = tok.save(out)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts[:2000]))
    sample = texts[: min(len(texts), 2000)]
    return {
        "tokenizer": str(path),
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": size,
        "num_texts": len(texts),
        "num_extra_texts": len(extra),
        "tokens_per_caption": round(n_tokens / max(1, len(sample)), 2),
    }
