"""The prefect.yaml deployment that sends the train stage to a GPU work pool (torchrun on the worker)."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_train_gpu_deployment_runs_the_train_stage_on_nproc_ranks():
    from prefect.flows import load_flow_from_entrypoint

    from slotwise.flows.pipeline import stage_args

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    dep = {d["name"]: d for d in spec["deployments"]}["train-gpu"]
    assert dep["work_pool"]["name"] == "slotwise-gpu" and "env" in dep["work_pool"]["job_variables"]
    flow = load_flow_from_entrypoint(str(ROOT / dep["entrypoint"]))
    assert set(dep["parameters"]) <= set(flow.parameters.properties)
    p = dep["parameters"]
    assert p["stages"] == ["train"] and p["nproc"] > 1
    args = stage_args("train", p["params"], Path(p["runs"]), p["nproc"])
    assert args[args.index("--nproc") + 1] == str(p["nproc"])  # the train component relaunches under torchrun
    assert "--nproc" not in stage_args("train", p["params"], Path(p["runs"]))  # one process: unchanged
    assert "--nproc" not in stage_args("evaluate", p["params"], Path(p["runs"]), p["nproc"])
