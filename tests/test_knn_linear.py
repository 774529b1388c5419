"""k-NN and linear evaluation on frozen features (eval/knn.py, eval/linear.py)."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eval.classify import knn_accuracy, knn_classify
from eval.knn import run_knn
from eval.linear import (CHECKPOINT, epoch_batches, evaluate_linear, run_linear,
                         scaled_lr, train_linear)
from eval.report import sha256_file
from msn_ds.io.weights import encoder_metadata, save_weights
from msn_ds.models import MSNEncoder
from msn_ds.schedules import cosine

from helpers import run_cli, write_folder


def tiny_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    write_folder(root / "train", {"a": 6, "b": 6, "c": 6}, seed=0)
    write_folder(root / "val", {"a": 3, "b": 3, "c": 3}, seed=1)
    return root


# ------------------------------------------------------------------------------ k-NN

TRAIN_X = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
TRAIN_Y = torch.tensor([0, 0, 1, 2])


def test_knn_weighted_vote_by_hand():
    T = 0.07
    # unnormalised inputs: the cosine similarity is what counts
    test_x = torch.tensor([[2.0, 0.0], [-0.6, 0.8], [0.0, -3.0]])
    scores = knn_classify(3 * TRAIN_X, TRAIN_Y, test_x, k=3, temperature=T, num_classes=3)
    e = lambda s: math.exp(s / T)  # noqa: E731
    # query (1, 0): sims 1, 0.8, 0, -1 -> neighbours (class 0, 0, 1)
    # query (-0.6, 0.8): sims -0.6, 0, 0.8, 0.6 -> neighbours (class 1, 2, 0)
    # query (0, -1): sims 0, -0.6, -1, 0; the 3 largest are 0 (c0), 0 (c2), -0.6 (c0)
    expected = torch.tensor([[e(1.0) + e(0.8), e(0.0), 0.0],
                             [e(0.0), e(0.8), e(0.6)],
                             [e(0.0) + e(-0.6), 0.0, e(0.0)]])
    torch.testing.assert_close(scores, expected.float(), rtol=1e-5, atol=1e-6)
    assert scores.argmax(1).tolist() == [0, 1, 0]
    # chunking does not change anything
    torch.testing.assert_close(knn_classify(TRAIN_X, TRAIN_Y, test_x, k=3, temperature=T,
                                            num_classes=3, chunk=1), scores)
    acc = knn_accuracy(TRAIN_X, TRAIN_Y, test_x, torch.tensor([0, 1, 2]), k=3, temperature=T)
    assert acc["top1"] == pytest.approx(200 / 3) and acc["top5"] == 100.0


def test_knn_k_larger_than_train_set_is_clamped():
    q = torch.tensor([[1.0, 0.0]])
    big = knn_classify(TRAIN_X, TRAIN_Y, q, k=100, temperature=0.5, num_classes=4)
    all4 = knn_classify(TRAIN_X, TRAIN_Y, q, k=4, temperature=0.5, num_classes=4)
    torch.testing.assert_close(big, all4)
    sims = torch.tensor([1.0, 0.8, 0.0, -1.0])
    w = (sims / 0.5).exp()
    torch.testing.assert_close(big[0], torch.stack([w[0] + w[1], w[2], w[3], torch.tensor(0.)]))
    with pytest.raises(ValueError):
        knn_classify(TRAIN_X, TRAIN_Y, q, k=0)


def test_knn_top5_at_least_top1():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 16, generator=g)
    ytr, yte = torch.randint(0, 12, (300,), generator=g), torch.randint(0, 12, (100,), generator=g)
    xtr = centres[ytr] + 1.5 * torch.randn(300, 16, generator=g)
    xte = centres[yte] + 1.5 * torch.randn(100, 16, generator=g)
    acc = knn_accuracy(xtr, ytr, xte, yte, k=20, num_classes=12)
    assert 100 / 12 < acc["top1"] <= acc["top5"] <= 100
    assert acc["top5"] > acc["top1"]


@pytest.mark.slow
def test_knn_pixels_on_demo_data(demo_root):
    # measured: 95.4 % top-1, 99.7 % top-5 (k=20, T=0.07, 4000 train / 1000 val)
    res = run_knn(None, os.path.join(demo_root, "mnist_demo"), pixels=True, device="cpu")
    assert res["num_train"] == 4000 and res["num_test"] == 1000 and res["k_used"] == 20
    assert res["top1"] > 90 and res["top5"] >= res["top1"]


@pytest.mark.slow
def test_knn_cli_with_weights_json(tmp_path):
    data = tiny_dataset(tmp_path)
    torch.manual_seed(0)
    enc = MSNEncoder("vit_pico_4", img_size=16, hidden_dim=64, output_dim=32)
    weights = tmp_path / "w.safetensors"
    save_weights(str(weights), enc, torch.randn(5, 32), encoder_metadata(enc, 16, 64, 32, True))
    out = tmp_path / "knn.json"
    proc = run_cli("-m", "eval.knn", "--weights", weights, "--root", data, "--crop", 16,
                   "--resize", 16, "--k", 50, "--json", out)
    assert "top1" in proc.stdout
    res = json.loads(out.read_text())
    assert res["weights_sha256"] == sha256_file(str(weights)) and len(res["weights_sha256"]) == 16
    assert res["k"] == 50 and res["k_used"] == 18 and res["temperature"] == 0.07
    assert res["root"] == str(data) and res["num_test"] == 9 and res["arch"] == "vit_pico_4"
    assert res["representation"] == "before_norm" and 0 <= res["top1"] <= res["top5"] <= 100
    # a subset file restricts the train set
    subset = tmp_path / "sub.txt"
    subset.write_text("a/img000.png\nb/img001.png\nc/img002.png\n")
    res = run_knn(None, str(data), subset=str(subset), pixels=True)
    assert res["num_train"] == 3 and res["k_used"] == 3


# ---------------------------------------------------------------------------- linear

def separable(n=240, dim=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    y = torch.arange(n) % classes
    x = centres[y] + 0.05 * torch.randn(n, dim, generator=g)
    return x, y


@pytest.mark.slow
def test_linear_separable_reaches_100_percent_train():
    x, y = separable()
    model, last = train_linear(x, y, 4, epochs=30, batch_size=32, base_lr=6.4 * 16384 / 32 * 0.5)
    assert last["epoch"] == 30 and last["train_top1"] == 100.0
    assert evaluate_linear(model, x, y)["top1"] == 100.0


def test_lr_scaling_and_cosine_schedule():
    assert scaled_lr(6.4, 16384) == pytest.approx(6.4)
    assert scaled_lr(6.4, 256) == pytest.approx(0.1)
    assert scaled_lr(6.4, 1024) == pytest.approx(0.4)
    assert cosine(0, 100, 0.4, 0.0) == pytest.approx(0.4)
    assert cosine(50, 100, 0.4, 0.0) == pytest.approx(0.2)
    assert cosine(100, 100, 0.4, 0.0) == pytest.approx(0.0, abs=1e-12)
    # the optimiser really uses it: one step of plain SGD from zero weights
    x, y = separable(n=8)
    lrs = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    orig = torch.optim.SGD
    torch.optim.SGD = Spy
    try:
        train_linear(x, y, 4, epochs=2, batch_size=4, base_lr=6.4)
    finally:
        torch.optim.SGD = orig
    lr0 = 6.4 * 4 / 16384
    assert lrs == pytest.approx([cosine(s, 4, lr0, 0.0) for s in range(4)])


def test_epoch_batches_split_global_batch():
    one = epoch_batches(10, 4, seed=3, epoch=1)
    assert [g for _, g in one] == [4, 4, 2]
    r0 = epoch_batches(10, 4, seed=3, epoch=1, rank=0, world_size=2)
    r1 = epoch_batches(10, 4, seed=3, epoch=1, rank=1, world_size=2)
    for (a, g), (b, _), (c, _) in zip(one, r0, r1):
        assert sorted(a.tolist()) == sorted(b.tolist() + c.tolist()) and len(b) == len(c) == g // 2
    assert not torch.equal(one[0][0], epoch_batches(10, 4, seed=3, epoch=2)[0][0])


def test_linear_resume_is_bit_for_bit(tmp_path):
    x, y = separable(n=100, dim=8, classes=3, seed=1)
    x = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    kw = dict(epochs=4, batch_size=16, base_lr=200.0, seed=7)
    straight, s_last = train_linear(x, y, 3, out=str(tmp_path / "a"), **kw)
    _, first = train_linear(x, y, 3, out=str(tmp_path / "b"), stop_after=2, **kw)
    assert first["epoch"] == 2
    ckpt = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)
    assert ckpt["epoch"] == 2 and set(ckpt) >= {"linear", "optimizer", "config"}
    resumed, r_last = train_linear(x, y, 3, out=str(tmp_path / "b"), resume=True, **kw)
    assert r_last == s_last
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert not list((tmp_path / "b").glob("*.tmp"))
    # other settings are refused
    with pytest.raises(ValueError, match="other settings"):
        train_linear(x, y, 3, out=str(tmp_path / "b"), resume=True, **{**kw, "batch_size": 8})


@pytest.mark.slow
def test_linear_pixels_on_demo_data(demo_root):
    # measured: 87.8 % top-1 (10 epochs, batch 256, base lr 64 -> lr 1.0); paper defaults
    # (100 epochs, batch 16384, base lr 6.4) give 91.0 %
    res = run_linear(None, os.path.join(demo_root, "mnist_demo"), pixels=True, epochs=10,
                     batch_size=256, base_lr=64.0, device="cpu")
    assert res["num_train"] == 4000 and res["num_test"] == 1000
    assert res["top1"] > 80 and res["top5"] >= res["top1"]


@pytest.mark.slow
def test_linear_cli_augment_resume(tmp_path):
    data = tiny_dataset(tmp_path)
    out = tmp_path / "lin"
    common = ["-m", "eval.linear", "--random-init", "vit_pico_4", "--root", data, "--crop", 16,
              "--resize", 16, "--epochs", 3, "--batch-size", 8, "--augment", "--out", out]
    run_cli(*common, "--stop-after", 1)
    assert torch.load(out / CHECKPOINT, weights_only=True)["epoch"] == 1
    run_cli(*common, "--resume", "--json", tmp_path / "a.json")
    res = json.loads((tmp_path / "a.json").read_text())
    assert res["epochs_trained"] == 3 and res["augment"] and res["num_train"] == 18
    assert res["lr"] == pytest.approx(6.4 * 8 / 16384) and 0 <= res["top1"] <= res["top5"]
    # the uninterrupted run gives the same result (augmentation seeded per epoch)
    run_cli(*common[:-1], tmp_path / "lin2", "--json", tmp_path / "b.json")
    b = json.loads((tmp_path / "b.json").read_text())
    assert (b["top1"], b["train_loss"]) == (res["top1"], res["train_loss"])


@pytest.mark.slow
def test_linear_torchrun_two_processes_match_one(demo_root, tmp_path):
    data = os.path.join(demo_root, "mnist_demo")
    args = ["--pixels", "--root", data, "--epochs", 3, "--batch-size", 255]  # uneven last batch
    run_cli("-m", "eval.linear", *args, "--out", tmp_path / "one", "--json", tmp_path / "1.json")
    run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
            "-m", "eval.linear", *args, "--out", tmp_path / "two", "--json", tmp_path / "2.json",
            timeout=300)
    one = torch.load(tmp_path / "one" / CHECKPOINT, weights_only=True)
    two = torch.load(tmp_path / "two" / CHECKPOINT, weights_only=True)
    for k in one["linear"]:
        torch.testing.assert_close(two["linear"][k], one["linear"][k], rtol=0, atol=1e-5)
    r1, r2 = (json.loads((tmp_path / f"{i}.json").read_text()) for i in (1, 2))
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    assert abs(r1["train_loss"] - r2["train_loss"]) < 1e-5
    assert abs(r1["top1"] - r2["top1"]) <= 0.1  # at most one of 1000 images may flip
