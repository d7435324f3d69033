"""`cm3leon tokenize`: encode a dataset once into code shards (BPE ids + VQ codes).

Images are tokenized once and every later stage trains on the codes (as LlamaGen and the
paper's pipeline do). The reader streams records in a deterministic order, so an interrupted
run resumes by skipping the records already committed to complete shards."""

from __future__ import annotations

from pathlib import Path

from cm3leon.errors import CM3LeonError
from cm3leon.utils.io import file_digest, read_json, remove_stale_temporaries, write_json
from cm3leon.utils.logging import progress

ARGS_FILE = "tokenize_args.json"


def tokenize_dataset(data: str | Path, image_tokenizer: str | Path, text_tokenizer: str | Path, out: str | Path,
                     batch_size: int = 64, shard_size: int = 4096, images: str | Path | None = None,
                     device: str = "cpu") -> dict:
    """Encode every record of `data` (any reader format, all splits) into code shards in `out`.

    `meta.json` records the absolute paths of both tokenizers and of the data, the image size
    and the reader's skipped-record counts. Re-running on an interrupted `out` resumes; on a
    finished one it returns the existing meta. Returns the meta dict."""
    import torch

    from cm3leon.data.codes import CodeShardWriter, is_complete
    from cm3leon.data.readers import open_dataset
    from cm3leon.tokenizers.image import VQModel, images_to_tensor
    from cm3leon.tokenizers.text import TextTokenizer

    if batch_size < 1 or shard_size < 1:
        raise CM3LeonError(f"--batch-size and --shard-size must be >= 1 (got {batch_size}, {shard_size})")
    out = Path(out)
    vq = VQModel.from_pretrained(image_tokenizer, device=device)
    tok = TextTokenizer.load(text_tokenizer)
    res = vq.config.resolution
    args = {
        "image_tokenizer": str(Path(image_tokenizer).resolve()),
        "text_tokenizer": str(Path(text_tokenizer).resolve()),
        "data": str(Path(data).resolve()),
        "image_size": res,
        # the tokenizers' contents too: one retrained in place makes other codes
        "image_tokenizer_sha256": file_digest(Path(image_tokenizer) / "model.safetensors"),
        "text_tokenizer_sha256": file_digest(Path(text_tokenizer) / "tokenizer.json"),
    }
    if (out / ARGS_FILE).is_file():
        before = read_json(out / ARGS_FILE)
        if {k: before.get(k) for k in args} != args or before.get("shard_size") != shard_size:
            raise CM3LeonError(
                f"{out} holds codes made from other inputs ({before}); use another --out or delete it")
        if is_complete(out):
            return read_json(out / "meta.json")
    elif any(out.glob("shard-*")):
        raise CM3LeonError(f"{out} already holds code shards of unknown origin; use another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / ARGS_FILE, {**args, "shard_size": shard_size})
    remove_stale_temporaries(out)  # leftovers of an interrupted shard write

    writer = CodeShardWriter(out, vq.config.grid, vq.config.codebook_size, tok.vocab_size,
                             shard_size=shard_size, extra_meta=args)
    skip = writer.num_done  # records already in complete shards (resume)
    reader = open_dataset(data, size=res, split=None, images=images)
    total = sum(1 for _ in open_dataset(data, size=None, images=images).texts()) if reader.format != "webdataset" else None

    def flush(batch) -> None:
        x = images_to_tensor([r.image for r in batch])
        with torch.no_grad():
            codes = vq.encode(x).reshape(len(batch), -1).cpu().numpy()  # (B, h*w)
        ids = tok.encode_batch([r.text for r in batch])
        for r, c, t in zip(batch, codes, ids):
            writer.add(r.key, r.split, r.text, t, c, extra=r.meta)

    batch: list = []
    seen = 0
    bar = progress(total=total, desc="tokenize", unit="rec", initial=min(skip, total or skip))
    try:
        for i, rec in enumerate(reader):
            seen = i + 1
            if i < skip:
                continue
            batch.append(rec)
            if len(batch) == batch_size:
                flush(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            flush(batch)
            bar.update(len(batch))
    finally:
        bar.close()
    if seen < skip:
        raise CM3LeonError(f"{data}: the dataset now has fewer records than {out} already holds ({skip}); "
                           "it changed since the interrupted run: delete the output and tokenize again")
    writer.extra_meta.update({
        "reader_skipped": dict(sorted(reader.stats.items())),
        "num_skipped": int(sum(reader.stats.values())),
        "reader_format": reader.format,
    })
    return writer.close()
