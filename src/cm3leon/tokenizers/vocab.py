"""The unified vocabulary: one id space for special tokens, text BPE ids and image codes.

Layout (contiguous ranges, in this order):

    [0, num_special)                    <pad> <eos> <break> <eoss> <mask:0> ... <mask:M-1>
    [text_offset, image_offset)         text BPE ids   (text id t  -> text_offset + t)
    [image_offset, size)                image codes    (code c     -> image_offset + c)

`<break>` marks a modality change, `<eos>` a document boundary, `<mask:i>` the i-th CM3
sentinel and `<eoss>` the end of a masked span (paper Sec. 2). The layout is
saved as `vocab.json` in every model directory so the directory describes itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cm3leon.errors import CM3LeonError
from cm3leon.utils.io import read_json, write_json

SPECIAL_TOKENS = ("<pad>", "<eos>", "<break>", "<eoss>")


@dataclass(frozen=True)
class Vocab:
    text_vocab_size: int  # size of the BPE tokenizer's vocabulary
    image_vocab_size: int  # VQ codebook size (paper: 8192)
    num_sentinels: int = 16  # <mask:0..M-1>; CM3 spans ~ Poisson(1), so few are ever used

    def __post_init__(self):
        for name in ("text_vocab_size", "image_vocab_size", "num_sentinels"):
            if int(getattr(self, name)) < 1:
                raise CM3LeonError(f"Vocab.{name} must be >= 1, got {getattr(self, name)}")

    # --- special ids -------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def break_id(self) -> int:
        return 2

    @property
    def eoss_id(self) -> int:
        return 3

    def mask_id(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise CM3LeonError(f"sentinel index {i} out of range [0, {self.num_sentinels})")
        return len(SPECIAL_TOKENS) + i

    @property
    def first_mask_id(self) -> int:
        return len(SPECIAL_TOKENS)

    # --- ranges --------------------------------------------------------------------------
    @property
    def num_special(self) -> int:
        return len(SPECIAL_TOKENS) + self.num_sentinels

    @property
    def text_offset(self) -> int:
        return self.num_special

    @property
    def image_offset(self) -> int:
        return self.text_offset + self.text_vocab_size

    @property
    def size(self) -> int:
        return self.image_offset + self.image_vocab_size

    def is_mask(self, ids):
        ids = np.asarray(ids)
        return (ids >= self.first_mask_id) & (ids < self.num_special)

    def is_text(self, ids):
        ids = np.asarray(ids)
        return (ids >= self.text_offset) & (ids < self.image_offset)

    def is_image(self, ids):
        ids = np.asarray(ids)
        return (ids >= self.image_offset) & (ids < self.size)

    # --- conversions ---------------------------------------------------------------------
    def text_to_ids(self, text_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """BPE ids -> unified ids."""
        a = np.asarray(text_ids, dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() >= self.text_vocab_size):
            raise CM3LeonError(
                f"text id out of range [0, {self.text_vocab_size}): min {a.min()}, max {a.max()}"
            )
        return a + self.text_offset

    def image_to_ids(self, codes) -> np.ndarray:
        """VQ codes (any shape) -> flat unified ids."""
        a = np.asarray(codes, dtype=np.int64).reshape(-1)
        if a.size and (a.min() < 0 or a.max() >= self.image_vocab_size):
            raise CM3LeonError(
                f"image code out of range [0, {self.image_vocab_size}): min {a.min()}, max {a.max()}"
            )
        return a + self.image_offset

    def ids_to_text_ids(self, ids) -> np.ndarray:
        a = np.asarray(ids, dtype=np.int64)
        if not self.is_text(a).all():
            raise CM3LeonError("ids_to_text_ids: some ids are not text ids")
        return a - self.text_offset

    def ids_to_codes(self, ids) -> np.ndarray:
        a = np.asarray(ids, dtype=np.int64)
        if not self.is_image(a).all():
            raise CM3LeonError("ids_to_codes: some ids are not image ids")
        return a - self.image_offset

    def check(self, ids) -> None:
        """Raise a clear error if any id is outside [0, size)."""
        a = np.asarray(ids)
        if a.size and (a.min() < 0 or a.max() >= self.size):
            bad = a[(a < 0) | (a >= self.size)]
            raise CM3LeonError(
                f"token id {int(bad.flat[0])} out of range [0, {self.size}) "
                f"({bad.size} bad ids; vocab: {self.num_special} special, "
                f"{self.text_vocab_size} text, {self.image_vocab_size} image)"
            )

    def token_name(self, i: int) -> str:
        i = int(i)
        self.check([i])
        if i < len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[i]
        if i < self.num_special:
            return f"<mask:{i - len(SPECIAL_TOKENS)}>"
        if i < self.image_offset:
            return f"<text:{i - self.text_offset}>"
        return f"<img:{i - self.image_offset}>"

    def special_id(self, name: str) -> int:
        """'<break>' -> 2, '<mask:3>' -> mask_id(3)."""
        if name in SPECIAL_TOKENS:
            return SPECIAL_TOKENS.index(name)
        if name.startswith("<mask:") and name.endswith(">"):
            return self.mask_id(int(name[6:-1]))
        raise CM3LeonError(f"unknown special token {name!r}")

    def segments(self, ids) -> list[tuple[str, object]]:
        """Split a mixed sequence into runs: ('text', text_ids), ('image', codes),
        ('special', name). Text and image runs are numpy arrays of tokenizer-local ids."""
        a = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.check(a)
        out: list[tuple[str, object]] = []
        i = 0
        while i < len(a):
            if self.is_text(a[i]):
                j = i
                while j < len(a) and self.is_text(a[j]):
                    j += 1
                out.append(("text", a[i:j] - self.text_offset))
            elif self.is_image(a[i]):
                j = i
                while j < len(a) and self.is_image(a[j]):
                    j += 1
                out.append(("image", a[i:j] - self.image_offset))
            else:
                j = i + 1
                out.append(("special", self.token_name(a[i])))
            i = j
        return out

    def decode(self, ids, text_tokenizer) -> str:
        """Readable rendering of a mixed sequence: text decoded, images as `<image:N codes>`."""
        parts = []
        for kind, val in self.segments(ids):
            if kind == "text":
                parts.append(text_tokenizer.decode(val.tolist()))
            elif kind == "image":
                parts.append(f"<image:{len(val)} codes>")
            else:
                parts.append(f" {val} ")
        return "".join(parts).strip()

    # --- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["special_tokens"] = list(SPECIAL_TOKENS)
        d["text_offset"] = self.text_offset
        d["image_offset"] = self.image_offset
        d["size"] = self.size
        return d

    def save(self, path: str | Path) -> None:
        """Write `vocab.json` (a file path, or a directory to write it into)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "vocab.json"
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.json"
        d = read_json(path, "vocabulary file")
        try:
            v = cls(int(d["text_vocab_size"]), int(d["image_vocab_size"]), int(d["num_sentinels"]))
        except KeyError as e:
            raise CM3LeonError(f"{path}: missing field {e.args[0]!r}") from None
        if list(d.get("special_tokens", SPECIAL_TOKENS)) != list(SPECIAL_TOKENS):
            raise CM3LeonError(f"{path}: special tokens {d['special_tokens']} differ from {list(SPECIAL_TOKENS)}")
        for k in ("text_offset", "image_offset", "size"):
            if k in d and int(d[k]) != getattr(v, k):
                raise CM3LeonError(f"{path}: {k}={d[k]} disagrees with the layout ({getattr(v, k)})")
        return v
