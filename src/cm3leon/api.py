"""The Python API: `CM3Leon.from_pretrained(dir)` and one method per task.

    from cm3leon import CM3Leon
    m = CM3Leon.from_pretrained("runs/demo/sft/model")
    img = m.text_to_image("a red circle", method="cfg", cfg_scale=3.0, seed=0)
    text = m.image_to_text(img)
    ans = m.answer(img, "what colour is the shape?")
    out = m.edit(img, "make it blue")
    imgs = m.text_to_image(["a red circle", "a blue square"], seed=0)   # a batch: one call, one pass

One method per task; each takes one input or a list of them (a list is decoded as one batch
and gives a list back). Text->image settings are a `DecodingConfig` (`m.decoding`: the paper's
defaults with the model directory's decoding.json applied); keyword options override fields.
Prompt layouts are documented in `cm3leon.layout.prompts`; decoding in `cm3leon.decode`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from cm3leon.decode.config import IMAGE_METHODS, SCORERS, DecodingConfig, check_model_decoding
from cm3leon.decode.generate import generate
from cm3leon.decode.processors import ImageConstraint, ImageInfillConstraint, SamplerSettings, TextConstraint
from cm3leon.decode.rerank import rank, sequence_logprob, split_methods
from cm3leon.layout.prompts import Document, PromptBuilder, TaskPrompt, box_to_region
from cm3leon.errors import CM3LeonError

__all__ = ["CM3Leon", "ImageSample", "DecodingConfig", "IMAGE_METHODS", "SCORERS", "prepare_image"]

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
# Ranked text's extra candidates (`image_to_text` / `answer` num_candidates > 1) are sampled at
# this temperature with top-p 0.9: on the long demo preset's tuned model (200 validation images
# of 1-3 objects, 8 candidates) 96% of the images had a right caption among them, against 82.5%
# right for the greedy caption alone; on the demo's, a right answer was among 8 for 100% of 80
# validation existence questions, against 52.5% for the greedy answer.
TEXT_CANDIDATE_TEMPERATURE = 0.7


def _new_seed(seed: int | None) -> int:
    if seed is None:
        return random.SystemRandom().randrange(2**31 - 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise CM3LeonError(f"seed must be an integer in [0, 2**63 - 1] or None, got {seed!r}")
    return int(seed)


def _best_text(candidates: Sequence[str], score: Callable[[list[str]], Sequence[float]]) -> str:
    """The best-scored of the distinct non-empty candidates; the first candidate (the greedy
    text) when they are all one or when none scores above -inf (none fits the context)."""
    uniq = list(dict.fromkeys(c for c in candidates if c.strip()))
    if len(uniq) < 2:
        return uniq[0] if uniq else candidates[0]
    scores = score(uniq)
    best = max(range(len(uniq)), key=scores.__getitem__)
    return uniq[best] if scores[best] > float("-inf") else candidates[0]


def _check_n(n, name: str = "n") -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
        raise CM3LeonError(f"{name} must be an integer in [1, {MAX_SAMPLES}], got {n!r}")


def _as_batch(x, what: str) -> tuple[bool, list]:
    """(single, items): a list or tuple is a batch; anything else is one item."""
    if isinstance(x, (list, tuple)):
        return False, list(x)
    return True, [x]


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


class CM3Leon:
    """A trained CM3Leon: transformer, vocabulary, text and image tokenizers, and (optional)
    retriever + memory bank. Build with `from_pretrained`."""

    def __init__(self, model, vocab, text_tokenizer, image_tokenizer, retriever=None, retrieval=None,
                 path: Path | None = None, decoding: DecodingConfig | Mapping[str, Any] | None = None):
        self.model = model.eval()
        self.vocab = vocab
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer.eval()
        self.retriever = retriever  # CLIP-style scorer (best-of-N), or None
        self.retrieval = retrieval  # retriever + memory bank (retrieval-augmented prompts), or None
        self.path = path
        self.prompts = PromptBuilder(vocab, text_tokenizer, model.config.max_seq_len, self.tokens_per_image)
        # text->image defaults: the paper's, with what the model directory recommends
        # (decoding.json: the pipeline writes the settings its own sweep chose)
        self.decoding = decoding if isinstance(decoding, DecodingConfig) else \
            DecodingConfig().replace(**check_model_decoding(decoding or {}, "decoding"))

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
                   decoding=DecodingConfig.from_model_dir(path))

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
        self, prompts: str | Sequence[str], n: int = 1, decoding: DecodingConfig | None = None,
        seed: int | None = None, on_step: Callable[[int, torch.Tensor], None] | None = None, **options,
    ) -> list[ImageSample]:
        """Images for text prompts, with their metadata: n per prompt, all drawn in one batch
        (a list of prompts gives a flat list, prompt by prompt: the n of the first, then the next).

        decoding: a `DecodingConfig` (default `self.decoding`); options: any of its fields
        (method, cfg_scale, temperature, top_p, top_k, cdk_alpha, cdk_k, num_candidates,
        num_retrieved, scorer; None keeps the config's). Methods: "topp" (plain nucleus
        sampling), "cfg" (TopP + classifier-free guidance), "cdk" (contrastive decoding,
        temperature only: its plausibility set replaces top-p), "best_of_n" (`num_candidates`
        per prompt, half TopP+CFG, half CD-K, ranked by `rerank`; the best n are kept, best first).
        on_step: `generate`'s per-step hook, for every batch drawn (streaming partial images)."""
        one = isinstance(prompts, str)
        prompts = [prompts] if one else list(prompts) if isinstance(prompts, (list, tuple)) else None
        if prompts is None or not all(isinstance(p, str) for p in prompts):
            raise CM3LeonError("prompts must be a string or a list of strings")
        _check_n(n)
        d = (decoding or self.decoding).replace(**options)
        seed = _new_seed(seed)
        if not prompts:
            return []
        rows = [(p, *self._text_to_image_prompt(p, d.num_retrieved)) for p in prompts]
        if d.method != "best_of_n":
            return self._draw_images([r for r in rows for _ in range(n)], d, d.method, seed, on_step)
        if d.num_candidates < n:
            raise CM3LeonError(f"num_candidates must be >= n ({n}), got {d.num_candidates}")
        n_cfg, n_cdk = split_methods(d.num_candidates)
        cands = self._draw_images([r for r in rows for _ in range(n_cfg)], d, "cfg", seed, on_step)
        by_prompt = [cands[i * n_cfg:(i + 1) * n_cfg] for i in range(len(rows))]
        if n_cdk:
            more = self._draw_images([r for r in rows for _ in range(n_cdk)], d, "cdk", seed + 1, on_step)
            for i in range(len(rows)):
                by_prompt[i] += more[i * n_cdk:(i + 1) * n_cdk]
        return [s for p, c in zip(prompts, by_prompt) for s in self.rerank(p, c, d.scorer)[:n]]

    def _text_to_image_prompt(self, prompt: str, num_retrieved: int) -> tuple[TaskPrompt, list[str]]:
        """The text->image prompt (with retrieved documents when the model has an index) and
        the keys of those documents."""
        docs = self._retrieve(text=prompt, k=num_retrieved) if prompt.strip() else []
        return self.prompts.text_to_image(prompt, [d for _, d in docs]), [k for k, _ in docs]

    def _draw_images(self, rows: Sequence[tuple[str, TaskPrompt, list[str]]], d: DecodingConfig, method: str,
                     seed: int, on_step=None) -> list[ImageSample]:
        """One image per row (prompt, its TaskPrompt, retrieved keys), all rows in one batch,
        with `method`'s guidance and sampler from `d`."""
        guidance, streams = d.guidance(method), None
        if guidance is not None:
            per_row = [tp.guidance_streams(guidance.method) for _, tp, _ in rows]
            streams = [[r[j] for r in per_row] for j in range(len(per_row[0]))]
        constraint = ImageConstraint(self.vocab, self.model.config.vocab_size, self.tokens_per_image)
        res = generate(self.model, [tp.cond for _, tp, _ in rows], constraint, sampler=d.sampler(method),
                       guidance=guidance, guidance_prompts=streams, seed=seed, on_step=on_step)
        codes = [self.vocab.ids_to_codes(t[: self.tokens_per_image]).tolist() for t in res.tokens]
        images = self.decode_images(codes)
        return [ImageSample(im, c, p, method, seed, i, res.settings, truncated_tokens=tp.truncated_tokens,
                            retrieved=keys) for i, (im, c, (p, tp, keys)) in enumerate(zip(images, codes, rows))]

    def rerank(self, prompt: str, samples: list[ImageSample], scorer: str = "auto") -> list[ImageSample]:
        """Score every sample and return them all, best first. scorer: "clip" (the retriever's
        CLIP score, paper Sec. 3), "likelihood" (the model's own mean log-likelihood of the
        prompt as the image's caption, by infilling: a model that captions well judges its
        own images without a second model), "auto" (clip with a retriever, else likelihood)."""
        scorer = self._scorer(scorer)
        if scorer == "clip":
            scores = self.retriever.clip_score([s.image for s in samples], [prompt] * len(samples)).tolist()
        else:
            text = self.prompts.text(prompt) + [self.vocab.eoss_id]
            prefixes = [self.prompts.caption(s.codes, len(text)).cond for s in samples]
            scores = sequence_logprob(self.model, prefixes, [text] * len(samples)).tolist()
        return rank(samples, scores, scorer)

    def text_to_image(self, prompts: str | Sequence[str], n: int = 1, seed: int | None = None, **options):
        """Images for text prompts: one prompt and n == 1 gives a PIL image; otherwise a list
        (n per prompt, prompt by prompt). Options: `sample_images`'."""
        images = [s.image for s in self.sample_images(prompts, n=n, seed=seed, **options)]
        return images[0] if isinstance(prompts, str) and n == 1 else images

    # --- image -> text ---------------------------------------------------------------------
    def _write_texts(self, tps: Sequence[TaskPrompt], max_new_tokens: int, temperature: float, top_p, top_k,
                     seed: int | None) -> list[str]:
        if not tps:
            return []
        res = generate(
            self.model, [tp.cond for tp in tps], TextConstraint(self.vocab, self.model.config.vocab_size),
            max_new_tokens=max_new_tokens, sampler=SamplerSettings(temperature, top_k, top_p), seed=_new_seed(seed),
        )
        return [self.text_tokenizer.decode(self.vocab.ids_to_text_ids(t).tolist()).strip() for t in res.tokens]

    @staticmethod
    def _check_max_new(max_new_tokens) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise CM3LeonError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")

    def image_to_text(self, images, max_new_tokens: int = 32, temperature: float = 0.0,
                      top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                      num_retrieved: int = 0, num_candidates: int | None = None,
                      scorer: str | None = None) -> str | list[str]:
        """Caption images by CM3 infilling (greedy by default): one image -> str, a list -> a
        list, decoded in one batch. num_retrieved > 0 puts documents retrieved by each image
        into its prompt (when the model has an index).

        num_candidates (default: the model's decoding.json `caption_candidates`, else 1): N > 1
        adds N - 1 captions sampled at temperature `TEXT_CANDIDATE_TEMPERATURE` (top-p 0.9)
        to the one above and keeps the best by `scorer` (default `self.decoding.scorer`):
        "clip", the retriever's image-text score (the paper's CLIP re-ranking, Sec. 3, turned
        to text); "likelihood", the model's own log p(image | caption) by the text->image
        layout (how well the caption would draw the picture); "auto", clip with a retriever,
        else likelihood."""
        self._check_max_new(max_new_tokens)
        n = self.decoding.caption_candidates if num_candidates is None else num_candidates
        _check_n(n, "num_candidates")
        if scorer is not None and scorer not in SCORERS:
            raise CM3LeonError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        one, images = _as_batch(images, "images")
        images = [prepare_image(im, self.resolution) for im in images]
        codes = self.encode_images(images)
        docs = [[]] * len(images)
        if num_retrieved > 0 and self.retrieval is not None:
            docs = [[d for _, d in self._retrieve(image=im, k=num_retrieved)] for im in images]
        tps = [self.prompts.caption(c, max_new_tokens, ds) for c, ds in zip(codes, docs)]
        texts = self._write_texts(tps, max_new_tokens, temperature, top_p, top_k, seed)
        if n > 1 and texts:
            scorer = self._scorer(self.decoding.scorer if scorer is None else scorer)
            cands = self._text_candidates(tps, texts, n, max_new_tokens, seed)
            texts = [_best_text(cs, lambda uniq: self.caption_scores(im, c, uniq, scorer))
                     for im, c, cs in zip(images, codes, cands)]
        return texts[0] if one else texts

    def _text_candidates(self, tps: Sequence[TaskPrompt], texts: list[str], n: int, max_new_tokens: int,
                         seed: int | None, clean: Callable[[list[str]], list[str]] = list) -> list[list[str]]:
        """Per prompt: its text in `texts` (the greedy one) then n - 1 sampled at
        `TEXT_CANDIDATE_TEMPERATURE` (top-p 0.9, seed + 1), all in one batch; `clean` tidies them."""
        more = clean(self._write_texts([tp for tp in tps for _ in range(n - 1)], max_new_tokens,
                                       TEXT_CANDIDATE_TEMPERATURE, 0.9, None,
                                       None if seed is None else (seed + 1) % (MAX_SEED + 1)))
        return [[t] + more[i * (n - 1):(i + 1) * (n - 1)] for i, t in enumerate(texts)]

    def _scorer(self, scorer: str) -> str:
        """`scorer` resolved: "auto" -> "clip" with a retriever, else "likelihood"."""
        if scorer not in SCORERS:
            raise CM3LeonError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if scorer == "clip" and self.retriever is None:
            raise CM3LeonError("scorer 'clip' needs a retriever in the model directory (retriever/)")
        return "clip" if scorer == "clip" or (scorer == "auto" and self.retriever is not None) else "likelihood"

    def caption_scores(self, image, codes: Sequence[int], captions: Sequence[str], scorer: str) -> list[float]:
        """How well each caption describes the image (higher is better), by a resolved scorer:
        "clip" (the retriever's cosine) or "likelihood" (mean log p(image codes | caption))."""
        if scorer == "clip":
            return self.retriever.clip_score([image] * len(captions), list(captions)).tolist()
        img = self.prompts.image(codes)
        return sequence_logprob(self.model, [self.prompts.text_to_image(c).cond for c in captions],
                                [img] * len(captions)).tolist()

    def answer(self, images, questions: str | Sequence[str], max_new_tokens: int = 16, temperature: float = 0.0,
               top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
               num_candidates: int | None = None) -> str | list[str]:
        """Answer questions about images by infilling the answer span of the VQA template (see
        `cm3leon.layout.prompts`; the template's closing '.' is removed): one image and one
        question -> str; lists of equal length -> a list, decoded in one batch.

        num_candidates (default: the model's decoding.json `answer_candidates`, else 1): N > 1
        adds N - 1 answers sampled at temperature `TEXT_CANDIDATE_TEMPERATURE` (top-p 0.9)
        to the one above and keeps, of the distinct ones, the answer that agrees best with the
        picture read both ways (`answer_scores`: the answer given the picture, and the picture
        given the question and answer). Reading the question the other way round helps where the
        model cannot yet say what it can draw: a demo model that answers "yes" to every "Is
        there a ...?" (chance) picks the right one of "yes" and "no" for ~95%."""
        self._check_max_new(max_new_tokens)
        n = self.decoding.answer_candidates if num_candidates is None else num_candidates
        _check_n(n, "num_candidates")
        one, images = _as_batch(images, "images")
        one_q, questions = _as_batch(questions, "questions")
        if one != one_q or len(images) != len(questions):
            raise CM3LeonError(f"answer: give one image and one question, or lists of equal length "
                               f"(got {len(images)} image(s), {len(questions)} question(s))")
        codes = self.encode_images(images)
        tps = [self.prompts.vqa(c, q, max_new_tokens) for c, q in zip(codes, questions)]

        def strip(ts: list[str]) -> list[str]:
            return [t[:-1].rstrip() if t.endswith(".") else t for t in ts]

        texts = strip(self._write_texts(tps, max_new_tokens, temperature, top_p, top_k, seed))
        if n > 1 and texts:
            cands = self._text_candidates(tps, texts, n, max_new_tokens, seed, strip)
            texts = [_best_text(cs, lambda uniq: self.answer_scores(c, q, uniq, max_new_tokens))
                     for c, q, cs in zip(codes, questions, cands)]
        return texts[0] if one else texts

    def answer_scores(self, codes: Sequence[int], question: str, answers: Sequence[str],
                      max_new_tokens: int = 16) -> list[float]:
        """How well each answer and the picture agree, read both ways (higher is better): log
        p(answer | picture, question), the answer written by infilling as `answer` writes it,
        plus log p(picture codes | `Question: {question} Answer: {answer}.`), the VQA template
        read left to right (SFT task `vqa_image`), each summed over its tokens. The infilling
        prompt is `answer`'s with `max_new_tokens`; an answer that does not fit either reading
        in the context scores -inf."""
        from cm3leon.layout.templates import prompt

        img = self.prompts.image(codes)
        v, limit = self.vocab, self.model.config.max_seq_len
        conds = [prompt("vqa_image", {"question": question, "answer": a}, v, self.text_tokenizer) for a in answers]
        written = [self.prompts.text(f" {a}.") + [v.eoss_id] for a in answers]  # the VQA template's response
        infill = self.prompts.vqa(codes, question, max_new_tokens).cond
        fits = [i for i, c in enumerate(conds) if len(c) + len(img) <= limit and len(infill) + len(written[i]) <= limit]
        scores = [float("-inf")] * len(answers)
        if fits:
            drawn = sequence_logprob(self.model, [conds[i] for i in fits], [img] * len(fits), reduction="sum")
            said = sequence_logprob(self.model, [infill] * len(fits), [written[i] for i in fits], reduction="sum")
            for i, a, b in zip(fits, drawn.tolist(), said.tolist()):
                scores[i] = a + b
        return scores

    # --- image -> image --------------------------------------------------------------------
    def edit_samples(self, images, instructions: str | Sequence[str], image_guidance: float | None = None,
                     text_guidance: float | None = None, temperature: float | None = None,
                     top_p: float | None = 0.9, top_k: int | None = None, seed: int | None = None, n: int = 1,
                     on_step: Callable[[int, torch.Tensor], None] | None = None,
                     num_candidates: int | None = None) -> list[ImageSample]:
        """Edit images following instructions (paper Table 5 template), with two-scale
        guidance in one batch. Scales and temperature left None are `self.decoding`'s: the
        model directory's decoding.json, else the paper's image 1.5, text 7.5 (Sec. 5) at
        temperature 1. n samples per (image, instruction), all in one batch, pair by pair.
        num_candidates (default: the model's decoding.json `edit_candidates`, else 1): N > 1
        draws max(n, N) edits per pair in the same batch and keeps the n the model itself finds
        most likely, best first (`rank_edits`). on_step: `generate`'s hook."""
        _check_n(n)
        ranked = self.decoding.edit_candidates if num_candidates is None else num_candidates
        _check_n(ranked, "num_candidates")
        one, images = _as_batch(images, "images")
        one_i, instructions = _as_batch(instructions, "instructions")
        if one != one_i or len(images) != len(instructions):
            raise CM3LeonError(f"edit: give one image and one instruction, or lists of equal length "
                               f"(got {len(images)} image(s), {len(instructions)} instruction(s))")
        if not images:
            return []
        d = self.decoding.replace(image_guidance=image_guidance, text_guidance=text_guidance, temperature=temperature)
        guidance = d.edit_guidance()
        sampler = SamplerSettings(d.temperature, top_k, top_p)
        seed = _new_seed(seed)
        k = max(n, ranked)  # drawn per pair
        tps = [tp for c, ins in zip(self.encode_images(images), instructions) for tp in [self.prompts.edit(c, ins)] * k]
        per_row = [tp.guidance_streams("edit") for tp in tps]
        res = generate(
            self.model, [tp.cond for tp in tps],
            ImageConstraint(self.vocab, self.model.config.vocab_size, self.tokens_per_image),
            sampler=sampler, guidance=guidance, guidance_prompts=[[r[j] for r in per_row] for j in range(len(per_row[0]))],
            seed=seed, on_step=on_step,
        )
        codes = [self.vocab.ids_to_codes(t[: self.tokens_per_image]).tolist() for t in res.tokens]
        rows = [ins for ins in instructions for _ in range(k)]
        samples = [ImageSample(im, c, ins, "edit", seed, i, res.settings, truncated_tokens=tp.truncated_tokens)
                   for i, (im, c, ins, tp) in enumerate(zip(self.decode_images(codes), codes, rows, tps))]
        if ranked < 2:
            return samples
        return [s for i in range(0, len(samples), k) for s in self._rank_edits(tps[i].cond, samples[i:i + k])[:n]]

    def edit(self, images, instructions: str | Sequence[str], image_guidance: float | None = None,
             text_guidance: float | None = None, temperature: float | None = None, top_p: float | None = 0.9,
             top_k: int | None = None, seed: int | None = None, num_candidates: int | None = None):
        """`edit_samples`' images, one per pair (the likeliest of `num_candidates`, default the
        model's decoding.json `edit_candidates`): one image and one instruction -> a PIL image;
        lists -> a list."""
        samples = self.edit_samples(images, instructions, image_guidance, text_guidance, temperature, top_p, top_k,
                                    seed, num_candidates=num_candidates)
        return samples[0].image if isinstance(instructions, str) else [s.image for s in samples]

    def rank_edits(self, source_codes: Sequence[int], instruction: str,
                   samples: list[ImageSample]) -> list[ImageSample]:
        """Edits of one (source, instruction) pair, best first, scored by the model's own mean
        log p(edited codes | source image, instruction) (scorer "likelihood"). On the long demo
        preset's model this ranker kept a done edit for 56% of 96 validation pairs out of 4
        candidates (a right one was among them for 58%; the first one alone: 50%), where the
        guidance streams' log ratios did worse (36-45%)."""
        return self._rank_edits(self.prompts.edit(source_codes, instruction).cond, samples)

    def _rank_edits(self, cond: Sequence[int], samples: list[ImageSample]) -> list[ImageSample]:
        if not samples:
            return []
        scores = sequence_logprob(self.model, [cond] * len(samples), [self.prompts.image(s.codes) for s in samples])
        return rank(samples, scores.tolist(), "likelihood")

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
