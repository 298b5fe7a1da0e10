"""Sparse deltas: an SMF update as the value rows it changed (small, composable, revertible).

Per value pool W (N, D) a delta holds the changed row ids R (R,) and the rows after the update
(new (R, D)); optionally (keep_old=True) also the rows before it (old (R, D)), so that

    apply:   W[R] = new          (on the model the delta was extracted from: its *base*)
    revert:  W[R] = old          (on the model the delta produced; without old rows, W[R] = base[R]
                                  read from the base model, which the caller passes)

By default a delta stores new rows only: half the size, and the base checkpoint (named by its
hash) is always at hand where a delta is served.

Which model is which is pinned by content hashes (`state_hash`: sha256 over every tensor of the
state dict, names, dtypes, shapes and bytes): a delta records base_hash and new_hash and refuses a
model whose state is neither. Stacking composes d1 then d2 (d2's base must be d1's result): the
union of rows, new rows from the later delta where both touch a row, old rows from the earlier.

On disk, a directory written atomically (temporary sibling, then rename):

    <dir>/delta.safetensors   "<pool>/rows" int64 (R,), "<pool>/new" (R, D), ["<pool>/old" (R, D)]
    <dir>/delta.json          base_hash, new_hash, pool shapes and dtypes, meta, sha256 of the weights

Size: R * (8 + D * itemsize) bytes per pool (twice the rows with old rows kept) against
N * D * itemsize for the full pool: 500 rows of a 1M x 576 fp32 pool are 1.2 MB, 0.05% of the
pool's 2.4 GB.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from slotwise.atomic import sha256_file, staged_dir
from slotwise.continual.pools import value_pools
from slotwise.errors import DeltaError

WEIGHTS = "delta.safetensors"
META = "delta.json"
FORMAT = 1


@dataclass
class PoolDelta:
    rows: torch.Tensor  # (R,) int64, ascending
    new: torch.Tensor  # (R, D)
    old: torch.Tensor | None  # (R, D), or None: revert reads the base model
    n_slots: int  # N of the pool it belongs to

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.new, self.old) if t is not None)


@dataclass
class SparseDelta:
    base_hash: str  # state_hash of the model it applies to
    new_hash: str  # state_hash of the model it produces
    pools: dict[str, PoolDelta]  # by value-pool parameter name
    meta: dict = field(default_factory=dict)  # free provenance (e.g. the base checkpoint's manifest hash)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pools.values())

    @property
    def n_rows(self) -> dict[str, int]:
        return {name: int(p.rows.numel()) for name, p in self.pools.items()}


def delta_nbytes(n_rows: int, dim: int, itemsize: int = 4, keep_old: bool = False) -> int:
    """Bytes of one pool's delta tensors: ids (int64) + new rows (+ old rows)."""
    return n_rows * (8 + (2 if keep_old else 1) * dim * itemsize)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of t, (..., last * itemsize) uint8; a bitwise view (NaN == NaN, -0 != +0)."""
    t = t.detach().contiguous().cpu()
    return t.reshape(1).view(torch.uint8) if t.dim() == 0 else t.view(torch.uint8)


def state_hash(model: nn.Module) -> str:
    """sha256 of the model's state: every state-dict entry's name, dtype, shape and bytes, by name."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(_bytes(t).reshape(-1).numpy().tobytes())
    return h.hexdigest()


def extract_delta(base_model: nn.Module, updated_model: nn.Module, meta: dict | None = None,
                  keep_old: bool = False) -> SparseDelta:
    """The value rows that differ (bitwise) between two models that may differ only in value rows.

    keep_old: also keep the base rows, so the delta reverts without the base model (twice the size)."""
    base_pools = {p.name: p for p in value_pools(base_model)}
    upd_pools = {p.name: p for p in value_pools(updated_model)}
    if base_pools.keys() != upd_pools.keys():
        raise DeltaError(f"the models have different value pools: {sorted(base_pools)} vs {sorted(upd_pools)}")
    pool_ptrs = {p.weight.data_ptr() for p in upd_pools.values()} | {p.weight.data_ptr() for p in base_pools.values()}
    base_sd, upd_sd = base_model.state_dict(), updated_model.state_dict()
    if base_sd.keys() != upd_sd.keys():
        raise DeltaError("the models have different parameters; a sparse delta needs the same architecture")
    for name, t in base_sd.items():
        u = upd_sd[name]
        if t.data_ptr() in pool_ptrs or u.data_ptr() in pool_ptrs:
            continue
        if t.shape != u.shape or t.dtype != u.dtype or not torch.equal(_bytes(t), _bytes(u)):
            raise DeltaError(f"{name} differs between the models; a sparse delta holds value rows only")
    pools = {}
    for name, bp in base_pools.items():
        b, u = bp.weight.detach(), upd_pools[name].weight.detach()
        if b.shape != u.shape or b.dtype != u.dtype:
            raise DeltaError(f"{name}: pool {tuple(b.shape)} {b.dtype} vs {tuple(u.shape)} {u.dtype}")
        rows = (_bytes(b) != _bytes(u)).any(dim=1).nonzero().squeeze(1).to(b.device)  # (R,)
        pools[name] = PoolDelta(rows.cpu(), u[rows].cpu().clone(), b[rows].cpu().clone() if keep_old else None, b.shape[0])
    return SparseDelta(state_hash(base_model), state_hash(updated_model), pools, dict(meta or {}))


def with_old_rows(delta: SparseDelta, base: nn.Module, verify: bool = True) -> SparseDelta:
    """The same delta with its old rows filled in from `base`, the model it was made from; after
    this it reverts on its own. verify: refuse a base whose state_hash is not delta.base_hash."""
    if verify and (have := state_hash(base)) != delta.base_hash:
        raise DeltaError(f"base model state {have[:12]} is not the delta's base ({delta.base_hash[:12]})")
    base_pools = {p.name: p.weight.detach() for p in value_pools(base)}
    pools = {name: pd if pd.old is not None else
             PoolDelta(pd.rows, pd.new, base_pools[name][pd.rows.to(base_pools[name].device)].cpu().clone(), pd.n_slots)
             for name, pd in delta.pools.items()}
    return SparseDelta(delta.base_hash, delta.new_hash, pools, delta.meta)


def _write_rows(model: nn.Module, delta: SparseDelta, expect: str, verify: bool) -> None:
    """Shared by apply (expect 'base') and revert (expect 'new': every pool must have old rows)."""
    want = delta.base_hash if expect == "base" else delta.new_hash
    pools = {p.name: p for p in value_pools(model)}
    for name, pd in delta.pools.items():
        if name not in pools:
            raise DeltaError(f"delta names value pool {name!r}, the model has {sorted(pools)}")
        w = pools[name].weight
        if w.shape[0] != pd.n_slots or w.shape[1] != pd.new.shape[1] or w.dtype != pd.new.dtype:
            raise DeltaError(f"{name}: the model's pool is {tuple(w.shape)} {w.dtype}, the delta's is "
                             f"({pd.n_slots}, {pd.new.shape[1]}) {pd.new.dtype}")
    if verify:
        have = state_hash(model)
        if have != want:
            what = "its base" if expect == "base" else "the model it produced"
            raise DeltaError(f"model state {have[:12]} is not {what} ({want[:12]}); "
                             f"{'apply' if expect == 'base' else 'revert'} deltas in order on the model they were made from")
    with torch.no_grad():
        for name, pd in delta.pools.items():
            w = pools[name].weight
            src, dst = (pd.old, pd.new) if expect == "base" else (pd.new, pd.old)
            rows = pd.rows.to(w.device)
            if src is not None and not torch.equal(_bytes(w[rows]), _bytes(src)):
                raise DeltaError(f"{name}: the rows the delta replaces are not the rows it was made from; wrong model")
            w[rows] = dst.to(w.device)


def apply_delta(model: nn.Module, delta: SparseDelta, verify: bool = True) -> nn.Module:
    """In place: W[R] = new for every pool. verify: refuse unless state_hash(model) == delta.base_hash
    (costs one pass over the weights); the replaced rows are also checked against delta.old if kept."""
    _write_rows(model, delta, "base", verify)
    return model


def revert_delta(model: nn.Module, delta: SparseDelta, verify: bool = True, base: nn.Module | None = None) -> nn.Module:
    """In place: W[R] = old, on the model the delta produced (state_hash == delta.new_hash).

    A delta without old rows reads them from `base`, the model it was made from (checked by hash)."""
    if any(pd.old is None for pd in delta.pools.values()):
        if base is None:
            raise DeltaError("this delta stores new rows only; revert it with base=<the base model> "
                             "(or extract it with keep_old=True)")
        delta = with_old_rows(delta, base, verify)
    _write_rows(model, delta, "new", verify)
    return model


def _member(sorted_ids: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of rows (R,): is it in sorted_ids (U,), and at which position -> (bool (R,), int64 (R,))."""
    pos = torch.searchsorted(sorted_ids, rows)
    if sorted_ids.numel() == 0:
        return torch.zeros_like(rows, dtype=torch.bool), pos
    pos = pos.clamp(max=sorted_ids.numel() - 1)
    return sorted_ids[pos] == rows, pos


def stack(first: SparseDelta, second: SparseDelta) -> SparseDelta:
    """first then second as one delta: base of first -> result of second."""
    if second.base_hash != first.new_hash:
        raise DeltaError(f"cannot stack: the second delta's base {second.base_hash[:12]} is not the first's result {first.new_hash[:12]}")
    pools = {}
    for name in list(first.pools) + [n for n in second.pools if n not in first.pools]:
        a, b = first.pools.get(name), second.pools.get(name)
        if a is None or b is None:
            pools[name] = a if a is not None else b
            continue
        rows = torch.cat([a.rows, b.rows]).unique()  # (R,) ascending
        in_a, pos_a = _member(a.rows, rows)
        in_b, pos_b = _member(b.rows, rows)
        new = torch.empty(rows.numel(), a.new.shape[1], dtype=a.new.dtype)
        new[in_a] = a.new[pos_a[in_a]]  # earlier delta first ...
        new[in_b] = b.new[pos_b[in_b]]  # ... the later one wins on shared rows
        old = None
        if a.old is not None and b.old is not None:  # old rows survive only if both deltas kept them
            old = torch.empty_like(new)
            old[in_a] = a.old[pos_a[in_a]]
            only_b = in_b & ~in_a
            old[only_b] = b.old[pos_b[only_b]]  # untouched by the first: b.old is the base row
        pools[name] = PoolDelta(rows, new, old, a.n_slots)
    return SparseDelta(first.base_hash, second.new_hash, pools, {"stacked": [first.meta, second.meta]})


def save_delta(delta: SparseDelta, path: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write delta.safetensors + delta.json (+ extra text files) into directory `path`, atomically."""
    with staged_dir(path) as tmp:
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        tensors = {}
        for name, pd in delta.pools.items():
            tensors[f"{name}/rows"] = pd.rows.contiguous()
            tensors[f"{name}/new"] = pd.new.contiguous()
            if pd.old is not None:
                tensors[f"{name}/old"] = pd.old.contiguous()
        save_file(tensors, str(tmp / WEIGHTS))
        meta = {
            "format": FORMAT,
            "base_hash": delta.base_hash,
            "new_hash": delta.new_hash,
            "pools": {name: {"n_slots": pd.n_slots, "n_rows": int(pd.rows.numel()), "dim": int(pd.new.shape[1]),
                             "dtype": str(pd.new.dtype)} for name, pd in delta.pools.items()},
            "meta": delta.meta,
            "sha256": {WEIGHTS: sha256_file(tmp / WEIGHTS)},
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
    return Path(path)


def load_delta(path: str | Path) -> SparseDelta:
    """Read a delta written by save_delta; refuses a truncated or modified weights file."""
    path = Path(path)
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise DeltaError(f"{path}: not a sparse delta (expected {META} and {WEIGHTS})")
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT:
        raise DeltaError(f"{path / META}: format {meta.get('format')!r}, this slotwise reads {FORMAT}")
    if sha256_file(path / WEIGHTS) != meta["sha256"][WEIGHTS]:
        raise DeltaError(f"{path / WEIGHTS}: sha256 does not match {META} (truncated or modified file)")
    t = load_file(str(path / WEIGHTS))
    pools = {name: PoolDelta(t[f"{name}/rows"], t[f"{name}/new"], t.get(f"{name}/old"), info["n_slots"])
             for name, info in meta["pools"].items()}
    return SparseDelta(meta["base_hash"], meta["new_hash"], pools, meta.get("meta", {}))
