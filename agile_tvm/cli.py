"""The `agile-tvm` command line.

Subcommands live in `agile_tvm/commands/`, one module per area (quantize, eval, rpc, tune, deploy), each with a
`register(subparsers)` function, so the parts of the data path can grow without editing one shared file.
Heavy imports (torch, tvm) happen inside the subcommands, so `agile-tvm --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from agile_tvm import commands
from agile_tvm.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agile-tvm",
        description="Agile-Quant W4A8/W4A4 LLMs on edge CPUs through Apache TVM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"agile-tvm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"agile-tvm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
