"""`slotwise export`: a saved model with a served sparse delta merged in, as a new Hugging Face native checkpoint.

    slotwise export --model runs/train --deltas serve/current --out exported/
    slotwise export --model runs/train --out exported/          # no delta: rewrite (e.g. a format-1 checkpoint) as HF native
    python -m slotwise.components.export --model s3://bucket/runs/train --deltas s3://bucket/serve/current --out exported/

--model   a slotwise checkpoint directory (or s3:// URI)
--deltas  a sparse delta directory (delta.safetensors + delta.json), or a serving directory holding
          `current/`; optional. It must have been made on --model (its base hash is checked).
--out     the new checkpoint: config.json (SlotwiseConfig, auto_map), the modelling code,
          model.safetensors, tokenizer, slotwise.json (what was merged), manifest.json; written
          atomically, never onto --model. Load it with

              AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
              slotwise.checkpoint.load_checkpoint(out)

The merged model is `apply_delta(load_checkpoint(model), load_delta(deltas))`, saved in the
checkpoint's own dtype.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from slotwise.checkpoint import CONFIG, is_hf_native, load_checkpoint, model_hash, read_retrofit_config, save_checkpoint
from slotwise.components._cli import run_cli
from slotwise.continual.delta import apply_delta, load_delta
from slotwise.continual.nightly import served_delta_dir
from slotwise.errors import CheckpointError, ConfigError, DeltaError

log = logging.getLogger("slotwise.export")


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype config.json records for the weights (float32 when it records none)."""
    from transformers import AutoConfig

    from slotwise.hf import SlotwiseConfig

    config = SlotwiseConfig.from_pretrained(model_dir) if is_hf_native(model_dir) else AutoConfig.from_pretrained(model_dir)
    dtype = config.dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def export(model_dir: str | Path, deltas: str | None, out: str | Path) -> Path:
    """Merge the delta (if any) into the checkpoint and write `out` as a HF-native checkpoint."""
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG).is_file():
        raise CheckpointError(f"{model_dir}: no {CONFIG}; expected a slotwise checkpoint directory")
    if Path(out).resolve() == model_dir.resolve():
        raise ConfigError(f"--out {out}: is the input checkpoint; export writes a new directory")
    cfg = read_retrofit_config(model_dir)
    if cfg is None:
        raise CheckpointError(f"{model_dir}: no memory layers (not a retrofitted checkpoint); nothing to export")
    dtype = stored_dtype(model_dir)
    model, tokenizer = load_checkpoint(model_dir, dtype=dtype)
    merged = None
    if deltas is not None:
        delta_dir = served_delta_dir(deltas)
        if delta_dir is None:
            raise CheckpointError(f"--deltas {deltas}: no delta there (expected delta.json, or a serving dir with current/)")
        delta = load_delta(delta_dir)
        try:
            apply_delta(model, delta)
        except DeltaError as exc:
            raise DeltaError(f"{delta_dir}: the delta does not apply to {model_dir} ({exc})") from None
        merged = {"path": str(delta_dir), "base_hash": delta.base_hash, "new_hash": delta.new_hash,
                  "rows": delta.n_rows, "meta": delta.meta}
    save_checkpoint(model, tokenizer, out, cfg,
                    extra={"exported_from": str(model_dir), "exported_from_sha256": model_hash(model_dir), "merged_delta": merged})
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slotwise export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="slotwise checkpoint directory (or s3:// URI)")
    parser.add_argument("--deltas", default=None, help="sparse delta directory, or a serving directory with current/ (optional)")
    parser.add_argument("--out", required=True, help="output checkpoint directory (Hugging Face native)")
    args = parser.parse_args(argv)
    export(args.model, args.deltas, args.out)
    log.info("wrote %s%s: load it with AutoModelForCausalLM.from_pretrained(%r, trust_remote_code=True)", args.out,
             f" ({args.model} + {args.deltas})" if args.deltas else f" ({args.model})", args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
