"""The `slotwise` command: one subcommand per pipeline stage.

    slotwise retrofit --params params.yaml --out runs/retrofit [key=value ...]
    slotwise --help
"""
from __future__ import annotations

import importlib
import sys

from slotwise.components._cli import run_cli

STAGES = {
    "data": "slotwise.components.data",
    "retrofit": "slotwise.components.retrofit",
    "slot_stats": "slotwise.components.slot_stats",
    "train": "slotwise.components.train",
    "continual": "slotwise.components.continual",
    "evaluate": "slotwise.components.evaluate",
    "report": "slotwise.components.report",
    "update": "slotwise.components.update",
    "gate": "slotwise.components.gate",
    "export": "slotwise.components.export",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nstages: " + ", ".join(STAGES))
        sys.exit(0 if argv else 2)
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}; expected one of: {', '.join(STAGES)}", file=sys.stderr)
        sys.exit(2)
    run_cli(importlib.import_module(STAGES[stage]).main, rest)
