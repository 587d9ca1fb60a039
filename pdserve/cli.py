"""The `pdserve` command: one sub-command per module that owns it."""

from __future__ import annotations

import argparse
import importlib

# Each module exposes add_parser(subparsers); its parser sets `func(args) -> int`.
SUBCOMMAND_MODULES = [
    "pdserve.server.cli",
    "pdserve.bench.cli",
    "pdserve.router.cli",
    "pdserve.launch.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="Serve LLMs with prefill/decode disaggregation, and measure it.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
