"""`cm3leon tokenize`: encode a dataset once into code shards (BPE ids + VQ codes).

Images are tokenized once and every later stage trains on the codes (as LlamaGen and the
paper's pipeline do). The dataset is read unit by unit (a webdataset's .tar shards; a folder
or COCO set is one unit), each unit into its own code shards (`shard-UNIT-CHUNK`, batched
within the unit), so a unit's codes do not depend on the process that made them:
`--workers N` processes, or the ranks of `torchrun --nproc_per_node=N`, each take whole
units, and the directory they write is byte for byte the one a single process writes.

A unit is finished when its `unit-*.json` is written; an interrupted run skips finished
units and resumes a started one after its last complete shard (the reader streams a unit's
records in a fixed order). `meta.json`, written once every unit is finished, merges them."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from cm3leon.errors import CM3LeonError
from cm3leon.utils.io import file_digest, read_json, remove_stale_temporaries, write_json
from cm3leon.utils.logging import progress
from cm3leon.utils.units import barrier_group, check_workers, run_units, torchrun

ARGS_FILE = "tokenize_args.json"
LAYOUT = "shard-UNIT-CHUNK"  # recorded in ARGS_FILE: a directory of another layout is not resumed


@dataclass(frozen=True)
class TokenizeJob:
    """What a process needs to tokenize units of a dataset (picklable, for worker processes)."""

    data: str
    image_tokenizer: str
    text_tokenizer: str
    out: str
    images: str | None
    batch_size: int
    shard_size: int
    device: str


def unit_file(out: str | Path, unit: int) -> Path:
    """The marker of a finished unit (its shards all written)."""
    return Path(out) / f"unit-{unit:05d}.json"


@functools.cache
def _tokenizers(image_tokenizer: str, text_tokenizer: str, device: str):
    from cm3leon.tokenizers.image import VQModel
    from cm3leon.tokenizers.text import TextTokenizer

    return VQModel.from_pretrained(image_tokenizer, device=device), TextTokenizer.load(text_tokenizer)


def tokenize_unit(job: TokenizeJob, unit: int, bar=None) -> dict:
    """Tokenize unit `unit` of the dataset into `shard-UNIT-*`, resuming after its last
    complete shard, and write its `unit-*.json`; returns that file's contents."""
    import torch

    from cm3leon.data.codes import CodeShardWriter
    from cm3leon.data.readers import dataset_units, open_dataset
    from cm3leon.tokenizers.image import images_to_tensor

    vq, tok = _tokenizers(job.image_tokenizer, job.text_tokenizer, job.device)
    writer = CodeShardWriter(job.out, vq.config.grid, vq.config.codebook_size, tok.vocab_size,
                             shard_size=job.shard_size, prefix=f"shard-{unit:05d}-")
    skip = writer.num_done  # records already in complete shards (resume)
    # the whole unit, also under torchrun (the reader would otherwise take this rank's part of it)
    reader = open_dataset(job.data, size=vq.config.resolution, split=None, images=job.images, units=[unit],
                          rank=0, world_size=1)

    def flush(batch) -> None:
        x = images_to_tensor([r.image for r in batch])
        with torch.no_grad():
            codes = vq.encode(x).reshape(len(batch), -1).cpu().numpy()  # (B, h*w)
        ids = tok.encode_batch([r.text for r in batch])
        for r, c, t in zip(batch, codes, ids):
            writer.add(r.key, r.split, r.text, t, c, extra=r.meta)
        if bar is not None:
            bar.update(len(batch))

    batch: list = []
    seen = 0
    for i, rec in enumerate(reader):
        seen = i + 1
        if i < skip:
            continue
        batch.append(rec)
        if len(batch) == job.batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if seen < skip:
        raise CM3LeonError(f"{job.data}: unit {unit} now has fewer records than {job.out} already holds of it "
                           f"({skip}); the dataset changed since the interrupted run: delete the output and "
                           "tokenize again")
    writer.finish()
    info = {"unit": unit, "source": Path(dataset_units(job.data, job.images)[unit]).name,
            "num_records": writer.num_done, "num_shards": len(list(Path(job.out).glob(f"shard-{unit:05d}-*"))),
            "reader_skipped": dict(sorted(reader.stats.items()))}
    write_json(unit_file(job.out, unit), info)
    return info


def _tokenize_units(job: TokenizeJob, units: list[int], workers: int, total: int | None, initial: int) -> None:
    with progress(total=total, desc="tokenize", unit="rec", initial=initial) as bar:
        run_units(functools.partial(tokenize_unit, job), units, workers, bar, count="num_records")


def tokenize_dataset(data: str | Path, image_tokenizer: str | Path, text_tokenizer: str | Path, out: str | Path,
                     batch_size: int = 64, shard_size: int = 4096, images: str | Path | None = None,
                     device: str = "cpu", workers: int = 1) -> dict:
    """Encode every record of `data` (any reader format, all splits) into code shards in `out`.

    `workers` processes (or the ranks of torchrun, one worker each) take whole units; the
    result does not depend on their number. `meta.json` records the absolute paths of both
    tokenizers and of the data, the image size and the reader's skipped-record counts.
    Re-running on an interrupted `out` resumes; on a finished one it returns the existing
    meta. Returns the meta dict."""
    import torch.distributed as dist

    from cm3leon.data.codes import is_complete, write_codes_meta
    from cm3leon.data.readers import detect_format

    if batch_size < 1 or shard_size < 1:
        raise CM3LeonError(f"--batch-size and --shard-size must be >= 1 (got {batch_size}, {shard_size})")
    rank, world = torchrun()
    check_workers(workers, world)
    out = Path(out)
    vq, tok = _tokenizers(str(image_tokenizer), str(text_tokenizer), device)
    args = {
        "image_tokenizer": str(Path(image_tokenizer).resolve()),
        "text_tokenizer": str(Path(text_tokenizer).resolve()),
        "data": str(Path(data).resolve()),
        "image_size": vq.config.resolution,
        # the tokenizers' contents too: one retrained in place makes other codes
        "image_tokenizer_sha256": file_digest(Path(image_tokenizer) / "model.safetensors"),
        "text_tokenizer_sha256": file_digest(Path(text_tokenizer) / "tokenizer.json"),
    }
    if (out / ARGS_FILE).is_file():
        before = read_json(out / ARGS_FILE)
        if {k: before.get(k) for k in args} != args or before.get("shard_size") != shard_size \
                or before.get("layout") != LAYOUT:
            raise CM3LeonError(
                f"{out} holds codes made from other inputs ({before}); use another --out or delete it")
        if is_complete(out):
            return read_json(out / "meta.json")
    elif any(out.glob("shard-*")):
        raise CM3LeonError(f"{out} already holds code shards of unknown origin; use another --out or delete it")

    group = barrier_group(world)
    try:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / ARGS_FILE, {**args, "shard_size": shard_size, "layout": LAYOUT})
            remove_stale_temporaries(out)  # leftovers of an interrupted shard write
        if world > 1:
            dist.barrier()
        fmt = detect_format(data, images)
        units = [str(u) for u in fmt.units()]  # as `dataset_units` lists them
        pending = [u for u in range(len(units)) if not unit_file(out, u).is_file()]
        total = None
        if world == 1 and fmt.format != "webdataset":  # one cheap pass over the captions
            from cm3leon.data.readers import open_dataset

            total = sum(1 for _ in open_dataset(data, size=None, images=images).texts())
        initial = sum(read_json(unit_file(out, u))["num_records"] for u in range(len(units)) if u not in pending)
        job = TokenizeJob(str(data), str(image_tokenizer), str(text_tokenizer), str(out),
                          None if images is None else str(images), batch_size, shard_size, device)
        _tokenize_units(job, pending[rank::world], workers, total, initial)
        if world > 1:
            dist.barrier()
        if rank == 0:
            infos = [read_json(unit_file(out, u), "unit marker") for u in range(len(units))]
            skipped: dict[str, int] = {}
            for info in infos:
                for reason, n in info["reader_skipped"].items():
                    skipped[reason] = skipped.get(reason, 0) + n
            write_codes_meta(out, vq.config.grid, vq.config.codebook_size, tok.vocab_size, {
                **args, "num_units": len(units), "reader_skipped": dict(sorted(skipped.items())),
                "num_skipped": int(sum(skipped.values())), "reader_format": fmt.format})
        if world > 1:
            dist.barrier()
    finally:
        if group:
            dist.destroy_process_group()
    return read_json(out / "meta.json")
