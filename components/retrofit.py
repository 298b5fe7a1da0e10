"""Stage `retrofit`: load the base model and insert product-key memory layers.

    python -m slotwise.components.retrofit --params params.yaml --out runs/retrofit
    slotwise retrofit --out runs/retrofit retrofit.insert.memory.n_keys=64

Writes a checkpoint directory (see slotwise.checkpoint) with summary.json (parameter counts, the
logit difference to the base model on a check prompt) and params.resolved.yaml.
"""
from __future__ import annotations

import json
import logging
import time

import torch

from slotwise.checkpoint import save_checkpoint
from slotwise.components._cli import component_parser, run_cli
from slotwise.config import RetrofitParams, load_params, to_yaml
from slotwise.errors import ConfigError
from slotwise.models import load_base_model
from slotwise.retrofit import memory_layers, parameter_summary, retrofit

log = logging.getLogger("slotwise.retrofit")


@torch.no_grad()
def check_logits(model, tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    return model(ids).logits.float()


def run_retrofit(p: RetrofitParams):
    """Load, retrofit, and compare logits on the check prompt -> (model, tokenizer, summary)."""
    t0 = time.perf_counter()
    model, tokenizer = load_base_model(p.base_model, dtype=getattr(torch, p.dtype))
    t_load = time.perf_counter() - t0
    base_logits = check_logits(model, tokenizer, p.check_prompt)
    torch.manual_seed(p.seed)
    try:
        retrofit(model, p.insert)
    except ValueError as exc:  # layers the loaded model does not have: known only now
        raise ConfigError(f"key 'retrofit.insert.layers': {exc}") from None
    model.eval()
    new_logits = check_logits(model, tokenizer, p.check_prompt)
    summary = {
        "base_model": p.base_model,
        "architecture": type(model).__name__,
        "layers": list(p.insert.layers),
        "mode": p.insert.mode,
        "n_slots_per_layer": next(iter(memory_layers(model).values())).n_slots,
        **{k: v for k, v in parameter_summary(model).items()},
        "check_prompt": p.check_prompt,
        "check_max_abs_logit_diff": (new_logits - base_logits).abs().max().item(),
        "check_next_token": tokenizer.decode(new_logits[0, -1].argmax()),
    }
    log.info("loaded %s in %.1f s", p.base_model, t_load)  # timings go to the log: summary.json is a cached, byte-stable output
    return model, tokenizer, summary


def main(argv: list[str] | None = None) -> int:
    parser = component_parser("slotwise retrofit", __doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/retrofit", help="output checkpoint directory")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.overrides)
    model, tokenizer, summary = run_retrofit(params.retrofit)
    log.info("memory params %s (values %s) beside %s base params; max |logit diff| on check prompt %.3g",
             f"{summary['memory_params']:,}", f"{summary['memory_value_params']:,}", f"{summary['base_params']:,}",
             summary["check_max_abs_logit_diff"])
    save_checkpoint(
        model, tokenizer, args.out, params.retrofit.insert,
        extra={"base_model": params.retrofit.base_model},
        extra_files={"summary.json": json.dumps(summary, indent=2), "params.resolved.yaml": to_yaml(params)},
    )
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
