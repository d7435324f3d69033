"""`cm3leon data synth | check | checker`: the built-in shapes dataset and dataset checks."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("data", help="build the shapes dataset, check a dataset")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True

    s = dsub.add_parser("synth", help="render the built-in shapes dataset (captions, VQA, edits, layouts)",
                        description="Render the built-in shapes dataset. --format folder (default): PNGs, "
                                    "captions.jsonl and the instruction data (VQA, edits, layouts). --format "
                                    "webdataset: the captioned images alone as img2dataset-layout .tar shards "
                                    "(.jpg + .txt + .json), streamed and resumable per shard: a million "
                                    "records is one command.")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--format", choices=("folder", "webdataset"), default="folder",
                   help="folder (default) or webdataset shards")
    s.add_argument("--shard-size", type=int, default=None,
                   help="scenes per .tar shard, --format webdataset only (default 10000)")
    s.add_argument("--num", type=int, default=2000, help="number of scenes (default 2000)")
    s.add_argument("--size", type=int, default=64, help="image side in pixels, 32..256 (default 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical files)")
    s.add_argument("--max-objects", type=int, default=3, help="objects per scene, 1..3 (default 3)")
    s.set_defaults(func=_synth)

    c = dsub.add_parser("check", help="read a dataset and count records skipped, by reason")
    c.add_argument("path", help="dataset: folder with captions.jsonl, folder of .tar shards, or COCO captions JSON")
    c.add_argument("--size", type=int, default=64, help="image size the reader resizes to (default 64)")
    c.add_argument("--images", default=None, help="image folder (COCO layout only)")
    c.add_argument("--json", action="store_true", help="print the counts as JSON")
    c.set_defaults(func=_check)

    k = dsub.add_parser("checker", help="measure the shapes checker on freshly rendered scenes")
    k.add_argument("--num", type=int, default=1000)
    k.add_argument("--size", type=int, default=64)
    k.add_argument("--seed", type=int, default=1234)
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=_checker)


def _synth(args) -> int:
    from cm3leon.data.shapes import synthesize, synthesize_webdataset
    from cm3leon.errors import CM3LeonError

    common = dict(num=args.num, size=args.size, seed=args.seed, max_objects=args.max_objects)
    if args.format == "webdataset":
        summary = synthesize_webdataset(args.out, shard_size=args.shard_size or 10_000, **common)
    elif args.shard_size is not None:
        raise CM3LeonError("--shard-size: only --format webdataset writes shards")
    else:
        summary = synthesize(args.out, **common)
    print(json.dumps(summary, indent=2))
    return 0


def _check(args) -> int:
    from cm3leon.data.readers import check_dataset

    report = check_dataset(args.path, size=args.size, images=args.images)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.path}: {report['ok']} records ok, {report['skipped']} skipped")
        for reason, n in sorted(report["skipped_by_reason"].items()):
            print(f"  {reason}: {n}")
    return 0


def _checker(args) -> int:
    from cm3leon.data.checker import evaluate_on_rendered

    res = evaluate_on_rendered(num=args.num, size=args.size, seed=args.seed)
    print(json.dumps(res, indent=2) if args.json else
          f"shapes checker at {args.size}px on {args.num} scenes: {100 * res['object_recall']:.2f}% objects recovered exactly, "
          f"{100 * res['scene_accuracy']:.2f}% scenes exact")
    return 0
