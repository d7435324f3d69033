"""The evaluation, task by task (`cm3leon.eval.evaluate.evaluate_model` runs them in order):
`text_to_image` (metrics "shapes", "clip", "fid"), `captioning` ("cider"), `vqa` ("vqa") and
`editing` ("edit"). Each module holds its model-free scorer (`score_*`: generated outputs in,
figures out, so any system's outputs or the real images go through the same path) and a
`run(ctx)` that generates with the model, scores, and adds its results, sample rows and grid
to the shared `TaskContext`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cm3leon.eval.data import EvalData

GRID_MAX = 32  # images per sample grid


@dataclass
class TaskContext:
    """What every task reads (the model, the data, the settings) and writes (results by
    metric, sample rows, files under `out`, the log)."""

    model: Any
    data: EvalData
    source: str  # the dataset as given (for notes)
    out: Path
    metrics: list[str]
    decoding: Any  # text->image settings: a DecodingConfig, or the options of a model of another kind
    seed: int
    batch_size: int
    num: int | None  # items per task
    size: int | None  # the model's image resolution
    retriever: Any = None  # scores CLIP score and FD features
    fid_features: str = "retriever"
    log: Any = None
    results: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)
    seconds_per_image: float | None = None  # text->image generation alone

    def skip(self, metric: str, why: str) -> None:
        self.results[metric] = {"skipped": why}


def save_png(image, path: Path) -> None:
    from cm3leon.utils.io import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def with_options(fn: Callable, **options) -> Callable:
    """`fn` with those of `options` its signature takes (every one when it takes **kwargs): a
    model of another kind, or a stand-in, may not take a run's decoding options."""
    import functools
    import inspect

    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        options = {k: v for k, v in options.items() if k in params}
    return functools.partial(fn, **options) if options else fn


def batched(fn: Callable, columns: Sequence[Sequence], batch_size: int, desc: str, seed: int) -> list:
    """`fn` (a task method taking lists) over the columns, `batch_size` rows per call; batch b uses seed + b."""
    from cm3leon.utils.logging import progress

    n = len(columns[0])
    out: list = []
    with progress(total=n, desc=desc, unit="item") as bar:
        for b, i in enumerate(range(0, n, batch_size)):
            out += fn(*[list(c[i:i + batch_size]) for c in columns], seed=seed + b)
            bar.update(min(batch_size, n - i))
    return out
