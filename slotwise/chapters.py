"""Mixture of Chapters (Tibrewal et al. 2026, arXiv 2603.21096), made causal.

A bank of learnable latent memory tokens (N, M), N = (n_chapters + 1 shared) * chapter_tokens,
cut into chapters of consecutive rows (the shared chapter is the last one). A memory layer:

    x (B, S, d)
      -> route: per segment of tokens, top_c chapters and their router weights (+ the shared
         chapter, weight 1)                                    chapters, weights (R, C)
      -> query projection                                       q (B*S, H, M)
      -> per chapter a softmax over its CT memory tokens, read straight from the bank, the
         chapter outputs mixed by the weights (kernels.chapter_cross_attention) (B*S, H, M)
      -> output projection (zero-initialised for a retrofit)   out (B, S, d)

Keys and values are the bank rows themselves; each layer's query and output projections absorb
the paper's per-layer key and value projections (as multi-head latent attention does): a shared
bank is read by every memory layer through its own projections, and the kernel never makes a
projected copy of the bank. Attention FLOPs per token are those of the paper's cross-attention
when M = d / heads.

Routing (chunk c = positions c*L .. c*L+L-1, L = chunk_len):

    causal_chunks  chunk c >= 1 is routed from the mean of the layer's input over positions
                   < c*L (every chunk before it); chunk 0 has no past and reads the shared
                   chapter only (so causal_chunks needs shared_chapter). Nothing at position t
                   depends on a token after t.
    sequence       the paper's: each sequence routed once from the mean over ALL its positions.
                   LEAKY: the chapters read at position t depend on tokens after t. Kept only so
                   the comparison can be made; decoding routes from the prefix seen so far, which
                   is not what training saw.

Router: softmax over the n_chapters logits, top_c, renormalised over the chosen (weights sum to
1; the shared chapter adds with weight 1). Training adds balance_weight * Switch load balance
(n_chapters * sum_i f_i P_i, f_i the fraction of the top_c choices that picked chapter i, P_i
the mean router probability; 1 when balanced) + z_weight * z-loss (mean logsumexp(logits)^2),
returned as MemoryOutput.balance (train.loop.balance_weight multiplies it: set it to 1).

Decoding with a KV cache: the state a layer needs to route later tokens (the running sum of its
inputs, the sum up to the current chunk boundary, the positions seen) travels on the HF cache
object next to the keys and values (RoutingContext, hooks on the decoder), so model.generate()
routes exactly as a full forward does. The decoder's 2-d attention mask reaches the layers the
same way: positions count real tokens and pads stay out of the means, so a left-padded row routes
like the row alone. Greedy decoding only (the state is not reordered for beams).

The layer returns MemoryOutput(out, ids, weights, balance) like ProductKeyMemory: ids (B, S, H, k)
are the k bank rows each (token, head) drew most attention mass from, weights that mass, so slot
statistics, TF-IDF / KL selection and SMF apply to the bank unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from slotwise import kernels
from slotwise.memory import ROUTINGS, MemoryConfig, MemoryOutput, ValuePool

CACHE_ATTR = "slotwise_chapter_routing"


def check_chapter_config(cfg: MemoryConfig, hidden: int | None = None) -> None:
    """Raise ValueError("memory.<key>: expected ..., got ...") (hidden None: skip the width check)."""
    c = cfg.chapters
    for key in ("n_chapters", "chapter_tokens", "top_c", "chunk_len", "access_k"):
        if getattr(c, key) <= 0:
            raise ValueError(f"memory.chapters.{key}: expected a positive integer, got {getattr(c, key)}")
    if c.top_c > c.n_chapters:
        raise ValueError(f"memory.chapters.top_c: expected at most n_chapters ({c.n_chapters}), got {c.top_c}")
    if c.routing not in ROUTINGS:
        raise ValueError(f"memory.chapters.routing: expected one of {ROUTINGS}, got {c.routing!r}")
    if c.routing == "causal_chunks" and not c.shared_chapter:
        raise ValueError("memory.chapters.shared_chapter: routing causal_chunks needs true (the first chunk has no past "
                         "to route from and reads only the shared chapter), got false")
    if c.access_k > c.chapter_tokens:
        raise ValueError(f"memory.chapters.access_k: expected at most chapter_tokens ({c.chapter_tokens}), got {c.access_k}")
    if cfg.heads <= 0:
        raise ValueError(f"memory.heads: expected a positive integer, got {cfg.heads}")
    if c.dim is not None and c.dim <= 0:
        raise ValueError(f"memory.chapters.dim: expected a positive integer or null, got {c.dim}")
    if c.dim is None and hidden is not None and hidden % cfg.heads:
        raise ValueError(f"memory.chapters.dim: null needs the hidden size {hidden} divisible by memory.heads {cfg.heads}")


def bank_shape(cfg: MemoryConfig, hidden: int) -> tuple[int, int]:
    c = cfg.chapters
    return (c.n_chapters + int(c.shared_chapter)) * c.chapter_tokens, c.dim or hidden // cfg.heads


def new_bank(cfg: MemoryConfig, hidden: int) -> ValuePool:
    n, m = bank_shape(cfg, hidden)
    return ValuePool(n, m, cfg.value_init_std if cfg.value_init_std is not None else 1.0)


@dataclass
class RoutingCache:
    """What a layer has seen of the sequences it is decoding: positions, input sums (B, d) fp32."""
    n: int = 0
    total: torch.Tensor | None = None  # sum over every (real) position seen
    boundary: torch.Tensor | None = None  # sum over (real) positions < (n_real // chunk_len) * chunk_len
    n_real: torch.Tensor | None = None  # (B,) real tokens seen per row, once padding was seen (None: all n)


class Route(NamedTuple):
    offsets: torch.Tensor  # (R + 1,) token segments of the flattened (B*S) tokens
    chapters: torch.Tensor  # (R, C) int64, -1 = empty
    weights: torch.Tensor  # (R, C) fp32, differentiable in the router
    logits: torch.Tensor  # (D, n_chapters) fp32: the routed decisions (aux losses)
    chosen: torch.Tensor  # (D, top_c) int64
    max_seg_len: int
    state: RoutingCache  # the cache after these tokens


def router_losses(logits: torch.Tensor, chosen: torch.Tensor, n_chapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch load balance n * sum_i f_i P_i and z-loss mean(logsumexp^2), from (D, n) logits, (D, c) choices."""
    p_mean = logits.softmax(-1).mean(0)  # (n,)
    f = torch.bincount(chosen.reshape(-1), minlength=n_chapters).to(logits.dtype) / chosen.numel()  # (n,)
    return n_chapters * (f * p_mean).sum(), logits.logsumexp(-1).pow(2).mean()


def _assemble(pooled: torch.Tensor, routed: torch.Tensor, offsets: torch.Tensor, max_seg_len: int, state: RoutingCache,
              router: nn.Linear, cfg: MemoryConfig) -> Route:
    """pooled (R, d) routing inputs, routed (R,) bool (False: shared chapter only) -> the Route."""
    c = cfg.chapters
    R = pooled.shape[0]
    logits = router(pooled.to(router.weight.dtype)).float()  # (R, n)
    probs, chosen = logits.softmax(-1).topk(c.top_c, dim=-1)  # (R, top_c)
    keep = routed[:, None]
    chapters = torch.where(keep, chosen, -1)
    w = torch.where(keep, probs / probs.sum(-1, keepdim=True), 0.0)
    if c.shared_chapter:
        chapters = torch.cat([torch.full((R, 1), c.n_chapters, device=pooled.device, dtype=torch.long), chapters], -1)
        w = torch.cat([torch.ones(R, 1, device=pooled.device), w], -1)
    return Route(offsets, chapters, w, logits[routed], chosen[routed], max_seg_len, state)


def route(x: torch.Tensor, router: nn.Linear, cfg: MemoryConfig, cache: RoutingCache | None = None,
          mask: torch.Tensor | None = None) -> Route:
    """x (B, S, d): the S tokens after the cache.n seen (0 without a cache) -> their Route.

    mask (B, S) (False = padding): pads read only the shared chapter and are left out of every
    mean, and positions count real tokens only, so a left-padded row routes like the row alone.
    """
    if (mask is not None and not bool(mask.all())) or (cache is not None and cache.n_real is not None):
        return _route_padded(x, router, cfg, cache, mask)
    c = cfg.chapters
    B, S, _ = x.shape
    n0 = cache.n if cache is not None else 0
    zeros = x.new_zeros(B, x.shape[-1], dtype=torch.float32)
    total0 = cache.total if cache is not None and cache.total is not None else zeros
    boundary0 = cache.boundary if cache is not None and cache.boundary is not None else zeros
    cums = total0[:, None] + x.float().cumsum(1)  # (B, S, d): sum over positions <= n0 + s
    L = c.chunk_len
    if c.routing == "sequence":
        starts, pooled, routed = [0], (cums[:, -1] / (n0 + S))[:, None], [True]  # LEAKY: the whole sequence
        state = RoutingCache(n0 + S, cums[:, -1], None)
    else:
        chunks = range(n0 // L, (n0 + S - 1) // L + 1)
        starts = [max(ch * L - n0, 0) for ch in chunks]
        sums = [boundary0 if ch * L <= n0 else cums[:, ch * L - n0 - 1] for ch in chunks]  # positions < ch * L
        pooled = torch.stack(sums, 1) / torch.tensor([max(ch * L, 1) for ch in chunks], device=x.device)[:, None]
        routed = [ch >= 1 for ch in chunks]
        cb = ((n0 + S) // L) * L
        state = RoutingCache(n0 + S, cums[:, -1], boundary0 if cb <= n0 else cums[:, cb - n0 - 1])
    K = len(starts)
    offsets = torch.cat([(torch.arange(B, device=x.device)[:, None] * S + torch.tensor(starts, device=x.device)).reshape(-1),
                         torch.tensor([B * S], device=x.device)])
    max_len = max(e - s for s, e in zip(starts, starts[1:] + [S]))
    routed = torch.tensor(routed, device=x.device).repeat(B)  # (B*K,)
    return _assemble(pooled.reshape(B * K, -1), routed, offsets, max_len, state, router, cfg)


def _route_padded(x, router, cfg: MemoryConfig, cache: RoutingCache | None, mask: torch.Tensor | None) -> Route:
    """route() with padding: per row, positions count real tokens; segments are runs of one chunk (or of pads)."""
    c = cfg.chapters
    B, S, d = x.shape
    L = c.chunk_len
    mask = torch.ones(B, S, dtype=torch.bool, device=x.device) if mask is None else mask.bool().to(x.device)
    n0 = cache.n if cache is not None else 0
    zeros = x.new_zeros(B, d, dtype=torch.float32)
    total0 = cache.total if cache is not None and cache.total is not None else zeros
    boundary0 = cache.boundary if cache is not None and cache.boundary is not None else zeros
    real0 = cache.n_real if cache is not None and cache.n_real is not None else torch.full((B,), n0, dtype=torch.long)
    xm = x.float() * mask[..., None]
    cums = total0[:, None] + xm.cumsum(1)  # (B, S, d): sum over the real tokens up to s
    cnt = (real0[:, None] + mask.long().cpu().cumsum(1))  # (B, S): real tokens up to s
    chunk = torch.where(mask.cpu(), (cnt - 1) // L if c.routing == "causal_chunks" else torch.zeros_like(cnt), -1)
    starts, pooled, routed, boundary = [], [], [], []

    def sum_before(b: int, pos: int) -> torch.Tensor:
        """Sum over row b's real tokens at positions < pos (pos > real0[b])."""
        i = int(torch.searchsorted(cnt[b], pos + 1))  # the real token at position pos, or S
        return cums[b, -1] if i == S else cums[b, i] - xm[b, i]

    for b in range(B):
        r0 = int(real0[b])
        run = torch.ones(S, dtype=torch.bool)
        run[1:] = chunk[b, 1:] != chunk[b, :-1]
        for s in run.nonzero().squeeze(1).tolist():
            starts.append(b * S + s)
            ch = int(chunk[b, s])
            if ch < 0:  # padding
                pooled.append(zeros[b])
                routed.append(False)
            elif c.routing == "sequence":  # LEAKY: every real token of the row
                pooled.append(cums[b, -1] / max(int(cnt[b, -1]), 1))
                routed.append(True)
            else:
                pooled.append((boundary0[b] if ch * L <= r0 else sum_before(b, ch * L)) / max(ch * L, 1))
                routed.append(ch >= 1)
        cb = (int(cnt[b, -1]) // L) * L
        boundary.append(boundary0[b] if cb <= r0 else sum_before(b, cb))
    offsets = torch.tensor(starts + [B * S], device=x.device)
    max_len = int(offsets.diff().max())
    state = RoutingCache(n0 + S, cums[:, -1], torch.stack(boundary), cnt[:, -1].clone())
    return _assemble(torch.stack(pooled), torch.tensor(routed, device=x.device), offsets, max_len, state, router, cfg)


class ChapterMemory(nn.Module):
    """A Mixture-of-Chapters memory layer (see the module docstring); `values` is the bank."""

    def __init__(self, d_in: int, d_out: int, cfg: MemoryConfig, values: ValuePool | None = None):
        super().__init__()
        check_chapter_config(cfg, d_in)
        self.cfg = cfg
        c = cfg.chapters
        n, m = bank_shape(cfg, d_in)
        self.values = values if values is not None else new_bank(cfg, d_in)
        if self.values.weight.shape != (n, m):
            raise ValueError(f"shared chapter bank is {tuple(self.values.weight.shape)}, this layer needs {(n, m)}")
        self.query = nn.Linear(d_in, cfg.heads * m, bias=False)
        self.router = nn.Linear(d_in, c.n_chapters, bias=True)
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.zeros_(self.router.bias)
        self.out_proj = nn.Linear(cfg.heads * m, d_out, bias=False)
        nn.init.normal_(self.out_proj.weight, std=cfg.out_init_std) if cfg.out_init_std else nn.init.zeros_(self.out_proj.weight)
        self.routing: RoutingContext | None = None  # set by install_routing (decoding with a KV cache)
        self.routing_key = 0

    @property
    def n_slots(self) -> int:
        return self.values.weight.shape[0]

    def forward(self, x: torch.Tensor, cache: RoutingCache | None = None) -> MemoryOutput:
        """x (B, S, d) -> MemoryOutput; cache: continue from the positions it has seen (updated in place)."""
        c = self.cfg.chapters
        mask = None
        if self.routing is not None and self.routing.states is not None:
            cache = cache if cache is not None else self.routing.states.setdefault(self.routing_key, RoutingCache())
            mask = self.routing.mask
        B, S, _ = x.shape
        mask = mask[:, -S:] if mask is not None and mask.shape == (B, mask.shape[1]) and mask.shape[1] >= S else None
        r = route(x, self.router, self.cfg, cache, mask)
        if cache is not None:
            cache.n, cache.total, cache.boundary, cache.n_real = r.state.n, r.state.total, r.state.boundary, r.state.n_real
        bank = self.values.weight
        q = self.query(x).view(B * S, self.cfg.heads, -1)  # (T, H, M)
        y = kernels.chapter_cross_attention(q, bank, bank, r.offsets, r.chapters, r.weights, c.chapter_tokens,
                                      max_seg_len=r.max_seg_len, sparse_grad=self.cfg.sparse_grad)  # (T, H, M)
        out = self.out_proj(y.reshape(B, S, -1).to(x.dtype))
        ids, mass = kernels.chapter_accesses(q.detach(), bank.detach(), r.offsets, r.chapters, r.weights.detach(),
                                             c.chapter_tokens, c.access_k)  # (T, H, k) each
        balance = None
        if self.training and r.logits.shape[0]:
            lb, z = router_losses(r.logits, r.chosen, c.n_chapters)
            balance = c.balance_weight * lb + c.z_weight * z
        return MemoryOutput(out, ids.view(B, S, self.cfg.heads, -1), mass.view(B, S, self.cfg.heads, -1), balance)


class RoutingContext:
    """Carries the chapter layers' routing state between forwards on the HF KV cache object.

    Hooked on the decoder: before a forward it picks the state stored on past_key_values (a
    continuation) or starts an empty one (no cache, or an empty one); after it, it stores the
    state on the returned cache. Hooks are this object's bound methods, so a deep copy of the
    model gets its own context.
    """

    def __init__(self):
        self.states: dict[int, RoutingCache] | None = None
        self.mask: torch.Tensor | None = None  # the forward's 2-d attention mask (past + new tokens)

    def before(self, _module, _args, kwargs):
        am = kwargs.get("attention_mask")
        self.mask = am if isinstance(am, torch.Tensor) and am.dim() == 2 else None
        pkv = kwargs.get("past_key_values")
        seen = pkv.get_seq_length() if pkv is not None and hasattr(pkv, "get_seq_length") else 0
        if not seen:
            self.states = {}
            return None
        states = getattr(pkv, CACHE_ATTR, None)
        if states is None or any(s.n != seen for s in states.values()):
            raise RuntimeError("chapter memory: this KV cache was not made by this model's forward (or was cropped): "
                               "the routing state of the positions it holds is missing")
        self.states = states
        return None

    def after(self, _module, _args, _kwargs, output):
        pkv = getattr(output, "past_key_values", None)
        if pkv is not None and self.states is not None:
            setattr(pkv, CACHE_ATTR, self.states)
        self.states = self.mask = None
        return None


def install_routing(decoder: nn.Module, layers: list[ChapterMemory]) -> RoutingContext:
    """Hook a RoutingContext on the decoder (the module whose forward takes past_key_values)."""
    ctx = RoutingContext()
    for i, layer in enumerate(layers):
        layer.routing, layer.routing_key = ctx, i
    decoder.register_forward_pre_hook(ctx.before, with_kwargs=True)
    decoder.register_forward_hook(ctx.after, with_kwargs=True)
    return ctx


def chapter_param_counts(memory: ChapterMemory) -> dict[str, int]:
    """Parameter counts by part (the bank counted once even when shared, by the caller)."""
    return {
        "query": memory.query.weight.numel(),
        "router": sum(p.numel() for p in memory.router.parameters()),
        "values": memory.values.weight.numel(),
        "out_proj": memory.out_proj.weight.numel(),
    }


def chapter_flops_per_token(d: int, cfg: MemoryConfig) -> int:
    """Multiply-adds per token of one chapter layer, M = chapters.dim or d // heads:

        query d*H*M + scores and mix 2*H*M*(top_c + shared)*CT + output H*M*d
        + router d*n_chapters / chunk_len (one decision per chunk; sequence routing makes fewer)

    The bank's size enters only through the router: compute per token is flat in the number of
    memory tokens at a fixed number of chapters read.
    """
    c = cfg.chapters
    m = c.dim or d // cfg.heads
    read = (c.top_c + int(c.shared_chapter)) * c.chapter_tokens
    return d * cfg.heads * m + 2 * cfg.heads * m * read + cfg.heads * m * d + (d * c.n_chapters) // c.chunk_len
