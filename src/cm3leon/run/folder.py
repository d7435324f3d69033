"""Reading a finished (or stopped) pipeline run folder: `RunFolder` (the stages' files by
path, their `.done` markers, the final evaluation), and what the comparisons on a run
(`cm3leon ablate`, its "baselines" group) reuse from it: its preset, dataset, code shards
(never re-tokenised), retriever and memory bank, and a view of the code shards with more
retrieved neighbours per record."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cm3leon.errors import CM3LeonError

DONE = ".done"


def run_preset_name(run_dir: str | os.PathLike) -> str:
    """The pipeline preset a run folder was made with (pipeline.json; default "demo")."""
    f = Path(run_dir) / "pipeline.json"
    if f.is_file():
        return str(json.loads(f.read_text(encoding="utf-8")).get("preset") or "demo")
    return "demo"


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
        pipe = run / "pipeline.json"
        if pipe.is_file():
            d = json.loads(pipe.read_text(encoding="utf-8")).get("data")
            if d:
                candidates += [Path(d), run.parent / d]
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


# ---- reading the stages' files ------------------------------------------------------------


class RunFolder:
    """Read access to a run folder: JSON / JSONL files by relative path (None when absent)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def json(self, *parts: str) -> Any:
        from cm3leon.utils.io import read_json

        p = self.path(*parts)
        if not p.is_file():
            return None
        try:
            return read_json(p)
        except ValueError as e:
            raise CM3LeonError(str(e)) from None

    def jsonl(self, *parts: str) -> list[dict] | None:
        from cm3leon.utils.logging import read_metrics

        p = self.path(*parts)
        return read_metrics(p) if p.is_file() else None

    def find(self, stage: str, name: str) -> Path | None:
        """`stage/name`, or `stage/<sub>/name` one level down (e.g. a model/ subfolder)."""
        d = self.path(stage)
        if (d / name).exists():
            return d / name
        if d.is_dir():
            for sub in sorted(p for p in d.iterdir() if p.is_dir()):
                if (sub / name).exists():
                    return sub / name
        return None

    def done(self, stage: str) -> dict | None:
        """The stage's `.done` marker ({"stage", "seconds", "result"}), None if unfinished."""
        from cm3leon.run.pipeline import DONE

        marker = self.json(stage, DONE)
        return marker if isinstance(marker, dict) else None

    def eval_dir(self, which: str) -> Path | None:
        """eval/<which>/ (which: "sft" or "pretrain") when it holds metrics.json."""
        d = self.path("eval", which)
        return d if (d / "metrics.json").is_file() else None

    def final_eval_dir(self) -> Path | None:
        """The evaluation of the final model: eval/sft, else eval/ itself, else eval/pretrain."""
        for d in (self.path("eval", "sft"), self.path("eval"), self.path("eval", "pretrain")):
            if (d / "metrics.json").is_file():
                return d
        return None


def stage_names() -> list[str]:
    from cm3leon.run.pipeline import STAGES

    return [s.name for s in STAGES]


def eval_metrics(d: Path | None) -> dict:
    from cm3leon.utils.io import read_json

    if d is None:
        return {}
    m = read_json(d / "metrics.json", "evaluation metrics").get("metrics", {})
    return m if isinstance(m, dict) else {}


def number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def relative(run: RunFolder, p: Path) -> str:
    try:
        return str(p.relative_to(run.root))
    except ValueError:
        return str(p)


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}
