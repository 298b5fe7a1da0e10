"""The slot-frequency table: what the background corpus reads, per value pool and per layer.

One safetensors file (written by the slot_stats stage, read by SMF selection):

    <name>.counts   (N,) int64   accesses of each slot over the |B| background batches
    <name>.df       (N,) int64   in how many of those batches the slot was read at least once

and, in the safetensors metadata under "slotwise", one JSON object:

    format, model_hash (slotwise.checkpoint.model_hash of the checkpoint it was made with),
    data_sha256 (of the background file), params (seq_len, batch_size, ...), and per table:
    {"kind": "pool" | "layer", "layers": [...], "n_slots", "n_batches" (|B|), "n_tokens"}

Names: a value pool read by one layer is "layer<i>" (the pool and the layer are the same table);
a pool shared by several layers is "shared", and each of its layers is stored too ("layer<i>",
kind "layer"), since a shared pool's df is not a function of its layers' dfs.

    table = load_table("runs/slot_stats/table.safetensors", expect_model_hash=model_hash(ckpt))
    table.for_layer(8)      # the LayerStats of the pool layer 8 reads (what SMF ranks against)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slotwise.atomic import staged_file
from slotwise.errors import SlotTableError
from slotwise.slot_stats import LayerStats

FORMAT = 1
META_KEY = "slotwise"
TABLE_FILE = "table.safetensors"


@dataclass
class SlotTable:
    pools: dict[str, LayerStats]  # value pools: "layer8", ... or "shared"
    layers: dict[str, LayerStats]  # layers of shared pools only ("layer8", ...)
    pool_layers: dict[str, list[int]]  # pool name -> the decoder layers that read it
    meta: dict = field(default_factory=dict)  # model_hash, data_sha256, params, ...

    @property
    def model_hash(self) -> str | None:
        return self.meta.get("model_hash")

    def names(self) -> list[str]:
        return list(self.pools) + list(self.layers)

    def __getitem__(self, name: str) -> LayerStats:
        if name in self.pools:
            return self.pools[name]
        if name in self.layers:
            return self.layers[name]
        raise KeyError(f"no table {name!r} (have: {', '.join(self.names())})")

    def pool_of(self, layer: int) -> str:
        for name, ids in self.pool_layers.items():
            if layer in ids:
                return name
        raise KeyError(f"layer {layer} reads no pool in this table (pools: {self.pool_layers})")

    def for_layer(self, layer: int) -> LayerStats:
        """The statistics of the value pool that `layer` reads (exact for shared pools too)."""
        return self.pools[self.pool_of(layer)]

    def layer_stats(self, layer: int) -> LayerStats:
        """What `layer` alone read (its own table if its pool is shared, else the pool's)."""
        name = f"layer{layer}"
        return self.layers[name] if name in self.layers else self.for_layer(layer)


def from_collect(per_layer: dict[int, LayerStats], per_pool: dict[str, LayerStats],
                 groups: dict[str, list[int]], meta: dict | None = None) -> SlotTable:
    """Build a table from slot_stats.collect's (per layer, per pool) and slot_stats.pool_groups."""
    layers = {f"layer{i}": per_layer[i] for ids in groups.values() if len(ids) > 1 for i in ids}
    clash = set(layers) & set(per_pool)
    if clash:
        raise ValueError(f"table names {sorted(clash)} are both a pool and a layer")
    return SlotTable(dict(per_pool), layers, {k: list(v) for k, v in groups.items()}, dict(meta or {}))


def save_table(table: SlotTable, path: str | Path) -> Path:
    """Write the table to path atomically (a temporary sibling renamed into place)."""
    path = Path(path)
    tensors, entries = {}, {}
    for kind, group in (("pool", table.pools), ("layer", table.layers)):
        for name, s in group.items():
            tensors[f"{name}.counts"] = s.counts.detach().to("cpu", torch.int64).contiguous()
            tensors[f"{name}.df"] = s.df.detach().to("cpu", torch.int64).contiguous()
            layers = table.pool_layers[name] if kind == "pool" else [int(name.removeprefix("layer"))]
            entries[name] = {"kind": kind, "layers": layers, "n_slots": s.n_slots,
                             "n_batches": s.n_batches, "n_tokens": s.n_tokens}
    meta = {"format": FORMAT, **table.meta, "tables": entries}
    with staged_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return path


def read_meta(path: str | Path) -> dict:
    """The table's JSON metadata without loading the tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: slot table not found (run the slot_stats stage)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as exc:  # safetensors raises its own error types for a truncated header
        raise SlotTableError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    if raw is None:
        raise SlotTableError(f"{path}: no '{META_KEY}' metadata (not a slotwise slot table)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise SlotTableError(f"{path}: table format {meta.get('format')!r}, this slotwise reads format {FORMAT}")
    return meta


def load_table(path: str | Path, expect_model_hash: str | None = None) -> SlotTable:
    """Read a table; with expect_model_hash, refuse one made for a different model."""
    path = Path(path)
    meta = read_meta(path)
    got = meta.get("model_hash")
    if expect_model_hash is not None and got != expect_model_hash:
        raise SlotTableError(f"{path}: slot table was made for model {got} but this model is {expect_model_hash} "
                             f"(rerun slot_stats on this checkpoint)")
    entries = meta.pop("tables")
    pools, layers, pool_layers = {}, {}, {}
    with safe_open(str(path), framework="pt") as f:
        for name, e in entries.items():
            s = LayerStats(e["n_slots"], f.get_tensor(f"{name}.counts"), f.get_tensor(f"{name}.df"),
                           e["n_batches"], e["n_tokens"])
            if e["kind"] == "pool":
                pools[name] = s
                pool_layers[name] = list(e["layers"])
            else:
                layers[name] = s
    return SlotTable(pools, layers, pool_layers, meta)
