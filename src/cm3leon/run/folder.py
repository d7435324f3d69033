"""What the comparisons on a finished pipeline run (`cm3leon ablate`, its "baselines" group)
reuse from it: its preset, dataset, code shards (never re-tokenised), retriever and memory
bank, and a view of the code shards with more retrieved neighbours per record. (The stages'
summaries are read in `cm3leon.run.summaries`.)"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from cm3leon.errors import CM3LeonError
from cm3leon.run.summaries import DONE, PipelineSummary, RunFolder


def run_preset_name(run_dir: str | os.PathLike) -> str:
    """The pipeline preset a run folder was made with (pipeline.json; default "demo")."""
    pipe = PipelineSummary.read(RunFolder(run_dir))
    return (pipe.preset if pipe is not None else None) or "demo"


@dataclass
class RunInputs:
    """What the ablations reuse from a finished pipeline run."""

    run: Path
    data: Path
    codes: Path  # RUN/tokenize
    neighbor_columns: int  # neighbours per record in RUN/tokenize/neighbors.npy (0: none)
    retriever: Path | None  # RUN/retrieval/retriever
    index: Path | None  # RUN/retrieval/index


def run_inputs(run_dir: str | os.PathLike, data: str | os.PathLike | None = None) -> RunInputs:
    """Find the shared stages of a run folder; a clear error names what is missing."""
    import numpy as np

    run = Path(run_dir)
    if not run.is_dir():
        raise CM3LeonError(f"--run: {run} is not a folder")
    codes = run / "tokenize"
    if not (codes / "meta.json").is_file() or not json.loads(
            (codes / "meta.json").read_text(encoding="utf-8")).get("complete"):
        raise CM3LeonError(f"--run: {codes} holds no finished code shards; run `cm3leon pipeline` (or "
                           "`cm3leon demo`) on this folder first")
    if data is None:
        candidates = []
        pipe = PipelineSummary.read(RunFolder(run))
        if pipe is not None and pipe.data:
            candidates += [Path(pipe.data), run.parent / pipe.data]
        meta_data = json.loads((codes / "meta.json").read_text(encoding="utf-8")).get("data")
        if meta_data:
            candidates.append(Path(meta_data))
        candidates.append(run / "data")
        data = next((c for c in candidates if c.exists()), None)
        if data is None:
            raise CM3LeonError(f"--run: the dataset of {run} was not found (tried {', '.join(map(str, candidates))}); "
                               "pass --data DIR")
    data = Path(data)
    if not data.exists():
        raise CM3LeonError(f"--data: {data} does not exist")
    nb = codes / "neighbors.npy"
    cols = int(np.load(nb, mmap_mode="r").shape[1]) if nb.is_file() else 0
    retriever = run / "retrieval" / "retriever"
    index = run / "retrieval" / "index"
    return RunInputs(run, data, codes, cols, retriever if retriever.is_dir() else None,
                     index if (index / "index.json").is_file() else None)


def codes_with_neighbors(inputs: RunInputs, k: int, out: Path, seed: int = 0) -> Path:
    """A code folder with at least k neighbours per record: RUN/tokenize itself when it has
    them, else `out` = a view of its shards (links, nothing re-tokenised) with neighbours
    retrieved again from the run's memory bank with k per record."""
    from cm3leon.retrieval.index import compute_neighbors
    from cm3leon.utils.io import write_json

    if k <= inputs.neighbor_columns:
        return inputs.codes
    if inputs.index is None:
        raise CM3LeonError(f"k={k} retrieved documents need the run's memory bank ({inputs.run / 'retrieval' / 'index'} "
                           "is missing); run the retrieval stage or leave k > 0 out")
    if (out / DONE).is_file() and json.loads((out / DONE).read_text(encoding="utf-8")).get("k") == k:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    src = inputs.codes.resolve()
    for shard in sorted(src.glob("shard-*")):
        try:
            os.symlink(shard, out / shard.name, target_is_directory=True)
        except OSError:  # no symlinks on this filesystem: copy
            shutil.copytree(shard, out / shard.name)
    meta = json.loads((src / "meta.json").read_text(encoding="utf-8"))
    for key in ("image_tokenizer", "text_tokenizer", "data"):  # absolute: the view lives elsewhere
        if meta.get(key):
            p = Path(meta[key])
            meta[key] = str(p.resolve() if p.is_absolute() or p.exists() else (src / p).resolve())
    write_json(out / "meta.json", meta)
    print(f"ablate: retrieving {k} neighbours per record (the run has {inputs.neighbor_columns})", file=sys.stderr)
    compute_neighbors(inputs.index, out, k=k, seed=seed, data=inputs.data)
    write_json(out / DONE, {"k": k, "source": str(src)})
    return out
