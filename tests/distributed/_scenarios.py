"""Scenarios run on W gloo ranks under torchrun, and the same setups for the single-process references.

    python -m torch.distributed.run --standalone --nproc-per-node 3 tests/distributed/_scenarios.py OUT

The worker runs every scenario on column-sharded value pools (v_dim 41: uneven splits at 2, 3 and
4 ranks) and rank 0 writes what it got to OUT/<scenario>_w<W>.pt; the tests compute the single-process
result in their own process from the same builders and compare. `run_world(W)` launches the
worker once per world size and session (not a conftest.py: tests/conftest.py stays the only one).
"""
from __future__ import annotations

import atexit
import copy
import dataclasses
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from slotwise.continual.selection import Background
from slotwise.continual.smf import SMFConfig
from slotwise.memory import MemoryConfig, ProductKeyMemory
from slotwise.optim import OptimParams
from slotwise.retrofit import RetrofitConfig, retrofit
from slotwise.training import LoopParams

V_DIM = 41  # columns of every value pool: 21+20 at 2 ranks, 14+14+13 at 3, 11+11+11+8 at 4
TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)


def retrofit_cfg(shared: bool, sparse: bool = False) -> RetrofitConfig:
    return RetrofitConfig(layers=[1, 3], memory=MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16, v_dim=V_DIM,
                                                             out_init_std=0.05, shared_values=shared,
                                                             sparse_grad=sparse))


def memory_model(shared: bool = False, seed: int = 0, sparse: bool = False):
    """A tiny Llama with memory in layers 1 and 3 (64 slots, 2 heads, knn 4, values 41 wide)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY, tie_word_embeddings=True))
    retrofit(model, retrofit_cfg(shared, sparse))
    return model.eval()


def token_batch(seed: int, rows: int = 6, seq: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (rows, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# --- the memory layer alone -------------------------------------------------------------------

LAYER_CASES = {"hard": dict(balance="hard"), "soft_sparse": dict(balance="soft", sparse_grad=True)}
LAYER_ROWS = 7  # 4+3 rows at 2 ranks, 3+2+2 at 3: uneven token counts


def layer_setup(case: str):
    torch.manual_seed(0)
    cfg = MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16, v_dim=V_DIM, out_init_std=0.05, **LAYER_CASES[case])
    mem = ProductKeyMemory(24, 24, cfg).train()
    g = torch.Generator().manual_seed(1)
    return mem, torch.randn(LAYER_ROWS, 5, 24, generator=g), torch.randn(LAYER_ROWS, 5, 24, generator=g)


def layer_loss(res, grad_out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """<out, grad_out> / rows (times scale) + the balancing loss."""
    return (res.out * grad_out).sum() / LAYER_ROWS * scale + res.balance


# --- bytes on the wire --------------------------------------------------------------------------

TRAFFIC = dict(tokens=1024, heads=4, knn=8, dim=V_DIM, n_keys=16)


def wchar() -> int:
    """Bytes this process has written so far (files, pipes and sockets: gloo's TCP sends)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


def measure_traffic(d, shape: dict) -> list[dict[str, int]]:
    """Bytes each rank sends in one forward and one backward of a sharded memory layer reading
    shape["tokens"] tokens per rank (the balancing loss off: its all-gather is kilobytes)."""
    import torch.distributed as dist

    from slotwise.distributed.memory import ShardedValuePool

    torch.manual_seed(0)
    cfg = MemoryConfig(n_keys=shape["n_keys"], heads=shape["heads"], knn=shape["knn"], k_dim=16, v_dim=shape["dim"],
                       out_init_std=0.05, balance="none")
    mem = ProductKeyMemory(24, 24, cfg).train()
    mem.values = ShardedValuePool.from_pool(mem.values)
    x = torch.randn(shape["tokens"], 24)
    dist.barrier()
    t0 = wchar()
    out = mem(x).out
    t1 = wchar()
    out.sum().backward()
    t2 = wchar()
    mine = {"forward": t1 - t0, "backward": t2 - t1}
    every = [None] * d.world
    dist.all_gather_object(every, mine)
    return every


# --- heal: two steps of the train loop --------------------------------------------------------

HEAL_LOOP = LoopParams(max_steps=2, eval_every=1, early_stop_patience=None, save_every=1, seed=0,
                       balance_weight=0.03, trainable="memory",
                       optim=OptimParams(lr_values=0.05, lr_memory=0.01, warmup_steps=0, grad_clip=0.05))
# the heal on sparse pools (SparseAdam), its shards stepped by the fused backward + SparseAdam
HEAL_FUSED_LOOP = dataclasses.replace(HEAL_LOOP, optim=dataclasses.replace(HEAL_LOOP.optim, fused_update="on"))


def heal_batch_at(step: int) -> dict[str, torch.Tensor]:
    b = token_batch(100 + step)
    del b["attention_mask"]
    return b


def heal_eval_batches() -> list[dict[str, torch.Tensor]]:
    """The two training batches: two steps improve on them, so the best weights are the last ones."""
    return [heal_batch_at(0), heal_batch_at(1)]


# --- SMF ---------------------------------------------------------------------------------------

SMF_CFG = SMFConfig(top_t=12, score="tfidf", optimizer="adam", lr=1e-2)
SMF_FUSED_CFG = dataclasses.replace(SMF_CFG, fused_update="on")  # each rank: fused steps on its columns


def smf_background() -> dict[int, Background]:
    g = torch.Generator().manual_seed(5)
    df = torch.randint(0, 21, (64,), generator=g)
    return {1: Background(df * torch.randint(1, 5, (64,), generator=g), df, 20)}


def smf_batches() -> list[dict[str, torch.Tensor]]:
    out = []
    for s in range(2):
        b = token_batch(200 + s, rows=6, seq=10)
        b["labels"][:, :5] = -100  # the loss (and the counted reads) on the second half only
        b["attention_mask"][0, -2:] = 0
        b["labels"][0, -2:] = -100
        out.append(b)
    return out


# --- slot statistics ---------------------------------------------------------------------------

def stats_batches() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Three batches of 5 rows (2+2+1 at 3 ranks), with right padding in some rows."""
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, TINY["vocab_size"], (5, 9), generator=g) for _ in range(3)]
    masks = [torch.ones(5, 9, dtype=torch.long) for _ in range(3)]
    masks[0][1, 6:] = 0
    masks[2][4, 3:] = 0
    return batches, masks


# --- checkpoints -------------------------------------------------------------------------------

CKPT_SEED = 3


def checkpoint_model():
    return memory_model(shared=True, seed=CKPT_SEED)


# --- the worker ---------------------------------------------------------------------------------

def _gather_full(local: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Columns of an (N, D_r) tensor from every rank -> (N, D) on rank 0."""
    from slotwise.distributed.memory import ShardedValuePool, gather_rows

    return gather_rows(ShardedValuePool(local.detach(), dim), torch.arange(local.shape[0]))


SCENARIOS = ("layer", "traffic", "heal", "heal_fused", "smf", "smf_fused", "stats", "ckpt")


def _worker(out: Path, which: tuple[str, ...] = SCENARIOS) -> None:
    import torch.distributed as dist

    from slotwise.distributed import init_from_env, shutdown
    from slotwise.distributed.memory import ShardedValuePool

    d = init_from_env("cpu")
    W = d.world

    def save(name, obj):
        if d.is_main:
            torch.save(obj, out / f"{name}_w{W}.pt")

    # the memory layer: outputs, and the gradients DDP would produce (dense ones averaged over ranks)
    for case in LAYER_CASES if "layer" in which else ():
        mem, x, grad_out = layer_setup(case)
        mem.values = ShardedValuePool.from_pool(mem.values)
        res = mem(d.rows(x))
        layer_loss(res, d.rows(grad_out), scale=W).backward()
        outs = [None] * W
        dist.all_gather_object(outs, res.out.detach())
        grads = {}
        for n, p in mem.named_parameters():
            if n != "values.weight":
                g = p.grad.clone()
                dist.all_reduce(g)
                grads[n] = g / W
        vg = mem.values.weight.grad
        grads["values.weight"] = _gather_full(vg.to_dense() if vg.is_sparse else vg, V_DIM)
        save(f"layer_{case}", {"out": torch.cat(outs), "balance": res.balance.detach(), "grads": grads,
                               "sparse": vg.is_sparse})

    if "traffic" in which:
        save("traffic", measure_traffic(d, TRAFFIC))
    if "heal" in which:
        _heal(out, d, save)
    if "heal_fused" in which:
        _heal(out, d, save, "heal_fused", HEAL_FUSED_LOOP, sparse=True)
    if "smf" in which:
        _smf(out, d, save)
    if "smf_fused" in which:
        _smf(out, d, save, "smf_fused", SMF_FUSED_CFG)
    if "stats" in which:
        _stats(d, save)
    if "ckpt" in which:
        _ckpt(out, d, save)
    shutdown()


def _heal(out, d, save, name="heal", loop=HEAL_LOOP, sparse=False):
    from slotwise.distributed.training import gather_for_save, prepare
    from slotwise.training import train

    model = memory_model(sparse=sparse)
    ddp = prepare(model, d, loop.trainable)
    record = train(ddp, heal_batch_at, heal_eval_batches(), loop, out / f"{name}_state", progress=False, dist=d)
    gather_for_save(ddp, d)
    save(name, {"state": {k: v.clone() for k, v in model.state_dict().items()}, "record": record})


def _smf(out, d, save, name="smf", cfg=SMF_CFG):
    """SMF: two sharded steps, then the sparse delta gathered on rank 0."""
    from slotwise.continual.delta import save_delta
    from slotwise.distributed.smf import ShardedSMF, extract_delta_sharded
    from slotwise.distributed.memory import shard_value_pools

    model = memory_model(shared=True)
    shard_value_pools(model)
    base = copy.deepcopy(model)
    smf = ShardedSMF(model, smf_background(), cfg, d)
    steps = [smf.step(b) for b in smf_batches()]
    delta = extract_delta_sharded(base, model)
    if d.is_main:
        save_delta(delta, out / f"{name}_delta_w{d.world}")
    save(name, {"selected": [s["selected"] for s in steps], "loss": [s["loss"] for s in steps],
                "fused": smf.smf.sinks is not None})


def _stats(d, save):
    """Slot statistics, per-layer pools and one shared pool, both document units."""
    from slotwise.distributed.memory import shard_value_pools
    from slotwise.distributed.stats import collect_sharded

    batches, masks = stats_batches()
    stats = {}
    for shared in (False, True):
        model = memory_model(shared=shared)
        shard_value_pools(model)
        for unit in ("batch", "sequence"):
            per_layer, per_pool = collect_sharded(model, batches, d, masks=masks, doc_unit=unit)
            stats[(shared, unit)] = {"layers": {k: vars(v) for k, v in per_layer.items()},
                                     "pools": {k: vars(v) for k, v in per_pool.items()}}
    save("stats", stats)


def _ckpt(out, d, save):
    """Checkpoints: read what other world sizes wrote, then write this world size's."""
    from slotwise.distributed.checkpoint import load_sharded, save_sharded
    from slotwise.distributed.training import gather_for_save
    from slotwise.distributed.memory import shard_value_pools

    for src in sorted(out.glob("dcp_w*")):
        torch.manual_seed(123)  # a different init: only what is read from disk can match
        model, _ = load_sharded(src)
        gather_for_save(model, d)
        save(f"ckpt_from_{src.name}", {k: v.clone() for k, v in model.state_dict().items()})
    model = checkpoint_model()
    shard_value_pools(model)
    save_sharded(model, out / f"dcp_w{d.world}", retrofit_cfg=retrofit_cfg(shared=True))


def torchrun(world: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """python -m torch.distributed.run --standalone (a free port) with `world` local processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@functools.cache
def results_dir() -> Path:
    """One directory for the session; a single-process DCP checkpoint is written first (world size 1)."""
    from slotwise.distributed.checkpoint import save_sharded

    out = Path(tempfile.mkdtemp(prefix="slotwise-dist-"))
    atexit.register(shutil.rmtree, out, True)
    save_sharded(checkpoint_model(), out / "dcp_w1", retrofit_cfg=retrofit_cfg(shared=True))
    return out


@functools.cache
def run_world(world: int) -> Path:
    """Run the worker at `world` ranks once per session (2 before 3: each reads the checkpoints the
    smaller worlds wrote); the results directory."""
    out = results_dir()
    for smaller in (2, 3):
        if smaller < world:
            run_world(smaller)
    proc = torchrun(world, str(Path(__file__).resolve()), str(out))
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun at world size {world} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return out


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), tuple(sys.argv[2:]) or SCENARIOS)
