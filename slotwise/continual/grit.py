"""GRIT (Saha et al. 2026, arXiv 2601.00231): curvature-aware LoRA.

A LoRA-adapted Linear computes  y = W x + s * B A x,  A (r, d_in), B (d_out, r), s = alpha / r.
Write the rank-space ("bottleneck") activation and its gradient per token:

    a = A x          (r,)    what lora_B reads
    g = dL/da        (r,)    = s * B^T dL/dy, the gradient lora_A's output receives

K-FAC (Martens & Grosse 2015) approximates the Fisher block of a Linear map with input u and output
gradient v as E[u u^T] (x) E[v v^T]. For lora_B (input a, output grad dL/dy) and lora_A (input x,
output grad g) the big factors are d_out x d_out and d_in x d_in; GRIT keeps only the two r x r
rank-space factors, running (EMA) estimates over steps,

    A_r = E[a a^T]      G_r = E[g g^T]           (r, r), damped: F + lambda I

and preconditions the LoRA gradients with the K-FAC inverse restricted to rank space,

    grad_B <- grad_B (A_r + lambda_A I)^-1        (the factor of lora_B's block that is r x r)
    grad_A <- (G_r + lambda_G I)^-1 grad_A        (the factor of lora_A's block that is r x r)

i.e. the general form (L + lambda I)^-1 grad (R + lambda I)^-1 = (L (x) R^T + ...)^-1 vec(grad)
(`kfac_precondition`) with the d_out / d_in factors taken as the identity. Every reproject_every
steps the bottleneck basis is rotated onto the eigenvectors of a rank-space Fisher factor and
truncated to the smallest k whose eigenvalues hold >= `energy` of the total (within r_min and the
current rank):

    M = U diag(lambda) U^T  (lambda descending),  U_k = U[:, :k]
    A <- U_k^T A   (k, d_in),   B <- B U_k   (d_out, k),   so  B A <- B U_k U_k^T A

which keeps the update B A's component in the dominant subspace, drops the rest, and shrinks the
trainable parameters (the paper's "fewer effective parameters").

What is a faithful reading and what is ours:
  * faithful: rank-space K-FAC factors from the LoRA bottleneck, damped inverse preconditioning,
    periodic reprojection onto dominant Fisher eigendirections, rank from a cumulative-energy
    threshold.
  * ours: which factor defines the basis (`basis`: the activation factor A_r by default, G_r, or
    their trace-normalised sum; the paper reprojects "two-sided"); the rank only shrinks (from r
    down to r_min; the paper can also grow it); damping is relative, lambda = damping * tr(F) / r
    (+1e-12), so the preconditioner is scale-free; G_r is estimated from per-token gradients
    scaled by the number of tokens (the loss is a mean); padding tokens contribute to A_r; the
    preconditioned gradient is rescaled to the raw gradient's norm (match_grad_norm) so learning
    rates stay comparable with LoRA's; after a reprojection the optimizer state is reset; AdamW
    (default) or SGD runs on the preconditioned gradients. No curvature-modulated forgetting law.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from slotwise.continual.baselines import LORA_TARGETS, LossFn, add_lora, causal_lm_loss, lora_target_modules, save_adapter
from slotwise.schema import Choice, check, constrained, number, positive

class Basis(Choice):
    activation = "activation"  # A_r
    gradient = "gradient"  # G_r
    sum = "sum"  # their trace-normalised sum


class GritOptimizer(Choice):
    adamw = "adamw"
    sgd = "sgd"


BASES = Basis.values()


# --- the math, on plain tensors -------------------------------------------------------------------

def second_moment(x: torch.Tensor) -> torch.Tensor:
    """x (T, r) -> E[x x^T] (r, r) fp32."""
    x = x.reshape(-1, x.shape[-1]).float()
    return x.T @ x / max(x.shape[0], 1)


def kfac_precondition(grad: torch.Tensor, left: torch.Tensor | None = None, right: torch.Tensor | None = None,
                      damping_left: float = 0.0, damping_right: float = 0.0) -> torch.Tensor:
    """(L + dl I)^-1 grad (R + dr I)^-1 for grad (m, n), L (m, m), R (n, n) symmetric (None = identity).

    Row-major vec: vec(L^-1 X R^-1) = (L (x) R^T)^-1 vec(X), the K-FAC inverse applied to the gradient.
    """
    dt = torch.promote_types(grad.dtype, torch.float32)
    out = grad.to(dt)
    if left is not None:
        eye = torch.eye(left.shape[0], dtype=dt, device=out.device)
        out = torch.linalg.solve(left.to(dt) + damping_left * eye, out)
    if right is not None:
        eye = torch.eye(right.shape[0], dtype=dt, device=out.device)
        out = torch.linalg.solve(right.to(dt) + damping_right * eye, out.T).T  # R symmetric
    return out


def relative_damping(factor: torch.Tensor, damping: float) -> float:
    """lambda = damping * mean eigenvalue (tr / r), + 1e-12 so an all-zero factor stays invertible."""
    return damping * float(torch.trace(factor)) / factor.shape[0] + 1e-12


def precondition_lora(grad_A: torch.Tensor, grad_B: torch.Tensor, A_r: torch.Tensor, G_r: torch.Tensor,
                      damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_A (r, d_in), grad_B (d_out, r) -> (G_r+lG I)^-1 grad_A, grad_B (A_r+lA I)^-1 (relative damping)."""
    nat_A = kfac_precondition(grad_A, left=G_r, damping_left=relative_damping(G_r, damping))
    nat_B = kfac_precondition(grad_B, right=A_r, damping_right=relative_damping(A_r, damping))
    return nat_A, nat_B


def energy_rank(eigvals: torch.Tensor, energy: float, r_min: int, r_max: int) -> int:
    """Smallest k with sum of the k largest eigenvalues >= energy * total, clamped to [r_min, r_max]."""
    lam = eigvals.double().clamp(min=0).sort(descending=True).values
    total = lam.sum()
    if total <= 0:
        return max(1, min(r_min, r_max))
    frac = lam.cumsum(0) / total
    k = int((frac < energy - 1e-12).sum()) + 1
    return max(r_min, min(k, r_max, lam.numel()))


def rank_basis(A_r: torch.Tensor, G_r: torch.Tensor, basis: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (r,) descending and eigenvectors (r, r) (columns) of the chosen rank-space factor."""
    if basis not in BASES:
        raise ValueError(f"grit.basis must be one of {BASES}, got {basis!r}")
    if basis == "activation":
        M = A_r
    elif basis == "gradient":
        M = G_r
    else:
        M = A_r / (torch.trace(A_r) + 1e-30) + G_r / (torch.trace(G_r) + 1e-30)
    vals, vecs = torch.linalg.eigh(M.double())  # ascending
    return vals.flip(0).float(), vecs.flip(1).float()


def reproject(A: torch.Tensor, B: torch.Tensor, U_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, d_in), B (d_out, r), U_k (r, k) orthonormal -> A' = U_k^T A (k, d_in), B' = B U_k (d_out, k)."""
    U = U_k.to(A.dtype)
    return U.T @ A, B @ U.to(B.dtype)


# --- the updater on a peft LoRA model -------------------------------------------------------------

@dataclass
class GritParams:
    r: int = positive(16)  # initial (= maximum) rank
    alpha: float = 32.0
    dropout: float = 0.0
    lr: float = number(2e-4, low=0, open_low=True)
    optimizer: GritOptimizer = GritOptimizer.adamw
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    include_memory: bool = False
    damping: float = 1e-3  # relative: lambda = damping * tr(F) / r
    ema_decay: float = 0.95  # running factors: F <- decay F + (1 - decay) F_batch
    reproject_every: int = 100  # steps; 0 = never
    energy: float = constrained(0.9, rule=lambda v, _: None if 0 < v <= 1 else "must be in (0, 1]")  # cumulative-energy threshold for the rank
    r_min: int = constrained(1, rule=lambda v, o: None if 1 <= v <= o.r else f"must be in [1, r={o.r}]")
    basis: Basis = Basis.activation
    match_grad_norm: bool = True
    max_grad_norm: float | None = None

    def __post_init__(self):
        check(self, "grit")


class GritUpdater:
    """LoRA with GRIT's preconditioning, reprojection and rank adaptation.

        up = GritUpdater(model, GritParams(r=16, reproject_every=50))
        up.step(batch)   # {"loss": float, "ranks": {module name: rank}, "n_trainable": int}
        up.model         # the peft model
    """

    def __init__(self, model: nn.Module, cfg: GritParams, loss_fn: LossFn = causal_lm_loss):
        from peft.tuners.lora import LoraLayer

        self.cfg, self.loss_fn = cfg, loss_fn
        self.target_modules = lora_target_modules(model, cfg.targets, cfg.include_memory)
        self.model = add_lora(model, cfg.r, cfg.alpha, cfg.dropout, self.target_modules)
        self.adapter = "default"
        self.layers = {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLayer) and self.adapter in m.lora_A}
        self.factors = {n: {"A": None, "G": None} for n in self.layers}  # (r, r) each once seen
        self.n_steps = 0
        self._build_optimizer()

    def _build_optimizer(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        c = self.cfg
        if c.optimizer == "adamw":
            self.opt = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
        else:
            self.opt = torch.optim.SGD(self.params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def ranks(self) -> dict[str, int]:
        return {n: m.lora_A[self.adapter].weight.shape[0] for n, m in self.layers.items()}

    @contextlib.contextmanager
    def _capture(self):
        """Per layer, the bottleneck activations a (T, r) and their gradients g (T, r) of one step."""
        seen: dict[str, dict[str, torch.Tensor]] = {n: {} for n in self.layers}

        def hook(name):
            def fn(_mod, _inp, out):
                seen[name]["a"] = out.detach().reshape(-1, out.shape[-1])
                if out.requires_grad:
                    out.register_hook(lambda g: seen[name].__setitem__("g", g.detach().reshape(-1, g.shape[-1])))
            return fn

        handles = [m.lora_A[self.adapter].register_forward_hook(hook(n)) for n, m in self.layers.items()]
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()

    def _update_factors(self, name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        batch = {"A": second_moment(a), "G": second_moment(g * g.shape[0])}  # per-token grads of a mean loss
        f, d = self.factors[name], self.cfg.ema_decay
        for k, v in batch.items():
            f[k] = v if f[k] is None else d * f[k] + (1 - d) * v

    def step(self, batch: dict) -> dict:
        cfg = self.cfg
        with self._capture() as seen:
            loss = self.loss_fn(self.model, batch)
            loss.backward()
        with torch.no_grad():
            for name, m in self.layers.items():
                if "a" not in seen[name] or "g" not in seen[name]:
                    continue  # the layer took no part in this loss
                self._update_factors(name, seen[name]["a"], seen[name]["g"])
                wA, wB = m.lora_A[self.adapter].weight, m.lora_B[self.adapter].weight
                if wA.grad is None or wB.grad is None:
                    continue
                f = self.factors[name]
                nat_A, nat_B = precondition_lora(wA.grad, wB.grad, f["A"], f["G"], cfg.damping)
                for w, nat in ((wA, nat_A), (wB, nat_B)):
                    if cfg.match_grad_norm:
                        nat = nat * (w.grad.float().norm() / (nat.norm() + 1e-30))
                    w.grad.copy_(nat.to(w.grad.dtype))
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.n_steps += 1
        if cfg.reproject_every and self.n_steps % cfg.reproject_every == 0:
            self.reproject_all()
        ranks = self.ranks()
        return {"loss": loss.item(), "ranks": ranks, "n_trainable": sum(p.numel() for p in self.params)}

    def save_adapter(self, path, base_model: str | None = None):
        """peft's save_pretrained, with each layer's current rank (rank_pattern) and an alpha that keeps
        its scale alpha / r_initial (alpha_pattern: peft scales by alpha / r), so that
        PeftModel.from_pretrained(base, path) rebuilds exactly this adapter."""
        cfg = self.model.peft_config[self.adapter]
        prefix = "base_model.model."  # peft's wrapper names; patterns match the base model's module names
        for name, r in self.ranks().items():
            if r != self.cfg.r:
                key = name[len(prefix):] if name.startswith(prefix) else name
                cfg.rank_pattern[key] = r
                cfg.alpha_pattern[key] = self.cfg.alpha * r / self.cfg.r
        return save_adapter(self.model, path, base_model)

    @torch.no_grad()
    def reproject_all(self) -> dict[str, int]:
        """Rotate every layer's bottleneck onto its Fisher eigenbasis and truncate by energy -> new ranks."""
        cfg = self.cfg
        for name, m in self.layers.items():
            f = self.factors[name]
            if f["A"] is None:
                continue
            linA, linB = m.lora_A[self.adapter], m.lora_B[self.adapter]
            r = linA.weight.shape[0]
            vals, vecs = rank_basis(f["A"], f["G"], cfg.basis)
            k = energy_rank(vals, cfg.energy, min(cfg.r_min, r), r)
            U_k = vecs[:, :k]  # (r, k)
            A_new, B_new = reproject(linA.weight.data, linB.weight.data, U_k)
            linA.weight = nn.Parameter(A_new.contiguous())
            linB.weight = nn.Parameter(B_new.contiguous())
            linA.out_features = linB.in_features = k
            m.r[self.adapter] = k  # the scaling alpha / r_initial is kept, so B A's scale is unchanged
            f["A"] = U_k.T @ f["A"] @ U_k  # the factors in the new coordinates a' = U_k^T a
            f["G"] = U_k.T @ f["G"] @ U_k
        self._build_optimizer()  # parameters were replaced: fresh optimizer state
        return self.ranks()
