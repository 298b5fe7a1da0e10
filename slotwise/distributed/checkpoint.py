"""Checkpoints of column-sharded models with torch.distributed.checkpoint (DCP), which reshards on load.

    save_sharded(model, "runs/train_dcp", tokenizer, retrofit_cfg)    # on every rank of a W-rank run
    model, tok = load_sharded("runs/train_dcp")     # any world size: one plain process, or W' ranks

On disk (a directory that rank 0 stages and renames into place once every rank has written):

    .metadata, __<rank>_0.distcp     DCP: each value pool as one (N, D) DTensor placed Shard(1) on a
                                     1-d mesh of the ranks; every other weight written once
    config.json, slotwise.json       the HF config and the retrofit config (as in checkpoint.py)
    tokenizer*                       when given

A loader asks DCP for the columns its own layout needs (or the whole table in a single process),
so a table trained on 8 ranks is read at world size 1 for a nightly update, or at 3 with an
uneven split. `sharded_state_hash` is delta.state_hash of the same model unsharded: sparse deltas
written by a sharded run name the same base and new states as a single-process run's.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from omegaconf import OmegaConf
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from slotwise.atomic import replace_dir
from slotwise.checkpoint import RETROFIT_FILE, read_retrofit_config
from slotwise.errors import CheckpointError
from slotwise.retrofit import RetrofitConfig, retrofit
from slotwise.distributed.memory import ShardedValuePool, gather_rows, shard_value_pools, sharded_pools

DCP_METADATA = ".metadata"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _pool_of_entry(model: nn.Module) -> dict[int, ShardedValuePool]:
    """data_ptr of each sharded pool's local weight -> the pool (state_dict entries share it)."""
    return {p.weight.data_ptr(): p for p in sharded_pools(model)}


def dcp_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every sharded pool as an (N, D) Shard(1) DTensor over its local columns
    (the same storage: DCP loads into it in place)."""
    pools = _pool_of_entry(model)
    meshes: dict[int, DeviceMesh] = {}
    out = {}
    for name, t in model.state_dict().items():
        pool = pools.get(t.data_ptr())
        if pool is None:
            out[name] = t
            continue
        mesh = meshes.setdefault(id(pool), DeviceMesh.from_group(pool.group, t.device.type))
        out[name] = DTensor.from_local(t, mesh, [Shard(1)], run_check=False,
                                       shape=torch.Size((pool.n_slots, pool.dim)), stride=(pool.dim, 1))
    return out


def save_sharded(model: nn.Module, out_dir: str | Path, tokenizer=None, retrofit_cfg: RetrofitConfig | None = None,
                 extra: dict | None = None) -> Path:
    """Write the model's weights with DCP (every rank calls this) plus config files (rank 0), atomically."""
    final = Path(out_dir)
    stage = [None]
    if _rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        stage[0] = tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    if dist.is_initialized():
        dist.broadcast_object_list(stage, group_src=0)
    tmp = Path(stage[0])
    try:
        dcp.save(dcp_state_dict(model), checkpoint_id=tmp)
        if _rank() == 0:
            model.config.save_pretrained(tmp)
            meta = {"format": 1, "sharded": "dcp",
                    "retrofit": None if retrofit_cfg is None else OmegaConf.to_container(OmegaConf.structured(retrofit_cfg))}
            meta.update(extra or {})
            (tmp / RETROFIT_FILE).write_text(json.dumps(meta, indent=2))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        if dist.is_initialized():
            dist.barrier()
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _rank() == 0:
        replace_dir(tmp, final)
    if dist.is_initialized():
        dist.barrier()
    return final


def load_sharded(ckpt_dir: str | Path, group: dist.ProcessGroup | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
    """Build the model from a save_sharded directory -> (model, tokenizer), its pools sharded over the
    current process group (world size > 1) or whole (one process, no process group)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / DCP_METADATA).is_file():
        raise CheckpointError(f"{ckpt_dir}: no {DCP_METADATA}; expected a directory written by dist_checkpoint.save_sharded")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt_dir), dtype=dtype)
    cfg = read_retrofit_config(ckpt_dir)
    if cfg is not None:
        retrofit(model, cfg)
    model.to(device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        shard_value_pools(model, group)
    load_into(model, ckpt_dir)
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir) if (ckpt_dir / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer


def load_into(model: nn.Module, ckpt_dir: str | Path) -> nn.Module:
    """In place: the weights of a save_sharded directory into a model of the same architecture,
    sharded or not (DCP reads the slices this rank's layout needs)."""
    sd = dcp_state_dict(model)
    dcp.load(sd, checkpoint_id=Path(ckpt_dir))
    with torch.no_grad():  # DCP fills the tensors in place; copy anything it had to replace
        live = model.state_dict()
        for name, t in sd.items():
            src = t.to_local() if isinstance(t, DTensor) else t
            if src.data_ptr() != live[name].data_ptr():
                live[name].copy_(src)
    return model


def sharded_state_hash(model: nn.Module, block_rows: int = 1 << 16) -> str:
    """delta.state_hash of the model as if unsharded: sha256 over every state-dict entry's name, dtype,
    global shape and bytes, by name; the pools' rows are streamed to rank 0 in blocks. Every rank
    calls it and gets the same hex digest."""
    from slotwise.continual.delta import state_hash

    pools = _pool_of_entry(model)
    if not pools:
        return state_hash(model)
    h = hashlib.sha256()
    main = _rank() == 0
    for name, t in sorted(model.state_dict().items()):
        pool = pools.get(t.data_ptr())
        shape = (pool.n_slots, pool.dim) if pool is not None else tuple(t.shape)
        if main:
            h.update(f"{name}|{t.dtype}|{shape}\n".encode())
        if pool is None:
            if main:
                h.update(_raw_bytes(t))
            continue
        for i in range(0, pool.n_slots, block_rows):
            rows = gather_rows(pool, torch.arange(i, min(i + block_rows, pool.n_slots)), block_rows=block_rows)
            if main:
                h.update(_raw_bytes(rows))
    digest = [h.hexdigest() if main else None]
    dist.broadcast_object_list(digest, group_src=0)
    return digest[0]


def _raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes in row-major order (as delta.state_hash reads them)."""
    t = t.detach().contiguous().cpu()
    return (t.reshape(1) if t.dim() == 0 else t).view(torch.uint8).reshape(-1).numpy().tobytes()
