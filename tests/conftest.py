"""Shared fixtures: tiny random model directories built in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def build_tiny_model_dir(d: Path, texts: list[str], *, vocab_size: int = 300, min_frequency: int = 1,
                         num_sentinels: int = 16, weight_std: float | None = None, seed: int = 0) -> Path:
    """A complete model directory (config + weights + vocab.json + text_tokenizer/ +
    image_tokenizer/) with a `tiny` transformer, a BPE trained on `texts` and a `tiny` VQ.
    `weight_std` re-draws every transformer weight from N(0, std) so outputs are not near-uniform
    (the paper's init zeroes the output projections)."""
    from cm3leon.model.config import ModelConfig
    from cm3leon.model.transformer import CM3LeonTransformer
    from cm3leon.tokenizers.image import VQModel, get_preset
    from cm3leon.tokenizers.text import TextTokenizer
    from cm3leon.tokenizers.vocab import Vocab

    d = Path(d)
    torch.manual_seed(seed)
    tok = TextTokenizer.train(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    tok.save(d / "text_tokenizer")
    vq = VQModel(get_preset("tiny"))
    vq.save_pretrained(d / "image_tokenizer")
    vocab = Vocab(text_vocab_size=tok.vocab_size, image_vocab_size=vq.config.codebook_size, num_sentinels=num_sentinels)
    vocab.save(d)
    model = CM3LeonTransformer(ModelConfig.from_preset("tiny", vocab_size=vocab.size))
    if weight_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, weight_std)
    model.save_pretrained(d)
    return d


def random_tiny_decoder(vocab_size: int, std: float = 0.3):
    """A `tiny` transformer with every weight drawn from N(0, std), seed 0: random but non-zero
    everywhere (the paper's init zeroes the out-projections), for decoding tests."""
    from cm3leon.model.config import ModelConfig
    from cm3leon.model.transformer import CM3LeonTransformer

    torch.manual_seed(0)
    m = CM3LeonTransformer(ModelConfig.from_preset("tiny", vocab_size=vocab_size)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, std)
    return m


# Texts of every task's shape, for the BPE of the API / UI tests' model directory.
TASK_SENTENCES = [
    "a red circle on a white background",
    "a blue square in the top left corner",
    "two green triangles next to a yellow circle",
    "Question: what colour is the circle? Answer: red.",
    "Edit first image following the instruction make it blue",
] * 4


def build_tiny_run(run: Path, num_images: int = 60) -> Path:
    """A pipeline run folder with the shared stages `cm3leon ablate` reuses, in seconds: 32-px
    shapes data, tokenizers (a random `tiny` VQ), code shards with ONE neighbour per record, a
    random tiny retriever and its memory bank; pipeline.json names the "quick" preset."""
    import json

    from cm3leon.data.shapes import synthesize
    from cm3leon.retrieval.encoder import BiEncoder, BiEncoderConfig, save_bi_encoder
    from cm3leon.retrieval.index import build_index, compute_neighbors
    from cm3leon.tokenizers.image import VQModel, get_preset
    from cm3leon.tokenizers.text import train_text_tokenizer
    from cm3leon.tokenizers.tokenize import tokenize_dataset

    data = run / "data"
    synthesize(data, num=num_images, size=32, max_objects=1)
    train_text_tokenizer(data, run / "text_tokenizer", vocab_size=300)
    torch.manual_seed(0)
    VQModel(get_preset("tiny")).save_pretrained(run / "image_tokenizer")
    tokenize_dataset(data, run / "image_tokenizer", run / "text_tokenizer", run / "tokenize")
    cfg = BiEncoderConfig(image_size=16, embed_dim=8, text_max_bytes=64, text_width=16, text_layers=1, text_heads=2,
                          image_channels=(8, 8), image_pool=2)
    save_bi_encoder(BiEncoder(cfg), run / "retrieval" / "retriever")
    build_index(data, run / "retrieval" / "retriever", run / "retrieval" / "index", codes=run / "tokenize")
    compute_neighbors(run / "retrieval" / "index", run / "tokenize", k=1)
    (run / "pipeline.json").write_text(json.dumps({"data": str(data), "preset": "quick", "stages": {}}))
    return run


@pytest.fixture(scope="module")
def task_model_dir(tmp_path_factory):
    """A tiny model directory whose tokenizer knows every task's words (one per test module)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("model"), TASK_SENTENCES, weight_std=0.2)


@pytest.fixture(scope="session")
def tiny_model_dir_factory():
    return build_tiny_model_dir
