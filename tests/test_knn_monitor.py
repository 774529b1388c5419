"""k-NN accuracy during pretraining (``eval.knn_every_steps``): it is eval.knn's classifier
on the target's features, the same with 2 processes as with 1, and it changes nothing in
the training: weights with it equal weights without it, and a resume stays bit-identical."""
import json
import os

import pytest
import torch

from eval.classify import knn_accuracy
from eval.features import extract_features
from eval.knn_monitor import KNNMonitor
from helpers import run_cli, write_folder
from msn_ds.data import eval_folder, eval_transform
from msn_ds.models import MSNEncoder
from test_checkpoint import args, assert_identical, weights


def subset_file(demo_root, path, per_class=10):
    """The first ``per_class`` images of each class of the demo's train folder."""
    train = os.path.join(demo_root, "mnist_demo", "train")
    lines = [f"{c}/{f}" for c in sorted(os.listdir(train))
             for f in sorted(os.listdir(os.path.join(train, c)))[:per_class]]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def encoder():
    torch.manual_seed(0)
    return MSNEncoder("vit_pico_4", img_size=32, hidden_dim=32, output_dim=16).train()


@pytest.mark.slow
def test_monitor_is_eval_knn_on_the_targets_features(demo_root, tmp_path):
    root = os.path.join(demo_root, "mnist_demo")
    subset = subset_file(demo_root, tmp_path / "subset.txt")
    enc = encoder()
    monitor = KNNMonitor(subset, os.path.join(root, "val"), train_root=os.path.join(root, "train"),
                         k=5, crop=32, resize=32, batch_size=64)
    rng = torch.get_rng_state()
    got = monitor(enc, torch.device("cpu"), torch.float32)
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the global generator
    assert enc.training  # mode restored
    t = eval_transform(32, 32)
    train_ds = eval_folder(os.path.join(root, "train"), t, subset)
    val_ds = eval_folder(os.path.join(root, "val"), t)
    tx, ty = extract_features(enc, train_ds)  # eval.knn's default: before the final norm
    vx, vy = extract_features(enc, val_ds)
    want = knn_accuracy(tx, ty, vx, vy, k=5, num_classes=10)
    assert got["knn_top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert got["knn_top5"] == pytest.approx(want["top5"], abs=1e-9)
    assert len(train_ds) == 100 and 10 < got["knn_top1"] < 100


def test_per_class_subset_is_make_subsets_draw(demo_root, tmp_path):
    """``eval.knn_train_per_class``: the balanced subset make_subsets.py would write, drawn
    without the global generator; refused on a subset file and when a class is too small."""
    from eval.subsets import make_subsets

    root = os.path.join(demo_root, "mnist_demo")
    train = os.path.join(root, "train")
    rng = torch.get_rng_state()
    monitor = KNNMonitor(train, os.path.join(root, "val"), train_root=train, crop=32,
                         resize=32, train_per_class=7)
    assert torch.equal(torch.get_rng_state(), rng)
    (lines,) = make_subsets(train, per_class=(7,), splits=1, seed=0).values()
    got = sorted(os.path.relpath(p, train) for p, _ in monitor.train.samples)
    assert got == sorted(lines) and len(got) == 70
    assert monitor.train.targets == [y for _, y in monitor.train.samples]
    assert sorted(set(monitor.train.targets)) == list(range(10))
    subset = subset_file(demo_root, tmp_path / "subset.txt")
    with pytest.raises(ValueError, match="subset file already"):
        KNNMonitor(subset, os.path.join(root, "val"), train_root=train, train_per_class=7)
    with pytest.raises(ValueError, match="cannot draw"):
        KNNMonitor(train, os.path.join(root, "val"), train_root=train, train_per_class=10**6)


@pytest.mark.slow
def test_two_processes_equal_one(demo_root, tmp_path):
    """Each process extracts every second image (97 and 1000 images: padded shares); rank
    0's accuracy equals one process's."""
    root = os.path.join(demo_root, "mnist_demo")
    lines = open(subset_file(demo_root, tmp_path / "s.txt")).read().split()
    subset = tmp_path / "odd.txt"
    subset.write_text("\n".join(lines[:97]) + "\n")
    enc = encoder()
    torch.save(enc.state_dict(), tmp_path / "enc.pt")
    spec = {"train": str(subset), "val": os.path.join(root, "val"),
            "train_root": os.path.join(root, "train"), "state": str(tmp_path / "enc.pt"),
            "out": str(tmp_path / "rank0.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_cli("tests/dist_knn_monitor.py", tmp_path / "spec.json", nproc=2)
    two = json.loads((tmp_path / "rank0.json").read_text())
    one = KNNMonitor(spec["train"], spec["val"], train_root=spec["train_root"], k=5, crop=32,
                     resize=32, batch_size=16)(enc, torch.device("cpu"), torch.float32)
    assert two["knn_top1"] == pytest.approx(one["knn_top1"], abs=1e-9)
    assert two["knn_top5"] == pytest.approx(one["knn_top5"], abs=1e-9)


@pytest.mark.slow
def test_training_with_knn_is_unchanged_and_resumes_exactly(demo_root, tmp_path):
    subset = subset_file(demo_root, tmp_path / "subset.txt")
    knn = ["eval.knn_every_steps=2", f"eval.knn_train={subset}", "eval.knn_train_per_class=null",
           "eval.knn_resize=32", "eval.knn_k=5", "logging.tensorboard=true"]
    plain, with_knn, resumed = (str(tmp_path / n) for n in ("plain", "knn", "resumed"))
    run_cli("train.py", *args(demo_root, plain, 6))
    r = run_cli("train.py", *args(demo_root, with_knn, 6, "zero0_fp32.json", *knn))
    assert_identical(weights(plain), weights(with_knn))
    with open(os.path.join(with_knn, "metrics.jsonl")) as f:
        evals = [row for row in map(json.loads, f) if "knn_top1" in row]
    assert [row["step"] for row in evals] == [2, 4, 6]
    assert all(0 <= row["knn_top1"] <= 100 and row["knn_seconds"] > 0 for row in evals)
    assert "k-NN top-1" in r.stderr and "| knn " in r.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(os.path.join(with_knn, "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("eval/knn_top1")] == [2, 4, 6]
    # the views grid, from the run's PretrainData at its start
    assert "data/views" in tb.Tags()["images"] and "views grid" not in r.stderr
    # stopped at 3 (between two evaluations) and resumed: the same weights as straight through
    run_cli("train.py", *args(demo_root, resumed, 3, "zero0_fp32.json", *knn))
    run_cli("train.py", *args(demo_root, resumed, 6, "zero0_fp32.json", *knn), "--resume")
    assert_identical(weights(with_knn), weights(resumed))


@pytest.mark.slow
def test_bad_knn_folder_fails_before_work(demo_root, tmp_path):
    folder = tmp_path / "run"
    r = run_cli("train.py", *args(demo_root, str(folder), 2), "eval.knn_every_steps=2",
                f"eval.knn_val={tmp_path / 'nope'}", expect=2)
    assert "eval.knn_val" in r.stderr and "nope" in r.stderr and "Traceback" not in r.stderr
    assert not folder.exists()


def _knn_sets(root):
    """Two small ImageFolders with the same 3 classes (random 16-px PNGs)."""
    write_folder(root / "train", {"a": 6, "b": 6, "c": 6}, seed=1)
    write_folder(root / "val", {"a": 4, "b": 4, "c": 4}, seed=2)
    return str(root / "train"), str(root / "val")


@pytest.mark.parametrize("cache_gib", [2.0, 0.0])
def test_unreadable_images_are_left_out_not_fatal(tmp_path, caplog, cache_gib):
    """A truncated image in either k-NN set is skipped, counted and named once in the log;
    the accuracy is the one of the sets without it, at every later evaluation too."""
    train, val = _knn_sets(tmp_path / "bad")
    clean_train, clean_val = _knn_sets(tmp_path / "clean")
    for folder, name in ((train, "a/img002.png"), (val, "c/img001.png")):
        data = open(os.path.join(folder, name), "rb").read()
        open(os.path.join(folder, name), "wb").write(data[:len(data) // 3])  # truncated
        os.remove(os.path.join(folder.replace("bad", "clean"), name))
    enc = encoder()
    kw = dict(k=3, crop=16, resize=16, batch_size=5, cache_gib=cache_gib)
    want = KNNMonitor(clean_train, clean_val, **kw)(enc, torch.device("cpu"), torch.float32)
    monitor = KNNMonitor(train, val, **kw)
    with caplog.at_level("WARNING"):
        first = monitor(enc, torch.device("cpu"), torch.float32)
        second = monitor(enc, torch.device("cpu"), torch.float32)
    for got in (first, second):
        assert got["knn_unreadable"] == 2
        assert got["knn_top1"] == pytest.approx(want["knn_top1"], abs=1e-9)
        assert got["knn_top5"] == pytest.approx(want["knn_top5"], abs=1e-9)
    named = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(named) == 2 and any("a/img002.png" in m for m in named)
    assert any("c/img001.png" in m for m in named)


@pytest.mark.slow
def test_truncated_knn_image_leaves_training_running(demo_root, tmp_path):
    """The run goes on to its end with the image left out of every evaluation (it used to
    die at the first one, and at the same step after every resume)."""
    train, val = _knn_sets(tmp_path / "knn")
    data = open(os.path.join(val, "b", "img000.png"), "rb").read()
    open(os.path.join(val, "b", "img000.png"), "wb").write(data[:40])
    folder = tmp_path / "run"
    r = run_cli("train.py", *args(demo_root, str(folder), 4), "eval.knn_every_steps=2",
                f"eval.knn_train={train}", f"eval.knn_val={val}", "eval.knn_train_per_class=null",
                "eval.knn_crop=16", "eval.knn_resize=16", "eval.knn_k=3")
    with open(folder / "metrics.jsonl") as f:
        evals = [row for row in map(json.loads, f) if "knn_top1" in row]
    assert [(row["step"], row["knn_unreadable"]) for row in evals] == [(2, 1), (4, 1)]
    assert r.stderr.count("skipping unreadable image") == 1 and "img000.png" in r.stderr
    assert (folder / "demo-target.safetensors").is_file()
