"""What every component's command line shares: --params, --out, key=value overrides, and the
rule that bad input ends in one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from slotwise.checkpoint import CheckpointError
from slotwise.config import ConfigError
from slotwise.models import ModelSourceError
from slotwise.sources import DataError
from slotwise.storage import StorageError

USER_ERRORS = (ConfigError, ModelSourceError, CheckpointError, DataError, StorageError, FileNotFoundError)


def component_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="params overrides, e.g. retrofit.insert.memory.n_keys=64")
    return parser


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a component's main; user errors become one line on stderr and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        code = main(argv)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def resolve_device(name: str, key: str = "device"):
    """params `device` (auto | cpu | cuda) -> torch.device; `key` names the param in the error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"key '{key}': cuda requested but no CUDA device is available")
    return torch.device(name)
