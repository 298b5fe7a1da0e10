"""Save and load retrofitted models: safetensors weights + HF config + the retrofit config.

    <dir>/config.json          the base model's HF config
    <dir>/model.safetensors    every weight, memory included (shared and tied tensors stored once)
    <dir>/slotwise.json        the retrofit config (layers, mode, memory hyperparameters)
    <dir>/manifest.json        sha256 of every file, for provenance and for refusing mismatches
    <dir>/tokenizer*           the tokenizer

A checkpoint is written into a temporary sibling directory and renamed into place, so a reader
never sees half of one and a killed save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from slotwise.atomic import sha256_file, staged_dir
from slotwise.errors import CheckpointError
from slotwise.retrofit import RetrofitConfig, memory_layers, retrofit

WEIGHTS = "model.safetensors"
RETROFIT_FILE = "slotwise.json"
MANIFEST = "manifest.json"


# How a tokenizer was loaded, not what it is: transformers writes these into tokenizer_config.json
# (local_files_only follows HF_HUB_OFFLINE), which would make the same checkpoint's bytes depend
# on the environment that saved it.
LOAD_TIME_TOKENIZER_KEYS = ("local_files_only", "cache_dir", "token", "force_download", "proxies")


def save_checkpoint(
    model, tokenizer, out_dir: str | Path, retrofit_cfg: RetrofitConfig | None, extra: dict | None = None,
    extra_files: dict[str, str] | None = None, extra_dirs: dict[str, str | Path] | None = None,
) -> Path:
    """Write model (+ tokenizer, retrofit config, manifest, extra text files, extra directories
    copied in whole) to out_dir atomically."""
    with staged_dir(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            normalise_tokenizer_config(tmp / "tokenizer_config.json")
        meta = {"format": 1, "retrofit": None if retrofit_cfg is None else OmegaConf.to_container(OmegaConf.structured(retrofit_cfg))}
        meta.update(extra or {})
        (tmp / RETROFIT_FILE).write_text(json.dumps(meta, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for name, src in (extra_dirs or {}).items():
            shutil.copytree(src, tmp / name)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {p.name: sha256_file(p) for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(out_dir)


def normalise_tokenizer_config(path: Path) -> None:
    """Drop the load-time keys from a saved tokenizer_config.json (see LOAD_TIME_TOKENIZER_KEYS)."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if any(k in config for k in LOAD_TIME_TOKENIZER_KEYS):
        path.write_text(json.dumps({k: v for k, v in config.items() if k not in LOAD_TIME_TOKENIZER_KEYS}, indent=2, ensure_ascii=False) + "\n")


def read_retrofit_config(ckpt_dir: str | Path) -> RetrofitConfig | None:
    path = Path(ckpt_dir) / RETROFIT_FILE
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("retrofit") is None:
        return None
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RetrofitConfig), meta["retrofit"]))


def model_hash(ckpt_dir: str | Path) -> str:
    """sha256 of a checkpoint's weights, as recorded in its manifest."""
    manifest = Path(ckpt_dir) / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {MANIFEST} (not a slotwise checkpoint)")
    return json.loads(manifest.read_text())[WEIGHTS]


def verify_checkpoint(ckpt_dir: str | Path) -> None:
    """Refuse a checkpoint whose files do not match its manifest (truncated or tampered)."""
    ckpt_dir = Path(ckpt_dir)
    manifest = json.loads((ckpt_dir / MANIFEST).read_text())
    for name, digest in manifest.items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {MANIFEST} but missing")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: sha256 does not match {MANIFEST} (truncated or modified file)")


def load_checkpoint(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", verify: bool = True):
    """Load a checkpoint written by save_checkpoint -> (model, tokenizer), in eval mode."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / WEIGHTS).is_file():
        raise CheckpointError(f"{ckpt_dir}: no {WEIGHTS}; expected a directory written by slotwise")
    if verify and (ckpt_dir / MANIFEST).is_file():
        verify_checkpoint(ckpt_dir)
    config = AutoConfig.from_pretrained(ckpt_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    cfg = read_retrofit_config(ckpt_dir)
    if cfg is not None:
        retrofit(model, cfg)
    missing, unexpected = load_model(model, str(ckpt_dir / WEIGHTS), strict=False, device=str(device))
    # Tied embeddings are stored once; anything else missing is a real mismatch.
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir / WEIGHTS}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir) if (ckpt_dir / "tokenizer_config.json").is_file() else None
    return model, tokenizer


def _is_tied(model, key: str) -> bool:
    return key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


__all__ = ["save_checkpoint", "load_checkpoint", "read_retrofit_config", "model_hash", "verify_checkpoint", "memory_layers"]
