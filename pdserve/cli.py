"""The `pdserve` command: one sub-command per module that owns it."""

from __future__ import annotations

import argparse
import importlib
import sys

from pdserve import __version__

# Each module exposes add_parser(subparsers); its parser sets `func(args) -> int`.
SUBCOMMANDS = {
    "serve": "pdserve.server.cli",
    "router": "pdserve.router.cli",
    "up": "pdserve.launch.cli",
    "deploy": "pdserve.launch.deploy",
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
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        if only is None or name == only:
            importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_parser(command)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the sub-command's usage, not the top level's: that is where the flag went
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(args.func(args) or 0)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


if __name__ == "__main__":
    raise SystemExit(main())
