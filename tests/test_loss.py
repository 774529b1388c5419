"""MSNLoss against docs/method.md section 1: hand-checked values, an independent float64
implementation written from the formulas, finite differences, Sinkhorn marginals, me-max."""
import math

import pytest
import torch

from msn_ds.loss import MSNLoss, sharpen, sinkhorn


def reference_msn(anchor, target, protos, T, tau=0.1, eps=0.0, use_sinkhorn=True,
                  me_max_w=1.0, ent_w=0.0, iters=3):
    """Straight from docs/method.md: p = softmax(cos / tau) @ L, p+ = sharpen then Sinkhorn,
    loss = mean H(p+, p) + w_me (log K - H(mean p)) + w_ent mean H(p)."""
    K = protos.shape[0]
    L = torch.full((K, K), eps / K, dtype=protos.dtype)
    L.fill_diagonal_(1 - eps + eps / K)
    na = anchor / anchor.norm(dim=1, keepdim=True)
    nt = target / target.norm(dim=1, keepdim=True)
    npr = protos / protos.norm(dim=1, keepdim=True)
    p = torch.softmax(na @ npr.T / tau, dim=1) @ L
    with torch.no_grad():
        q = torch.softmax(nt @ npr.T / tau, dim=1) @ L
        q = q ** (1 / T)
        q = q / q.sum(1, keepdim=True)
        if use_sinkhorn:
            Q = q.T.clone()
            B = Q.shape[1]
            Q = Q / Q.sum()
            for _ in range(iters):
                Q = Q / Q.sum(1, keepdim=True) / K
                Q = Q / Q.sum(0, keepdim=True) / B
            q = (Q * B).T
    M = anchor.shape[0] // target.shape[0]
    qq = torch.cat([q] * M)
    ce = torch.mean(torch.sum(-qq * torch.log(p), dim=1))
    pbar = p.mean(0)
    me = math.log(K) + torch.sum(pbar * torch.log(pbar))
    ent = torch.mean(torch.sum(-p * torch.log(p), dim=1))
    return ce + me_max_w * me + ent_w * ent, ce, me, ent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_sinkhorn", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("ent_w", [0.0, 0.3])
def test_matches_independent_implementation(use_sinkhorn, eps, ent_w, dtype):
    g = torch.Generator().manual_seed(11)
    B, M, d, K, T = 6, 3, 16, 24, 0.3
    anchor = torch.randn(M * B, d, generator=g, dtype=torch.float64)
    target = torch.randn(B, d, generator=g, dtype=torch.float64)
    protos = torch.randn(K, d, generator=g, dtype=torch.float64)

    # MSNLoss in float32 (training precision) or float64, against the formula in float64.
    a1 = anchor.detach().to(dtype).clone().requires_grad_()
    p1 = protos.detach().to(dtype).clone().requires_grad_()
    crit = MSNLoss(temperature=0.1, me_max_weight=1.0, entropy_weight=ent_w,
                   use_sinkhorn=use_sinkhorn, label_smoothing=eps)
    loss, stats = crit(a1, target.to(dtype), p1, T)
    loss.backward()

    a2, p2 = anchor.clone().requires_grad_(), protos.clone().requires_grad_()
    ref, ce, me, ent = reference_msn(a2, target, p2, T, eps=eps, use_sinkhorn=use_sinkhorn,
                                     ent_w=ent_w)
    ref.backward()

    rel = 1e-5
    assert loss.item() == pytest.approx(ref.item(), rel=rel)
    assert stats["ce"].item() == pytest.approx(ce.item(), rel=rel)
    assert stats["me_max"].item() == pytest.approx(me.item(), rel=rel, abs=1e-6)
    assert stats["ent"].item() == pytest.approx(ent.item(), rel=rel)
    for got, want in [(a1.grad, a2.grad), (p1.grad, p2.grad)]:
        err = (got.double() - want).norm() / want.norm()
        assert err < rel, err


def test_hand_checked_two_prototypes():
    """K=2 orthogonal prototypes, one target on e1, one anchor on e2, no Sinkhorn."""
    protos = torch.eye(2)
    target = torch.tensor([[1.0, 0.0]])
    anchor = torch.tensor([[0.0, 1.0]])
    crit = MSNLoss(temperature=0.1, use_sinkhorn=False)
    loss, stats = crit(anchor, target, protos, 0.25)
    # p(anchor) = softmax([0, 10]); p+ = sharpen(softmax([10, 0]), 0.25) = softmax([40, 0])
    log_p = [-10 - math.log1p(math.exp(-10)), -math.log1p(math.exp(-10))]
    t = [1 / (1 + math.exp(-40)), math.exp(-40) / (1 + math.exp(-40))]
    ce = -(t[0] * log_p[0] + t[1] * log_p[1])
    p = [math.exp(v) for v in log_p]
    me = math.log(2) + sum(v * math.log(v) for v in p)
    assert stats["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert stats["me_max"].item() == pytest.approx(me, rel=1e-5)
    assert loss.item() == pytest.approx(ce + me, rel=1e-6)
    assert stats["np"].item() == 1
    assert stats["max_t"].item() == pytest.approx(t[0], rel=1e-6)
    # what the monitor reads and files under train/ (scalars, then the per-prototype hits)
    assert tuple(stats) == MSNLoss.STATS + MSNLoss.VECTORS
    assert stats["proto_hits"].tolist() == [1.0, 0.0]  # the one target's argmax: prototype 0


def test_targets_repeat_view_major():
    """Anchor row v*B + i is compared with target row i."""
    g = torch.Generator().manual_seed(0)
    B, d, K = 4, 8, 10
    protos = torch.randn(K, d, generator=g)
    target = torch.randn(B, d, generator=g)
    crit = MSNLoss(use_sinkhorn=False, me_max_weight=0.0)
    one, _ = crit(target.clone(), target, protos)  # anchors identical to their targets
    two, _ = crit(torch.cat([target, target]), target, protos)
    shuffled, _ = crit(torch.cat([target, target.roll(1, 0)]), target, protos)
    assert one.item() == pytest.approx(two.item(), rel=1e-6)
    assert shuffled.item() > two.item() + 1e-3


def test_gradient_finite_differences():
    """Gradient w.r.t. the anchors by central differences (float64 gradcheck)."""
    g = torch.Generator().manual_seed(3)
    B, M, d, K = 3, 2, 5, 7
    target = torch.randn(B, d, generator=g, dtype=torch.float64)
    protos = torch.randn(K, d, generator=g, dtype=torch.float64)
    anchor = torch.randn(M * B, d, generator=g, dtype=torch.float64, requires_grad=True)

    def f(a):
        return MSNLoss(entropy_weight=0.2, label_smoothing=0.05)(a, target, protos)[0]

    assert torch.autograd.gradcheck(f, (anchor,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_sinkhorn_marginals():
    g = torch.Generator().manual_seed(5)
    B, K = 32, 8
    q = torch.softmax(torch.randn(B, K, generator=g) * 3, dim=1)
    out = sinkhorn(q, num_iters=3)
    torch.testing.assert_close(out.sum(1), torch.ones(B), atol=1e-5, rtol=0)  # per sample
    long = sinkhorn(q.double(), num_iters=200)
    torch.testing.assert_close(long.sum(1), torch.ones(B, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(long.sum(0), torch.full((K,), B / K, dtype=torch.float64),
                               atol=1e-6, rtol=0)  # per prototype: uniform
    # three iterations already move prototype marginals most of the way to uniform
    spread = lambda x: (x.sum(0) - B / K).abs().max().item()
    assert spread(out) < 0.25 * spread(q)


def test_me_max_uniform_and_one_hot():
    K, d = 16, 16
    protos = torch.eye(K, d)
    target = torch.randn(4, d)
    # anchors at the origin: every cosine similarity is 0, predictions are uniform
    _, stats = MSNLoss()(torch.zeros(8, d), target, protos)
    assert stats["me_max"].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["ent"].item() == pytest.approx(math.log(K), rel=1e-6)
    # every anchor on prototype 0 with a sharp temperature: predictions one-hot
    anchors = torch.zeros(8, d)
    anchors[:, 0] = 1.0
    _, stats = MSNLoss(temperature=0.01)(anchors, target, protos)
    assert stats["me_max"].item() == pytest.approx(math.log(K), abs=1e-6)
    assert stats["ent"].item() == pytest.approx(0.0, abs=1e-6)


def test_sharpen():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    s = sharpen(p, 0.5)
    want = p ** 2 / (p ** 2).sum()
    torch.testing.assert_close(s, want)
    assert sharpen(p, 1.0).allclose(p)


def test_bad_shapes():
    with pytest.raises(ValueError, match="multiple of target rows"):
        MSNLoss()(torch.randn(5, 4), torch.randn(2, 4), torch.randn(3, 4))


def test_effective_rank_and_target_entropy():
    """RankMe: exp of the entropy of the normalised singular values (1 for embeddings on one
    line, D for D orthogonal directions of equal weight); the mean target's entropy is log K
    when every prototype is used alike."""
    from msn_ds.loss import effective_rank

    g = torch.Generator().manual_seed(0)
    line = torch.randn(64, 1, generator=g) * torch.randn(1, 16, generator=g)
    assert effective_rank(line).item() == pytest.approx(1.0, abs=1e-3)
    q, _ = torch.linalg.qr(torch.randn(64, 16, generator=g, dtype=torch.float64))
    assert effective_rank(q).item() == pytest.approx(16.0, rel=1e-5)
    s = torch.tensor([3.0, 1.0])  # by hand: p = (3/4, 1/4)
    h = torch.diag(s)
    want = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(h).item() == pytest.approx(want, rel=1e-5)
    crit = MSNLoss(temperature=0.1)
    protos = torch.eye(8)
    _, stats = crit(protos.repeat(2, 1), protos, protos, 0.25)  # each image its own prototype
    assert stats["target_ent"].item() == pytest.approx(math.log(8), rel=1e-4)
