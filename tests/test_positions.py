"""Segment positions and document masking (cm3leon.model.positions): the same position ids
wherever they are computed (training blocks, prompts, one decoding step at a time), cached
decoding equal to uncached, and packed documents that train exactly as if each were alone."""

import numpy as np
import pytest
import torch

from cm3leon.objectives.sequences import PackedStream
from cm3leon.decode.generate import generate
from cm3leon.decode.processors import AnyConstraint, ImageConstraint, SamplerSettings
from cm3leon.errors import CM3LeonError
from cm3leon.model.config import ModelConfig
from cm3leon.model.positions import document_mask, document_positions, next_positions
from cm3leon.model.transformer import CM3LeonTransformer
from cm3leon.objectives.cm3 import IGNORE_INDEX, CM3Example
from cm3leon.tokenizers.vocab import Vocab
from cm3leon.train.loop import _loss_sums

VOCAB = Vocab(text_vocab_size=40, image_vocab_size=24, num_sentinels=4)
EOS, BRK = VOCAB.eos_id, VOCAB.break_id
STRIDE = 8


def _config(stride: int = STRIDE, numbers: bool = True) -> ModelConfig:
    return ModelConfig.from_preset("tiny", vocab_size=VOCAB.size, segment_positions=stride,
                                   segment_delimiters=[BRK, EOS], segment_numbers=numbers)


def _model(stride: int = STRIDE, numbers: bool = True) -> CM3LeonTransformer:
    torch.manual_seed(0)
    m = CM3LeonTransformer(_config(stride, numbers)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def test_segment_positions_restart_after_every_delimiter_and_clamp_inside_a_segment():
    t, i = VOCAB.text_offset, VOCAB.image_offset
    doc = [EOS, t + 1, t + 2, BRK, i, i + 1, i + 2, BRK, t + 3, EOS]
    assert document_positions(doc, _config()).tolist() == [0, 8, 9, 10, 16, 17, 18, 19, 24, 25]
    # an image's k-th code has position 2 * stride + k whatever the caption's length
    longer = [EOS, t + 1, t + 2, t + 3, t + 4, BRK, i, i + 1]
    assert document_positions(longer, _config()).tolist()[-2:] == [16, 17]
    # a segment longer than the stride keeps its last position (never reaches the next segment)
    assert document_positions([EOS] + [t + 1] * 12, _config()).tolist()[-3:] == [15, 15, 15]
    # plain positions without segment positions
    assert document_positions(doc, ModelConfig.from_preset("tiny", vocab_size=VOCAB.size)).tolist() == list(range(10))


def test_without_segment_numbers_every_image_shares_its_positions_and_only_the_start_is_zero():
    t, i = VOCAB.text_offset, VOCAB.image_offset
    doc = [EOS, t + 1, t + 2, BRK, i, i + 1, i + 2, BRK, t + 3, t + 4, t + 5, BRK, i, i + 1, i + 2, EOS]
    pos = document_positions(doc, _config(numbers=False)).tolist()
    assert pos == [0, 1, 2, 3, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]
    assert pos[4:7] == pos[12:15]  # the k-th code of both images, whatever came before
    assert pos.count(0) == 1  # packed documents are still found by their first position
    assert document_positions([EOS] + [t + 1] * 12, _config(numbers=False)).tolist()[-3:] == [7, 7, 7]


@pytest.mark.parametrize("numbers", [True, False])
def test_next_positions_one_step_at_a_time_equals_the_whole_document(numbers):
    rng = np.random.default_rng(0)
    doc = [EOS] + list(rng.choice([BRK, EOS] + list(range(VOCAB.text_offset, VOCAB.size)), size=60))
    whole = document_positions(doc, _config(numbers=numbers))
    pos, steps = torch.tensor(0), [0]
    for prev in doc[:-1]:
        pos = next_positions(pos, torch.tensor(prev), _config(numbers=numbers))
        steps.append(int(pos))
    assert steps == whole.tolist()


def test_document_mask_keeps_packed_documents_apart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = document_mask(positions)[0, 0]
    assert m[2, :3].all() and not m[2, 3:].any()
    assert m[4, 3:5].all() and not m[4, :3].any() and not m[4, 5]


def _image_prompts():
    t, i = VOCAB.text_offset, VOCAB.image_offset
    return [[EOS, t + 1, t + 2, BRK], [EOS, t + 3, BRK, i, i + 1, BRK, t + 4, t + 5, t + 6, BRK]]


@pytest.mark.parametrize("numbers", [True, False])
def test_cached_generation_equals_uncached_with_segment_positions(numbers):
    model = _model(numbers=numbers)
    s = SamplerSettings(temperature=1.0, top_p=0.9)
    for c in (ImageConstraint(VOCAB, VOCAB.size, tokens_per_image=16), AnyConstraint(VOCAB, VOCAB.size)):
        a = generate(model, _image_prompts(), c, max_new_tokens=20, sampler=s, seed=3)
        b = generate(model, _image_prompts(), c, max_new_tokens=20, sampler=s, seed=3, use_cache=False)
        assert a.tokens == b.tokens


def test_generation_sees_segment_positions():
    """The same weights decode differently with segment positions than with plain ones (the
    position ids really reach the model)."""
    greedy = SamplerSettings(temperature=0.0)
    c = ImageConstraint(VOCAB, VOCAB.size, tokens_per_image=16)
    seg = _model()
    plain = CM3LeonTransformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB.size)).eval()
    plain.load_state_dict(seg.state_dict())
    assert generate(seg, _image_prompts(), c, sampler=greedy).tokens != \
        generate(plain, _image_prompts(), c, sampler=greedy).tokens


def test_prompt_past_the_position_table_is_a_named_error():
    model = _model(stride=64)  # tiny: max_seq_len 128, so the third segment starts past it
    t = VOCAB.text_offset
    with pytest.raises(CM3LeonError, match="position table"):
        generate(model, [[EOS, t, BRK, t, BRK, t, BRK]], AnyConstraint(VOCAB, VOCAB.size), max_new_tokens=2)


def test_segment_positions_need_delimiters():
    with pytest.raises(CM3LeonError, match="segment_delimiters"):
        ModelConfig.from_preset("tiny", vocab_size=VOCAB.size, segment_positions=8)


class _Docs(PackedStream):
    def __init__(self, docs, seq_len):
        super().__init__(seq_len, VOCAB.pad_id, shuffle=False, epochs=1)
        self.docs = docs

    @property
    def num_items(self):
        return len(self.docs)

    def example(self, item, epoch):
        d = np.array(self.docs[item], dtype=np.int64)
        tgt = np.full(len(d), IGNORE_INDEX, dtype=np.int64)
        tgt[:-1] = d[1:]
        return CM3Example(tokens=d, targets=tgt, loss_mask=(tgt != IGNORE_INDEX).astype(np.uint8))


@pytest.mark.parametrize("stride,numbers", [(0, True), (STRIDE, True), (STRIDE, False)])
def test_packed_documents_train_exactly_as_each_alone(stride, numbers):
    """With positions from the stream, a packed block's loss is the sum of its documents'
    losses computed alone: no document sees another or inherits its positions."""
    model = _model(stride, numbers) if stride else CM3LeonTransformer(
        ModelConfig.from_preset("tiny", vocab_size=VOCAB.size)).eval()
    docs = [[EOS, VOCAB.text_offset + 1, BRK, VOCAB.image_offset + 2, VOCAB.image_offset + 3, EOS],
            [EOS, VOCAB.text_offset + 5, VOCAB.text_offset + 6, BRK, VOCAB.image_offset + 1, EOS]]
    stream = _Docs(docs, seq_len=16)
    stream.set_positions(model.config)
    (tokens, targets, _, positions), = list(stream)
    assert positions[:6].tolist() == document_positions(docs[0], model.config).tolist()
    kinds = torch.zeros(1, 16, dtype=torch.int8)
    with torch.no_grad():
        packed, _ = _loss_sums(model, tokens[None], targets[None], kinds, True, positions[None])
        unmasked, _ = _loss_sums(model, tokens[None], targets[None], kinds, True)
        alone = 0.0
        for i in range(len(docs)):
            ex = stream.example(i, 0)
            t, y = torch.from_numpy(ex.tokens)[None], torch.from_numpy(ex.targets)[None]
            pos = document_positions(ex.tokens, model.config)[None]
            alone += float(model(t, y, reduction="none", position_ids=pos)[1].sum())
    assert packed.item() == pytest.approx(alone, rel=1e-5)
    assert abs(unmasked.item() - alone) > 1e-3  # packing without it is not the same


def _shared_model() -> CM3LeonTransformer:
    torch.manual_seed(1)
    m = CM3LeonTransformer(_config().replace(shared_segment_positions=True)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def test_shared_segment_positions_give_a_cell_one_vector_in_every_segment():
    """model.shared_segment_positions: the k-th token of every segment shares the cell table's
    row k (on top of its own position row), and that row learns from every segment."""
    m = _shared_model()
    with torch.no_grad():
        m.pos_embeddings.weight.zero_()
    table = m.position_table()
    assert torch.equal(table[3], table[STRIDE + 3]) and torch.equal(table[3], table[2 * STRIDE + 3])
    assert not torch.equal(table[3], table[4])
    i = VOCAB.image_offset
    doc = [EOS, i, i + 1, BRK, i + 2, i + 3, BRK, i + 4, i + 5, EOS]
    pos = document_positions(doc, m.config)
    _, loss = m(torch.tensor([doc]), targets=torch.tensor([doc[1:] + [-100]]), position_ids=pos)
    loss.backward()
    grad = m.cell_embeddings.weight.grad
    assert grad[1].abs().sum() > 0 and grad[2].abs().sum() > 0  # cells of the three segments
    assert grad[STRIDE - 1].abs().sum() == 0  # no token sits at that index


def test_shared_segment_positions_need_segment_positions_and_export_as_one_table(tmp_path):
    from cm3leon.convert.hf_opt import export_hf, import_hf

    with pytest.raises(CM3LeonError, match="shared_segment_positions needs segment_positions"):
        ModelConfig.from_preset("tiny", vocab_size=VOCAB.size, shared_segment_positions=True)
    m = _shared_model()
    export_hf(m, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = CM3LeonTransformer.from_pretrained(tmp_path / "back").eval()
    assert back.cell_embeddings is None and not back.config.shared_segment_positions
    assert torch.allclose(back.pos_embeddings.weight, m.position_table())
    t, i = VOCAB.text_offset, VOCAB.image_offset
    doc = [EOS, t + 1, t + 2, BRK, i, i + 1, i + 2, BRK, t + 3, BRK, i + 3, i + 4, EOS]
    pos = document_positions(doc, m.config)
    with torch.no_grad():
        a, _ = m(torch.tensor([doc]), position_ids=pos)
        b, _ = back(torch.tensor([doc]), position_ids=pos)
    torch.testing.assert_close(a, b)
