"""Save and load retrofitted models: safetensors weights + HF config + the retrofit config.

    <dir>/config.json          a retrofitted model: slotwise.hf.SlotwiseConfig (model_type "slotwise":
                               the base model's config as text_config, the retrofit config, auto_map);
                               a plain model: the base model's HF config
    <dir>/*.py                 a retrofitted model: the modelling code config.json's auto_map names
    <dir>/model.safetensors    every weight, memory included (shared and tied tensors stored once)
    <dir>/slotwise.json        {"format": 2, ...provenance (e.g. trained_from)}
    <dir>/manifest.json        sha256 of every file, for provenance and for refusing mismatches
    <dir>/tokenizer*           the tokenizer

A retrofitted checkpoint is Hugging Face native: AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True) gives load_checkpoint's logits (slotwise.hf), and a load without
trust_remote_code fails (model_type "slotwise" is not one transformers knows) instead of building
the base architecture with its memory layers' FFNs randomly initialised.

Format 1 (before): config.json was the base model's config and slotwise.json held the retrofit
config; load_checkpoint still reads it, and `slotwise export` rewrites one as format 2.

A checkpoint is written into a temporary sibling directory and renamed into place, so a reader
never sees half of one and a killed save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from slotwise.atomic import sha256_file, staged_dir
from slotwise.errors import CheckpointError
from slotwise.hf import MODEL_TYPE, SlotwiseConfig, retrofit_config_from_dict, retrofit_dict, write_hf_config
from slotwise.retrofit import RetrofitConfig, memory_layers, retrofit

WEIGHTS = "model.safetensors"
RETROFIT_FILE = "slotwise.json"
MANIFEST = "manifest.json"
CONFIG = "config.json"
FORMAT = 2


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
        if retrofit_cfg is not None:
            write_hf_config(model, retrofit_dict(retrofit_cfg), tmp)
        else:
            model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            normalise_tokenizer_config(tmp / "tokenizer_config.json")
        meta = {"format": FORMAT}
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


def is_hf_native(ckpt_dir: str | Path) -> bool:
    """Whether config.json is a SlotwiseConfig (format 2, retrofitted) rather than a base model's."""
    path = Path(ckpt_dir) / CONFIG
    try:
        return path.is_file() and json.loads(path.read_bytes()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):  # unreadable or not an object: load_checkpoint says so in one line
        return False


def _read_json(path: Path, what: str) -> dict:
    """A JSON object file of a checkpoint; CheckpointError (one line) if it is unreadable or not an object."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        why = f"{exc.msg}, line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise CheckpointError(f"{path}: not a valid {what} ({why})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a valid {what} (expected a JSON object)")
    return value


def read_retrofit_config(ckpt_dir: str | Path) -> RetrofitConfig | None:
    """The checkpoint's retrofit config (config.json's, or format 1's slotwise.json), None for a plain model."""
    ckpt_dir = Path(ckpt_dir)
    if is_hf_native(ckpt_dir):
        return _retrofit_config(_read_json(ckpt_dir / CONFIG, "model config").get("retrofit"), ckpt_dir / CONFIG)
    path = ckpt_dir / RETROFIT_FILE
    if not path.is_file():
        return None
    meta = _read_json(path, "slotwise retrofit file")
    if meta.get("retrofit") is None:
        return None
    return _retrofit_config(meta["retrofit"], path)


def recorded_base_model(ckpt_dir: str | Path) -> str | None:
    """The base model a retrofit checkpoint was made from (slotwise.json's base_model), None if unrecorded."""
    path = Path(ckpt_dir) / RETROFIT_FILE
    return _read_json(path, "slotwise retrofit file").get("base_model") if path.is_file() else None


def _retrofit_config(d, path: Path) -> RetrofitConfig:
    try:
        return retrofit_config_from_dict(d)
    except Exception as exc:  # noqa: BLE001 - an omegaconf validation error: unknown key, wrong type
        raise CheckpointError(f"{path}: 'retrofit' is not a valid retrofit config ({str(exc).splitlines()[0]})") from None


def read_manifest(ckpt_dir: str | Path) -> dict[str, str]:
    """{file name: sha256} of a checkpoint; CheckpointError if missing or malformed."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {MANIFEST} (not a complete slotwise checkpoint)")
    manifest = _read_json(path, "checkpoint manifest")
    if WEIGHTS not in manifest or not all(isinstance(k, str) and "/" not in k and isinstance(v, str) and len(v) == 64
                                          for k, v in manifest.items()):
        raise CheckpointError(f"{path}: not a valid checkpoint manifest (expected {{file name: sha256}} listing {WEIGHTS})")
    return manifest


def model_hash(ckpt_dir: str | Path) -> str:
    """sha256 of a checkpoint's weights, as recorded in its manifest."""
    return read_manifest(ckpt_dir)[WEIGHTS]


def verify_checkpoint(ckpt_dir: str | Path) -> None:
    """Refuse a checkpoint whose files do not match its manifest (truncated or tampered)."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
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
    # save_checkpoint always writes slotwise.json and manifest.json; a SlotwiseForCausalLM's
    # save_pretrained writes neither (nothing to verify against).
    if verify and ((ckpt_dir / MANIFEST).exists() or (ckpt_dir / RETROFIT_FILE).exists()):
        verify_checkpoint(ckpt_dir)
    try:
        config = SlotwiseConfig.from_pretrained(ckpt_dir).text_config if is_hf_native(ckpt_dir) else AutoConfig.from_pretrained(ckpt_dir)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # transformers' errors for a broken config.json
        raise CheckpointError(f"{ckpt_dir / CONFIG}: not a usable model config ({_first_line(exc)})") from None
    cfg = read_retrofit_config(ckpt_dir)
    if cfg is not None:
        retrofit(model, cfg)
    missing, unexpected = load_model(model, str(ckpt_dir / WEIGHTS), strict=False, device=str(device))
    # Tied embeddings and shared value pools are stored once (under any one of their names); anything
    # else missing is a real mismatch.
    missing = [k for k in missing if not _stored_under_another_name(model, k, missing)]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir / WEIGHTS}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    # config= : without it AutoTokenizer reads config.json, and a SlotwiseConfig there would make it
    # ask (interactively) whether to run the checkpoint's code.
    tokenizer = None
    if (ckpt_dir / "tokenizer_config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(ckpt_dir, config=config)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{ckpt_dir}: the saved tokenizer does not load ({_first_line(exc)})") from None
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split(". ")[0].split())
    return (text[:200] or type(exc).__name__)


def _stored_under_another_name(model, key: str, missing: list[str]) -> bool:
    """Whether parameter `key` is the same tensor as a parameter the file did hold."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    return any(p is params[key] and name != key and name not in missing for name, p in params.items())


__all__ = ["save_checkpoint", "load_checkpoint", "read_retrofit_config", "read_manifest", "is_hf_native", "model_hash",
           "verify_checkpoint", "memory_layers"]
