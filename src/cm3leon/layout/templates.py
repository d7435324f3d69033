"""Instruction templates for supervised fine-tuning (CM3Leon, arXiv:2309.02591, Sec. 4, Table 5).

A template is data: a string in the paper's notation plus the names of its image fields,
kept in the `TEMPLATES` registry. Notation:

- ` <break> ` separates segments (a modality change, paper Sec. 2);
- a segment that is exactly `{name}` (or `[[{name}]]`) with `name` in the template's `images`
  is an image: its VQ codes in raster order;
- any other segment is text: literal words and `{field}` values;
- `[[...]]` marks the RESPONSE: what the model writes at inference, and what the loss can be
  restricted to. Exactly one per template.

A rendered document is `<eos> seg_0 <break> seg_1 ... <break> seg_n <eos>`, the layout of
pretraining (`cm3leon.layout.documents.build_document`), so the CM3 transform applies as is.

Tokenization rule: the text of a segment is cut at every field and at the response marks,
and each piece (literal run, stripped field value, whole response) is BPE-encoded on its own.
So a field's tokens never depend on its neighbours, and the inference prompt built from the
same template (`prompt`) holds exactly the training tokens. For VQA the pieces are
`"Question: "`, the question, `" Answer:"` and the response `" {answer}."`, which is the
layout of `cm3leon.layout.prompts.PromptBuilder.vqa`.

Where the response sits decides the inference form (`prompt`):
- response last (text->image, editing, grounded and structure-guided generation, OCR):
  the prompt is the document up to the response; the model continues left to right;
- response inside (captioning, VQA): CM3 infilling (paper Sec. 2): the response is replaced
  by `<mask:0>` in place and `<mask:0>` follows the closing `<eos>`; the model writes the
  response and `<eoss>`.

Choices made here where Table 5 gives no exact string (documented, change them in the registry):
- structure -> image (edge / segmentation / depth maps): the condition image comes first, as
  the source image of editing: `Generate high quality image of {caption} with {kind} map
  <break> {condition_image} <break> [[{image}]]`;
- OCR / text rendering: `Draw "{text}" in {caption} <break> [[{image}]]`;
- grounded generation: `{segmentations}` is a comma-separated list `name at <x0,y0,x1,y1>`
  with box corners quantised to a 0..99 grid of the (square, centre-cropped) image, written
  as plain text (`format_segmentations`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from cm3leon.errors import CM3LeonError
from cm3leon.tokenizers.vocab import Vocab

BREAK = " <break> "
FIELD = re.compile(r"\{(\w+)\}")
LOCATION_GRID = 100  # box corners written on a 0..99 grid

# The registry. "images": which fields are images; "source": where the built-in data has it.
TEMPLATES: dict[str, dict[str, Any]] = {
    "t2i": {
        "template": "{caption} <break> [[{image}]]",
        "images": ("image",),
        "doc": "text -> image (paper Table 5)",
    },
    "caption": {
        "template": "[[{caption}]] <break> {image}",
        "images": ("image",),
        "doc": "short captioning, infilled (paper Table 5: `{caption} <break> {image}`)",
    },
    "caption_detailed": {
        "template": "Describe the given picture.[[ {caption}]] <break> {image}",
        "images": ("image",),
        "doc": "detailed captioning, infilled (paper Table 5)",
    },
    "vqa": {
        "template": "Question: {question} Answer:[[ {answer}.]] <break> {image}",
        "images": ("image",),
        "doc": "visual question answering, answer infilled (paper Table 5)",
    },
    "vqa_image": {
        "template": "Question: {question} Answer: {answer}. <break> [[{image}]]",
        "images": ("image",),
        "doc": "the VQA template read left to right: the image given the question and its answer (paper "
               "Table 5); what `CM3Leon.answer` ranks candidate answers by",
    },
    "edit": {
        "template": "Edit first image following the instruction <break> {image} <break> {instruction} "
                    "<break> [[{target_image}]]",
        "images": ("image", "target_image"),
        "doc": "instruction-guided editing, InstructPix2Pix form (paper Table 5)",
    },
    "layout": {
        "template": "Generate high quality image of {caption} with segmentations {segmentations} "
                    "<break> [[{image}]]",
        "images": ("image",),
        "doc": "spatially grounded image generation (paper Table 5)",
    },
    "edge2img": {
        "template": "Generate high quality image of {caption} with edge map <break> {condition_image} "
                    "<break> [[{image}]]",
        "images": ("condition_image", "image"),
        "doc": "edge map -> image (structure-guided generation)",
    },
    "seg2img": {
        "template": "Generate high quality image of {caption} with segmentation map <break> {condition_image} "
                    "<break> [[{image}]]",
        "images": ("condition_image", "image"),
        "doc": "segmentation map -> image (structure-guided generation)",
    },
    "depth2img": {
        "template": "Generate high quality image of {caption} with depth map <break> {condition_image} "
                    "<break> [[{image}]]",
        "images": ("condition_image", "image"),
        "doc": "depth map -> image (structure-guided generation)",
    },
    "ocr": {
        "template": 'Draw "{text}" in {caption} <break> [[{image}]]',
        "images": ("image",),
        "doc": "text rendering (OCR-style data)",
    },
}


@dataclass(frozen=True)
class _Piece:
    kind: str  # "text" (literal), "field" (text field), "image", "break"
    value: str  # literal text, field name, or (for a response piece) its format string
    response: bool = False


@dataclass
class TemplateDoc:
    """A rendered training document in unified ids."""

    tokens: np.ndarray  # int64 [L]: <eos> ... <eos>
    response: tuple[int, int]  # [start, end) of the response in `tokens`

    @property
    def response_last(self) -> bool:
        """True when nothing but the closing `<eos>` follows the response (left-to-right tasks)."""
        return self.response[1] == len(self.tokens) - 1


def _parse(task: str) -> tuple[tuple[_Piece, ...], tuple[str, ...], tuple[str, ...]]:
    """Pieces of a template, its text fields and its image fields."""
    spec = template_spec(task)
    return _parse_template(task, spec["template"], tuple(spec["images"]))


@functools.lru_cache(maxsize=None)
def _parse_template(task: str, template: str, images: tuple[str, ...]):
    pieces: list[_Piece] = []
    text_fields: list[str] = []
    responses = 0
    for s, seg in enumerate(template.split(BREAK)):
        if s:
            pieces.append(_Piece("break", ""))
        whole = seg.startswith("[[") and seg.endswith("]]")
        m = FIELD.fullmatch(seg[2:-2] if whole else seg)
        if m and m.group(1) in images:
            responses += whole
            pieces.append(_Piece("image", m.group(1), response=whole))
            continue
        pos = 0
        for m in re.finditer(r"\[\[.*?\]\]|\{\w+\}", seg):
            if m.start() > pos:
                pieces.append(_Piece("text", seg[pos:m.start()]))
            tok = m.group(0)
            if tok.startswith("[["):
                responses += 1
                pieces.append(_Piece("text", tok[2:-2], response=True))
                names = FIELD.findall(tok)
            else:
                pieces.append(_Piece("field", tok[1:-1]))
                names = [tok[1:-1]]
            for name in names:
                if name in images:
                    raise CM3LeonError(f"template {task!r}: image field {{{name}}} must be a whole segment")
                text_fields.append(name)
            pos = m.end()
        if pos < len(seg):
            pieces.append(_Piece("text", seg[pos:]))
    if responses != 1:
        raise CM3LeonError(f"template {task!r} must mark exactly one response with [[...]], found {responses}")
    return tuple(pieces), tuple(dict.fromkeys(text_fields)), images


def template_spec(task: str) -> dict[str, Any]:
    if task not in TEMPLATES:
        raise CM3LeonError(f"unknown SFT task {task!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[task]


def required_fields(task: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(text fields, image fields) a record of `task` must give."""
    _, text_fields, images = _parse(task)
    return text_fields, images


def response_fields(task: str) -> tuple[str, ...]:
    """The fields inside the response (not needed to build an inference prompt)."""
    pieces, _, _ = _parse(task)
    p = next(p for p in pieces if p.response)
    return (p.value,) if p.kind == "image" else tuple(FIELD.findall(p.value))


def _text_value(task: str, fields: Mapping[str, Any], name: str) -> str:
    v = fields.get(name)
    if not isinstance(v, str) or not v.strip():
        raise CM3LeonError(f"SFT task {task!r}: field {name!r} must be non-empty text, got {v!r}")
    return v.strip()


def _piece_text(task: str, p: _Piece, fields: Mapping[str, Any]) -> str:
    """The string a text piece encodes: a field's value, the formatted response or the literal."""
    if p.kind == "field":
        return _text_value(task, fields, p.value)
    if p.response:
        return p.value.format(**{n: _text_value(task, fields, n) for n in FIELD.findall(p.value)})
    return p.value


def text_strings(task: str, fields: Mapping[str, Any]) -> list[str]:
    """The strings a record's document BPE-encodes, one per text piece (what a text tokenizer
    trained for this task should see); image fields are not needed."""
    pieces, _, _ = _parse(task)
    return [_piece_text(task, p, fields) for p in pieces if p.kind in ("text", "field")]


def _build(task: str, fields: Mapping[str, Any], vocab: Vocab, text_tokenizer,
           for_prompt: bool) -> tuple[list[int], tuple[int, int]]:
    pieces, _, _ = _parse(task)

    def text(s: str) -> list[int]:
        return vocab.text_to_ids(text_tokenizer.encode(s)).tolist() if s else []

    out: list[int] = [vocab.eos_id]
    span = (0, 0)
    for p in pieces:
        start = len(out)
        if p.response and for_prompt:
            out.append(vocab.mask_id(0))
            span = (start, len(out))
            continue
        if p.kind == "break":
            out.append(vocab.break_id)
        elif p.kind == "image":
            codes = fields.get(p.value)
            if codes is None:
                raise CM3LeonError(f"SFT task {task!r}: image field {p.value!r} is missing")
            ids = vocab.image_to_ids(codes).tolist()
            if not ids:
                raise CM3LeonError(f"SFT task {task!r}: image field {p.value!r} has no codes")
            out += ids
        else:
            out += text(_piece_text(task, p, fields))
        if p.response:
            span = (start, len(out))
    out.append(vocab.eos_id)
    return out, span


def render(task: str, fields: Mapping[str, Any], vocab: Vocab, text_tokenizer) -> TemplateDoc:
    """The training document of one record: text fields are strings, image fields are VQ codes
    (tokenizer-local, any shape). Raises CM3LeonError naming a missing or empty field."""
    tokens, span = _build(task, fields, vocab, text_tokenizer, for_prompt=False)
    if span[1] <= span[0]:
        raise CM3LeonError(f"SFT task {task!r}: the response renders to no tokens")
    return TemplateDoc(np.asarray(tokens, dtype=np.int64), span)


def prompt(task: str, fields: Mapping[str, Any], vocab: Vocab, text_tokenizer) -> list[int]:
    """The inference prompt of the same template (the response's fields are not needed).

    Response last: the document up to the response (the model continues left to right).
    Otherwise: infilling, `<eos> ... <mask:0> ... <eos> <mask:0>` (the model writes the
    response and `<eoss>`)."""
    tokens, (s, e) = _build(task, fields, vocab, text_tokenizer, for_prompt=True)
    if e == len(tokens) - 1:
        return tokens[:s]
    return tokens + [vocab.mask_id(0)]


def format_location(bbox: Sequence[float], width: float, height: float, grid: int = LOCATION_GRID) -> str:
    """`<x0,y0,x1,y1>`: a pixel box (left, top, right, bottom) of a `width` x `height` image,
    mapped into the square centre crop the image tokenizer sees and quantised to 0..grid-1."""
    if len(bbox) != 4:
        raise CM3LeonError(f"bbox must be [x0, y0, x1, y1] in pixels, got {bbox!r}")
    x0, y0, x1, y1 = (float(c) for c in bbox)
    if not (x1 > x0 and y1 > y0) or width <= 0 or height <= 0:
        raise CM3LeonError(f"bbox {bbox!r} is empty or the image size {width}x{height} is invalid")
    side = min(width, height)
    ox, oy = (width - side) / 2, (height - side) / 2  # centre crop offsets

    def q(v: float, off: float) -> int:
        return int(np.clip(np.floor((v - off) / side * grid), 0, grid - 1))

    return f"<{q(x0, ox)},{q(y0, oy)},{q(x1, ox)},{q(y1, oy)}>"


def format_segmentations(objects: Sequence[Mapping[str, Any]], width: float, height: float,
                         grid: int = LOCATION_GRID) -> str:
    """`name at <x0,y0,x1,y1>, name at <...>` for the grounded-generation template."""
    if not objects:
        raise CM3LeonError("layout record has no objects")
    parts = []
    for i, o in enumerate(objects):
        name = o.get("name") if isinstance(o, Mapping) else None
        if not isinstance(name, str) or not name.strip():
            raise CM3LeonError(f"layout object {i} has no 'name'")
        parts.append(f"{name.strip()} at {format_location(o.get('bbox') or (), width, height, grid)}")
    return ", ".join(parts)
