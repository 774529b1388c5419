"""The projection head runs once per group of equal-size views, as the reference's
``forward`` does, so the masked anchor views and the focal views each get BatchNorm
statistics of their own (docs/method.md section 1). Checked against a float64 re-implementation
of the reference's grouping, with 1 process and with 2 (torchrun, gloo)."""
import pytest
import torch
import torch.nn.functional as F

from helpers import run_cli
from msn_ds.models import MSNEncoder

B, MASK, SEED = 8, 0.5, 3
SIZES = [16, 16, 8, 8, 8]  # 2 random anchor views (masked), 3 focal views


def make_encoder() -> MSNEncoder:
    torch.manual_seed(0)
    enc = MSNEncoder("vit_pico_4", img_size=16, hidden_dim=24, output_dim=12).double()
    with torch.no_grad():  # BatchNorm affine parameters away from (1, 0)
        for bn in (enc.head.bn1, enc.head.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return enc.train()


def make_views() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, 3, s, s, generator=g, dtype=torch.float64) for s in SIZES]


def reference_head(head, h: torch.Tensor) -> torch.Tensor:
    """The reference's ``fc``: Linear -> BatchNorm (batch statistics, biased variance) ->
    GELU -> Linear -> BatchNorm -> GELU -> Linear, in float64."""
    def bn(x, m):
        mean, var = x.mean(0), x.var(0, unbiased=False)
        return (x - mean) / torch.sqrt(var + m.eps) * m.weight + m.bias
    x = F.gelu(bn(F.linear(h, head.fc1.weight, head.fc1.bias), head.bn1))
    x = F.gelu(bn(F.linear(x, head.fc2.weight, head.fc2.bias), head.bn2))
    return F.linear(x, head.fc3.weight, head.fc3.bias)


@torch.no_grad()
def reference_forward(enc: MSNEncoder, views, mask_ratio: float, seed: int) -> torch.Tensor:
    """``src/deit.py`` ``forward``: for each run of equal sizes, features then ``fc``."""
    sizes = torch.tensor([v.shape[-1] for v in views])
    ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
    g, start, out = torch.Generator().manual_seed(seed), 0, []
    for end in ends:
        h = enc.forward_features(torch.cat(views[start:end]),
                                 mask_ratio=mask_ratio if start == 0 else 0.0, generator=g)
        out.append(reference_head(enc.head, h))
        start = end
    return torch.cat(out)


def test_head_per_size_group_equals_reference_one_process():
    enc, views = make_encoder(), make_views()
    want = reference_forward(enc, views, MASK, SEED)
    with torch.no_grad():
        got = enc(views, masked_views=2, mask_ratio=MASK,
                  generator=torch.Generator().manual_seed(SEED))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the test tells the grouping apart: one head pass over all views differs a lot
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED)
        h = torch.cat([enc.forward_features(torch.cat(views[:2]), mask_ratio=MASK, generator=g),
                       enc.forward_features(torch.cat(views[2:]))])
        pooled = reference_head(enc.head, h)
    assert (pooled[:2 * B] - want[:2 * B]).abs().max() > 1e-2  # measured 0.057


@pytest.mark.slow
def test_head_per_size_group_equals_reference_two_processes(tmp_path):
    enc, views = make_encoder(), make_views()
    torch.save({"state": enc.state_dict(), "views": views}, tmp_path / "inputs.pt")
    run_cli("tests/dist_head_groups.py", tmp_path, nproc=2)
    want = reference_forward(enc, views, MASK, SEED).view(len(SIZES), B, -1)
    b = B // 2
    for rank in range(2):  # rank r holds images r*b..(r+1)*b of every view, view-major
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got.view(len(SIZES), b, -1), want[:, rank * b:(rank + 1) * b],
                                   atol=1e-5, rtol=1e-5)
