"""Instruction tuning: templates, the mixture, the SFT objective, and a tiny end-to-end run."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from cm3leon.errors import CM3LeonError
from cm3leon.objectives.cm3 import IGNORE_INDEX, invert_cm3
from cm3leon.layout import templates as T
from cm3leon.sft.mixture import (MixtureConfig, SFTStream, mixture_probabilities, sft_example,
                                 stratified_counts)
from cm3leon.tokenizers.text import TextTokenizer
from cm3leon.tokenizers.vocab import Vocab

CORPUS = [
    "Question: what color is the circle? Answer: red.", "a red circle in the top left",
    "Edit first image following the instruction make the circle blue",
    "Generate high quality image of a red circle with segmentations red circle at <1,2,30,40>",
    "Describe the given picture. two blue squares", 'Draw "hello" in a sign with edge map depth map',
] * 10


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def vocab(tok):
    return Vocab(tok.vocab_size, 64, num_sentinels=8)


CODES = np.arange(16).reshape(4, 4)
CODES2 = np.arange(16, 32)


def _t(tok, vocab, s):
    return vocab.text_to_ids(tok.encode(s)).tolist()


def _img(vocab, c):
    return vocab.image_to_ids(c).tolist()


# --- templates -------------------------------------------------------------------------------

def test_templates_render_exact_documented_token_layouts(tok, vocab):
    E, B = vocab.eos_id, vocab.break_id
    img, img2 = _img(vocab, CODES), _img(vocab, CODES2)
    cap = "a red circle in the top left"

    d = T.render("t2i", {"caption": cap, "image": CODES}, vocab, tok)
    assert d.tokens.tolist() == [E] + _t(tok, vocab, cap) + [B] + img + [E]
    assert d.tokens[slice(*d.response)].tolist() == img and d.response_last

    d = T.render("caption", {"caption": cap, "image": CODES}, vocab, tok)
    assert d.tokens.tolist() == [E] + _t(tok, vocab, cap) + [B] + img + [E]
    assert d.response == (1, 1 + len(_t(tok, vocab, cap))) and not d.response_last

    d = T.render("caption_detailed", {"caption": cap, "image": CODES}, vocab, tok)
    head = _t(tok, vocab, "Describe the given picture.")
    assert d.tokens.tolist() == [E] + head + _t(tok, vocab, " " + cap) + [B] + img + [E]
    assert d.tokens[slice(*d.response)].tolist() == _t(tok, vocab, " " + cap)

    d = T.render("vqa", {"question": " what color is the circle? ", "answer": "red", "image": CODES}, vocab, tok)
    expect = ([E] + _t(tok, vocab, "Question: ") + _t(tok, vocab, "what color is the circle?")
              + _t(tok, vocab, " Answer:") + _t(tok, vocab, " red.") + [B] + img + [E])
    assert d.tokens.tolist() == expect
    assert d.tokens[slice(*d.response)].tolist() == _t(tok, vocab, " red.")

    d = T.render("edit", {"image": CODES, "instruction": "make the circle blue", "target_image": CODES2}, vocab, tok)
    assert d.tokens.tolist() == ([E] + _t(tok, vocab, "Edit first image following the instruction") + [B] + img
                                 + [B] + _t(tok, vocab, "make the circle blue") + [B] + img2 + [E])
    assert d.tokens[slice(*d.response)].tolist() == img2 and d.response_last

    segs = T.format_segmentations([{"name": "red circle", "bbox": [0, 0, 8, 8]}], 16, 16)
    assert segs == "red circle at <0,0,50,50>"
    d = T.render("layout", {"caption": "a red circle", "segmentations": segs, "image": CODES}, vocab, tok)
    assert d.tokens.tolist() == ([E] + _t(tok, vocab, "Generate high quality image of ") + _t(tok, vocab, "a red circle")
                                 + _t(tok, vocab, " with segmentations ") + _t(tok, vocab, segs) + [B] + img + [E])

    d = T.render("edge2img", {"caption": "a sign", "condition_image": CODES2, "image": CODES}, vocab, tok)
    assert d.tokens.tolist()[-len(img) - 2 - len(img2) - 1:] == [B] + img2 + [B] + img + [E]
    assert (d.tokens == B).sum() == 2 and d.response_last


@pytest.mark.parametrize("task", sorted(T.TEMPLATES))
def test_every_template_renders_with_one_response_and_its_prompt_is_a_prefix_or_infill(task, tok, vocab):
    text_fields, image_fields = T.required_fields(task)
    fields = {k: "a red circle" for k in text_fields}
    fields.update({k: CODES for k in image_fields})
    d = T.render(task, fields, vocab, tok)
    n_breaks = T.TEMPLATES[task]["template"].count(" <break> ")
    assert d.tokens[0] == d.tokens[-1] == vocab.eos_id and (d.tokens == vocab.break_id).sum() == n_breaks
    s, e = d.response
    assert 0 < s < e < len(d.tokens)
    p = T.prompt(task, {k: v for k, v in fields.items() if k not in T.response_fields(task)}, vocab, tok)
    if d.response_last:
        assert p == d.tokens[:s].tolist()
    else:  # infilling: the response is one CM3 span
        m0 = vocab.mask_id(0)
        assert p == d.tokens[:s].tolist() + [m0] + d.tokens[e:].tolist() + [m0]


def test_template_prompts_equal_the_decode_task_prompts(tok, vocab):
    from cm3leon.layout.prompts import PromptBuilder

    pb = PromptBuilder(vocab, tok, max_seq_len=128, tokens_per_image=16)
    assert T.prompt("caption", {"image": CODES}, vocab, tok) == pb.caption(CODES, max_new_tokens=8).cond
    q = "what color is the circle?"
    assert T.prompt("vqa", {"question": q, "image": CODES}, vocab, tok) == pb.vqa(CODES, q, max_new_tokens=8).cond
    instr = "make the circle blue"
    assert T.prompt("edit", {"image": CODES, "instruction": instr}, vocab, tok) == pb.edit(CODES, instr).cond
    cap = "a red circle in the top left"
    assert T.prompt("t2i", {"caption": cap}, vocab, tok) == pb.text_to_image(cap).cond


def test_text_strings_are_the_pieces_a_document_encodes(tok, vocab):
    fields = {"question": "Is there a cat?", "answer": "no", "image": np.zeros(4, dtype=np.int64)}
    assert T.text_strings("vqa", fields) == ["Question: ", "Is there a cat?", " Answer:", " no."]
    doc = T.render("vqa", fields, vocab, tok)
    text_ids = [i for i in doc.tokens.tolist() if vocab.text_offset <= i < vocab.image_offset]
    assert text_ids == vocab.text_to_ids(
        [t for s in T.text_strings("vqa", fields) for t in tok.encode(s)]).tolist()
    assert T.text_strings("t2i", {"caption": "a red circle"}) == ["a red circle"]


def test_template_missing_or_empty_field_is_a_clear_error(tok, vocab):
    with pytest.raises(CM3LeonError, match="'answer'"):
        T.render("vqa", {"question": "what?", "answer": "  ", "image": CODES}, vocab, tok)
    with pytest.raises(CM3LeonError, match="target_image"):
        T.render("edit", {"image": CODES, "instruction": "x"}, vocab, tok)
    with pytest.raises(CM3LeonError, match="unknown SFT task"):
        T.render("nope", {}, vocab, tok)


def test_format_location_maps_into_the_centre_crop_on_a_0_99_grid():
    assert T.format_location([0, 0, 10, 10], 10, 10) == "<0,0,99,99>"
    # 20x10 image: the crop is x in [5, 15]; a box at x 5..10 is the crop's left half.
    assert T.format_location([5, 0, 10, 5], 20, 10) == "<0,0,50,50>"
    with pytest.raises(CM3LeonError):
        T.format_location([3, 3, 1, 1], 10, 10)


# --- mixture ---------------------------------------------------------------------------------

def test_mixture_probabilities_follow_weights_and_clamp_ratios_to_0_3_and_3():
    sizes = {"big": 10000, "mid": 1000, "small": 10}
    p = mixture_probabilities(sizes)  # equal target shares
    natural = {t: n / sum(sizes.values()) for t, n in sizes.items()}
    ratio = {t: p[t] / natural[t] for t in sizes}
    assert sum(p.values()) == pytest.approx(1.0)
    assert ratio["small"] == pytest.approx(3.0)  # up-sampled to the limit
    assert all(0.3 - 1e-9 <= r <= 3.0 + 1e-9 for r in ratio.values())
    assert ratio["big"] < 1.0 < ratio["mid"]
    # No clamp binds: the probabilities are exactly the normalised weights.
    q = mixture_probabilities({"a": 100, "b": 100, "c": 200}, {"a": 1, "b": 2, "c": 3})
    assert q == pytest.approx({"a": 1 / 6, "b": 2 / 6, "c": 3 / 6})
    # A huge weight is clamped at 3x its natural share.
    r = mixture_probabilities({"a": 100, "b": 100}, {"a": 100, "b": 1})
    assert r["b"] == pytest.approx(0.5 * 0.3) and r["a"] == pytest.approx(1 - 0.15)
    assert "z" not in mixture_probabilities({"a": 5, "z": 5}, {"a": 1, "z": 0})
    with pytest.raises(CM3LeonError, match="no data"):
        mixture_probabilities({"a": 5}, {"b": 1})
    assert mixture_probabilities({"a": 5}, {"a": 1, "b": 0}) == {"a": 1.0}  # a task left out needs no data
    # Largest remainders: 3.5, 1.75, 1.75 -> 3, 2, 2.
    assert stratified_counts({"a": 0.5, "b": 0.25, "c": 0.25}, 7) == {"a": 3, "b": 2, "c": 2}


class _FakeSource:
    """Documents with a fixed response; records which examples the stream renders."""

    def __init__(self, sizes, vocab, tok):
        self.tasks, self.vocab, self.tok = [], vocab, tok
        for t, n in sizes.items():
            self.tasks += [t] * n
        self.seen = collections.Counter()
        self.doc = T.render("vqa", {"question": "what color?", "answer": "red", "image": CODES}, vocab, tok)

    def task_indices(self, split):
        out = collections.defaultdict(list)
        for i, t in enumerate(self.tasks):
            out[t].append(i)
        return {t: np.array(ix) for t, ix in out.items()}

    def document(self, i):
        self.seen[self.tasks[i]] += 1
        return self.doc


def test_stream_samples_tasks_at_the_mixture_rates(tok, vocab):
    sizes = {"t2i": 400, "vqa": 100, "edit": 20}
    src = _FakeSource(sizes, vocab, tok)
    cfg = MixtureConfig(weights={"t2i": 1, "vqa": 1, "edit": 1}, epoch_size=600)
    stream = SFTStream(src, "train", seq_len=128, vocab=vocab, config=cfg, seed=3, epochs=3)
    blocks = list(stream)
    assert blocks and all(len(b[0]) == 128 for b in blocks)
    total = sum(src.seen.values())
    assert total == 3 * 600  # every draw rendered once
    for t, p in stream.probabilities.items():
        sigma = np.sqrt(p * (1 - p) / total)
        assert abs(src.seen[t] / total - p) <= 4 * sigma + 1e-9
    natural = {t: n / 520 for t, n in sizes.items()}
    assert stream.probabilities["edit"] == pytest.approx(3 * natural["edit"])
    # An up-sampled task cycles through all its examples before repeating one.
    ids = stream.epoch_examples(0)
    edit_ids = [i for i in ids if src.tasks[i] == "edit"]
    assert len(set(edit_ids[:20])) == 20


# --- the SFT objective -------------------------------------------------------------------------

def _vqa_doc(tok, vocab):
    return T.render("vqa", {"question": "what color is the circle?", "answer": "red", "image": CODES}, vocab, tok)


def test_response_masked_as_one_span_is_the_inference_infilling_form(tok, vocab):
    doc = _vqa_doc(tok, vocab)
    cfg = MixtureConfig(response_mask_prob=1.0)
    ex = sft_example(doc, vocab, np.random.default_rng(0), cfg)
    p = T.prompt("vqa", {"question": "what color is the circle?", "image": CODES}, vocab, tok)
    resp = doc.tokens[slice(*doc.response)].tolist()
    assert ex.tokens.tolist() == p + resp + [vocab.eoss_id]
    assert invert_cm3(ex, vocab).tolist() == doc.tokens.tolist()
    # loss "all": everything but predicting the in-place <mask:0> and the last position.
    hole = doc.response[0]
    expect = np.ones(len(ex), dtype=np.uint8)
    expect[hole - 1] = 0
    expect[-1] = 0
    assert ex.loss_mask.tolist() == expect.tolist()
    # A response already last stays in place: plain left-to-right.
    t2i = T.render("t2i", {"caption": "a red circle", "image": CODES}, vocab, tok)
    ex = sft_example(t2i, vocab, np.random.default_rng(0), cfg)
    assert ex.tokens.tolist() == t2i.tokens.tolist()


def test_response_only_loss_covers_exactly_the_response(tok, vocab):
    doc = _vqa_doc(tok, vocab)
    resp = doc.tokens[slice(*doc.response)].tolist()
    # Inference form: targets are the response then <eoss>, nothing else.
    ex = sft_example(doc, vocab, np.random.default_rng(0), MixtureConfig(response_mask_prob=1.0, loss_on="response"))
    assert ex.targets[ex.targets != IGNORE_INDEX].tolist() == resp + [vocab.eoss_id]
    # Random CM3 spans: each response token is predicted exactly once wherever it moved, and
    # nothing outside the response except the <eoss> closing a span that ends inside it.
    cfg = MixtureConfig(response_mask_prob=0.0, loss_on="response")
    moved = 0
    for seed in range(60):
        ex = sft_example(doc, vocab, np.random.default_rng(seed), cfg)
        tg = ex.targets[ex.targets != IGNORE_INDEX]
        closing = sum(1 for s, e in ex.spans if doc.response[0] <= e - 1 < doc.response[1])
        assert sorted(tg[tg != vocab.eoss_id].tolist()) == sorted(resp)
        assert int((tg == vocab.eoss_id).sum()) == closing
        assert invert_cm3(ex, vocab).tolist() == doc.tokens.tolist()
        moved += closing
    assert moved > 0  # some seeds did move response tokens into spans
    t2i = T.render("t2i", {"caption": "a red circle", "image": CODES}, vocab, tok)
    ex = sft_example(t2i, vocab, np.random.default_rng(0), MixtureConfig(response_mask_prob=1.0, loss_on="response"))
    assert ex.targets[ex.targets != IGNORE_INDEX].tolist() == _img(vocab, CODES)


def test_random_span_branch_is_the_paper_cm3_objective(tok, vocab):
    from cm3leon.objectives.cm3 import cm3_transform

    doc = _vqa_doc(tok, vocab)
    cfg = MixtureConfig(response_mask_prob=0.0)
    for seed in range(5):
        rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
        rng_b.random()  # the branch draw
        ex = sft_example(doc, vocab, rng_a, cfg)
        ref = cm3_transform(doc.tokens, vocab, rng_b, cfg.cm3)
        assert ex.tokens.tolist() == ref.tokens.tolist() and ex.targets.tolist() == ref.targets.tolist()


def test_mixture_config_rejects_bad_values():
    with pytest.raises(CM3LeonError, match="loss_on"):
        MixtureConfig(loss_on="prompt")
    with pytest.raises(CM3LeonError, match="response_mask_prob"):
        MixtureConfig(response_mask_prob=1.5)
    with pytest.raises(CM3LeonError, match="min_ratio"):
        MixtureConfig(min_ratio=2.0)


# --- end to end --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_model_dir_factory):
    """A tiny "pretrained" model directory (random weights) and a tiny shapes dataset."""
    from cm3leon.data.shapes import synthesize

    root = tmp_path_factory.mktemp("sft")
    data = root / "data"
    synthesize(data, num=40, size=32, seed=0)  # resized to the VQ side (16) on reading
    texts = []
    for name in ("captions.jsonl", "vqa.jsonl", "edits.jsonl", "layouts.jsonl"):
        for line in open(data / name):
            r = json.loads(line)
            texts += [r.get(k, "") for k in ("text", "question", "answer", "instruction", "caption")]
    texts += CORPUS
    model_dir = tiny_model_dir_factory(root / "init", texts, vocab_size=400, min_frequency=2, num_sentinels=8)
    return model_dir, data


def test_tiny_sft_run_lowers_val_loss_and_writes_a_loadable_model(pretrained, tmp_path):
    from cm3leon import CM3Leon
    from cm3leon.sft import run_sft
    from cm3leon.sft.data import build_sft_cache

    init, data = pretrained
    out = tmp_path / "sft"
    summary = run_sft(init, data, out, preset="tiny", steps=25, log_every=5)
    m = summary["sft"]
    assert m["val_loss_after"] < m["val_loss_before"] - 0.5
    assert m["train_loss_after"] < m["train_loss_before"] - 0.5
    assert set(summary["tasks"]) == {"caption", "t2i", "vqa", "edit", "layout"}
    for name in ("config.json", "model.safetensors", "vocab.json", "text_tokenizer/tokenizer.json",
                 "image_tokenizer/config.json", "sft_summary.json"):
        assert (out / name).is_file(), name
    CM3Leon.from_pretrained(out)
    # Each image is encoded once: scenes + edit targets; the cache is reused on a re-run.
    meta = json.loads((out / "sft_data" / "meta.json").read_text())
    assert meta["num_images"] == 80
    assert np.load(out / "sft_data" / "codes.npy").shape == (80, 16)
    stamp = (out / "sft_data" / "codes.npy").stat().st_mtime_ns
    assert build_sft_cache([data], out, init / "image_tokenizer") == out / "sft_data"
    assert (out / "sft_data" / "codes.npy").stat().st_mtime_ns == stamp


def test_sft_reads_user_task_lines_and_skips_bad_ones(pretrained, tmp_path):
    from cm3leon.data.readers import outside_root_allowed
    from cm3leon.sft.data import read_sources

    _, data = pretrained
    lines = [  # image paths relative to the file's folder
        {"task": "vqa", "image": "images/000000.png", "question": "what?", "answer": "red"},
        {"task": "edge2img", "image": "images/000001.png",
         "condition_image": "images/000002.png", "caption": "a cross", "split": "val"},
        {"task": "layout", "image": "images/000000.png", "caption": "c",
         "objects": [{"name": "red circle", "bbox": [0, 0, 16, 16]}]},  # 32 px image
        {"task": "vqa", "image": "x.png", "question": "what?"},  # no answer
        {"task": "juggle", "image": "x.png"},
        {"task": "vqa", "image": str(data / "images/000000.png"), "question": "q", "answer": "a"},  # absolute
        {"task": "vqa", "image": "../elsewhere.png", "question": "q", "answer": "a"},  # climbs out
    ]
    f = data / "mine.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    stats = collections.Counter()
    try:
        recs = read_sources([f], stats=stats)
        with outside_root_allowed(True):
            allowed = read_sources([f])
    finally:
        f.unlink()
    assert [r.task for r in recs] == ["vqa", "edge2img", "layout"]
    assert recs[1].split == "val"
    assert recs[2].text["segmentations"] == "red circle at <0,0,50,50>"
    assert stats["missing_field"] == 1 and stats["unknown_task"] == 1 and stats["outside_root"] == 2
    assert sum(stats.values()) == 5
    assert [r.task for r in allowed] == ["vqa", "edge2img", "layout", "vqa", "vqa"]
    with pytest.raises(CM3LeonError, match="unknown SFT task"):  # checked before any file is read
        read_sources([data], tasks=["juggle"])


def test_vqa_image_reads_the_vqa_records_the_other_way_only_when_asked(pretrained, tok, vocab, tmp_path):
    from cm3leon.sft import run_sft
    from cm3leon.sft.data import folder_tasks, read_sources

    init, data = pretrained
    default = collections.Counter(r.task for r in read_sources([data]))
    assert "vqa_image" not in default and default["vqa"] > 0  # a run that does not ask is as before
    asked = read_sources([data], opt_in=["vqa_image"])
    mirrored = [r for r in asked if r.task == "vqa_image"]
    vqa = [r for r in asked if r.task == "vqa"]
    assert [(r.text, r.images, r.split) for r in mirrored] == [(r.text, r.images, r.split) for r in vqa]
    assert {r.task for r in read_sources([data], tasks=["vqa_image"])} == {"vqa_image"}
    assert "vqa_image" in folder_tasks(data)  # so the pipeline keeps its weight where vqa.jsonl is
    doc = T.render("vqa_image", {"question": "is it red?", "answer": "yes", "image": CODES}, vocab, tok)
    assert doc.response_last and doc.response[1] - doc.response[0] == CODES.size  # the picture is the response
    assert T.prompt("vqa_image", {"question": "is it red?", "answer": "yes"}, vocab, tok) == \
        doc.tokens[:doc.response[0]].tolist()
    # a mixture weight asks for it
    summary = run_sft(init, data, tmp_path / "sft", preset="tiny", steps=2, log_every=1,
                      weights={"vqa": 1.0, "vqa_image": 1.0})
    assert set(summary["tasks"]) >= {"vqa", "vqa_image"}


def test_cli_weights_option_parses_task_shares():
    from cm3leon.sft.cli import _weights

    assert _weights("vqa=2, caption=0.5") == {"vqa": 2.0, "caption": 0.5}
    with pytest.raises(CM3LeonError, match="task=number"):
        _weights("vqa:2")
