"""`cm3leon generate image | caption | vqa | edit`: samples from a model directory.

Every command writes its outputs under --out (PNG files for images) and appends one JSON
line per sample to `--out/samples.jsonl` with the prompt, seed, decoding settings and score.

    cm3leon generate image --model runs/demo/sft/model --prompt "a red circle" --n 4 --method cfg
    cm3leon generate caption --model DIR --image photo.png
    cm3leon generate vqa --model DIR --image photo.png --question "what colour is the shape?"
    cm3leon generate edit --model DIR --image photo.png --instruction "make it blue"
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cm3leon.decode import config as decoding_config

SAMPLES_FILE = "samples.jsonl"


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images or text from a trained model directory")
    gsub = p.add_subparsers(dest="generate_command", metavar="TASK")
    gsub.required = True

    def common(q, image_sampling: bool | None) -> None:
        q.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, ...)")
        q.add_argument("--out", default="samples", help="output folder (default ./samples)")
        q.add_argument("--device", default="cpu", help="torch device (default cpu)")
        q.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as saved)")
        q.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
        if image_sampling is None:  # text -> image: every DecodingConfig flag
            return
        q.add_argument("--temperature", type=float, default=None if image_sampling else 0.0,
                       help="0 = greedy (default " + ("the model's decoding.json, else 1)" if image_sampling
                                                      else "%(default)s)"))
        q.add_argument("--top-p", type=float, default=0.9 if image_sampling else None,
                       help="nucleus sampling mass (default %(default)s)")
        q.add_argument("--top-k", type=int, default=None, help="keep the k best tokens (default all)")

    t = gsub.add_parser("image", help="text -> image")
    common(t, None)
    t.add_argument("text", nargs="*", default=[], help="text prompt(s), e.g. \"a red circle\"")
    t.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    t.add_argument("--prompts", help="a text file with one prompt per line")
    t.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    decoding_config.add_arguments(t, skip=decoding_config.TASK_ONLY)
    # (every flag's default: the model's decoding.json, else the config's)
    t.set_defaults(func=_image)

    c = gsub.add_parser("caption", help="image -> text (infilling)")
    common(c, False)
    c.add_argument("--image", action="append", required=True, help="an image file (repeatable)")
    c.add_argument("--max-new-tokens", type=int, default=32)
    decoding_config.add_arguments(c, only=("caption_candidates", "scorer"))
    c.set_defaults(func=_caption)

    v = gsub.add_parser("vqa", help="answer a question about an image")
    common(v, False)
    v.add_argument("--image", required=True, help="an image file")
    v.add_argument("--question", action="append", required=True, help="a question (repeatable)")
    v.add_argument("--max-new-tokens", type=int, default=16)
    decoding_config.add_arguments(v, only=("answer_candidates",))
    v.set_defaults(func=_vqa)

    e = gsub.add_parser("edit", help="edit an image following an instruction")
    common(e, True)
    e.add_argument("--image", required=True, help="the image to edit")
    e.add_argument("--instruction", required=True, help="what to change")
    e.add_argument("--n", type=int, default=1, help="edited images to draw (default 1)")
    e.add_argument("--image-guidance", type=float, default=None,
                   help="source-image guidance (default: the model's decoding.json, else the paper's 1.5)")
    e.add_argument("--text-guidance", type=float, default=None,
                   help="instruction guidance (default: the model's decoding.json, else the paper's 7.5)")
    decoding_config.add_arguments(e, only=("edit_candidates",))
    e.set_defaults(func=_edit)


def _load(args):
    from cm3leon.api import CM3Leon

    return CM3Leon.from_pretrained(args.model, device=args.device, dtype=args.dtype)


def append_samples(out: Path, rows: list[dict]) -> Path:
    """Append rows to `out/samples.jsonl` (rewritten atomically with the old rows first)."""
    from cm3leon.utils.io import read_jsonl, write_jsonl

    path = out / SAMPLES_FILE
    old = list(read_jsonl(path)) if path.is_file() else []
    write_jsonl(path, old + rows)
    return path


def _save_png(image, path: Path) -> None:
    from cm3leon.utils.io import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _next_index(out: Path) -> int:
    """First free sample number, so repeated runs into one folder never overwrite images."""
    nums = [int(p.stem.split("_")[0]) for p in out.glob("[0-9]*_*.png") if p.stem.split("_")[0].isdigit()]
    return max(nums, default=-1) + 1


def generate_images(m, prompts: list[str], out: Path, n: int = 1, seed: int = 0, **options) -> list[dict]:
    """Images for every prompt into `out` (PNG + samples.jsonl rows); returns the rows.
    options: DecodingConfig fields over the model's (`m.decoding`)."""
    from cm3leon.errors import CM3LeonError
    from cm3leon.utils.logging import progress

    if not prompts:
        raise CM3LeonError("no prompts: pass --prompt TEXT or --prompts FILE")
    out.mkdir(parents=True, exist_ok=True)
    first = _next_index(out)
    decoding = m.decoding.replace(**options)
    rows = []
    with progress(total=len(prompts), desc=f"generate {decoding.method}", unit="prompt") as bar:
        for i, prompt in enumerate(prompts):
            samples = m.sample_images(prompt, n=n, decoding=decoding, seed=seed + i)
            for j, s in enumerate(samples):
                f = out / f"{first + i:04d}_{j}.png"
                _save_png(s.image, f)
                rows.append({"task": "image", "file": f.name, **s.to_json()})
            bar.update(1)
    append_samples(out, rows)
    return rows


def _read_prompts(args) -> list[str]:
    from cm3leon.errors import CM3LeonError

    prompts = list(args.text) + list(args.prompt)
    if args.prompts:
        p = Path(args.prompts)
        if not p.is_file():
            raise CM3LeonError(f"--prompts: file not found: {p}")
        prompts += [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts


def _image(args) -> int:
    m = _load(args)
    out = Path(args.out)
    rows = generate_images(m, _read_prompts(args), out, n=args.n, seed=args.seed, **decoding_config.given(args))
    print(f"wrote {len(rows)} image(s) and {out / SAMPLES_FILE}", file=sys.stderr)
    return 0


def _text_settings(args) -> dict:
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens}


def _caption(args) -> int:
    m = _load(args)
    out = Path(args.out)
    rows = []
    d = m.decoding.replace(caption_candidates=args.caption_candidates, scorer=args.scorer)  # checked here
    settings = {**_text_settings(args), "caption_candidates": d.caption_candidates, "scorer": d.scorer}
    for path in args.image:
        text = m.image_to_text(path, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                               num_candidates=args.caption_candidates, scorer=args.scorer)
        print(json.dumps({"image": path, "text": text}))
        rows.append({"task": "caption", "image": str(path), "text": text, "seed": args.seed,
                     "settings": settings, "score": None})
    out.mkdir(parents=True, exist_ok=True)
    append_samples(out, rows)
    return 0


def _vqa(args) -> int:
    m = _load(args)
    out = Path(args.out)
    rows = []
    d = m.decoding.replace(answer_candidates=args.answer_candidates)  # checked here
    settings = {**_text_settings(args), "answer_candidates": d.answer_candidates}
    for q in args.question:
        a = m.answer(args.image, q, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, top_k=args.top_k, seed=args.seed, num_candidates=args.answer_candidates)
        print(json.dumps({"question": q, "answer": a}))
        rows.append({"task": "vqa", "image": str(args.image), "question": q, "text": a, "seed": args.seed,
                     "settings": settings, "score": None})
    out.mkdir(parents=True, exist_ok=True)
    append_samples(out, rows)
    return 0


def _edit(args) -> int:
    m = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # > 1: draw that many, keep the best --n (replace() checks the value, naming the flag's field)
    ranked = m.decoding.replace(edit_candidates=args.edit_candidates).edit_candidates
    samples = m.edit_samples(args.image, args.instruction, image_guidance=args.image_guidance,
                             text_guidance=args.text_guidance, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, seed=args.seed, n=args.n, num_candidates=ranked)
    first = _next_index(out)
    rows = []
    for j, s in enumerate(samples):
        f = out / f"{first:04d}_{j}.png"
        _save_png(s.image, f)
        rows.append({"task": "edit", "file": f.name, "image": str(args.image), **s.to_json()})
    append_samples(out, rows)
    print(f"wrote {len(rows)} image(s) and {out / SAMPLES_FILE}", file=sys.stderr)
    return 0
