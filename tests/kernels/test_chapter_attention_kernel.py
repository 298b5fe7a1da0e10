"""Routed chapter cross-attention: the Triton forward and every gradient against the reference."""
from __future__ import annotations

import sys

import pytest
import torch
from _kernel_fixtures import close, device, poison_outputs  # noqa: F401  (pytest fixtures)

from slotwise.kernels import chapter_cross_attention
from slotwise.kernels.chapter_attention_reference import chapter_attention_reference

DTYPES = [torch.float32, torch.bfloat16]
# (segment lengths, heads, M, chapter tokens, chapters in the bank, entries per segment):
# M 24 and CT 5 are masked tiles, CT 70 two tiles of 64, a 1-token segment (decoding), a segment
# longer than one BLOCK_M of rows, segments of unequal length
SHAPES = [((4, 1, 6), 3, 24, 5, 7, 3), ((9, 2), 2, 16, 70, 3, 2), ((40, 3), 2, 8, 4, 5, 4)]


@pytest.fixture(scope="module", autouse=True)
def _interpreted_kernel_module():
    """The kernel module must be built after TRITON_INTERPRET=1 (set by _kernel_fixtures) on a CPU."""
    mod = sys.modules.get("slotwise.kernels.chapter_attention")
    if mod is not None and not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(mod._fwd_kernel, InterpretedFunction):
            pytest.skip("slotwise.kernels.chapter_attention was built for a GPU before TRITON_INTERPRET=1; run in its own process")


def _inputs(shape, dtype, device, seed=0, separate_values=False):
    lengths, H, M, CT, n_ch, C = shape
    g = torch.Generator().manual_seed(seed)
    T, R = sum(lengths), len(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    chapters = torch.randint(0, n_ch, (R, C), generator=g)
    chapters[0, 1] = -1  # an empty entry
    chapters[-1, :2] = chapters[-1, 0].clone()  # one chapter twice in a segment
    q = torch.randn(T, H, M, generator=g).to(dtype)
    keys = torch.randn(n_ch * CT, M, generator=g).to(dtype)
    values = torch.randn(n_ch * CT, M, generator=g).to(dtype) if separate_values else keys
    weights = torch.rand(R, C, generator=g)
    grad = torch.randn(T, H, M, generator=g)
    to = lambda t: t.to(device)  # noqa: E731
    values = to(values) if separate_values else None
    return to(q), to(keys), values, to(offsets), to(chapters), to(weights), to(grad), CT


def _run(backend, q, keys, values, offsets, chapters, weights, grad, CT, sparse=False):
    q = q.clone().requires_grad_()
    k = keys.clone().requires_grad_()
    v = values.clone().requires_grad_() if values is not None else k
    w = weights.clone().requires_grad_()
    out = chapter_cross_attention(q, k, v, offsets, chapters, w, CT, backend=backend, sparse_grad=sparse)
    out.backward(grad.to(out.dtype))
    grads = [q.grad, k.grad] + ([v.grad] if values is not None else []) + [w.grad]
    return out, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"seg{'-'.join(map(str, s[0]))}_H{s[1]}_M{s[2]}_CT{s[3]}")
@pytest.mark.parametrize("bank", ["one_bank", "keys_and_values"])
def test_forward_and_every_gradient_match_the_reference(device, close, dtype, shape, bank):
    args = _inputs(shape, dtype, device, separate_values=bank == "keys_and_values")
    out, grads = _run("triton", *args)
    ref_out, ref_grads = _run("torch", *args)
    assert out.dtype == dtype and out.shape == ref_out.shape
    close(out, ref_out, dtype)
    for got, want, name in zip(grads, ref_grads, ["q", "keys", "values", "weights"][:len(grads)] if bank != "one_bank"
                               else ["q", "bank", "weights"]):
        assert got.dtype == want.dtype, name
        close(got, want, dtype, scale=4.0 if dtype == torch.bfloat16 else 1.0)  # bf16: several rounded sums


def test_sparse_bank_gradient_holds_only_the_chapters_read(device, close):
    args = _inputs(SHAPES[0], torch.float32, device, seed=1)
    _, grads = _run("triton", *args, sparse=True)
    _, ref = _run("torch", *args)
    g = grads[1]
    assert g.is_sparse
    CT = args[-1]
    chapters = args[4]
    read = torch.unique(chapters[chapters >= 0])
    assert torch.equal(g._indices()[0].cpu(), (read.cpu()[:, None] * CT + torch.arange(CT)).reshape(-1))
    close(g.to_dense(), ref[1])


def test_only_query_gradient(device, close):
    q, keys, _, offsets, chapters, weights, grad, CT = _inputs(SHAPES[0], torch.float32, device, seed=2)
    qq = q.clone().requires_grad_()
    chapter_cross_attention(qq, keys, keys, offsets, chapters, weights, CT, backend="triton").backward(grad)
    qr = q.clone().requires_grad_()
    chapter_attention_reference(qr, keys, keys, offsets, chapters, weights, CT).backward(grad)
    close(qq.grad, qr.grad)


def test_matches_scaled_dot_product_attention_per_chapter(device, close):
    """One chapter per segment, weight 1: plain attention of the segment's queries on that chapter."""
    q, keys, _, offsets, chapters, _, _, CT = _inputs(SHAPES[1], torch.float32, device, seed=3)
    chapters = chapters[:, :1].contiguous()
    weights = torch.ones(chapters.shape, device=q.device)
    out = chapter_cross_attention(q, keys, keys, offsets, chapters, weights, CT, backend="triton")
    for r in range(chapters.shape[0]):
        a, b = int(offsets[r]), int(offsets[r + 1])
        kv = keys[int(chapters[r, 0]) * CT:(int(chapters[r, 0]) + 1) * CT]
        want = torch.nn.functional.scaled_dot_product_attention(q[a:b].transpose(0, 1), kv[None], kv[None])  # (H, L, M)
        close(out[a:b], want.transpose(0, 1))
