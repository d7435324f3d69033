"""The Python API: `CM3Leon.from_pretrained(dir)` and one method per task.

    from cm3leon import CM3Leon
    m = CM3Leon.from_pretrained("runs/demo/sft/model")
    img = m.text_to_image("a red circle", method="cfg", cfg_scale=3.0, seed=0)
    text = m.image_to_text(img)
    ans = m.answer(img, "what colour is the shape?")
    out = m.edit(img, "make it blue")

Prompt layouts are documented in `cm3leon.decode.tasks`; decoding in `cm3leon.decode`.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from cm3leon.decode.generate import generate
from cm3leon.decode.guidance import Guidance
from cm3leon.decode.processors import ImageConstraint, ImageInfillConstraint, SamplerSettings, TextConstraint
from cm3leon.decode.rerank import rank, sequence_logprob, split_methods
from cm3leon.decode.tasks import Document, PromptBuilder, TaskPrompt, box_to_region
from cm3leon.errors import CM3LeonError

IMAGE_METHODS = ("topp", "cfg", "cdk", "best_of_n")
SCORERS = ("auto", "clip", "likelihood")  # best-of-N re-ranking (CM3Leon.rerank)
DEFAULT_NUM_RETRIEVED = 2  # documents retrieved into a text->image prompt (paper Sec. 2: k = 2)
DEFAULT_CFG_SCALE = Guidance("cfg").cfg_scale  # when neither the call nor the model directory says
# A model directory may recommend its text->image decoding in decoding.json (the pipeline
# writes the preset's, chosen by its own sweep: a small tuned model draws best at a lower CFG
# scale and without retrieved documents); arguments given to a call override it.
DECODING_FILE = "decoding.json"
DECODING_KEYS = {"cfg_scale": (0.0, 100.0), "num_retrieved": (0, 64), "cdk_k": (1, 1 << 20)}

# What each part of a model directory is, for error messages.
REQUIRED_FILES = (
    ("config.json", "the transformer config"),
    ("model.safetensors", "the transformer weights"),
    ("vocab.json", "the unified vocabulary layout"),
    ("text_tokenizer/tokenizer.json", "the text (BPE) tokenizer"),
    ("image_tokenizer/config.json", "the image (VQ) tokenizer config"),
    ("image_tokenizer/model.safetensors", "the image (VQ) tokenizer weights"),
)


@dataclass
class ImageSample:
    """A generated image with everything needed to reproduce and rank it."""

    image: Any  # PIL.Image
    codes: list[int]
    prompt: str
    method: str
    seed: int
    index: int  # row of the batch drawn with `seed`
    settings: dict
    score: float | None = None
    scorer: str | None = None
    truncated_tokens: int = 0
    retrieved: list[str] = field(default_factory=list)  # keys of the retrieved documents

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt, "method": self.method, "seed": self.seed, "index": self.index,
            "settings": self.settings, "score": self.score, "scorer": self.scorer,
            "truncated_tokens": self.truncated_tokens, "retrieved": self.retrieved,
        }


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise CM3LeonError(f"dtype must be one of {sorted(names)} or a torch.dtype, got {dtype!r}")
    return names[dtype]


MAX_SAMPLES = 256  # n (images or edits) per call: the batch that is decoded at once
MAX_SEED = 2**63 - 1


def _new_seed(seed: int | None) -> int:
    if seed is None:
        return random.SystemRandom().randrange(2**31 - 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise CM3LeonError(f"seed must be an integer in [0, 2**63 - 1] or None, got {seed!r}")
    return int(seed)


def _check_n(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
        raise CM3LeonError(f"n must be an integer in [1, {MAX_SAMPLES}], got {n!r}")


def _array_to_uint8(a: np.ndarray) -> np.ndarray:
    """An image array as uint8, by its dtype: uint8 as is, other integers by their type's
    range (uint16 / uint32 scaled down; signed types must hold 0..255), floats in [0, 1]."""
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind == "b":
        raise CM3LeonError("image array is boolean: give uint8 (0..255) or floats in [0, 1]")
    if a.dtype.kind == "u":
        top = np.iinfo(a.dtype).max
        return (a.astype(np.float64) * (255.0 / top)).round().astype(np.uint8)
    if a.dtype.kind == "i":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise CM3LeonError(f"image array of {a.dtype} must hold values 0..255, got {lo}..{hi}")
        return a.astype(np.uint8)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise CM3LeonError("image array holds NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:
            raise CM3LeonError(f"image array of floats must hold values in [0, 1], got {lo:g}..{hi:g}")
        return (a.astype(np.float64) * 255).round().astype(np.uint8)
    raise CM3LeonError(f"image array of dtype {a.dtype} is not an image: give uint8 or floats in [0, 1]")


def prepare_image(image, resolution: int):
    """Any PIL image / path / HxWxC uint8 array -> RGB PIL image `resolution` px square
    (centre-cropped to a square, then resized with bicubic filtering)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        if not p.is_file():
            raise CM3LeonError(f"image file not found: {p}")
        from cm3leon.data.readers import SkipRecord, load_image

        try:  # the dataset readers' loader: regular files only, size and pixel caps, named reasons
            image = load_image(p, size=None)
        except SkipRecord as e:
            raise CM3LeonError(f"{p}: not a usable image ({e})") from None
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or image.size == 0 or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise CM3LeonError(f"image array must be HxW or HxWxC with C in 1, 3, 4, got shape {image.shape}")
        if image.size > 4 * 8192 * 8192:
            raise CM3LeonError(f"image array of shape {image.shape} is larger than 8192 x 8192")
        a = _array_to_uint8(image)
        image = Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a)
    if not isinstance(image, Image.Image):
        raise CM3LeonError(f"image must be a PIL image, a file path or a numpy array, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise CM3LeonError(f"image is empty ({image.width}x{image.height})")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency on white rather than letting convert() expose hidden colours.
        rgba = image.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(bg, rgba)
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return image


def check_decoding(d, where: str) -> dict:
    """Validated text->image decoding defaults ({"cfg_scale": float, "num_retrieved": int,
    "cdk_k": int}, any subset);
    errors name `where` (the file or argument) and the field."""
    if not isinstance(d, Mapping):
        raise CM3LeonError(f"{where}: expected a JSON object with {sorted(DECODING_KEYS)}, got {type(d).__name__}")
    unknown = sorted(set(d) - set(DECODING_KEYS))
    if unknown:
        raise CM3LeonError(f"{where}: unknown field(s) {unknown}; known: {sorted(DECODING_KEYS)}")
    out = {}
    for k, v in d.items():
        lo, hi = DECODING_KEYS[k]
        integral = isinstance(lo, int)
        ok = not isinstance(v, bool) and isinstance(v, int if integral else (int, float))
        if not ok or not lo <= v <= hi or (not integral and not math.isfinite(v)):
            raise CM3LeonError(f"{where}: {k} must be {'an integer' if integral else 'a number'} in [{lo}, {hi}], "
                               f"got {v!r}")
        out[k] = int(v) if integral else float(v)
    return out


def read_decoding(model_dir: str | os.PathLike) -> dict:
    """A model directory's decoding.json, validated ({} when it has none)."""
    path = Path(model_dir) / DECODING_FILE
    if not path.is_file():
        return {}
    from cm3leon.utils.io import read_json

    return check_decoding(read_json(path, "decoding settings"), str(path))


class CM3Leon:
    """A trained CM3Leon: transformer, vocabulary, text and image tokenizers, and (optional)
    retriever + memory bank. Build with `from_pretrained`."""

    def __init__(self, model, vocab, text_tokenizer, image_tokenizer, retriever=None, retrieval=None,
                 path: Path | None = None, decoding: Mapping[str, Any] | None = None):
        self.model = model.eval()
        self.vocab = vocab
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer.eval()
        self.retriever = retriever  # CLIP-style scorer (best-of-N), or None
        self.retrieval = retrieval  # retriever + memory bank (retrieval-augmented prompts), or None
        self.path = path
        self.prompts = PromptBuilder(vocab, text_tokenizer, model.config.max_seq_len, self.tokens_per_image)
        self.decoding = {"cfg_scale": DEFAULT_CFG_SCALE, "num_retrieved": DEFAULT_NUM_RETRIEVED,
                         "cdk_k": Guidance("cdk").cdk_k}
        if decoding:
            self.decoding.update(check_decoding(decoding, "decoding"))

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu", dtype=None) -> "CM3Leon":
        """Load a model directory: config.json, model.safetensors, vocab.json,
        text_tokenizer/, image_tokenizer/, and retriever/ + index/ when present."""
        from cm3leon.model.transformer import CM3LeonTransformer
        from cm3leon.tokenizers.image import VQModel
        from cm3leon.tokenizers.text import TextTokenizer
        from cm3leon.tokenizers.vocab import Vocab

        path = Path(path)
        if not path.is_dir():
            raise CM3LeonError(f"model directory not found: {path}")
        for rel, what in REQUIRED_FILES:
            if not (path / rel).is_file():
                raise CM3LeonError(f"model directory {path} is missing {rel} ({what})")
        model = CM3LeonTransformer.from_pretrained(path, device=device, dtype=_resolve_dtype(dtype))
        vocab = Vocab.load(path / "vocab.json")
        text_tok = TextTokenizer.load(path / "text_tokenizer")
        image_tok = VQModel.from_pretrained(path / "image_tokenizer", device=device)
        if model.config.vocab_size < vocab.size:
            raise CM3LeonError(f"{path / 'config.json'}: vocab_size {model.config.vocab_size} is smaller than "
                               f"vocab.json's {vocab.size} ids")
        if text_tok.vocab_size != vocab.text_vocab_size:
            raise CM3LeonError(f"{path / 'text_tokenizer/tokenizer.json'}: {text_tok.vocab_size} tokens but "
                               f"vocab.json says text_vocab_size={vocab.text_vocab_size}")
        if image_tok.config.codebook_size != vocab.image_vocab_size:
            raise CM3LeonError(f"{path / 'image_tokenizer/config.json'}: codebook_size "
                               f"{image_tok.config.codebook_size} but vocab.json says "
                               f"image_vocab_size={vocab.image_vocab_size}")
        retriever, retrieval = cls._load_retrieval(path, device)
        return cls(model, vocab, text_tok, image_tok, retriever=retriever, retrieval=retrieval, path=path,
                   decoding=read_decoding(path))

    @staticmethod
    def _load_retrieval(path: Path, device):
        """(retriever or None, Retrieval or None): optional parts, used when present."""
        if not (path / "retriever").is_dir():
            return None, None
        from cm3leon.retrieval.encoder import load_retriever

        if (path / "index").is_dir():
            from cm3leon.retrieval.index import Retrieval

            retrieval = Retrieval.from_model_dir(path, device=device)
            return retrieval.retriever, retrieval
        return load_retriever(path / "retriever", device=device), None

    # --- properties ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokens_per_image(self) -> int:
        return self.image_tokenizer.config.tokens_per_image

    @property
    def resolution(self) -> int:
        return self.image_tokenizer.config.resolution

    # --- images <-> codes ------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, image) -> list[int]:
        """Any image (PIL / path / array, any size or mode) -> raster-order VQ codes."""
        from cm3leon.tokenizers.image import images_to_tensor

        im = prepare_image(image, self.resolution)
        x = images_to_tensor([im]).to(self.device)
        return self.image_tokenizer.encode(x).reshape(-1).tolist()

    @torch.no_grad()
    def encode_images(self, images: Sequence, batch_size: int = 64) -> list[list[int]]:
        """`encode_image` for many images, `batch_size` at a time."""
        from cm3leon.tokenizers.image import images_to_tensor

        out: list[list[int]] = []
        images = [prepare_image(im, self.resolution) for im in images]
        for i in range(0, len(images), batch_size):
            x = images_to_tensor(images[i : i + batch_size]).to(self.device)
            out += self.image_tokenizer.encode(x).reshape(x.shape[0], -1).tolist()
        return out

    @torch.no_grad()
    def decode_images(self, codes: Sequence[Sequence[int]]) -> list:
        """Raster-order VQ codes -> PIL images."""
        from cm3leon.tokenizers.image import tensor_to_images

        h, w = self.image_tokenizer.config.grid
        c = torch.tensor([list(x) for x in codes], dtype=torch.long, device=self.device).view(-1, h, w)
        return tensor_to_images(self.image_tokenizer.decode(c))

    def retrieve(self, text: str | None = None, image=None, k: int = 2) -> list[dict]:
        """The documents a prompt is conditioned on, most relevant first: those of the k
        retrieved that have both a text and image codes, as {key, text, image_codes, score, ...};
        [] when the model has no index."""
        if self.retrieval is None or k <= 0:
            return []
        return [d for d in self.retrieval.retrieve_for_prompt(text=text, image=image, k=k)
                if d.get("image_codes") is not None and d.get("text")]

    def _retrieve(self, text: str | None = None, image=None, k: int = 2) -> list[tuple[str, Document]]:
        """`retrieve`'s documents as (key, prompt Document)."""
        return [(str(d.get("key")), Document(self.text_tokenizer.encode(d["text"]),
                                             np.asarray(d["image_codes"]).reshape(-1).tolist()))
                for d in self.retrieve(text, image, k)]

    # --- text -> image ---------------------------------------------------------------------
    def sample_images(
        self, prompt: str, n: int = 1, method: str = "cfg", cfg_scale: float | None = None, temperature: float = 1.0,
        top_p: float | None = 0.9, top_k: int | None = None, cdk_alpha: float = 0.1, cdk_k: int | None = None,
        num_candidates: int = 8, num_retrieved: int | None = None, seed: int | None = None, scorer: str = "auto",
        on_step: Callable[[int, torch.Tensor], None] | None = None,
    ) -> list[ImageSample]:
        """Images for a text prompt, with their metadata.

        method: "topp" (plain nucleus sampling), "cfg" (TopP + classifier-free guidance),
        "cdk" (contrastive decoding, temperature only: its plausibility set replaces top-p),
        "best_of_n" (`num_candidates` samples, half TopP+CFG, half CD-K, ranked by CLIP score
        or by the model's own caption likelihood; the best `n` are returned, best first).
        cfg_scale / num_retrieved / cdk_k: None takes the model directory's decoding.json, else
        DEFAULT_CFG_SCALE / DEFAULT_NUM_RETRIEVED / Guidance's cdk_k (`self.decoding`).
        num_retrieved: documents retrieved into the prompt when the model has an index.
        scorer: how best-of-N ranks (`rerank`): "auto", "clip" or "likelihood".
        on_step: `generate`'s per-step hook, for every batch drawn (streaming partial images)."""
        if method not in IMAGE_METHODS:
            raise CM3LeonError(f"method must be one of {IMAGE_METHODS}, got {method!r}")
        _check_n(n)
        seed = _new_seed(seed)
        cfg_scale, num_retrieved, cdk_k = self._decoding(cfg_scale=cfg_scale, num_retrieved=num_retrieved,
                                                         cdk_k=cdk_k)
        topp = SamplerSettings(temperature, top_k, top_p)
        cdk_sampler = SamplerSettings(temperature)
        cfg = Guidance("cfg", cfg_scale=cfg_scale)
        cdk = Guidance("cdk", cdk_alpha=cdk_alpha, cdk_k=cdk_k)
        tp, keys = self._text_to_image_prompt(prompt, num_retrieved)

        def draw(count: int, guidance: Guidance | None, sampler: SamplerSettings, name: str,
                 s: int) -> list[ImageSample]:
            return self._draw_images([(prompt, tp, keys)] * count, guidance, sampler, name, s, on_step)

        if method == "topp":
            return draw(n, None, topp, "topp", seed)
        if method == "cfg":
            return draw(n, cfg, topp, "cfg", seed)
        if method == "cdk":
            return draw(n, cdk, cdk_sampler, "cdk", seed)
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < n:
            raise CM3LeonError(f"num_candidates must be an integer >= n ({n}), got {num_candidates!r}")
        n_cfg, n_cdk = split_methods(num_candidates)
        samples = draw(n_cfg, cfg, topp, "cfg", seed)
        if n_cdk:
            samples += draw(n_cdk, cdk, cdk_sampler, "cdk", seed + 1)
        return self.rerank(prompt, samples, scorer)[:n]

    def _decoding(self, **given) -> tuple:
        """The call's values of `given` (cfg_scale, num_retrieved, cdk_k), the model's where None."""
        return tuple(self.decoding[k] if v is None else v for k, v in given.items())

    def _text_to_image_prompt(self, prompt: str, num_retrieved: int) -> tuple[TaskPrompt, list[str]]:
        """The text->image prompt (with retrieved documents when the model has an index) and
        the keys of those documents."""
        docs = self._retrieve(text=prompt, k=num_retrieved) if isinstance(prompt, str) and prompt.strip() else []
        return self.prompts.text_to_image(prompt, [d for _, d in docs]), [k for k, _ in docs]

    def _draw_images(self, rows: Sequence[tuple[str, TaskPrompt, list[str]]], guidance: Guidance | None,
                     sampler: SamplerSettings, name: str, seed: int, on_step=None) -> list[ImageSample]:
        """One image per row (prompt, its TaskPrompt, retrieved keys), all rows in one batch."""
        streams = None
        if guidance is not None:
            per_row = [tp.guidance_streams(guidance.method) for _, tp, _ in rows]
            streams = [[r[j] for r in per_row] for j in range(len(per_row[0]))]
        constraint = ImageConstraint(self.vocab, self.model.config.vocab_size, self.tokens_per_image)
        res = generate(self.model, [tp.cond for _, tp, _ in rows], constraint, sampler=sampler, guidance=guidance,
                       guidance_prompts=streams, seed=seed, on_step=on_step)
        codes = [self.vocab.ids_to_codes(t[: self.tokens_per_image]).tolist() for t in res.tokens]
        images = self.decode_images(codes)
        return [ImageSample(im, c, p, name, seed, i, res.settings, truncated_tokens=tp.truncated_tokens,
                            retrieved=keys) for i, (im, c, (p, tp, keys)) in enumerate(zip(images, codes, rows))]

    def sample_images_batch(
        self, prompts: Sequence[str], method: str = "cfg", cfg_scale: float | None = None, temperature: float = 1.0,
        top_p: float | None = 0.9, top_k: int | None = None, cdk_alpha: float = 0.1, cdk_k: int | None = None,
        num_candidates: int = 8, num_retrieved: int | None = None, seed: int | None = None, scorer: str = "auto",
    ) -> list[ImageSample]:
        """One image per prompt, every prompt in one batch (options as `sample_images`).

        For "best_of_n", `num_candidates` per prompt are drawn (all prompts' TopP+CFG
        candidates in one batch, then all CD-K ones) and each prompt keeps its best. A batch
        draws different random numbers than one-prompt calls, so images differ from
        `sample_images` with the same seed (each is reproducible on its own)."""
        if method not in IMAGE_METHODS:
            raise CM3LeonError(f"method must be one of {IMAGE_METHODS}, got {method!r}")
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise CM3LeonError("prompts must be a list of strings")
        if not prompts:
            return []
        seed = _new_seed(seed)
        cfg_scale, num_retrieved, cdk_k = self._decoding(cfg_scale=cfg_scale, num_retrieved=num_retrieved,
                                                         cdk_k=cdk_k)
        topp = SamplerSettings(temperature, top_k, top_p)
        cdk_sampler = SamplerSettings(temperature)
        cfg = Guidance("cfg", cfg_scale=cfg_scale)
        cdk = Guidance("cdk", cdk_alpha=cdk_alpha, cdk_k=cdk_k)
        rows = [(p, *self._text_to_image_prompt(p, num_retrieved)) for p in prompts]
        if method == "topp":
            return self._draw_images(rows, None, topp, "topp", seed)
        if method == "cfg":
            return self._draw_images(rows, cfg, topp, "cfg", seed)
        if method == "cdk":
            return self._draw_images(rows, cdk, cdk_sampler, "cdk", seed)
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
            raise CM3LeonError(f"num_candidates must be an integer >= 1, got {num_candidates!r}")
        n_cfg, n_cdk = split_methods(num_candidates)
        cands = self._draw_images([r for r in rows for _ in range(n_cfg)], cfg, topp, "cfg", seed)
        by_prompt = [cands[i * n_cfg:(i + 1) * n_cfg] for i in range(len(rows))]
        if n_cdk:
            more = self._draw_images([r for r in rows for _ in range(n_cdk)], cdk, cdk_sampler, "cdk", seed + 1)
            for i in range(len(rows)):
                by_prompt[i] += more[i * n_cdk:(i + 1) * n_cdk]
        return [self.rerank(p, s, scorer)[0] for p, s in zip(prompts, by_prompt)]

    def text_to_image_batch(self, prompts: Sequence[str], **kwargs) -> list:
        """One PIL image per prompt, generated in one batch (options: `sample_images_batch`)."""
        return [s.image for s in self.sample_images_batch(prompts, **kwargs)]

    def rerank(self, prompt: str, samples: list[ImageSample], scorer: str = "auto") -> list[ImageSample]:
        """Score every sample and return them all, best first. scorer: "clip" (the retriever's
        CLIP score, paper Sec. 3), "likelihood" (the model's own mean log-likelihood of the
        prompt as the image's caption, by infilling: a model that captions well judges its
        own images without a second model), "auto" (clip with a retriever, else likelihood)."""
        if scorer not in SCORERS:
            raise CM3LeonError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if scorer == "clip" and self.retriever is None:
            raise CM3LeonError("scorer 'clip' needs a retriever in the model directory (retriever/)")
        if scorer == "clip" or (scorer == "auto" and self.retriever is not None):
            scores = self.retriever.clip_score([s.image for s in samples], [prompt] * len(samples)).tolist()
            scorer = "clip"
        else:
            text = self.prompts.text(prompt) + [self.vocab.eoss_id]
            prefixes = [self.prompts.caption(s.codes, len(text)).cond for s in samples]
            scores = sequence_logprob(self.model, prefixes, [text] * len(samples)).tolist()
            scorer = "likelihood"
        return rank(samples, scores, scorer)

    def text_to_image(self, prompt: str, n: int = 1, method: str = "cfg", cfg_scale: float | None = None,
                      temperature: float = 1.0, top_p: float | None = 0.9, top_k: int | None = None,
                      seed: int | None = None, **kwargs):
        """Generate an image for `prompt`: a PIL image when n == 1, else a list of n.
        Other options (cdk_alpha, cdk_k, num_candidates, num_retrieved): see `sample_images`."""
        samples = self.sample_images(prompt, n=n, method=method, cfg_scale=cfg_scale, temperature=temperature,
                                     top_p=top_p, top_k=top_k, seed=seed, **kwargs)
        images = [s.image for s in samples]
        return images[0] if n == 1 else images

    # --- image -> text ---------------------------------------------------------------------
    def _write_text(self, tp: TaskPrompt, max_new_tokens: int, temperature: float, top_p, top_k,
                    seed: int | None) -> str:
        return self._write_texts([tp], max_new_tokens, temperature, top_p, top_k, seed)[0]

    def _write_texts(self, tps: Sequence[TaskPrompt], max_new_tokens: int, temperature: float, top_p, top_k,
                     seed: int | None) -> list[str]:
        res = generate(
            self.model, [tp.cond for tp in tps], TextConstraint(self.vocab, self.model.config.vocab_size),
            max_new_tokens=max_new_tokens, sampler=SamplerSettings(temperature, top_k, top_p), seed=_new_seed(seed),
        )
        return [self.text_tokenizer.decode(self.vocab.ids_to_text_ids(t).tolist()).strip() for t in res.tokens]

    @staticmethod
    def _check_max_new(max_new_tokens) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise CM3LeonError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")

    def image_to_text(self, image, max_new_tokens: int = 32, temperature: float = 0.0,
                      top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                      num_retrieved: int = 0) -> str:
        """Caption an image by CM3 infilling (greedy by default). num_retrieved > 0 puts
        documents retrieved by the image into the prompt (when the model has an index)."""
        self._check_max_new(max_new_tokens)
        codes = self.encode_image(image)
        docs = []
        if num_retrieved > 0 and self.retrieval is not None:
            docs = [d for _, d in self._retrieve(image=prepare_image(image, self.resolution), k=num_retrieved)]
        tp = self.prompts.caption(codes, max_new_tokens, docs)
        return self._write_text(tp, max_new_tokens, temperature, top_p, top_k, seed)

    def answer(self, image, question: str, max_new_tokens: int = 16, temperature: float = 0.0,
               top_p: float | None = None, top_k: int | None = None, seed: int | None = None) -> str:
        """Answer a question about an image by infilling the answer span of the VQA template
        (see `cm3leon.decode.tasks`); the template's closing '.' is removed."""
        self._check_max_new(max_new_tokens)
        tp = self.prompts.vqa(self.encode_image(image), question, max_new_tokens)
        text = self._write_text(tp, max_new_tokens, temperature, top_p, top_k, seed)
        return text[:-1].rstrip() if text.endswith(".") else text

    def image_to_text_batch(self, images: Sequence, max_new_tokens: int = 32, temperature: float = 0.0,
                            top_p: float | None = None, top_k: int | None = None,
                            seed: int | None = None) -> list[str]:
        """`image_to_text` for many images in one batch (no retrieved documents)."""
        self._check_max_new(max_new_tokens)
        tps = [self.prompts.caption(c, max_new_tokens) for c in self.encode_images(images)]
        return self._write_texts(tps, max_new_tokens, temperature, top_p, top_k, seed) if tps else []

    def answer_batch(self, images: Sequence, questions: Sequence[str], max_new_tokens: int = 16,
                     temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
                     seed: int | None = None) -> list[str]:
        """`answer` for many (image, question) pairs in one batch."""
        self._check_max_new(max_new_tokens)
        if len(images) != len(questions):
            raise CM3LeonError(f"answer_batch: {len(images)} images but {len(questions)} questions")
        tps = [self.prompts.vqa(c, q, max_new_tokens) for c, q in zip(self.encode_images(images), questions)]
        texts = self._write_texts(tps, max_new_tokens, temperature, top_p, top_k, seed) if tps else []
        return [t[:-1].rstrip() if t.endswith(".") else t for t in texts]

    # --- image -> image --------------------------------------------------------------------
    def edit(self, image, instruction: str, image_guidance: float = 1.5, text_guidance: float = 7.5,
             temperature: float = 1.0, top_p: float | None = 0.9, top_k: int | None = None,
             seed: int | None = None):
        """Edit an image following an instruction (paper Table 5 template), with two-scale
        guidance in one batch: image 1.5, text 7.5 by default (paper Sec. 5). -> PIL image."""
        return self.edit_samples(image, instruction, image_guidance, text_guidance, temperature, top_p, top_k,
                                 seed)[0].image

    def edit_samples(self, image, instruction: str, image_guidance: float = 1.5, text_guidance: float = 7.5,
                     temperature: float = 1.0, top_p: float | None = 0.9, top_k: int | None = None,
                     seed: int | None = None, n: int = 1,
                     on_step: Callable[[int, torch.Tensor], None] | None = None) -> list[ImageSample]:
        """`edit` with metadata, n samples in one batch (on_step: `generate`'s per-step hook)."""
        _check_n(n)
        guidance = Guidance("edit", image_scale=image_guidance, text_scale=text_guidance)
        sampler = SamplerSettings(temperature, top_k, top_p)
        seed = _new_seed(seed)
        tp = self.prompts.edit(self.encode_image(image), instruction)
        res = generate(
            self.model, [tp.cond] * n, ImageConstraint(self.vocab, self.model.config.vocab_size, self.tokens_per_image),
            sampler=sampler, guidance=guidance, guidance_prompts=[[p] * n for p in tp.guidance_streams("edit")],
            seed=seed, on_step=on_step,
        )
        codes = [self.vocab.ids_to_codes(t[: self.tokens_per_image]).tolist() for t in res.tokens]
        return [ImageSample(im, c, instruction, "edit", seed, i, res.settings, truncated_tokens=tp.truncated_tokens)
                for i, (im, c) in enumerate(zip(self.decode_images(codes), codes))]

    def edit_batch(self, images: Sequence, instructions: Sequence[str], image_guidance: float = 1.5,
                   text_guidance: float = 7.5, temperature: float = 1.0, top_p: float | None = 0.9,
                   top_k: int | None = None, seed: int | None = None) -> list:
        """`edit` for many (image, instruction) pairs in one batch -> PIL images."""
        if len(images) != len(instructions):
            raise CM3LeonError(f"edit_batch: {len(images)} images but {len(instructions)} instructions")
        if not images:
            return []
        guidance = Guidance("edit", image_scale=image_guidance, text_scale=text_guidance)
        tps = [self.prompts.edit(c, ins) for c, ins in zip(self.encode_images(images), instructions)]
        per_row = [tp.guidance_streams("edit") for tp in tps]
        res = generate(
            self.model, [tp.cond for tp in tps],
            ImageConstraint(self.vocab, self.model.config.vocab_size, self.tokens_per_image),
            sampler=SamplerSettings(temperature, top_k, top_p), guidance=guidance,
            guidance_prompts=[[r[j] for r in per_row] for j in range(len(per_row[0]))], seed=_new_seed(seed),
        )
        return self.decode_images([self.vocab.ids_to_codes(t[: self.tokens_per_image]).tolist() for t in res.tokens])

    def infill_image(self, image, box: Sequence[float], prompt: str | None = None, temperature: float = 1.0,
                     top_p: float | None = 0.9, top_k: int | None = None, seed: int | None = None):
        """Regenerate the codes of a region. box = (left, top, right, bottom) as fractions of
        the (centre-cropped) image side; prompt: optional caption of the whole image. -> PIL."""
        codes = self.encode_image(image)
        region = box_to_region(box, self.image_tokenizer.config.grid)
        tp, a, b = self.prompts.infill_image(codes, region, prompt)
        constraint = ImageInfillConstraint(self.vocab, self.model.config.vocab_size, codes[a:b], region[a:b])
        res = generate(self.model, [tp.cond], constraint, sampler=SamplerSettings(temperature, top_k, top_p),
                       seed=_new_seed(seed))
        new = list(codes)
        new[a:b] = self.vocab.ids_to_codes(res.tokens[0][: b - a]).tolist()
        return self.decode_images([new])[0]

    def __repr__(self) -> str:
        c = self.model.config
        extra = ", retrieval" if self.retrieval is not None else (", retriever" if self.retriever is not None else "")
        return (f"CM3Leon({self.path}: {c.n_layer} layers x {c.d_model}, vocab {self.vocab.size}, "
                f"{self.tokens_per_image} tokens/image{extra})")
