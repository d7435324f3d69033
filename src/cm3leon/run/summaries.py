"""What a run's stages wrote, read one way: `RunFolder` (the run folder's files by path) and one
frozen dataclass per summary file that the report, the quality bar and RUN/metrics.json use,
each with a `read` that gives None when the stage has not written it (not run, or stopped).

A field is checked as it is read: one of the wrong type is a CM3LeonError naming the file and
the field (`eval/sft/metrics.json: metrics.vqa.vqa_accuracy must be a number, got 'high'`). An
absent or null field reads as None (runs of older versions lack some), and a number stays as
it was written (an int stays an int: the tables print them as they are)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from cm3leon.errors import CM3LeonError

DONE = ".done"  # a finished stage's marker, written by the pipeline (`StageDone`)


class RunFolder:
    """A run folder's files by relative path (None when absent)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def json(self, *parts: str) -> Any:
        """A JSON file as written (RUN/metrics.json copies the stages' files whole)."""
        from cm3leon.utils.io import read_json

        p = self.path(*parts)
        return read_json(p) if p.is_file() else None

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


def number(v: Any) -> float | None:
    return float(v) if _is_number(v) else None


def relative(run: RunFolder, p: Path) -> str:
    try:
        return str(p.relative_to(run.root))
    except ValueError:
        return str(p)


# ---- a JSON object's fields, checked as they are read ----------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


class _Fields:
    """The fields of a JSON object read from `where`; `prefix` names the enclosing fields."""

    def __init__(self, d: dict, where: str, prefix: str = ""):
        self._d, self._where, self._prefix = d, where, prefix

    def __bool__(self) -> bool:  # an empty object reads like an absent one
        return bool(self._d)

    def _bad(self, name: str, kind: str, v: Any) -> CM3LeonError:
        return CM3LeonError(f"{self._where}: {self._prefix}{name} must be {kind}, got {_short(v)}")

    def _item(self, name: str, v: Any, ok: Callable[[Any], bool], kind: str) -> Any:
        if not ok(v):
            raise self._bad(name, kind, v)
        return v

    def _get(self, key: str, ok: Callable[[Any], bool], kind: str) -> Any:
        v = self._d.get(key)
        return None if v is None else self._item(key, v, ok, kind)

    def number(self, key: str) -> float | None:
        return self._get(key, _is_number, "a number")

    def text(self, key: str) -> str | None:
        return self._get(key, lambda v: isinstance(v, str), "a string")

    def flag(self, key: str) -> bool | None:
        return self._get(key, lambda v: isinstance(v, bool), "true or false")

    def obj(self, key: str) -> _Fields | None:
        d = self._get(key, lambda v: isinstance(v, dict), "an object")
        return None if d is None else _Fields(d, self._where, f"{self._prefix}{key}.")

    def raw_obj(self, key: str) -> dict | None:
        """An object whose content is free-form (a stage's result, a metric's breakdowns)."""
        return self._get(key, lambda v: isinstance(v, dict), "an object")

    def objs(self, key: str) -> dict[str, _Fields]:
        """An object of objects ({} when absent), in the file's order."""
        d = self.obj(key)
        return {} if d is None else {k: d.obj(k) for k in d._d if d._d[k] is not None}

    def numbers(self, key: str) -> dict[str, float] | None:
        """An object of numbers, in the file's order."""
        d = self.obj(key)
        return None if d is None else {k: d._item(k, v, _is_number, "a number") for k, v in d._d.items()}

    def prefixed(self, prefix: str) -> dict[str, float]:
        """The number fields named `prefix` + suffix, as {suffix: value}, in the file's order."""
        return {k[len(prefix):]: self._item(k, v, _is_number, "a number")
                for k, v in self._d.items() if k.startswith(prefix)}

    def _list(self, key: str, ok: Callable[[Any], bool], kind: str) -> tuple | None:
        items = self._get(key, lambda v: isinstance(v, list), "a list")
        return None if items is None else tuple(self._item(f"{key}[{i}]", v, ok, kind) for i, v in enumerate(items))

    def texts(self, key: str) -> tuple[str, ...]:
        return self._list(key, lambda v: isinstance(v, str), "a string") or ()

    def number_list(self, key: str) -> tuple[float, ...]:
        return self._list(key, _is_number, "a number") or ()

    def rows(self, key: str) -> tuple[dict, ...] | None:
        """A list of table rows (objects whose fields are the table's columns)."""
        return self._list(key, lambda v: isinstance(v, dict), "an object")


_EMPTY = _Fields({}, "")  # an absent object: every field reads as None


def _read(path: Path) -> _Fields | None:
    """The JSON object in `path`, None when there is no such file."""
    from cm3leon.utils.io import read_json

    if not path.is_file():
        return None
    d = read_json(path)
    if not isinstance(d, dict):
        raise CM3LeonError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return _Fields(d, str(path))


# ---- the pipeline ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageDone:
    """RUN/<stage>/.done: written by the pipeline when the stage finished."""

    path: Path
    seconds: float | None  # the stage's own time
    result: dict  # what the stage function returned (its summary; {} for the data stage)

    @classmethod
    def read(cls, run: RunFolder, stage: str) -> StageDone | None:
        """None: the stage has not finished (or has not run)."""
        path = run.path(stage, DONE)
        f = _read(path)
        return None if f is None else cls(path, f.number("seconds"), f.raw_obj("result") or {})


@dataclass(frozen=True)
class StageRecord:
    """One stage's entry in pipeline.json."""

    status: str | None = None  # "done", "skipped (already done)", ...
    seconds: float | None = None


@dataclass(frozen=True)
class PipelineSummary:
    """RUN/pipeline.json: written by `cm3leon pipeline` after every stage of a pass."""

    FILE: ClassVar[str] = "pipeline.json"
    data: str | None = None  # the dataset folder, as given to the pipeline
    preset: str | None = None
    quick: bool | None = None
    seconds: float | None = None  # the last pass, all its stages
    stages: dict[str, StageRecord] = field(default_factory=dict)  # the stages of the last pass

    @property
    def label(self) -> str:
        """The preset as the report names it."""
        name = self.preset or "?"
        return f"{name} (quick)" if self.quick and name != "quick" else name

    @classmethod
    def read(cls, run: RunFolder) -> PipelineSummary | None:
        f = _read(run.path(cls.FILE))
        if f is None:
            return None
        return cls(f.text("data"), f.text("preset"), f.flag("quick"), f.number("seconds"),
                   {name: StageRecord(s.text("status"), s.number("seconds")) for name, s in f.objs("stages").items()})


# ---- data and tokenizers -----------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSummary:
    """DATA/dataset.json: written by `cm3leon.data.shapes.synthesize` (the shapes data)."""

    NAME: ClassVar[str] = "dataset.json"
    name: str | None
    num: int | None  # images
    size: int | None  # image side, px
    max_objects: int | None  # per scene
    splits: dict[str, int] | None  # images per split

    @classmethod
    def read(cls, data_dir: Path) -> DatasetSummary | None:
        f = _read(data_dir / cls.NAME)
        if f is None:
            return None
        return cls(f.text("name"), f.number("num"), f.number("size"), f.number("max_objects"), f.numbers("splits"))


@dataclass(frozen=True)
class TextTokenizerSummary:
    """The text tokenizer stage's result in its .done marker (`train_text_tokenizer`'s summary)."""

    vocab_size: int | None
    tokens_per_caption: float | None

    @classmethod
    def read(cls, run: RunFolder) -> TextTokenizerSummary | None:
        done = StageDone.read(run, "text_tokenizer")
        if done is None:
            return None
        f = _Fields(done.result, str(done.path), "result.")
        return cls(f.number("vocab_size"), f.number("tokens_per_caption"))


@dataclass(frozen=True)
class ImageTokenizerSummary:
    """RUN/image_tokenizer/metrics.json: the VQ tokenizer measured on held-out images
    (`cm3leon.tokenizers.image_train`)."""

    FILE: ClassVar[tuple[str, ...]] = ("image_tokenizer", "metrics.json")
    psnr_db: float | None
    val_l1: float | None  # pixels in [0, 1]
    codebook_usage: float | None
    codes_used: int | None
    codebook_size: int | None
    perplexity: float | None  # of the codes used
    tokens_per_image: int | None
    checker_recovered: float | None  # objects the shapes checker finds exactly after encode -> decode
    checker_recovered_colour_shape: float | None  # ... by colour and shape
    checker_recovered_colour_cell: float | None  # ... by colour and cell
    num_eval_images: int | None
    eval_split: str | None
    steps: int | None
    train_time_s: float | None
    parameters: int | None

    @classmethod
    def read(cls, run: RunFolder) -> ImageTokenizerSummary | None:
        f = _read(run.path(*cls.FILE))
        if f is None:
            return None
        return cls(eval_split=f.text("eval_split"), **{k: f.number(k) for k in (
            "psnr_db", "val_l1", "codebook_usage", "codes_used", "codebook_size", "perplexity", "tokens_per_image",
            "checker_recovered", "checker_recovered_colour_shape", "checker_recovered_colour_cell",
            "num_eval_images", "steps", "train_time_s", "parameters")})


# ---- retrieval ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrieverSummary:
    """The bi-encoder's recall on held-out pairs and its training (`cm3leon.retrieval.train`):
    RUN/retrieval/retriever/metrics.json, else a metrics.json one level down in retrieval/."""

    FILE: ClassVar[tuple[str, ...]] = ("retrieval", "retriever", "metrics.json")
    text_to_image_recall: dict[str, float]  # k -> recall@k, in the file's order
    image_to_text_recall: dict[str, float]
    num_pairs: int | None
    eval_split: str | None
    first_loss: float | None
    final_loss: float | None
    temperature: float | None
    steps: int | None
    train_seconds: float | None

    @classmethod
    def read(cls, run: RunFolder) -> RetrieverSummary | None:
        path = run.path(*cls.FILE)
        f = _read(path if path.is_file() else run.find("retrieval", "metrics.json") or path)
        if f is None:
            return None
        return cls(f.prefixed("text_to_image_recall@"), f.prefixed("image_to_text_recall@"),
                   eval_split=f.text("eval_split"), **{k: f.number(k) for k in (
                       "num_pairs", "first_loss", "final_loss", "temperature", "steps", "train_seconds")})


@dataclass(frozen=True)
class NeighborsSummary:
    """RUN/tokenize/neighbors.json: the documents retrieved for every record once
    (`cm3leon.retrieval.index.compute_neighbors`)."""

    FILE: ClassVar[tuple[str, ...]] = ("tokenize", "neighbors.json")
    k: int | None  # documents per record
    num_records: int | None
    rows_with_k: int | None  # records with all k
    skipped: dict[str, int]  # candidates passed over, by reason

    @classmethod
    def read(cls, run: RunFolder) -> NeighborsSummary | None:
        f = _read(run.path(*cls.FILE))
        if f is None:
            return None
        return cls(f.number("k"), f.number("num_records"), f.number("rows_with_k"), f.numbers("skipped") or {})


# ---- training ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSummary:
    """<stage>/train_summary.json (pretrain, sft; or a model/ folder one level down): written by
    the training loop (`cm3leon.train.loop.train`)."""

    NAME: ClassVar[str] = "train_summary.json"
    path: Path
    steps: int | None
    tokens_seen: int | None
    tokens_per_second: float | None
    train_seconds: float | None
    num_parameters: int | None
    final_train_loss: float | None
    final_val_loss: float | None
    device: str | None

    @classmethod
    def read(cls, run: RunFolder, stage: str) -> TrainSummary | None:
        path = run.find(stage, cls.NAME)
        f = _read(path) if path is not None else None
        if f is None:
            return None
        return cls(path, device=f.text("device"), **{k: f.number(k) for k in (
            "steps", "tokens_seen", "tokens_per_second", "train_seconds", "num_parameters", "final_train_loss",
            "final_val_loss")})


@dataclass(frozen=True)
class SFTSummary:
    """sft/sft_summary.json (or one level down): the loss on fixed batches before and after
    instruction tuning (`cm3leon.sft.cli.run_sft`; flat, or under "sft")."""

    NAME: ClassVar[str] = "sft_summary.json"
    path: Path
    train_loss_before: float | None
    train_loss_after: float | None
    val_loss_before: float | None
    val_loss_after: float | None

    @classmethod
    def read(cls, run: RunFolder) -> SFTSummary | None:
        path = run.find("sft", cls.NAME)
        f = _read(path) if path is not None else None
        if f is None:
            return None
        f = f.obj("sft") or f
        return cls(path, **{k: f.number(k) for k in ("train_loss_before", "train_loss_after", "val_loss_before",
                                                      "val_loss_after")})


# ---- generation and evaluation -----------------------------------------------------------------


@dataclass(frozen=True)
class MethodAccuracy:
    """One decoding method's samples in generate/summary.json."""

    n: int | None  # prompts
    accuracy_both: float | None  # colour and shape right, by the shapes checker (shapes data only)


@dataclass(frozen=True)
class GenerateSummary:
    """RUN/generate/summary.json: the fixed prompts drawn with every decoding method
    (`cm3leon.run.stages.generate`)."""

    FILE: ClassVar[tuple[str, ...]] = ("generate", "summary.json")
    methods: dict[str, MethodAccuracy]  # in the order drawn

    @classmethod
    def read(cls, run: RunFolder) -> GenerateSummary | None:
        f = _read(run.path(*cls.FILE))
        if f is None:
            return None
        return cls({m: MethodAccuracy(e.number("n"), e.number("accuracy_both")) for m, e in f.objs("methods").items()})


@dataclass(frozen=True)
class ShapesFigures:
    """Text->image prompts with colour and shape right, by the shapes checker (a group of prompts)."""

    both: float | None = None
    colour: float | None = None
    shape: float | None = None
    n: int | None = None

    @classmethod
    def of(cls, f: _Fields | None) -> ShapesFigures:
        return cls() if f is None else cls(f.number("both"), f.number("colour"), f.number("shape"), f.number("n"))


@dataclass(frozen=True)
class CaptionFigures:
    """Captioning: CIDEr-D and BLEU-4, and with shapes truths the checker's verdict on the captions."""

    cider_d: float | None = None
    bleu_4: float | None = None
    correct: float | None = None  # captions naming the right objects (colours and shapes)
    colour: float | None = None
    shape: float | None = None
    checked: int | None = None  # captions the checker judged
    skipped: str | None = None  # why the metric was not measured

    @classmethod
    def of(cls, f: _Fields | None) -> CaptionFigures:
        if f is None:
            return cls()
        s = f.obj("shapes") or _EMPTY
        return cls(f.number("CIDEr-D"), f.number("BLEU-4"), s.number("correct"), s.number("colour"),
                   s.number("shape"), s.number("n"), f.text("skipped"))


@dataclass(frozen=True)
class VQAKind:
    accuracy: float | None  # VQAv2 accuracy, percent
    n: int | None


@dataclass(frozen=True)
class VQAFigures:
    accuracy: float | None = None  # VQAv2 accuracy, percent
    n: int | None = None
    by_type: dict[str, VQAKind] = field(default_factory=dict)  # question kind -> its figures
    skipped: str | None = None

    @classmethod
    def of(cls, f: _Fields | None) -> VQAFigures:
        if f is None:
            return cls()
        return cls(f.number("vqa_accuracy"), f.number("n"),
                   {t: VQAKind(v.number("vqa_accuracy"), v.number("n")) for t, v in f.objs("by_type").items()},
                   f.text("skipped"))


@dataclass(frozen=True)
class EditFigures:
    done_rate: float | None = None  # edits the checker finds done
    do_nothing_baseline: float | None = None  # the same rate for the unedited source image
    skipped: str | None = None
    n: int | None = None  # edits judged

    @classmethod
    def of(cls, f: _Fields | None) -> EditFigures:
        return cls() if f is None else cls(f.number("done_rate"), f.number("do_nothing_baseline"), f.text("skipped"),
                                           f.number("n"))


@dataclass(frozen=True)
class Evaluation:
    """eval/<which>/metrics.json: a model evaluated (`cm3leon.eval.evaluate.evaluate_model`), with
    the figures the run reads typed; `metrics` keeps every metric as written (its headline
    table is `cm3leon.eval.evaluate.headline_rows`)."""

    NAME: ClassVar[str] = "metrics.json"
    dir: Path
    decoding_method: str | None  # text->image decoding
    metrics: dict
    text_to_image: ShapesFigures  # every prompt
    single_object: ShapesFigures | None  # prompts with one object, where the figures say so
    captions: CaptionFigures
    vqa: VQAFigures
    edit: EditFigures
    # prompts drawn as an exact scene (every object's colour and shape, nothing more), by number
    # of objects in the prompt: {k: (share, n)}, where the figures say so
    exact_scenes: dict[int, tuple[float, int]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.dir / self.NAME

    @classmethod
    def read(cls, d: Path) -> Evaluation | None:
        f = _read(d / cls.NAME)
        if f is None:
            return None
        m = f.obj("metrics") or _EMPTY
        shapes = m.obj("shapes")
        one = shapes.obj("by_num_objects") if shapes is not None else None
        one = one.obj("1") if one is not None else None
        scene = shapes.obj("scene") if shapes is not None else None
        exact = {}
        for k, g in (scene.objs("by_num_objects") if scene is not None else {}).items():
            share, n = g.number("exact_scene"), g.number("n")
            if k.isdigit() and share is not None and n:
                exact[int(k)] = (share, int(n))
        return cls(d, (f.obj("decoding") or _EMPTY).text("method"), f.raw_obj("metrics") or {},
                   ShapesFigures.of(shapes), ShapesFigures.of(one) if one else None, CaptionFigures.of(m.obj("cider")),
                   VQAFigures.of(m.obj("vqa")), EditFigures.of(m.obj("edit")), exact)


def pretrained_evaluation(run: RunFolder) -> Evaluation | None:
    """The pretrained model's evaluation (eval/pretrain), run to show what SFT changed."""
    return Evaluation.read(run.path("eval", "pretrain"))


def final_evaluation(run: RunFolder) -> Evaluation | None:
    """The evaluation of the final model: eval/sft, else eval/ itself, else eval/pretrain."""
    for d in (run.path("eval", "sft"), run.path("eval"), run.path("eval", "pretrain")):
        if (d / Evaluation.NAME).is_file():
            return Evaluation.read(d)
    return None


@dataclass(frozen=True)
class SweepSummary:
    """eval/<name>/sweep.json (name: sweep, after SFT; sweep_pretrain, before): decoding settings on
    the same prompts and seeds (`cm3leon.eval.sweep.sweep_decoding`). `rows` are its table, one
    per setting, read by `cm3leon.eval.sweep`'s `spread_rows` and `with_spread`."""

    NAME: ClassVar[str] = "sweep.json"
    dir: Path
    rows: tuple[dict, ...]
    metrics: tuple[str, ...]  # the figures measured per setting
    seeds: tuple[int | None, ...]  # sampling seeds (one: no spread)
    num_prompts: int | None
    scorer: str | None  # best-of-N's re-ranker (None: the shapes checker)
    plots: tuple[str, ...]  # PNG files in `dir`
    notes: tuple[str, ...]

    @classmethod
    def read(cls, run: RunFolder, name: str = "sweep") -> SweepSummary | None:
        d = run.path("eval", name)
        f = _read(d / cls.NAME)
        if f is None:
            return None
        return cls(d, f.rows("rows") or (), f.texts("metrics"), f.number_list("seeds") or (f.number("seed"),),
                   f.number("num_prompts"), f.text("scorer"), f.texts("plots"), f.texts("notes"))


# ---- the run's headline, ablations and baselines -----------------------------------------------


@dataclass(frozen=True)
class RunMetrics:
    """RUN/metrics.json: the run's headline numbers with the quality bar, written by the eval
    stage (`cm3leon.run.stages.run_metrics`; it copies the stages' summaries in whole)."""

    FILE: ClassVar[str] = "metrics.json"
    preset: str | None
    quality_bar: tuple[dict, ...]  # `quality_bar_checks` as the eval stage judged it

    @classmethod
    def read(cls, run: RunFolder) -> RunMetrics | None:
        f = _read(run.path(cls.FILE))
        return None if f is None else cls(f.text("preset"), f.rows("quality_bar") or ())


@dataclass(frozen=True)
class AblationResults:
    """RUN/ablate/results.json: one row per ablation variant (`cm3leon.run.ablate`)."""

    FILE: ClassVar[tuple[str, ...]] = ("ablate", "results.json")
    rows: tuple[dict, ...]

    @classmethod
    def read(cls, run: RunFolder) -> AblationResults | None:
        f = _read(run.path(*cls.FILE))
        return None if f is None else cls(f.rows("rows") or ())


@dataclass(frozen=True)
class BaselinesSummary:
    """RUN/ablate/baselines/metrics.json: the same-budget baselines (`cm3leon.run.baselines`)."""

    FILE: ClassVar[tuple[str, ...]] = ("ablate", "baselines", "metrics.json")
    dir: Path
    rows: tuple[dict, ...]  # one per model and budget (`cm3leon.run.baselines.COLUMNS`)
    train_flops: float | None  # CM3Leon's budgets
    train_seconds: float | None
    notes: tuple[str, ...]
    plots: tuple[str, ...]  # PNG files in `dir`

    @classmethod
    def read(cls, run: RunFolder) -> BaselinesSummary | None:
        path = run.path(*cls.FILE)
        f = _read(path)
        rows = f.rows("rows") if f is not None else None
        if rows is None:
            return None
        budgets = f.obj("budgets") or _EMPTY
        return cls(path.parent, rows, budgets.number("train_flops"), budgets.number("train_seconds"),
                   f.texts("notes"), f.texts("plots"))
