"""`cm3leon export hf` and `cm3leon import hf`: exact conversion to / from HF OPT."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("export", help="export a trained model to another format")
    esub = p.add_subparsers(dest="export_format", metavar="FORMAT")
    esub.required = True
    e = esub.add_parser("hf", help="a Hugging Face OPTForCausalLM directory (transformers / vLLM)")
    e.add_argument("--model", required=True, help="CM3Leon model directory (config.json + model.safetensors)")
    e.add_argument("--out", required=True, help="output directory (replaced)")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weight dtype of the export (default: as stored)")
    e.set_defaults(func=_export_hf)

    p = sub.add_parser("import", help="import a model from another format")
    isub = p.add_subparsers(dest="import_format", metavar="FORMAT")
    isub.required = True
    i = isub.add_parser("hf", help="a Hugging Face OPT directory with enable_bias=false and "
                                   "layer_norm_elementwise_affine=false")
    i.add_argument("--hf", required=True, help="OPT directory (config.json + safetensors or pytorch_model.bin)")
    i.add_argument("--out", required=True, help="CM3Leon model directory to write (replaced)")
    i.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weight dtype of the import (default: as stored)")
    i.set_defaults(func=_import_hf)


def _export_hf(args) -> int:
    from cm3leon.convert.hf_opt import export_hf

    print(json.dumps(export_hf(args.model, args.out, dtype=args.dtype), indent=2))
    return 0


def _import_hf(args) -> int:
    from cm3leon.convert.hf_opt import import_hf

    info = import_hf(args.hf, args.out, dtype=args.dtype)
    print(json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2))
    return 0
