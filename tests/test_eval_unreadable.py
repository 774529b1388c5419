"""One truncated image in an evaluation set is left out, counted and named, never fatal:
k-NN and few-shot logistic regression give the numbers of the set without it, and a cached
entry with the unreadable rows still fits its image list."""
import os

import numpy as np
import pytest

from eval.features import FeatureCache
from eval.knn import run_knn
from eval.logistic import run_fewshot
from helpers import write_folder


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 3])


def twin_roots(tmp_path, bad):
    """Two copies of a small train/val pair: in ``bad`` the files named in ``bad`` are
    truncated; in ``clean`` they do not exist."""
    roots = {}
    for name in ("bad", "clean"):
        root = tmp_path / name
        write_folder(root / "train", {"a": 5, "b": 5}, size=8, seed=0)
        write_folder(root / "val", {"a": 4, "b": 4}, size=8, seed=1)
        for rel in bad:
            (truncate if name == "bad" else os.remove)(root / rel)
        roots[name] = str(root)
    return roots


def test_knn_leaves_unreadable_images_out(tmp_path, caplog):
    roots = twin_roots(tmp_path, ["train/a/img001.png", "val/b/img002.png"])
    want = run_knn(None, roots["clean"], k=3, device="cpu")
    cache = FeatureCache(str(tmp_path / "cache"))
    with caplog.at_level("WARNING"):
        got = run_knn(None, roots["bad"], k=3, device="cpu", cache=cache)
    again = run_knn(None, roots["bad"], k=3, device="cpu", cache=FeatureCache(cache.folder))
    for res in (got, again):  # the second from the disk cache, the unreadable rows included
        assert res["num_unreadable"] == 2
        assert (res["num_train"], res["num_test"]) == (9, 7)
        assert res["top1"] == pytest.approx(want["top1"]) and res["top5"] == pytest.approx(
            want["top5"])
    log = caplog.text
    assert "img001.png" in log and "img002.png" in log and "Traceback" not in log


def test_logistic_leaves_unreadable_images_out_of_their_subsets(tmp_path):
    roots = twin_roots(tmp_path, ["train/a/img001.png", "val/a/img000.png"])
    subsets = []
    for name in ("bad", "clean"):
        lines = [f"{c}/img{i:03d}.png" for c in "ab" for i in range(3)
                 if name == "bad" or (c, i) != ("a", 1)]
        path = tmp_path / f"{name}_3imgs_class_split0.txt"
        path.write_text("\n".join(lines) + "\n")
        subsets.append(str(path))
    got = run_fewshot(None, roots["bad"], [subsets[0]], device="cpu")
    want = run_fewshot(None, roots["clean"], [subsets[1]], device="cpu")
    assert got["num_unreadable"] == 2 and got["num_test"] == 7
    assert got["splits"][0]["num_train"] == want["splits"][0]["num_train"] == 5
    assert np.isclose(got["splits"][0]["top1"], want["splits"][0]["top1"])


def test_linear_leaves_unreadable_images_out(tmp_path):
    from eval.linear import run_linear

    roots = twin_roots(tmp_path, ["train/b/img003.png", "val/a/img001.png"])
    kw = dict(pixels=True, epochs=3, batch_size=4, base_lr=0.1, device="cpu")
    want = run_linear(None, roots["clean"], **kw)
    got = run_linear(None, roots["bad"], cache=FeatureCache(str(tmp_path / "c")), **kw)
    assert (got["num_train"], got["num_test"]) == (want["num_train"], want["num_test"]) == (9, 7)
    assert got["top1"] == pytest.approx(want["top1"]) and got["train_loss"] == pytest.approx(
        want["train_loss"])


def test_cache_entry_of_another_width_is_recomputed(tmp_path, caplog):
    import torch

    from eval.features import FeatureCache, dataset_features, encoder_fingerprint, load_datasets
    from msn_ds.data import eval_transform
    from msn_ds.models import MSNEncoder

    roots = twin_roots(tmp_path, [])
    torch.manual_seed(0)
    enc = MSNEncoder("vit_pico_4", img_size=16).eval()
    train, _ = load_datasets(roots["bad"], eval_transform(16, 16))
    cache = FeatureCache(str(tmp_path / "cache"))
    x, y = dataset_features(enc, train, cache=cache)
    key = FeatureCache.key(encoder_fingerprint(enc), train)
    np.savez(tmp_path / "cache" / f"{key}.npz", x=x[:, :5], y=y)  # a foreign entry
    with caplog.at_level("WARNING"):
        again, _ = dataset_features(enc, train, cache=FeatureCache(cache.folder))
    assert np.array_equal(again, x) and "5 features per image" in caplog.text
