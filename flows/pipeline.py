"""The pipeline as a Prefect flow: the same stages and paths as dvc.yaml, as tasks with retries.

    python -m slotwise.flows.pipeline --params params.yaml --runs runs
    python -m slotwise.flows.pipeline --runs runs --publish-to s3://bucket/slotwise/runs   # also publish each output
    python -m slotwise.flows.pipeline --stages slot_stats continual evaluate                 # the rest already in runs/
    python -m slotwise.flows.pipeline --stages train --nproc 8          # train on 8 local GPUs (torchrun)

    data -> retrofit -> train -> slot_stats -> continual -> evaluate

Each task calls the stage's component (`slotwise.components.<stage>.main([...])`) with paths under
--runs; nothing but paths crosses between tasks. A failing stage is retried (twice, after 10 s and
60 s) unless the failure is bad input (params, a corrupt checkpoint, a mismatched slot table),
which no retry fixes. `dvc repro` remains the way to skip what is up to date; this flow runs what
it is asked to, and with --publish-to puts every output on S3 (slotwise.storage.publish: readers
see the old version or the new one, whole).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from slotwise import storage
from slotwise.flows.tasks import retry_unless_user_error, run_component

STAGES = ("data", "retrofit", "train", "slot_stats", "continual", "evaluate")


def stage_args(name: str, params: str, runs: Path, nproc: int = 1) -> list[str]:
    """The command line of each stage, as in dvc.yaml; nproc > 1 runs train on that many local ranks."""
    r = {s: str(runs / s) for s in STAGES}
    args = ["--params", params]
    if name == "train":
        args += ["--model", r["retrofit"], "--data", r["data"], "--state", str(runs / "train_state")]
        args += ["--nproc", str(nproc)] if nproc > 1 else []
    elif name in ("slot_stats", "evaluate"):
        args += ["--model", r["train"], "--data", r["data"]]
    elif name == "continual":
        args += ["--model", r["train"], "--data", r["data"], "--stats", r["slot_stats"]]
    return args + ["--out", r[name]]


@task(task_run_name="{name}", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def stage(name: str, args: list[str]) -> str:
    """Run one stage's component; returns its output path."""
    run_component(name, args)
    return args[args.index("--out") + 1]


@task(task_run_name="publish-{uri}", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def publish(path: str, uri: str) -> str:
    return storage.publish(path, uri)


@flow(name="slotwise-pipeline", log_prints=True)
def pipeline(params: str = "params.yaml", runs: str = "runs", stages: list[str] | None = None,
             publish_to: str | None = None, nproc: int = 1) -> dict[str, str]:
    """Run the stages (all by default, always in DAG order); returns {stage: output path}."""
    wanted = list(stages or STAGES)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; expected some of {list(STAGES)}")
    outs = {}
    for name in STAGES:
        if name not in wanted:
            continue
        outs[name] = stage(name, stage_args(name, params, Path(runs), nproc))
        if publish_to:
            publish(outs[name], f"{publish_to.rstrip('/')}/{name}")
    return outs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slotwise.flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--runs", default="runs", help="local folder of stage outputs (as in dvc.yaml)")
    parser.add_argument("--stages", nargs="*", default=None, choices=STAGES)
    parser.add_argument("--publish-to", default=None, help="also publish each output to <uri>/<stage> (s3:// or a folder)")
    parser.add_argument("--nproc", type=int, default=1, help="train on this many local ranks (torchrun; GPUs when present)")
    a = parser.parse_args(argv)
    print(json.dumps(pipeline(params=a.params, runs=a.runs, stages=a.stages, publish_to=a.publish_to, nproc=a.nproc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
