"""The unified vocabulary: layout invariants, conversions, errors, persistence."""

import numpy as np
import pytest

from cm3leon.errors import CM3LeonError
from cm3leon.tokenizers.vocab import SPECIAL_TOKENS, Vocab


def test_ranges_are_contiguous_and_disjoint():
    v = Vocab(text_vocab_size=300, image_vocab_size=64, num_sentinels=5)
    assert [v.pad_id, v.eos_id, v.break_id, v.eoss_id] == [0, 1, 2, 3]
    assert [v.mask_id(i) for i in range(5)] == list(range(4, 9))
    assert v.text_offset == v.num_special == 9
    assert v.image_offset == 9 + 300
    assert v.size == 9 + 300 + 64
    ids = np.arange(v.size)
    kinds = v.is_mask(ids).astype(int) + v.is_text(ids) + v.is_image(ids)
    # every id is at most one of mask/text/image; the four plain specials are none of them
    assert kinds.max() == 1 and kinds[:4].sum() == 0 and kinds[4:].min() == 1


def test_text_and_image_round_trip():
    v = Vocab(100, 16, 2)
    t = v.text_to_ids([0, 5, 99])
    c = v.image_to_ids(np.array([[0, 15], [3, 4]]))
    assert v.is_text(t).all() and v.is_image(c).all()
    assert v.ids_to_text_ids(t).tolist() == [0, 5, 99]
    assert v.ids_to_codes(c).tolist() == [0, 15, 3, 4]


def test_out_of_range_ids_give_clear_errors():
    v = Vocab(100, 16, 2)
    with pytest.raises(CM3LeonError, match="text id out of range"):
        v.text_to_ids([100])
    with pytest.raises(CM3LeonError, match="image code out of range"):
        v.image_to_ids([16])
    with pytest.raises(CM3LeonError, match=r"token id 999 out of range \[0, 122\)"):
        v.check([1, 2, 999])
    with pytest.raises(CM3LeonError, match="sentinel index 2"):
        v.mask_id(2)
    with pytest.raises(CM3LeonError, match="must be >= 1"):
        Vocab(0, 16)


def test_segments_split_mixed_sequences():
    v = Vocab(50, 8, 2)
    seq = np.concatenate([[v.eos_id], v.text_to_ids([1, 2]), [v.break_id], v.image_to_ids([7, 0, 3]), [v.break_id, v.mask_id(1)]])
    segs = v.segments(seq)
    assert [k for k, _ in segs] == ["special", "text", "special", "image", "special", "special"]
    assert segs[1][1].tolist() == [1, 2] and segs[3][1].tolist() == [7, 0, 3]
    assert segs[5][1] == "<mask:1>"
    assert v.special_id("<mask:1>") == v.mask_id(1) and v.special_id("<break>") == 2


def test_save_load_round_trip_and_tamper_detection(tmp_path):
    v = Vocab(321, 64, 7)
    v.save(tmp_path)
    assert Vocab.load(tmp_path) == v
    text = (tmp_path / "vocab.json").read_text()
    tampered = text.replace(f'"image_offset": {v.image_offset}', f'"image_offset": {v.image_offset + 1}')
    assert tampered != text
    (tmp_path / "vocab.json").write_text(tampered)
    with pytest.raises(CM3LeonError, match="image_offset"):
        Vocab.load(tmp_path)
    assert tuple(SPECIAL_TOKENS) == ("<pad>", "<eos>", "<break>", "<eoss>")
