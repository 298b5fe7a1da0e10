"""Product-key memory for inference with torch alone: the twin of slotwise.memory + slotwise.retrofit.

Copied beside every retrofitted checkpoint with modeling_slotwise.py, so a Python that has
torch and transformers but not slotwise can still load the checkpoint (trust_remote_code=True).
It runs slotwise's memory forward with the PyTorch reference ops (slotwise.kernels'
pk_topk_reference and weighted_bag_reference), op for op, so its logits equal slotwise's CPU
logits bitwise (tests/test_hf_native.py). It builds the same modules under the same names
(`mlp.mlp`, `mlp.memory.{query,query_norm,keys,values.weight,gate,out_proj}`), so the same
safetensors file loads into either.

Inference only: no balancing loss, no sparse gradients, no Triton. Memory kinds other than
product_key (Mixture of Chapters) need slotwise installed; PORTABLE_KINDS lists what is here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ValuePool(nn.Module):
    def __init__(self, n_slots: int, v_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_slots, v_dim))  # (N, v_dim); the checkpoint fills it


class ProductKeyMemory(nn.Module):
    """x (B, S, d) -> out (B, S, d): product-key top-k, softmax, weighted bag of value rows, Memory+."""

    def __init__(self, hidden: int, mem: dict, values: ValuePool | None):
        super().__init__()
        self.heads, self.k_dim, self.knn, self.n_keys = mem["heads"], mem["k_dim"], mem["knn"], mem["n_keys"]
        v_dim = mem.get("v_dim") or hidden
        self.query = nn.Linear(hidden, self.heads * self.k_dim, bias=False)
        self.query_norm = nn.LayerNorm(self.k_dim) if mem.get("query_norm", True) else None
        self.keys = nn.Parameter(torch.zeros(self.heads, 2, self.n_keys, self.k_dim // 2))  # (H, 2, n_keys, K/2)
        self.values = values if values is not None else ValuePool(self.n_keys**2, v_dim)
        self.gate = nn.Linear(hidden, v_dim, bias=False) if mem.get("memory_plus", True) else None
        self.out_proj = nn.Linear(v_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])  # (T, d)
        T, H, K, n = flat.shape[0], self.heads, self.k_dim, self.n_keys
        q = self.query(flat).view(T, H, K)
        if self.query_norm is not None:
            q = self.query_norm(q)
        qf, keys = q.float(), self.keys.float()
        # the top-k search with its scores (pk_topk_reference: differentiable through the two top-ks)
        half = torch.einsum("thsd,hsnd->thsn", qf.view(T, H, 2, K // 2), keys)  # (T, H, 2, n_keys)
        s1, i1 = half[:, :, 0].topk(self.knn, dim=-1)  # (T, H, knn)
        s2, i2 = half[:, :, 1].topk(self.knn, dim=-1)
        cand = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).view(T, H, self.knn * self.knn)
        cand_ids = (i1.unsqueeze(-1) * n + i2.unsqueeze(-2)).view(T, H, self.knn * self.knn)
        scores, best = cand.topk(self.knn, dim=-1)  # (T, H, knn)
        ids = cand_ids.gather(-1, best)
        weights = F.softmax(scores, dim=-1)
        v = self.values.weight
        w = weights.to(v.dtype)
        y = F.embedding_bag(ids.reshape(T, -1), v.float(), per_sample_weights=w.reshape(T, -1).float(), mode="sum")
        y = y.to(v.dtype).to(x.dtype)  # (T, v_dim)
        if self.gate is not None:
            y = y * F.silu(self.gate(flat))
        return self.out_proj(y).view(*lead, -1)


class MemoryMLP(nn.Module):
    """The decoder layer's FFN with the memory beside it (additive) or in its place (replace)."""

    def __init__(self, mlp: nn.Module | None, memory: nn.Module, mode: str, alpha: float):
        super().__init__()
        self.mlp = mlp if mode == "additive" else None
        self.memory = memory
        self.alpha = alpha

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.mlp is not None and self.alpha == 0:
            return self.mlp(x, *args, **kwargs)
        mem = self.memory(x)
        if self.mlp is None:
            return mem
        return self.mlp(x, *args, **kwargs) + self.alpha * mem


PORTABLE_KINDS = ("product_key",)


def add_memory(model: nn.Module, retrofit: dict) -> nn.Module:
    """Insert the memory layers that `retrofit` (slotwise's RetrofitConfig as a dict) names, in place."""
    mem = retrofit["memory"]
    kind = mem.get("kind", "product_key")
    if kind not in PORTABLE_KINDS:
        raise ImportError(f"memory kind {kind!r} has no portable implementation (only {PORTABLE_KINDS}): "
                          "install slotwise to load this checkpoint")
    if retrofit.get("mode", "additive") not in ("additive", "replace"):
        raise ValueError(f"retrofit.mode must be additive or replace, got {retrofit.get('mode')!r}")
    layers = model.get_decoder().layers
    hidden = model.config.get_text_config().hidden_size
    ref = next(model.parameters())
    shared = ValuePool(mem["n_keys"] ** 2, mem.get("v_dim") or hidden) if mem.get("shared_values") else None
    for i in retrofit["layers"]:
        memory = ProductKeyMemory(hidden, mem, shared)
        layers[i].mlp = MemoryMLP(layers[i].mlp, memory, retrofit.get("mode", "additive"), retrofit.get("alpha", 1.0))
        layers[i].mlp.to(device=ref.device)
        memory.to(dtype=ref.dtype)
    return model
