"""Serve the nightly knowledge update on a cron schedule: a long-running process that runs the flow.

    export PREFECT_API_URL=http://127.0.0.1:4200/api          # a Prefect server (prefect server start)
    python -m slotwise.flows.serve --cron "0 2 * * *" --params params.yaml --model runs/train \\
        --stats runs/slot_stats --data runs/data --drop s3://bucket/drop --serve /srv/slotwise
    prefect deployment run nightly-knowledge-update/nightly    # trigger a run now

Runs execute inside this process, at most one at a time (limit=1); the serving directory's lock
also stops a second run started any other way. The alternative with a process work pool and a
worker is prefect.yaml (`prefect deploy --all`, `prefect worker start --pool slotwise-process`).
"""
from __future__ import annotations

import argparse
import sys

from slotwise.flows.nightly import nightly


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slotwise.flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    parser.add_argument("--cron", default="0 2 * * *", help="cron schedule, UTC (default: 02:00 every night)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="runs/train")
    parser.add_argument("--stats", default="runs/slot_stats")
    parser.add_argument("--data", default="runs/data")
    parser.add_argument("--drop", default="drop")
    parser.add_argument("--serve", default="serve")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    a = parser.parse_args(argv)
    nightly.serve(name=a.name, cron=a.cron, limit=1, tags=["slotwise", "nightly"],
                  description="new facts from the drop location -> SMF -> retention gate -> promote or keep",
                  parameters={"params": a.params, "model": a.model, "stats": a.stats, "data": a.data, "drop": a.drop,
                              "serve": a.serve, "overrides": a.overrides})
    return 0


if __name__ == "__main__":
    sys.exit(main())
