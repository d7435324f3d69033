"""`cm3leon eval model | sweep | fd | captions | vqa`.

`model` generates with a model directory on a dataset split and scores it (see
`cm3leon.eval.evaluate`); `sweep` compares decoding settings (`cm3leon.eval.sweep`).
`fd`, `captions` and `vqa` read predictions from disk, so they score any system's outputs
(ours or another model's), e.g. COCO caption results against the COCO annotation file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cm3leon.decode import config as decoding_config
from cm3leon.errors import CM3LeonError

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_ID_KEYS = ("id", "image_id", "question_id", "image", "key")


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a dataset (model, sweep) or score output files "
                                   "(fd, captions, vqa)")
    esub = p.add_subparsers(dest="eval_command", metavar="METRIC")
    esub.required = True

    f = esub.add_parser("fd", help="Fréchet distance between two image folders (FID with InceptionV3)")
    f.add_argument("--real", required=True, help="folder of reference images (searched recursively)")
    f.add_argument("--fake", required=True, help="folder of generated images (searched recursively)")
    f.add_argument("--features", default="pixelstats",
                   help="feature space: 'inception:WEIGHTS.pth' (standard FID, needs torch-fidelity), "
                        "'retriever:DIR' (our retriever's image encoder, FD-<name>), "
                        "or 'pixelstats' (colour/edge statistics, a smoke test; default)")
    f.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE first (default: as stored)")
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--out", default=None, help="also write the result as JSON here")
    f.set_defaults(func=_fd)

    c = esub.add_parser("captions", help="CIDEr-D and BLEU-4 (COCO caption evaluation)")
    c.add_argument("--pred", required=True,
                   help="predictions: JSONL/JSON rows with an id (id/image_id/image) and caption (or text)")
    c.add_argument("--refs", required=True,
                   help="references: rows with an id and caption/text (one row per caption) or a "
                        "'captions' list, or a COCO captions annotation JSON")
    c.add_argument("--out", default=None, help="also write the result as JSON here")
    c.set_defaults(func=_captions)

    v = esub.add_parser("vqa", help="VQAv2 accuracy")
    v.add_argument("--pred", required=True, help="predictions: rows with an id (question_id/id) and answer")
    v.add_argument("--refs", required=True,
                   help="references: rows with an id and 'answers' (list of strings or {answer}) or "
                        "'answer', or a VQAv2 annotation JSON")
    v.add_argument("--official-refs", action="store_true",
                   help="leave references unnormalised, exactly as the official code does")
    v.add_argument("--out", default=None, help="also write the result as JSON here")
    v.set_defaults(func=_vqa)

    def model_args(q, default_num: int) -> None:
        q.add_argument("--model", required=True, help="model directory (as `CM3Leon.from_pretrained` loads)")
        q.add_argument("--data", required=True,
                       help="dataset: a folder with captions.jsonl (shapes: also annotations.jsonl, vqa.jsonl, "
                            "edits.jsonl), .tar shards, or a COCO captions JSON")
        q.add_argument("--out", required=True, help="output folder")
        q.add_argument("--split", default="test", help="train | val | test | all (default test)")
        q.add_argument("--num", type=int, default=default_num,
                       help="prompts / images / questions per task (default %(default)s; 0 = the whole split)")
        q.add_argument("--images", default=None, help="COCO: the image folder (default: found next to the JSON)")
        q.add_argument("--fid-features", default="retriever",
                       help="FD feature space: 'retriever' (the model's retriever/ or --clip-retriever: FD-CLIP / "
                            "FD-retriever; default), 'retriever:DIR', 'inception:WEIGHTS.pth' (standard FID), "
                            "'pixelstats' (smoke test)")
        q.add_argument("--clip-retriever", default=None,
                       help="retriever directory that scores images (CLIP score, FD), e.g. one made with "
                            "`cm3leon retriever clip` from local CLIP weights (default: the model's own)")
        q.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
        q.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
        q.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")

    from cm3leon.eval.evaluate import METRICS

    m = esub.add_parser("model", help="generate with a model on a dataset split and score it "
                                      "(shapes accuracy, FD, CLIP score, CIDEr-D, VQA, editing)")
    model_args(m, 200)
    m.add_argument("--metrics", default=",".join(METRICS),
                   help=f"comma-separated, any of {', '.join(METRICS)} (default all)")
    decoding_config.add_arguments(m)  # text->image decoding: the model's decoding.json unless given
    m.set_defaults(func=_model)

    w = esub.add_parser("sweep", help="compare decoding: TopP, TopP+CFG over scales, CD-K, best-of-N "
                                      "(the paper's Figure 4 on your data)")
    model_args(w, 100)
    w.add_argument("--cfg-scales", default="1,2,3,5,7", help="CFG scales α (default 1,2,3,5,7)")
    w.add_argument("--best-of", default="1,2,4,8", help="best-of-N candidate counts (default 1,2,4,8)")
    w.add_argument("--seeds", default=None,
                   help="sampling seeds, comma-separated: each figure is the mean over them, with its spread "
                        "(default: --seed alone)")
    w.add_argument("--methods", default=None,
                   help="decoding families to compare, comma-separated (default all: topp, cfg, cdk, best_of_n)")
    w.add_argument("--retrieved", default="",
                   help="k values, comma-separated: extra TopP+CFG settings with k retrieved documents "
                        "(retrieval k vs the shared --num-retrieved)")
    w.add_argument("--temperatures", default="",
                   help="sampling temperatures, comma-separated: extra TopP+CFG settings at the shared "
                        "--cfg-scale (temperature vs the shared --temperature)")
    # what every setting starts from (the model's decoding.json unless given); --cfg-scale is
    # best-of-N's and the --retrieved settings' scale
    decoding_config.add_arguments(w, skip=("method", "num_candidates", *decoding_config.TASK_ONLY))
    w.set_defaults(func=_sweep)


# ---- file readers -------------------------------------------------------------------------


def _rows(path: str) -> list[dict]:
    """Rows of a JSONL file, a JSON list, or the 'annotations' list of a COCO/VQA JSON."""
    from cm3leon.utils.io import read_json, read_jsonl

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"file not found: {p}")
    if p.suffix == ".jsonl":
        try:
            rows = list(read_jsonl(p))
        except ValueError as e:
            raise CM3LeonError(str(e)) from None
    else:
        try:
            data = read_json(p)
        except ValueError as e:
            raise CM3LeonError(str(e)) from None
        rows = data.get("annotations") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise CM3LeonError(f"{p}: expected a JSON list of rows or a dict with 'annotations'")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise CM3LeonError(f"{p}: row {i + 1} is not an object")
    return rows


def _row_id(row: dict, path: str, i: int) -> Any:
    for k in _ID_KEYS:
        if k in row:
            return row[k]
    raise CM3LeonError(f"{path}: row {i + 1} has no id field (one of {', '.join(_ID_KEYS)})")


def _field(row: dict, keys: tuple[str, ...], path: str, i: int) -> Any:
    for k in keys:
        if k in row:
            return row[k]
    raise CM3LeonError(f"{path}: row {i + 1} has none of the fields {', '.join(keys)}")


def _grouped(path: str, single: tuple[str, ...], multi: tuple[str, ...]) -> dict:
    """{id: [strings]} from rows holding either one string (several rows per id) or a list."""
    out: dict = {}
    for i, r in enumerate(_rows(path)):
        key = _row_id(r, path, i)
        m = next((r[k] for k in multi if k in r), None)
        vals = m if m is not None else [_field(r, single, path, i)]
        if not isinstance(vals, list):
            raise CM3LeonError(f"{path}: row {i + 1}: {multi[0]} must be a list")
        vals = [v["answer"] if isinstance(v, dict) and "answer" in v else v for v in vals]
        if not all(isinstance(v, str) for v in vals):
            raise CM3LeonError(f"{path}: row {i + 1}: expected strings")
        out.setdefault(key, []).extend(vals)
    return out


def _single(path: str, keys: tuple[str, ...]) -> dict:
    out: dict = {}
    for i, r in enumerate(_rows(path)):
        key = _row_id(r, path, i)
        if key in out:
            raise CM3LeonError(f"{path}: id {key!r} appears twice")
        val = _field(r, keys, path, i)
        if not isinstance(val, str):
            raise CM3LeonError(f"{path}: row {i + 1}: {keys[0]} must be a string")
        out[key] = val
    return out


def _emit(result: dict, out: str | None) -> int:
    from cm3leon.utils.io import write_json

    if out:
        write_json(out, result)
    print(json.dumps(result, indent=2))
    return 0


# ---- commands -----------------------------------------------------------------------------


def _load_images(folder: str) -> list:
    from PIL import Image

    p = Path(folder)
    if not p.is_dir():
        raise FileNotFoundError(f"image folder not found: {p}")
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in _IMAGE_EXTS)
    if not files:
        raise CM3LeonError(f"{p}: no images ({', '.join(_IMAGE_EXTS)})")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
        except OSError as e:
            raise CM3LeonError(f"{f}: not a readable image ({e})") from None
    return images


def _fd(args) -> int:
    from cm3leon.eval.fid import compute_fd, make_extractor

    extractor = make_extractor(args.features)
    real, fake = _load_images(args.real), _load_images(args.fake)
    if args.size:
        real = [im.resize((args.size, args.size)) for im in real]
        fake = [im.resize((args.size, args.size)) for im in fake]
    res = compute_fd(real, fake, extractor, batch_size=args.batch_size)
    return _emit(res, args.out)


def _captions(args) -> int:
    from cm3leon.eval.captioning import caption_metrics

    preds = _single(args.pred, ("caption", "text"))
    refs = _grouped(args.refs, ("caption", "text"), ("captions", "references"))
    return _emit(caption_metrics(preds, refs), args.out)


def _vqa(args) -> int:
    from cm3leon.eval.vqa import vqa_score

    preds = _single(args.pred, ("answer", "text"))
    refs = _grouped(args.refs, ("answer", "multiple_choice_answer"), ("answers",))
    missing = [k for k in preds if k not in refs]
    if missing:
        raise CM3LeonError(f"{args.refs}: no reference answers for question id(s) {missing[:5]}")
    keys = list(preds)
    res = vqa_score([preds[k] for k in keys], [refs[k] for k in keys], not args.official_refs)
    res.pop("per_question")
    return _emit(res, args.out)


def _num_and_split(args) -> tuple[int | None, str | None]:
    if args.num < 0:
        raise CM3LeonError(f"--num must be >= 0 (0 = the whole split), got {args.num}")
    return (args.num or None), (None if args.split == "all" else args.split)


def _model(args) -> int:
    from cm3leon.eval.evaluate import evaluate_model, headline_rows
    from cm3leon.eval.report import markdown_table

    num, split = _num_and_split(args)
    res = evaluate_model(args.model, args.data, args.out, metrics=args.metrics, split=split, num_prompts=num,
                         decoding=decoding_config.given(args), seed=args.seed, batch_size=args.batch_size,
                         fid_features=args.fid_features, clip_retriever=args.clip_retriever, images=args.images,
                         device=args.device)
    print(markdown_table(headline_rows(res["metrics"]), ["metric", "value", "n", "note"]))
    print(f"wrote {Path(args.out) / 'metrics.json'}, metrics.md, samples.jsonl and grid_*.png")
    return 0


def _sweep(args) -> int:
    from cm3leon.eval.report import markdown_table
    from cm3leon.eval.sweep import spread_rows, sweep_decoding

    num, split = _num_and_split(args)
    res = sweep_decoding(args.model, args.data, args.out, cfg_scales=args.cfg_scales, best_of=args.best_of,
                         num_prompts=num, seed=args.seed, split=split, batch_size=args.batch_size,
                         fid_features=args.fid_features, clip_retriever=args.clip_retriever, images=args.images,
                         device=args.device, decoding=decoding_config.given(args), seeds=args.seeds,
                         retrieved=args.retrieved, temperatures=args.temperatures,
                         methods=args.methods)
    print(markdown_table(spread_rows(res["rows"], res["metrics"]), ["setting", *res["metrics"], "seconds_per_image"]))
    print(f"wrote {Path(args.out) / 'sweep.json'}, sweep.md and {len(res['plots'])} plot(s)")
    return 0
