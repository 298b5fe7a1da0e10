"""dvclive as the stages' optional logger (`--live`): the training loss and the continual curves in
dvclive's layout, so `dvc exp show` has their columns and `dvc plots diff` overlays experiments.

    <out>/live/metrics.json                 last value of every metric (dvclive's summary)
    <out>/live/plots/metrics/<name>.tsv     step, value: one row per logged point

The library takes plain callbacks (training.train's on_entry, experiment.run_stream's on_point);
only this module imports dvclive. It is off unless asked for: dvclive looks for a DVC repository
from the working directory (and runs `dvc init` in a git repository that has none), which a stage
run by hand should not do. dvc.yaml passes --live. No timestamps are logged: the files are part of
a cached stage output and must be the same bytes on every run.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

from slotwise.errors import ConfigError

LIVE_DIR = "live"  # inside the stage's output directory


@contextlib.contextmanager
def live_logger(directory: str | Path | None) -> Iterator[object | None]:
    """A dvclive Live writing to `directory` (None: no logging; yields None)."""
    if directory is None:
        yield None
        return
    try:
        from dvclive import Live
    except ImportError:
        raise ConfigError("--live needs dvclive (pip install 'slotwise[pipeline]')") from None
    with Live(str(directory), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        yield live


TRAIN_METRICS = {"lm_loss": "train/loss", "balance": "train/balance", "eval_loss": "eval/loss"}


def train_entry_logger(live) -> Callable[[dict], None] | None:
    """training.train's on_entry -> train/loss, train/balance (every step) and eval/loss (at evaluations)."""
    if live is None:
        return None

    def log(entry: dict) -> None:
        live.step = entry["step"]
        for key, name in TRAIN_METRICS.items():
            if entry.get(key) is not None:
                live.log_metric(name, entry[key])

    return log


CURVE_METRICS = ("learned", "known_kept", "acquisition_f1", "heldout_ppl")


def curve_point_logger(live, run: str) -> Callable[[dict], None] | None:
    """run_stream's on_point for one run -> <run>/<metric> at step = facts seen (one file per run
    and metric, so `dvc plots diff` overlays the same run of two experiments)."""
    if live is None:
        return None

    def log(point: dict) -> None:
        live.step = point["facts_seen"]
        for key in CURVE_METRICS:
            if point.get(key) is not None:
                live.log_metric(f"{run}/{key}", point[key])

    return log
