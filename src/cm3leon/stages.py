"""The pipeline's stage functions: each takes (ctx, out_dir) and returns a JSON-able dict.

They only wire the stage modules together with the run's preset; the work is done in the
stage modules themselves."""

from __future__ import annotations

from pathlib import Path

from cm3leon.pipeline import PipelineContext


def text_tokenizer(ctx: PipelineContext, out: Path) -> dict:
    from cm3leon.tokenizers.text import train_text_tokenizer

    return train_text_tokenizer(ctx.data, out, vocab_size="tiny" if ctx.quick else "small")
