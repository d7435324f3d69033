"""`cm3leon tokenizer text | image` and `cm3leon tokenize`."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train the text (BPE) or image (VQ) tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="KIND")
    tsub.required = True

    t = tsub.add_parser("text", help="train a byte-level BPE on a dataset's captions")
    t.add_argument("--data", required=True, help="dataset (any reader format)")
    t.add_argument("--out", required=True, help="output folder (tokenizer.json)")
    t.add_argument("--vocab-size", default="small",
                   help="number of BPE tokens, or a preset: small (1024, default), tiny (512), paper (56320)")
    t.add_argument("--split", default="train", help="split whose captions train the BPE (default train)")
    t.set_defaults(func=_text)


def _text(args) -> int:
    from cm3leon.tokenizers.text import train_text_tokenizer

    info = train_text_tokenizer(args.data, args.out, vocab_size=args.vocab_size, split=args.split)
    print(json.dumps(info, indent=2))
    return 0
