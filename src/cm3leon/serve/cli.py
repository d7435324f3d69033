"""`cm3leon serve --model DIR [--host 127.0.0.1] [--port 7860]`: the web UI (`cm3leon.serve.app`)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("serve", help="web UI over a model directory: every task, images drawn live "
                                     "(needs: pip install 'cm3leon[ui]')")
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, ...)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as saved)")
    p.set_defaults(func=_serve)


def _serve(args) -> None:
    from cm3leon.serve.app import serve

    serve(args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype)
