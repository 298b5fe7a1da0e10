"""What every flow's tasks share: run a component's main() in-process, and retry only what may pass next time.

    run_component("update", ["--params", "params.yaml", "--model", "runs/train", ...])

Components take and return paths (never tensors); a user error (bad params, a corrupt checkpoint,
another model's slot table, missing data) fails the task at once, since retrying cannot fix it;
anything else (S3 hiccups past storage's own retries, a killed worker, CUDA OOM) is retried.
Set PREFECT_LOGGING_EXTRA_LOGGERS=slotwise to see the components' logs in the Prefect UI.
"""
from __future__ import annotations

import importlib
import logging

from slotwise.errors import USER_ERRORS

log = logging.getLogger("slotwise.flows")


def run_component(stage: str, args: list[str]) -> None:
    """`slotwise <stage> *args` in this process; a non-zero return is an error."""
    module = importlib.import_module(f"slotwise.components.{stage}")
    log.info("slotwise %s %s", stage, " ".join(args))
    code = module.main(list(args))
    if code:
        raise RuntimeError(f"slotwise {stage} exited with code {code}")


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry unless the failure is bad input (USER_ERRORS)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, USER_ERRORS)
