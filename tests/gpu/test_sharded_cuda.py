"""The column-sharded pool on a GPU: NCCL, world size 1, Triton kernels, against the plain layer.

    make test-gpu        # = TRITON_INTERPRET=0 pytest -m gpu tests/gpu

(Several GPUs: python scripts/bench_distributed.py --device cuda --worlds 2,4,8 measures bytes and
times; the CPU suite checks 2 and 3 ranks on gloo.)
"""
import copy
import os

import pytest
import torch
import torch.distributed as dist

from slotwise.memory import MemoryConfig, ProductKeyMemory
from slotwise.distributed.memory import ShardedValuePool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="run with TRITON_INTERPRET=0 to test compiled kernels"),
]


@pytest.fixture(scope="module")
def nccl_world_1():
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_sharded_layer_on_nccl_equals_the_plain_layer(nccl_world_1, sparse_grad):
    torch.manual_seed(0)
    cfg = MemoryConfig(n_keys=256, heads=4, knn=32, k_dim=128, v_dim=576, out_init_std=0.02, sparse_grad=sparse_grad)
    plain = ProductKeyMemory(576, 576, cfg).cuda().train()
    sharded = copy.deepcopy(plain)
    sharded.values = ShardedValuePool.from_pool(sharded.values)
    x = torch.randn(2048, 576, device="cuda")
    g = torch.randn(2048, 576, device="cuda")
    a, b = plain(x), sharded(x)
    ((a.out * g).sum() + a.balance).backward()
    ((b.out * g).sum() + b.balance).backward()
    torch.testing.assert_close(b.out, a.out, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), sharded.parameters()):
        gp, gq = (t.grad.to_dense() if t.grad.is_sparse else t.grad for t in (p, q))
        torch.testing.assert_close(gq, gp, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
