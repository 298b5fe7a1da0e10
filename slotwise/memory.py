"""Product-key memory layer (Lample et al. 2019; Berges et al. 2024, "Memory Layers at Scale").

    x (B, S, d_in)
      -> query projection (+ optional norm)             q (T, H, K)
      -> product-key top-k over N = n_keys**2 slots     ids, scores (T, H, knn)
      -> softmax over the knn scores                    weights (T, H, knn)
      -> weighted sum of value rows, heads summed       y (T, v_dim)
      -> Memory+: W2(y * silu(W1 x)), else W2(y)         out (B, S, d_out)

The forward returns the output *and* what it looked up (slot ids and weights), so statistics
and slot selection read them from the return value rather than from state kept on the module.
The lookups run through slotwise.kernels (Triton on GPU, the PyTorch reference elsewhere).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from slotwise import kernels
from slotwise.schema import Choice, at_most, check, constrained, even, number, positive


class Balance(Choice):
    """The sub-key balancing loss a memory adds in training mode (see ProductKeyMemory.balance_loss)."""
    soft = "soft"
    hard = "hard"
    none = "none"


class MemoryKind(Choice):
    product_key = "product_key"  # ProductKeyMemory (this module)
    chapters = "chapters"  # Mixture of Chapters (slotwise.chapters)


class Routing(Choice):
    causal_chunks = "causal_chunks"  # chunk c routed from the positions before it
    sequence = "sequence"  # the paper's: one route per sequence from all its positions (LEAKY: sees the future)


KINDS, ROUTINGS = MemoryKind.values(), Routing.values()


def _shared_for_causal(value, cfg) -> str | None:
    if not value and cfg.routing == Routing.causal_chunks:
        return ("routing causal_chunks needs true (the first chunk has no past to route from and reads only "
                "the shared chapter)")
    return None


@dataclass
class ChapterConfig:
    """Mixture of Chapters (slotwise.chapters): a bank of latent memory tokens cut into chapters.

    The layer also reads these MemoryConfig fields: heads (attention heads), shared_values (one
    bank for every memory layer), sparse_grad, value_init_std (bank init; None = 1.0) and
    out_init_std (output projection init; 0 = the retrofit leaves the model exactly unchanged).
    """
    n_chapters: int = positive(64)  # routed chapters; the shared chapter is one more
    chapter_tokens: int = positive(64)  # memory tokens per chapter
    top_c: int = at_most("n_chapters", 4)  # routed chapters read per chunk
    routing: Routing = Routing.causal_chunks  # causal_chunks | sequence (the paper's: LEAKY, sees future tokens)
    shared_chapter: bool = constrained(True, rule=_shared_for_causal)  # one chapter every token reads (the first chunk reads only it)
    chunk_len: int = positive(32)  # causal_chunks: chunk c is routed from the mean hidden state of positions < c * chunk_len
    dim: int | None = positive(None)  # width of a memory token; None = hidden size // heads
    access_k: int = at_most("chapter_tokens", 8)  # memory tokens recorded per (token, head) as accesses (slot statistics, SMF)
    balance_weight: float = 0.01  # Switch load-balance loss
    z_weight: float = 0.001  # router z-loss


@dataclass
class MemoryConfig:
    kind: MemoryKind = MemoryKind.product_key  # product_key | chapters (Mixture of Chapters, slotwise.chapters)
    n_keys: int = positive(128)  # sub-keys per half: N = n_keys**2 slots
    heads: int = positive(4)
    knn: int = at_most("n_keys", 16)  # slots read per head and token
    k_dim: int = even(256)  # query / key width (two halves of k_dim // 2)
    v_dim: int | None = positive(None)  # value row width; None = the model's hidden size
    memory_plus: bool = True  # gate the read-out: W2(y * silu(W1 x))
    query_norm: bool = True  # layer norm on each head's query (keeps slot usage from collapsing)
    shared_values: bool = False  # one value pool shared by every memory layer
    sparse_grad: bool = False  # values get sparse gradients (for SparseAdam on ~1M-row pools)
    value_init_std: float | None = number(None, low=0, open_low=True)  # None = v_dim ** -0.5
    out_init_std: float = number(0.0, low=0)  # W2 init; 0 makes a retrofit exactly the base model
    balance: Balance = Balance.soft  # sub-key balancing loss in training mode (see ProductKeyMemory.balance_loss)
    chapters: ChapterConfig = field(default_factory=ChapterConfig)  # kind: chapters

    def __post_init__(self):
        check(self, "memory")


class MemoryOutput(NamedTuple):
    out: torch.Tensor  # (B, S, d_out)
    ids: torch.Tensor  # (B, S, H, knn) int64 slot ids
    weights: torch.Tensor  # (B, S, H, knn) softmax weights
    balance: torch.Tensor | None = None  # sub-key balancing loss (training mode only), scalar


class ValuePool(nn.Module):
    """The value table, (N, v_dim). A separate module so several layers can share one."""

    def __init__(self, n_slots: int, v_dim: int, init_std: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_slots, v_dim))
        nn.init.normal_(self.weight, std=init_std if init_std is not None else v_dim**-0.5)

    @property
    def n_slots(self) -> int:
        return self.weight.shape[0]

    def bag(self, ids: torch.Tensor, weights: torch.Tensor, sparse_grad: bool = False,
            defer: kernels.DeferredBagGrads | None = None) -> torch.Tensor:
        """ids, weights (T, H, knn) -> (T, v_dim): the weighted sum of the rows each token reads.
        defer: the pool gets no gradient; the backward records into `defer` for one fused
        backward + step after loss.backward() (slotwise.fused_update).
        (slotwise.distributed.memory.ShardedValuePool does the same with its columns spread over ranks.)"""
        return kernels.weighted_bag(self.weight, ids, weights.to(self.weight.dtype), sparse_grad=sparse_grad,
                                    defer=defer)

    def token_mean(self, mean: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """A mean over this step's n_tokens tokens -> the mean over every token of the step (here the
        same; a sharded pool averages over the tokens of all ranks, so losses on it match one process)."""
        return mean


class ProductKeyMemory(nn.Module):
    def __init__(self, d_in: int, d_out: int, cfg: MemoryConfig, values: ValuePool | None = None):
        super().__init__()
        self.cfg = cfg
        v_dim = cfg.v_dim or d_out
        self.query = nn.Linear(d_in, cfg.heads * cfg.k_dim, bias=False)
        self.query_norm = nn.LayerNorm(cfg.k_dim) if cfg.query_norm else None
        # Sub-keys: (H, 2 halves, n_keys, K/2), uniform like the reference implementation.
        bound = 1 / math.sqrt(cfg.k_dim)
        self.keys = nn.Parameter(torch.empty(cfg.heads, 2, cfg.n_keys, cfg.k_dim // 2).uniform_(-bound, bound))
        self.values = values if values is not None else ValuePool(cfg.n_keys**2, v_dim, cfg.value_init_std)
        if self.values.weight.shape != (cfg.n_keys**2, v_dim):
            raise ValueError(
                f"shared value pool is {tuple(self.values.weight.shape)}, this layer needs {(cfg.n_keys**2, v_dim)}"
            )
        self.gate = nn.Linear(d_in, v_dim, bias=False) if cfg.memory_plus else None  # W1
        self.out_proj = nn.Linear(v_dim, d_out, bias=False)  # W2
        nn.init.normal_(self.out_proj.weight, std=cfg.out_init_std) if cfg.out_init_std else nn.init.zeros_(
            self.out_proj.weight
        )

    @property
    def n_slots(self) -> int:
        return self.cfg.n_keys**2

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, d_in) -> q (T, H, K)."""
        q = self.query(x).view(x.shape[0], self.cfg.heads, self.cfg.k_dim)
        return self.query_norm(q) if self.query_norm is not None else q

    def balance_loss(self, q: torch.Tensor, usage: torch.Tensor | None = None) -> torch.Tensor | None:
        """A loss that spreads the reads over the sub-keys (per head and half, averaged), or None.

        usage (H, 2, n_keys): this step's mean softmax over sub-keys, as kernels.pk_topk(usage=True)
        returns it from the search's own scores; None scores every sub-key here once more.

        soft  KL(mean_t softmax over sub-keys || uniform). Cheap, but blind to *hard* collapse:
              with flat sub-key scores the mean softmax looks uniform while the top-k picks pile
              onto a few sub-keys (the H100 heal: 0.06 of a possible log(n_keys) while coverage
              fell to 32%).
        hard  Switch-Transformer style n * sum_i f_i * P_i, with f_i the fraction of the top-knn
              picks that went to sub-key i (no gradient) and P_i the mean softmax probability
              of i: the gradient lowers exactly the sub-keys the hard selection over-uses. 1.0
              when picks and probabilities are uniform.
        """
        if self.cfg.balance == "none":
            return None
        T, H, K = q.shape

        def sub_key_scores():  # (T, H, 2, n_keys)
            return torch.einsum("thsd,hsnd->thsn", q.view(T, H, 2, K // 2).float(), self.keys.float())

        if usage is None:
            usage = sub_key_scores().softmax(dim=-1).mean(dim=0)
        p_mean = self.values.token_mean(usage, T)  # (H, 2, n_keys)
        n = p_mean.shape[-1]
        if self.cfg.balance == "soft":
            return (p_mean * (p_mean * n).clamp_min(1e-12).log()).sum(-1).mean()
        with torch.no_grad():  # the hard picks: each half's own top-knn (no gradient, no saved activations)
            picks = sub_key_scores().topk(self.cfg.knn, dim=-1).indices  # (T, H, 2, knn)
            f = torch.zeros_like(p_mean).scatter_add_(-1, picks.permute(1, 2, 0, 3).reshape(H, 2, -1),
                                                      torch.ones(H, 2, T * self.cfg.knn, device=q.device))
            f = self.values.token_mean(f / (T * self.cfg.knn), T)  # (H, 2, n_keys), sums to 1
        return n * (f * p_mean).sum(-1).mean()

    def forward(self, x: torch.Tensor, defer: kernels.DeferredBagGrads | None = None) -> MemoryOutput:
        """defer: record the value pool's backward there instead of giving it a gradient (ValuePool.bag)."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])  # (T, d_in)
        q = self.queries(flat)
        want_usage = self.training and self.cfg.balance != "none"
        scores, ids, *usage = kernels.pk_topk(q, self.keys, self.cfg.knn, usage=want_usage)  # (T, H, knn) each
        weights = F.softmax(scores, dim=-1)
        balance = self.balance_loss(q, usage[0]) if want_usage else None
        y = self.values.bag(ids, weights, sparse_grad=self.cfg.sparse_grad, defer=defer)  # (T, v_dim)
        y = y.to(x.dtype)
        if self.gate is not None:
            y = y * F.silu(self.gate(flat))
        out = self.out_proj(y)
        return MemoryOutput(
            out.view(*lead, -1),
            ids.view(*lead, self.cfg.heads, self.cfg.knn),
            weights.view(*lead, self.cfg.heads, self.cfg.knn),
            balance,
        )


def memory_param_counts(memory: ProductKeyMemory) -> dict[str, int]:
    """Parameter counts by part; the value pool is counted once even when shared."""
    counts = {
        "query": sum(p.numel() for p in memory.query.parameters())
        + (sum(p.numel() for p in memory.query_norm.parameters()) if memory.query_norm is not None else 0),
        "keys": memory.keys.numel(),
        "values": memory.values.weight.numel(),
        "gate": memory.gate.weight.numel() if memory.gate is not None else 0,
        "out_proj": memory.out_proj.weight.numel(),
    }
    return counts
