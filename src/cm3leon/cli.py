"""`cm3leon` command line: one subcommand per pipeline stage.

Each stage module exposes `register(subparsers)`, which adds its subcommand(s) with a
`func(args) -> int | None` default; heavy imports happen inside the handlers so `--help`
stays fast."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from cm3leon import __version__
from cm3leon.errors import CM3LeonError, MissingDependencyError

# Stage modules, in pipeline order. Each defines `register(subparsers)`.
COMMAND_MODULES = (
    "cm3leon.data.cli",
    "cm3leon.tokenizers.cli",
    "cm3leon.retrieval.cli",
    "cm3leon.train.cli",
    "cm3leon.sft.cli",
    "cm3leon.convert.cli",
    "cm3leon.decode.cli",
    "cm3leon.eval.cli",
    "cm3leon.run.report",
    "cm3leon.run.ablate_cli",
    "cm3leon.run.pipeline",
    "cm3leon.serve.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cm3leon",
        description="CM3Leon: text<->image generation with one decoder-only transformer.",
    )
    parser.add_argument("--version", action="version", version=f"cm3leon {__version__}")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="let image paths a dataset names leave its folder (absolute paths, '..', symlinks "
                             "out); by default such records are skipped and counted as outside_root")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from cm3leon.data.readers import outside_root_allowed

        with outside_root_allowed(args.allow_outside_root):
            rc = args.func(args)
    except (CM3LeonError, FileNotFoundError, MissingDependencyError) as e:
        if os.environ.get("CM3LEON_DEBUG"):
            raise
        print(f"cm3leon {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write outside atomic_path (an image, a report) that found no space
        from cm3leon.utils.io import out_of_space_reason

        reason = out_of_space_reason(e)
        if reason is None or os.environ.get("CM3LEON_DEBUG"):
            raise
        print(f"cm3leon {args.command}: error: {e.filename or 'a file'}: write failed, {reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ncm3leon {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
