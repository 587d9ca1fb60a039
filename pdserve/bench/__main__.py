"""`python -m pdserve.bench ...`: the same as `pdserve bench ...`, without the engine's CLI."""

from __future__ import annotations

import argparse
import sys

from pdserve.bench import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
