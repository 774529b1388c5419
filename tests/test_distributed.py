"""Real 2-process runs (torchrun, gloo, CPU): the loss, its gradients and the heads'
BatchNorm equal a 1-process computation on the concatenated batch within 1e-6."""
import os

import pytest
import torch

from msn_ds.loss import MSNLoss
from msn_ds.models.norm import BatchNorm1d
from helpers import run_cli

WORLD = 2


@pytest.mark.slow
@pytest.mark.parametrize("sinkhorn,eps", [(True, 0.0), (False, 0.1)])
def test_two_process_loss_equals_one_process(tmp_path, sinkhorn, eps):
    g = torch.Generator().manual_seed(7)
    M, B, d, K, C = 3, 8, 12, 20, 6
    inputs = {"M": M, "B": B, "eps": eps, "sinkhorn": sinkhorn,
              "anchor": torch.randn(M * B, d, generator=g, dtype=torch.float64),
              "target": torch.randn(B, d, generator=g, dtype=torch.float64),
              "protos": torch.randn(K, d, generator=g, dtype=torch.float64),
              "bn_x": torch.randn(B, C, generator=g, dtype=torch.float64) * 3 + 1,
              "bn_w": torch.rand(C, generator=g, dtype=torch.float64) + 0.5,
              "bn_b": torch.randn(C, generator=g, dtype=torch.float64),
              "bn_probe": torch.randn(B, C, generator=g, dtype=torch.float64)}
    path = tmp_path / "inputs.pt"
    torch.save(inputs, path)
    run_cli("tests/dist_worker.py", path, tmp_path, nproc=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # one process, the whole batch
    anchor = inputs["anchor"].clone().requires_grad_()
    protos = inputs["protos"].clone().requires_grad_()
    loss, stats = MSNLoss(entropy_weight=0.2, label_smoothing=eps, use_sinkhorn=sinkhorn)(
        anchor, inputs["target"], protos, 0.25)
    loss.backward()

    tol = dict(atol=1e-6, rtol=1e-6)
    mean_loss = sum(r["loss"] for r in ranks) / WORLD
    torch.testing.assert_close(mean_loss, loss.detach(), **tol)
    for key in ("me_max", "np", "proto_hits"):  # global statistics
        for r in ranks:
            torch.testing.assert_close(r["stats"][key], stats[key], **tol)
    # anchor rows: rank r holds images r*b..(r+1)*b of every view; the engine averages the
    # W per-process gradients, so each local gradient is W times the global one.
    b = B // WORLD
    grad = anchor.grad.view(M, B, -1)
    for r, res in enumerate(ranks):
        local = res["anchor_grad"].view(M, b, -1) / WORLD
        torch.testing.assert_close(local, grad[:, r * b:(r + 1) * b], **tol)
        torch.testing.assert_close(res["proto_grad"], protos.grad, **tol)

    # BatchNorm on global statistics
    bn = BatchNorm1d(inputs["bn_x"].shape[1]).double()
    with torch.no_grad():
        bn.weight.copy_(inputs["bn_w"])
        bn.bias.copy_(inputs["bn_b"])
    x = inputs["bn_x"].clone().requires_grad_()
    y = bn(x)
    (y * inputs["bn_probe"]).sum().backward()
    torch.testing.assert_close(torch.cat([r["bn_y"] for r in ranks]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([r["bn_xgrad"] for r in ranks]), x.grad, **tol)
    torch.testing.assert_close(ranks[0]["bn_wgrad"], bn.weight.grad, **tol)
    torch.testing.assert_close(ranks[1]["bn_running_mean"], bn.running_mean, **tol)
    # ...and nn.BatchNorm1d agrees with ours in one process
    ref = torch.nn.BatchNorm1d(inputs["bn_x"].shape[1]).double()
    ref.load_state_dict(bn.state_dict())
    with torch.no_grad():
        ref.running_mean.zero_(), ref.running_var.fill_(1)
    torch.testing.assert_close(ref(inputs["bn_x"]), y.detach(), **tol)


def test_rank_discovery_from_slurm(monkeypatch):
    from msn_ds import distributed as D

    monkeypatch.setattr(os, "environ", dict(os.environ))  # setup_env writes: keep it local
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[003-004,010],cpu1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    D.setup_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "16", "1")
    # the port every task of this job derives alike (not a fixed 29500 that a second job on
    # the node would find taken); tests/test_rendezvous.py checks more
    assert os.environ["MASTER_ADDR"] == "gpu003"
    assert os.environ["MASTER_PORT"] == str(D.slurm_port(4242))


def test_one_process_defaults_to_a_free_port(monkeypatch):
    from msn_ds import distributed as D

    monkeypatch.setattr(os, "environ", dict(os.environ))  # setup_env writes: keep it local
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    D.setup_env()
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["RANK"] == "0"
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
