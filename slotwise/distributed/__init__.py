"""Process groups for runs launched by torchrun, and the launcher behind `--nproc`.

    torchrun --standalone --nproc-per-node 2 -m slotwise.components.train --model ... --out ...
    slotwise train --nproc 2 --model ... --out ...        # the same: re-executes itself under torchrun

`init_from_env()` reads what torchrun exports (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
starts the default process group: NCCL on CUDA, gloo on CPU. In a plain single process (no
WORLD_SIZE, or WORLD_SIZE=1) it starts nothing and returns None, so the single-process path runs
exactly as before.

`Dist` carries what a data-parallel step needs besides the model: each rank's rows of a global
batch (the same rows a single process would see, in the same order), sums over ranks, and a
gradient-norm clip that counts the column-sharded value pools once.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    group: ProcessGroup | None = None  # None: the default group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of dim 0 (torch.tensor_split: the first B % W ranks get one more)."""
        return torch.tensor_split(t, self.world)[self.rank]

    def shard_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: (B, ...)} -> this rank's rows of every tensor."""
        return {k: self.rows(v) for k, v in batch.items()}

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64), the same on every rank."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def clip_grad_norm_(self, replicated: list[torch.Tensor], sharded: list[torch.Tensor], max_norm: float) -> float:
        """clip_grad_norm_ over the global parameters: `replicated` hold the same (all-reduced) gradient
        on every rank (DDP), `sharded` hold this rank's columns of a pool. Returns the total norm."""
        rep = [p.grad for p in replicated if p.grad is not None]
        loc = [p.grad for p in sharded if p.grad is not None]  # dense (sparse pools are not clipped)
        sq_rep = torch.nn.utils.get_total_norm(rep).float() ** 2 if rep else torch.zeros((), device=self.device)
        sq_loc = torch.nn.utils.get_total_norm(loc).float() ** 2 if loc else torch.zeros((), device=self.device)
        dist.all_reduce(sq_loc, group=self.group)
        total = (sq_rep.to(self.device) + sq_loc).sqrt()
        torch.nn.utils.clip_grads_with_norm_(replicated + sharded, max_norm, total)
        return float(total)

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def in_torchrun() -> bool:
    """True inside a process started by torchrun (or anything that exports WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | torch.device = "auto") -> Dist | None:
    """Start the default process group from torchrun's environment; None in a single process.

    device: auto (cuda:LOCAL_RANK when CUDA is available, else cpu) | cpu | cuda.
    """
    if not in_torchrun():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = str(device)
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(module: str, argv: list[str], nproc: int) -> list[str]:
    """The torchrun command line that runs `python -m module argv...` on nproc local processes."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module, *argv]


def relaunch(module: str, argv: list[str], nproc: int) -> int:
    """Run `module` under torchrun with nproc processes (this process waits); the exit code of torchrun.

    torchrun's own rendezvous (--standalone) picks a free port on this host."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(torchrun_command(module, argv, nproc), env=env)


def strip_nproc(argv: list[str]) -> tuple[int, list[str]]:
    """Take `--nproc N` / `--nproc=N` out of argv -> (N, the rest); N = 1 when absent."""
    rest, n, i = [], 1, 0
    while i < len(argv):
        a = argv[i]
        if a == "--nproc" and i + 1 < len(argv):
            n, i = argv[i + 1], i + 2
            continue
        if a.startswith("--nproc="):
            n, i = a.split("=", 1)[1], i + 1
            continue
        rest.append(a)
        i += 1
    try:
        n = int(n)
    except ValueError:
        raise ValueError(f"--nproc: expected a whole number of processes, got {n!r}") from None
    if n < 1:
        raise ValueError(f"--nproc: expected a whole number >= 1, got {n}")
    return n, rest
