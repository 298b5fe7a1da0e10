"""Make a retrofitted model data-parallel over a torchrun run: column-sharded value pools + DDP.

    d = init_from_env()                       # slotwise.distributed
    ddp = prepare(model, d)                   # every rank holds the same full model before this
    train(ddp, batch_at, eval_batches, loop, state, dist=d)      # slotwise.training
    gather_for_save(model, d)                 # rank 0: full pools again, ready for save_checkpoint

The value pools are split by column (slotwise.distributed.memory: each rank keeps D/W columns of every
row and reads them for the tokens of all ranks). Everything else that trains -- the memory's
query, keys, gate and output projection, and the base model when train.loop.trainable=all -- is
replicated and synchronised by DistributedDataParallel, which averages gradients over ranks; the
pools' parameters are excluded from DDP (their gradient never leaves the rank). DDP gets its own
process group so its gradient buckets never interleave with the pools' collectives on the default
group.

Why DDP and not FSDP2 here: the dense parts of a retrofit (query, keys, gate, out_proj, and a
frozen base) fit on every GPU, and DDP keeps plain tensors, so the resumable trainer state,
gradient clipping and the sparse optimizers work unchanged. A base model too large for one GPU
would take torch.distributed.fsdp.fully_shard(model, ignored_params=<the pools>) instead (checked
to run on CPU/gloo in tests/distributed); the trainer state would then need DCP as well.
"""
from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from slotwise.distributed import Dist
from slotwise.optim import trainable_groups
from slotwise.retrofit import memory_layers
from slotwise.distributed.memory import shard_value_pools, unshard_value_pools


def pool_parameter_names(model: nn.Module) -> list[str]:
    """Names (model.named_parameters, duplicates included) of the value pools' weights."""
    pools = {id(m.values.weight) for m in memory_layers(model).values()}
    return [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in pools]


def prepare(model: nn.Module, d: Dist, trainable: str = "memory") -> DistributedDataParallel:
    """In place: shard the value pools over the ranks; return the model wrapped in DDP (pools ignored).

    trainable: memory | all (train.loop.trainable), set before DDP registers what it synchronises."""
    shard_value_pools(model, d.group)
    trainable_groups(model, trainable)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, pool_parameter_names(model))
    ddp_group = dist.new_group(backend=dist.get_backend(d.group))
    return DistributedDataParallel(model, process_group=ddp_group,
                                   device_ids=[d.device.index] if d.device.type == "cuda" else None)


def gather_for_save(model: nn.Module, d: Dist) -> bool:
    """Every rank calls it: rank 0's model gets its full value pools back (the others only send).
    True on rank 0, which then saves the usual checkpoint."""
    unshard_value_pools(model.module if isinstance(model, DistributedDataParallel) else model)
    return d.is_main
