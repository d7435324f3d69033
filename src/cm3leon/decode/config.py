"""How text->image is decoded, in one place: `DecodingConfig` (CM3Leon, arXiv:2309.02591,
Sec. 3: TopP, classifier-free guidance, contrastive decoding CD-K, best-of-N re-ranking; Sec. 2:
retrieved documents in the prompt).

Every reader of decoding settings goes through it: the Python API (`CM3Leon.decoding`, one
per model directory), the CLI flags (`add_arguments` / `given`), evaluation and the decoding
sweep, the pipeline presets and the web UI. A model directory may carry `decoding.json` with
the settings it draws best with (`MODEL_KEYS`); the pipeline writes the preset's there, and
any value given to a call, a flag or a sweep overrides it.

    from cm3leon.decode.config import DecodingConfig
    d = DecodingConfig.from_model_dir("runs/demo/sft")      # the paper's defaults + decoding.json
    d = d.replace(method="cdk", temperature=0.7)            # None values keep what is there
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields
from dataclasses import replace as _replace
from pathlib import Path
from typing import Any, Mapping

from cm3leon.decode.guidance import Guidance
from cm3leon.decode.processors import SamplerSettings
from cm3leon.errors import CM3LeonError

IMAGE_METHODS = ("topp", "cfg", "cdk", "best_of_n")
SCORERS = ("auto", "clip", "likelihood")  # how best-of-N ranks its candidates (CM3Leon.rerank)
DECODING_FILE = "decoding.json"
# What a model directory's decoding.json may set: a small tuned model can draw best with another
# method (best-of-N and its N), at another CFG scale, without retrieved documents or with another
# CD-K k than the paper's settings, edit best at other guidance scales, caption best by
# re-ranking several candidates, answer best by ranking several answers, and rank candidates best
# with its own likelihood.
MODEL_KEYS = ("method", "cfg_scale", "temperature", "num_retrieved", "cdk_k", "num_candidates", "image_guidance",
              "text_guidance", "caption_candidates", "edit_candidates", "answer_candidates", "scorer")
EDIT_KEYS = ("image_guidance", "text_guidance")  # editing only; text->image ignores them
# What one task's decoding alone uses, by task: the commands of the other tasks leave their flags out.
TASK_ONLY_KEYS = {"caption": ("caption_candidates",), "edit": (*EDIT_KEYS, "edit_candidates"),
                  "vqa": ("answer_candidates",)}
TASK_ONLY = tuple(k for ks in TASK_ONLY_KEYS.values() for k in ks)  # what text->image commands leave out
MAX_RETRIEVED = 64
MAX_CANDIDATES = 1024
MAX_RANKED_CANDIDATES = 256  # captions / edits / answers per input (each one decoded)


@dataclass(frozen=True)
class DecodingConfig:
    """Text->image decoding. Defaults are the paper's where it gives them."""

    method: str = "cfg"  # topp | cfg (TopP + CFG) | cdk (contrastive, temperature only) | best_of_n
    cfg_scale: float = Guidance.cfg_scale  # CFG alpha (the paper sweeps it; 3 by default)
    temperature: float = 1.0  # 0 = greedy
    top_p: float | None = 0.9  # nucleus mass of TopP (and of TopP+CFG); None = all
    top_k: int | None = None
    cdk_alpha: float = Guidance.cdk_alpha  # CD-K plausibility fraction (paper Eq. 3)
    cdk_k: int = Guidance.cdk_k  # CD-K's k-th best token (the paper gives no k)
    num_candidates: int = 8  # best-of-N: candidates drawn per prompt (half TopP+CFG, half CD-K)
    num_retrieved: int = 2  # documents retrieved into the prompt (paper Sec. 2: k = 2)
    scorer: str = "auto"  # best-of-N's (and captioning's) ranking: auto | clip | likelihood
    # Editing (paper Sec. 5: two-scale guidance, source image 1.5, instruction 7.5); editing
    # samples with this config's temperature and top-p / top-k too.
    image_guidance: float = Guidance.image_scale
    text_guidance: float = Guidance.text_scale
    # Captioning (`CM3Leon.image_to_text`): 1 writes the greedy caption; N > 1 adds N - 1
    # sampled ones and keeps the best by `scorer` (the paper's CLIP re-ranking, Sec. 3, turned
    # to text; the paper does not say how it decodes captions).
    caption_candidates: int = 1
    # Editing (`CM3Leon.edit`): N > 1 draws N edits per pair and keeps the one the model finds
    # most likely given the source image and instruction (`CM3Leon.rank_edits`).
    edit_candidates: int = 1
    # Question answering (`CM3Leon.answer`): N > 1 adds N - 1 sampled answers to the greedy one
    # and keeps the one that agrees best with the picture read both ways (`CM3Leon.answer_scores`:
    # the answer given the picture, and the picture given the question and answer, the VQA
    # template read left to right, which SFT trains as the task `vqa_image`).
    answer_candidates: int = 1

    def __post_init__(self) -> None:
        if self.method not in IMAGE_METHODS:
            raise CM3LeonError(f"method must be one of {IMAGE_METHODS}, got {self.method!r}")
        if self.scorer not in SCORERS:
            raise CM3LeonError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        SamplerSettings(self.temperature, self.top_k, self.top_p)  # their checks, their messages
        Guidance("cfg", cfg_scale=self.cfg_scale, cdk_alpha=self.cdk_alpha, cdk_k=self.cdk_k)  # inf / NaN too
        self.edit_guidance()
        for name, hi in (("num_candidates", MAX_CANDIDATES), ("num_retrieved", MAX_RETRIEVED),
                         ("caption_candidates", MAX_RANKED_CANDIDATES), ("edit_candidates", MAX_RANKED_CANDIDATES),
                         ("answer_candidates", MAX_RANKED_CANDIDATES)):
            v, lo = getattr(self, name), int(name != "num_retrieved")
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise CM3LeonError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")

    # --- building ------------------------------------------------------------------------
    def replace(self, **given: Any) -> "DecodingConfig":
        """A copy with the given fields changed; None values keep the current one (so an
        unset option or flag passes through). Unknown names are refused."""
        unknown = sorted(set(given) - FIELDS)
        if unknown:
            raise CM3LeonError(f"decoding: unknown option(s) {unknown}; expected some of {', '.join(sorted(FIELDS))}")
        given = {k: v for k, v in given.items() if v is not None}
        return _replace(self, **given) if given else self

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, base: "DecodingConfig | None" = None) -> "DecodingConfig":
        """`base` (the paper's defaults) with the model directory's decoding.json applied."""
        return (base or cls()).replace(**read_model_decoding(model_dir))

    def model_defaults(self) -> dict:
        """The part a model directory keeps (`MODEL_KEYS`), as written to decoding.json."""
        return {k: getattr(self, k) for k in MODEL_KEYS}

    def to_dict(self) -> dict:
        return asdict(self)

    # --- what the decoder takes ----------------------------------------------------------
    def sampler(self, method: str | None = None) -> SamplerSettings:
        """TopP (and TopP+CFG) sample with temperature, top-k and top-p; CD-K with the
        temperature only: its plausibility set takes the place of top-p."""
        if (method or self.method) == "cdk":
            return SamplerSettings(self.temperature)
        return SamplerSettings(self.temperature, self.top_k, self.top_p)

    def guidance(self, method: str | None = None) -> Guidance | None:
        """The guidance of `method` (default: this config's): None for plain TopP."""
        method = method or self.method
        if method == "topp":
            return None
        if method == "cdk":
            return Guidance("cdk", cdk_alpha=self.cdk_alpha, cdk_k=self.cdk_k)
        return Guidance("cfg", cfg_scale=self.cfg_scale)

    def edit_guidance(self) -> Guidance:
        """Editing's two-scale guidance (source image, instruction)."""
        return Guidance("edit", image_scale=self.image_guidance, text_scale=self.text_guidance)


FIELDS = frozenset(f.name for f in fields(DecodingConfig))


def check_model_decoding(d: Any, where: str) -> dict:
    """A decoding.json's content, validated: a JSON object with some of `MODEL_KEYS`, each
    in range; errors name `where` (the file or argument) and the field."""
    if not isinstance(d, Mapping):
        raise CM3LeonError(f"{where}: expected a JSON object with some of {list(MODEL_KEYS)}, got {type(d).__name__}")
    unknown = sorted(set(d) - set(MODEL_KEYS))
    if unknown:
        raise CM3LeonError(f"{where}: unknown field(s) {unknown}; known: {list(MODEL_KEYS)}")
    null = [k for k, v in d.items() if v is None]
    if null:
        raise CM3LeonError(f"{where}: {null[0]} must not be null")
    try:
        DecodingConfig().replace(**d)
    except CM3LeonError as e:
        raise CM3LeonError(f"{where}: {e}") from None
    return {k: v if k in ("method", "scorer") else float(v) if k in ("cfg_scale", "temperature", *EDIT_KEYS) else int(v)
            for k, v in d.items()}


def read_model_decoding(model_dir: str | os.PathLike) -> dict:
    """A model directory's decoding.json, validated ({} when it has none)."""
    path = Path(model_dir) / DECODING_FILE
    if not path.is_file():
        return {}
    from cm3leon.utils.io import read_json

    return check_model_decoding(read_json(path, "decoding settings"), str(path))


def write_model_decoding(model_dir: str | os.PathLike, decoding: DecodingConfig) -> Path:
    """Write `decoding`'s `MODEL_KEYS` as the model directory's decoding.json."""
    from cm3leon.utils.io import write_json

    path = Path(model_dir) / DECODING_FILE
    write_json(path, decoding.model_defaults())
    return path


# --- command-line flags -------------------------------------------------------------------
_HELP = {
    "method": f"text->image decoding: {' | '.join(IMAGE_METHODS)}",
    "cfg_scale": "CFG scale alpha",
    "temperature": "sampling temperature (0 = greedy)",
    "top_p": "nucleus mass for TopP / TopP+CFG",
    "top_k": "keep the k best tokens",
    "cdk_alpha": "CD-K plausibility fraction alpha",
    "cdk_k": "CD-K's k (its plausibility threshold is alpha x the k-th best probability)",
    "num_candidates": "best_of_n: candidates per prompt",
    "num_retrieved": "documents retrieved into the prompt",
    "scorer": f"best_of_n's and captioning's ranking: {' | '.join(SCORERS)}",
    "image_guidance": "editing: source-image guidance scale (paper 1.5)",
    "text_guidance": "editing: instruction guidance scale (paper 7.5)",
    "caption_candidates": "captioning: candidates per image, the best kept by --scorer (1 = greedy only)",
    "edit_candidates": "editing: edits drawn per pair, the one the model finds most likely kept",
    "answer_candidates": "VQA: answers per question, the one agreeing best with the picture kept "
                         "(1 = greedy only)",
}


def add_arguments(parser: argparse.ArgumentParser | Any, only: tuple[str, ...] | None = None,
                  skip: tuple[str, ...] = ()) -> None:
    """Add a `--flag` per DecodingConfig field (`only` / `skip` select them). Every default is
    None, meaning "not given": the model directory's decoding.json, then the dataclass's
    default, apply (`given` collects what was given)."""
    defaults = DecodingConfig()
    for f in fields(DecodingConfig):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        default = getattr(defaults, f.name)
        kind = type(default) if default is not None else (int if f.name == "top_k" else float)
        extra = {"choices": IMAGE_METHODS if f.name == "method" else SCORERS} if kind is str else {}
        said = "all" if default is None else default
        said = f"the model's decoding.json, else {said}" if f.name in MODEL_KEYS else said
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                            help=f"{_HELP[f.name]} (default: {said})", **extra)


def given(args: argparse.Namespace) -> dict:
    """The decoding options given on the command line (flags left unset are not included)."""
    return {k: getattr(args, k) for k in sorted(FIELDS) if getattr(args, k, None) is not None}
