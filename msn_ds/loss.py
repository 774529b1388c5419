"""The MSN criterion (docs/method.md section 1). Knows tensors and process groups, nothing else."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import all_reduce_mean, all_reduce_sum_, world_size


def sharpen(p: torch.Tensor, T: float) -> torch.Tensor:
    """``p_k^(1/T) / sum_j p_j^(1/T)``."""
    return sharpen_log(torch.log(p), T)


def sharpen_log(log_p: torch.Tensor, T: float) -> torch.Tensor:
    """:func:`sharpen` from ``log p``: computed in log space, so small ``T`` cannot underflow."""
    return torch.softmax(log_p / T, dim=1)


@torch.no_grad()
def sinkhorn(Q: torch.Tensor, num_iters: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp over the global batch: rows ``[B, K]`` become assignments whose
    prototype marginals approach uniform. Sums over prototypes' columns are all-reduced, so
    every process sees the global batch (equal batch sizes per process assumed)."""
    Q = Q.t().clone()  # [K, B]
    num_proto, batch = Q.shape[0], Q.shape[1] * world_size()
    Q /= all_reduce_sum_(Q.sum())
    for _ in range(num_iters):
        Q /= all_reduce_sum_(Q.sum(dim=1, keepdim=True))
        Q /= num_proto
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= batch
    Q *= batch
    return Q.t()


def effective_rank(h: torch.Tensor) -> torch.Tensor:
    """RankMe (Garrido et al. 2023): ``exp`` of the entropy of the normalised singular values
    of the embeddings ``h`` [N, D] of the global batch (gathered over processes): about
    ``min(N, D)`` for embeddings that use every direction, 1 when they have collapsed to
    one. A log-interval statistic: the gather and the SVD are not free."""
    if world_size() > 1:
        parts = [torch.empty_like(h) for _ in range(world_size())]
        torch.distributed.all_gather(parts, h.contiguous())
        h = torch.cat(parts)
    s = torch.linalg.svdvals(h.float())
    p = s / s.sum() + 1e-7
    return torch.exp(-(p * torch.log(p)).sum())


def entropy(p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return -(p * log_p).sum(dim=-1)


class MSNLoss(nn.Module):
    """``loss, stats = crit(anchor_z, target_z, prototypes, sharpen_T)``.

    ``anchor_z``: ``[M*B, d]``, view-major (all images' view 1, then view 2, ...);
    ``target_z``: ``[B, d]``; ``prototypes``: ``[K, d]``.

    loss = mean_anchors H(p+, p) + me_max_weight * R(p_bar) + entropy_weight * mean H(p)

    with ``R(p_bar) = log K - H(p_bar) = KL(p_bar || uniform)`` (me-max, ``prior="uniform"``),
    or, with ``prior="power_law"`` (PMSN, Assran et al. 2023, arXiv 2210.07277),
    ``R(p_bar) = KL(sort_desc(p_bar) || g)`` with ``g_k = k^(-prior_tau) / sum_j j^(-prior_tau)``,
    ``k = 1..K``: the mean prediction, largest first, matched to the power law (sorting is the
    pairing of prototypes to ranks that minimises the divergence; prototypes have no order).

    ``p_bar`` (me-max) and the Sinkhorn sums are global across processes. ``stats`` holds
    detached tensors: ``ce``, ``me_max`` (the regulariser ``R``, whichever prior), ``ent``
    (this process's values; ``me_max`` is global), ``np`` (distinct target argmaxes over the
    global batch), ``max_t`` (mean of the largest target probability, this process), and
    the vector ``proto_hits`` ``[K]``: how many images of the global batch have each
    prototype as their target's argmax (``np`` counts its non-zero entries; the monitor sums
    it over the log interval into TensorBoard's ``train/prototype_usage`` histogram).
    """

    PRIORS = ("uniform", "power_law")

    STATS = ("ce", "me_max", "ent", "np", "max_t", "target_ent")  # ``stats``' keys, in order
    VECTORS = ("proto_hits",)  # then these: one value per prototype, not scalars

    @staticmethod
    def describe(stats: dict[str, float]) -> str:
        """The progress line's part for ``stats`` averaged to floats (a missing one reads 0)."""
        s = {k: stats.get(k, 0) for k in MSNLoss.STATS}
        return (f"(ce {s['ce']:.4f} me_max {s['me_max']:.4f} ent {s['ent']:.4f}) "
                f"np {round(s['np']):d} max_t {s['max_t']:.3f} H(t) {s['target_ent']:.2f}"
                + (f" rank {stats['rankme']:.1f}" if "rankme" in stats else ""))

    def __init__(self, temperature: float = 0.1, me_max_weight: float = 1.0,
                 entropy_weight: float = 0.0, use_sinkhorn: bool = True,
                 label_smoothing: float = 0.0, sinkhorn_iters: int = 3, prior: str = "uniform",
                 prior_tau: float = 0.25):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if prior not in self.PRIORS:
            raise ValueError(f"prior must be one of {', '.join(self.PRIORS)}, got {prior!r}")
        if not (math.isfinite(prior_tau) and prior_tau >= 0):
            raise ValueError(f"prior_tau must be a finite number >= 0, got {prior_tau!r}")
        self.prior = prior
        self.prior_tau = float(prior_tau)
        self._log_prior: dict = {}  # (K, dtype, device) -> log g, made once
        self.temperature = temperature
        self.me_max_weight = me_max_weight
        self.entropy_weight = entropy_weight
        self.use_sinkhorn = use_sinkhorn
        self.label_smoothing = label_smoothing
        self.sinkhorn_iters = sinkhorn_iters

    def soft_nn(self, z: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft nearest neighbours against one-hot (optionally smoothed) prototype labels.

        Returns ``p`` and ``log p``. With smoothing eps, ``softmax @ L`` equals
        ``(1 - eps) * softmax + eps / K`` exactly.
        """
        logits = F.normalize(z, dim=1) @ F.normalize(prototypes, dim=1).t() / self.temperature
        if self.label_smoothing == 0.0:
            log_p = torch.log_softmax(logits, dim=1)
            return log_p.exp(), log_p
        eps, num_proto = self.label_smoothing, prototypes.shape[0]
        p = (1.0 - eps) * torch.softmax(logits, dim=1) + eps / num_proto
        return p, torch.log(p)

    def log_prior(self, num_proto: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``log g`` of the power-law prior, ``[K]``, largest first: computed in float64 once
        per (K, dtype, device), then cast (no host sync in the step)."""
        key = (num_proto, dtype, str(device))
        if key not in self._log_prior:
            k = torch.arange(1, num_proto + 1, dtype=torch.float64)
            log_g = -self.prior_tau * torch.log(k)
            self._log_prior[key] = (log_g - torch.logsumexp(log_g, dim=0)).to(dtype=dtype,
                                                                              device=device)
        return self._log_prior[key]

    def prior_divergence(self, avg_probs: torch.Tensor) -> torch.Tensor:
        """``KL(sort_desc(p_bar) || g)``: PMSN's regulariser for the power-law prior ``g``."""
        p = avg_probs.sort(descending=True).values
        log_g = self.log_prior(p.shape[0], p.dtype, p.device)
        return (p * (torch.log(p) - log_g)).sum()

    def forward(self, anchor_z: torch.Tensor, target_z: torch.Tensor,
                prototypes: torch.Tensor, sharpen_T: float = 0.25):
        batch = target_z.shape[0]
        if anchor_z.shape[0] % batch != 0:
            raise ValueError(f"anchor rows ({anchor_z.shape[0]}) must be a multiple of target "
                             f"rows ({batch})")
        num_views = anchor_z.shape[0] // batch
        # Half-precision inputs are promoted to fp32; float64 stays (finite-difference tests).
        dtype = torch.promote_types(anchor_z.dtype, torch.float32)
        anchor_z, target_z, prototypes = anchor_z.to(dtype), target_z.to(dtype), prototypes.to(dtype)

        probs, log_probs = self.soft_nn(anchor_z, prototypes)
        with torch.no_grad():
            targets = sharpen_log(self.soft_nn(target_z, prototypes)[1], sharpen_T)
            if self.use_sinkhorn:
                targets = sinkhorn(targets, self.sinkhorn_iters)

        ce = -(targets.repeat(num_views, 1) * log_probs).sum(dim=1).mean()

        avg_probs = all_reduce_mean(probs.mean(dim=0))
        if self.prior == "uniform":
            me_max = math.log(prototypes.shape[0]) - entropy(avg_probs, torch.log(avg_probs))
        else:
            me_max = self.prior_divergence(avg_probs)
        ent = entropy(probs, log_probs).mean()

        loss = ce
        if self.me_max_weight:
            loss = loss + self.me_max_weight * me_max
        if self.entropy_weight:
            loss = loss + self.entropy_weight * ent

        with torch.no_grad():
            # index_add_, not bincount: bincount sizes its output from the data (a host sync)
            k = prototypes.shape[0]
            usage = torch.zeros(2, k, dtype=targets.dtype, device=targets.device)
            usage[0].index_add_(0, targets.argmax(dim=1), torch.ones_like(targets[:, 0]))
            usage[1] = targets.sum(dim=0)
            usage = all_reduce_sum_(usage)  # [argmax hits, summed targets] of the global batch
            mean_t = usage[1] / usage[1].sum()
            stats = {
                "ce": ce.detach(),
                "me_max": me_max.detach(),
                "ent": ent.detach(),
                "np": (usage[0] > 0).sum().float(),
                "max_t": targets.max(dim=1).values.mean(),
                # entropy of the mean target over the global batch: log K when every
                # prototype is used alike, 0 when all images share one (collapse)
                "target_ent": entropy(mean_t, torch.log(mean_t.clamp_min(1e-30))),
                "proto_hits": usage[0],
            }
        return loss, stats
