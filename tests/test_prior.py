"""``criterion.prior``: me-max's uniform target (unchanged, bit for bit) or PMSN's power law
(Assran et al. 2023, arXiv 2210.07277), checked against a float64 re-implementation of the
formula ``KL(sort_desc(mean_p) || g)``, ``g_k = k^(-tau) / sum_j j^(-tau)``."""
import math

import pytest
import torch

from helpers import ROOT
from msn_ds.config import ConfigError, load_config
from msn_ds.loss import MSNLoss, entropy, sharpen_log, sinkhorn
from msn_ds.trainer import build_criterion

DEMO = str(ROOT / "configs" / "demo_cpu.yaml")


def inputs(dtype=torch.float32, B=6, M=3, d=16, K=24, seed=7):
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn(M * B, d, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype)
    protos = torch.randn(K, d, generator=g, dtype=torch.float64).to(dtype)
    return anchor, target, protos


def loss_before_priors(crit, anchor_z, target_z, prototypes, sharpen_T):
    """MSNLoss.forward's loss as it was before ``criterion.prior`` existed, op for op."""
    batch = target_z.shape[0]
    num_views = anchor_z.shape[0] // batch
    probs, log_probs = crit.soft_nn(anchor_z, prototypes)
    with torch.no_grad():
        targets = sharpen_log(crit.soft_nn(target_z, prototypes)[1], sharpen_T)
        if crit.use_sinkhorn:
            targets = sinkhorn(targets, crit.sinkhorn_iters)
    ce = -(targets.repeat(num_views, 1) * log_probs).sum(dim=1).mean()
    avg_probs = probs.mean(dim=0)  # all_reduce_mean is the identity in one process
    me_max = math.log(prototypes.shape[0]) - entropy(avg_probs, torch.log(avg_probs))
    ent = entropy(probs, log_probs).mean()
    loss = ce
    if crit.me_max_weight:
        loss = loss + crit.me_max_weight * me_max
    if crit.entropy_weight:
        loss = loss + crit.entropy_weight * ent
    return loss


@pytest.mark.parametrize("eps, ent_w", [(0.0, 0.0), (0.1, 0.3)])
def test_uniform_is_bit_identical_to_before(eps, ent_w):
    anchor, target, protos = inputs()
    results = []
    for how in ("before", "default", "uniform"):
        a, p = anchor.clone().requires_grad_(), protos.clone().requires_grad_()
        kw = {} if how == "default" else {"prior": "uniform", "prior_tau": 0.7}
        crit = MSNLoss(me_max_weight=1.0, entropy_weight=ent_w, label_smoothing=eps,
                       **({} if how == "before" else kw))
        loss = (loss_before_priors(crit, a, target, p, 0.25) if how == "before"
                else crit(a, target, p, 0.25)[0])
        loss.backward()
        results.append((loss.detach(), a.grad, p.grad))
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


def reference_power_law(anchor, protos, tau, temperature=0.1):
    """The regulariser from the paper's formula, float64, written independently: mean
    prediction over the anchors, sorted largest first, KL to the normalised power law."""
    a = anchor / anchor.norm(dim=1, keepdim=True)
    c = protos / protos.norm(dim=1, keepdim=True)
    p = torch.softmax(a @ c.T / temperature, dim=1)
    pbar, _ = torch.sort(p.mean(0), descending=True)
    K = protos.shape[0]
    g = torch.tensor([k ** -tau for k in range(1, K + 1)], dtype=torch.float64)
    g = g / g.sum()
    return torch.sum(pbar * torch.log(pbar / g))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("tau", [0.25, 1.0])
def test_power_law_matches_float64_formula(dtype, tol, tau):
    """loss(power_law) - loss(me_max off) is the regulariser; it and its gradient match the
    float64 formula to ``tol`` (absolute; the values are of order 0.1 to 1)."""
    anchor, target, protos = inputs(torch.float64)
    a64, p64 = anchor.clone().requires_grad_(), protos.clone().requires_grad_()
    want = reference_power_law(a64, p64, tau)
    want.backward()

    a, p = anchor.to(dtype).requires_grad_(), protos.to(dtype).requires_grad_()
    crit = MSNLoss(me_max_weight=1.0, prior="power_law", prior_tau=tau)
    loss, stats = crit(a, target.to(dtype), p, 0.25)
    no_reg, _ = MSNLoss(me_max_weight=0.0)(a, target.to(dtype), p, 0.25)
    assert abs((loss - no_reg).item() - want.item()) < tol * 10
    assert abs(stats["me_max"].item() - want.item()) < tol
    # gradient of the regulariser alone
    reg = crit.prior_divergence(crit.soft_nn(a, p)[0].mean(0))
    ga, gp = torch.autograd.grad(reg, (a, p))
    torch.testing.assert_close(ga.double(), a64.grad, atol=tol, rtol=0)
    torch.testing.assert_close(gp.double(), p64.grad, atol=tol, rtol=0)


def test_power_law_properties():
    crit = MSNLoss(prior="power_law", prior_tau=0.5)
    K = 10
    g = torch.exp(crit.log_prior(K, torch.float64, torch.device("cpu")))
    assert torch.allclose(g.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.all(g[:-1] > g[1:])  # largest first
    # prototypes have no order: the prior in any order is a perfect match
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(0))
    assert abs(crit.prior_divergence(g[perm]).item()) < 1e-14
    # tau 0 is the uniform prior: me-max's log K - H(p)
    p = torch.softmax(torch.randn(K, dtype=torch.float64), 0)
    flat = MSNLoss(prior="power_law", prior_tau=0.0).prior_divergence(p)
    assert abs(flat.item() - (math.log(K) + (p * p.log()).sum().item())) < 1e-12
    # a uniform mean prediction is no longer the minimum: the power law pulls it off flat
    assert crit.prior_divergence(torch.full((K,), 1.0 / K, dtype=torch.float64)) > 0.01


def test_config_keys():
    cfg = load_config(DEMO, ["criterion.prior=power_law", "criterion.prior_tau=0.5"],
                      check_paths=False)
    crit = build_criterion(cfg)
    assert (crit.prior, crit.prior_tau) == ("power_law", 0.5)
    assert build_criterion(load_config(DEMO, [], check_paths=False)).prior == "uniform"
    with pytest.raises(ConfigError, match="criterion.prior"):
        load_config(DEMO, ["criterion.prior=zipf"], check_paths=False)
    with pytest.raises(ConfigError, match="criterion.prior_tau"):
        load_config(DEMO, ["criterion.prior_tau=-1"], check_paths=False)
    with pytest.raises(ValueError, match="prior must be one of"):
        MSNLoss(prior="zipf")
