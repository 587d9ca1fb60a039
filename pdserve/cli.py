"""The `pdserve` command: one sub-command per module that owns it."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes add_parser(subparsers); its parser sets `func(args) -> int`.
SUBCOMMANDS = {
    "serve": "pdserve.server.cli",
    "router": "pdserve.router.cli",
    "up": "pdserve.launch.cli",
    "bench": "pdserve.bench.cli",
    "plan": "pdserve.planner.cli",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """All sub-commands (for --help), or only `only`: one team's import error or slow
    import then never breaks another's command."""
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="Serve LLMs with prefill/decode disaggregation, and measure it.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        if only is None or name == only:
            importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(command).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
