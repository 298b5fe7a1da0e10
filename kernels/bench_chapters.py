"""Benchmark cases for routed chapter cross-attention (run through `python -m slotwise.kernels.bench`).

    python -m slotwise.kernels.bench --cases moc-paper,moc-paper-seq

Three ways to compute the same op, forward and forward + backward (q, bank, router weights):
reference (chapter_attention_reference: gathers each segment's chapters, einsum), triton (the
kernel: reads the chapters straight from the bank) and sdpa (the chapters gathered into one
tensor per (segment, chapter), torch's scaled_dot_product_attention per chapter, mixed by the
weights; what a straightforward implementation with a fused attention does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# (sequences, sequence length, chunk_len (None: one segment per sequence), heads, M, chapters, chapter
# tokens, top_c): the paper's shape is d 768 = 12 heads x 64, 4096 routed + 1 shared chapters of 64
# tokens (262,208 memory tokens), top-64 + shared; 8 x 1024 tokens per step
CHAPTER_CASES = {
    "moc-paper": (8, 1024, 64, 12, 64, 4096, 64, 64),
    "moc-paper-seq": (8, 1024, None, 12, 64, 4096, 64, 64),
}


def _setup(case, device, dtype, seed=0):
    B, S, L, H, M, n_ch, CT, top_c = case
    g = torch.Generator(device=device).manual_seed(seed)
    L = L or S
    n_chunks = -(-S // L)
    R = B * n_chunks
    offsets = torch.cat([(torch.arange(B, device=device)[:, None] * S
                          + torch.arange(n_chunks, device=device)[None, :] * L).reshape(-1), torch.tensor([B * S], device=device)])
    routed = torch.rand(R, n_ch, device=device, generator=g).topk(top_c, -1).indices
    chapters = torch.cat([torch.full((R, 1), n_ch, device=device, dtype=torch.long), routed], 1)  # shared + routed
    weights = torch.cat([torch.ones(R, 1, device=device), torch.softmax(torch.randn(R, top_c, device=device, generator=g), -1)], 1)
    return dict(
        q=torch.randn(B * S, H, M, device=device, generator=g).to(dtype),
        bank=torch.randn((n_ch + 1) * CT, M, device=device, generator=g).to(dtype),
        offsets=offsets, chapters=chapters, weights=weights, CT=CT, L=L,
        grad=torch.randn(B * S, H, M, device=device, generator=g).to(dtype),
    )


def sdpa_gathered(q, bank, chapters, weights, CT: int, L: int) -> torch.Tensor:
    """Equal segments of L tokens: gather (R, C, CT, M), one SDPA per (segment, chapter), weighted sum."""
    T, H, M = q.shape
    R, C = chapters.shape
    kv = bank[(chapters[..., None] * CT + torch.arange(CT, device=q.device))]  # (R, C, CT, M): the gathered copy
    qs = q.view(R, L, H, M).permute(0, 2, 1, 3)  # (R, H, L, M)
    qs = qs[:, None].expand(R, C, H, L, M).reshape(R * C, H, L, M)
    kv = kv.reshape(R * C, 1, CT, M).expand(R * C, H, CT, M)
    o = F.scaled_dot_product_attention(qs, kv, kv).view(R, C, H, L, M)
    out = torch.einsum("rchlm,rc->rlhm", o.float(), weights.float())
    return out.reshape(T, H, M).to(q.dtype)


def bench_chapter_case(label: str, case, device: str, dtype, bench) -> list[dict]:
    from . import chapter_cross_attention
    from .chapter_attention_reference import chapter_attention_reference

    s = _setup(case, device, dtype)
    B, S, _, H, M, n_ch, CT, top_c = case
    L, q0, bank0, off, ch, w0, grad = s["L"], s["q"], s["bank"], s["offsets"], s["chapters"], s["weights"], s["grad"]
    shape = f"T{B * S} L{L} H{H} M{M} N{(n_ch + 1) * CT} read{top_c}+1x{CT} {str(dtype).removeprefix('torch.')}"
    fns = {
        "reference": lambda q, b, w: chapter_attention_reference(q, b, b, off, ch, w, CT),
        "triton": lambda q, b, w: chapter_cross_attention(q, b, b, off, ch, w, CT, max_seg_len=L, backend="triton"),
        "sdpa (gathered)": lambda q, b, w: sdpa_gathered(q, b, ch, w, CT, L),
    }
    rows = []
    for name, fn in fns.items():
        q, b, w = (t.detach().requires_grad_() for t in (q0, bank0, w0))
        try:
            fwd = bench(lambda: fn(q, b, w))

            def step():
                for t in (q, b, w):
                    t.grad = None
                fn(q, b, w).backward(grad)

            both = bench(step)
        except torch.OutOfMemoryError:
            fwd = both = float("nan")
            torch.cuda.empty_cache()
        rows.append(dict(op=f"chapter attention [{name}]", case=label, shape=shape, forward_ms=fwd,
                         backward_ms=both - fwd, fwd_bwd_ms=both))
    return rows


def print_chapter_table(rows: list[dict]) -> None:
    head = f"{'op':38s} {'shape':60s} {'fwd ms':>9s} {'bwd ms':>9s} {'fwd+bwd':>9s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:38s} {r['shape']:60s} {r['forward_ms']:9.3f} {r['backward_ms']:9.3f} {r['fwd_bwd_ms']:9.3f}")


def smoke_check_chapters() -> list[tuple[str, bool]]:
    """Tiny interpreted run against the reference (CPU, seconds)."""
    from . import chapter_cross_attention
    from .chapter_attention_reference import chapter_attention_reference

    s = _setup((2, 12, 4, 3, 16, 6, 5, 2), "cpu", torch.float32)
    args = (s["offsets"], s["chapters"], s["weights"], s["CT"])
    got = chapter_cross_attention(s["q"], s["bank"], s["bank"], *args, backend="triton")
    want = chapter_attention_reference(s["q"], s["bank"], s["bank"], *args)
    sd = sdpa_gathered(s["q"], s["bank"], s["chapters"], s["weights"], s["CT"], s["L"])
    return [("chapter attention", torch.allclose(got, want, atol=1e-5)), ("chapter sdpa", torch.allclose(sd, want, atol=1e-5))]
