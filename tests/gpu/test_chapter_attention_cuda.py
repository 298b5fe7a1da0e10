"""The compiled chapter-attention kernel on a real GPU against its reference, at a mid-size MoC shape.

    make test-gpu        # = TRITON_INTERPRET=0 pytest -m gpu tests/gpu

Skipped without CUDA (the CPU suite runs the same kernel interpreted on small shapes).
"""
import os

import pytest
import torch

from slotwise import kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="run with TRITON_INTERPRET=0 to test compiled kernels"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk_len", [64, 512])
def test_chapter_attention_matches_reference(dtype, chunk_len):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, S, H, M, n_ch, CT, top_c = 4, 512, 12, 64, 1024, 64, 16
    n_chunks = S // chunk_len
    R = B * n_chunks
    offsets = torch.arange(R + 1, device="cuda") * chunk_len
    routed = torch.rand(R, n_ch, device="cuda", generator=g).topk(top_c, -1).indices
    chapters = torch.cat([torch.full((R, 1), n_ch, device="cuda", dtype=torch.long), routed], 1)
    weights = torch.cat([torch.ones(R, 1, device="cuda"), torch.rand(R, top_c, device="cuda", generator=g).softmax(-1)], 1)
    q0 = torch.randn(B * S, H, M, device="cuda", generator=g).to(dtype)
    bank0 = torch.randn((n_ch + 1) * CT, M, device="cuda", generator=g).to(dtype)
    grad = torch.randn(B * S, H, M, device="cuda", generator=g).to(dtype)
    results = []
    for backend in ("triton", "torch"):
        q, bank, w = (t.detach().clone().requires_grad_() for t in (q0, bank0, weights))
        out = kernels.chapter_cross_attention(q, bank, bank, offsets, chapters, w, CT, max_seg_len=chunk_len, backend=backend)
        out.backward(grad)
        results.append((out, q.grad, bank.grad, w.grad))
    # relative RMS error (the kernel rounds probabilities to bf16 before its dots; the reference does not)
    limit = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for got, want, name in zip(*results, ["out", "q", "bank", "weights"]):
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert err < limit, f"{name}: relative RMS error {err:.2e}"
