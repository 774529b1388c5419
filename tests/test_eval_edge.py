"""Evaluation edge cases: non-UTF-8 file names, bad arguments refused before any work, and a
feature cache entry that does not fit its image list. Real files and CLI processes."""
import glob
import json
import os

import numpy as np
import pytest

from helpers import run_cli, write_folder

pytestmark = pytest.mark.slow  # launches processes

NAME = b"img\xe9.png"  # Latin-1 "imgé.png": not valid UTF-8


def tiny_root(tmp_path, odd_name=False):
    root = tmp_path / "tiny"
    write_folder(root / "train", {"a": 3, "b": 3}, seed=0)
    write_folder(root / "val", {"a": 2, "b": 2}, seed=1)
    if odd_name:  # one training image renamed to a name that is not UTF-8
        os.rename(os.fsencode(root / "train" / "a" / "img001.png"),
                  os.fsencode(root / "train" / "a") + b"/" + NAME)
    return root


def test_make_subsets_writes_non_utf8_names_as_their_bytes(tmp_path):
    root = tiny_root(tmp_path, odd_name=True)
    subs = tmp_path / "subsets"
    proc = run_cli("scripts/make_subsets.py", root / "train", "--per-class", 1, 3, "--splits",
                   1, "--out", subs, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    every = (subs / "3imgs_class_split0.txt").read_bytes()  # all images: the odd one too
    assert b"a/" + NAME + b"\n" in every and len(every.splitlines()) == 6
    assert "wrote" in proc.stdout and "(6 images)" in proc.stdout


def test_logistic_reads_non_utf8_names(tmp_path):
    root = tiny_root(tmp_path, odd_name=True)
    one, every = tmp_path / "1imgs_class_split0.txt", tmp_path / "3imgs_class_split0.txt"
    one.write_bytes(b"a/" + NAME + b"\nb/img000.png\n")
    every.write_bytes(b"".join(b"%s/%s\n" % (c, n) for c in (b"a", b"b")
                               for n in (b"img000.png", NAME if c == b"a" else b"img001.png",
                                         b"img002.png")))
    out = tmp_path / "fewshot.json"
    proc = run_cli("-m", "eval.logistic", "--pixels", "--root", root, "--subsets", one, every,
                   "--json", out, "--cache-dir", tmp_path / "cache", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [s["num_train"] for s in res["splits"]] == [2, 6]
    assert res["num_train_extracted"] == 6 and res["num_test"] == 4


def test_bad_lambd_refused_before_any_feature(tmp_path):
    root = tiny_root(tmp_path)
    subset = tmp_path / "1imgs_class_split0.txt"
    subset.write_text("a/img000.png\nb/img000.png\n")
    cache, out = tmp_path / "cache", tmp_path / "r.json"
    for bad in ("-1", "0", "nan"):
        proc = run_cli("-m", "eval.logistic", "--pixels", "--root", root, "--subsets", subset,
                       "--lambd", "0.0025", bad, "--json", out, "--cache-dir", cache,
                       check=False)
        assert not glob.glob(str(cache / "*.npz")), "features were extracted first"
        assert proc.stdout == "" and not out.exists()  # no result computed, then lost
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "--lambd must be a finite value > 0" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def cache_entries(cache, split):
    """``{npz path: info}`` of the cache entries for ROOT/<split>."""
    out = {}
    for meta in glob.glob(str(cache / "*.json")):
        with open(meta) as f:
            info = json.load(f)
        if os.path.basename(info["root"]) == split:
            out[meta[:-5] + ".npz"] = info
    return out


def test_cache_entry_that_does_not_fit_the_image_list_is_recomputed(tmp_path):
    root = tiny_root(tmp_path)
    subset = tmp_path / "3imgs_class_split0.txt"
    subset.write_text("".join(f"{c}/img{i:03d}.png\n" for c in "ab" for i in range(3)))
    cache = tmp_path / "cache"
    args = ["-m", "eval.logistic", "--random-init", "vit_pico_4", "--crop", 16, "--resize", 16,
            "--root", root, "--subsets", subset, "--cache-dir", cache]
    run_cli(*args, "--json", tmp_path / "clean.json")
    clean = json.loads((tmp_path / "clean.json").read_text())
    (val,) = cache_entries(cache, "val")
    (train,) = cache_entries(cache, "train")
    with np.load(val) as z:  # a valid entry with a row missing
        np.savez(val[:-4], x=z["x"][:-1], y=z["y"][:-1])
    with np.load(train) as z:  # a valid entry whose labels are not the image list's
        np.savez(train[:-4], x=z["x"], y=z["y"][::-1].copy())
    proc = run_cli(*args, "--json", tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert proc.stderr.count("ignoring feature cache entry") == 2, proc.stderr[-3000:]
    assert "3 rows for 4 images" in proc.stderr and "labels differ" in proc.stderr
    assert again["num_test"] == clean["num_test"] == 4
    assert abs(again["splits"][0]["top1"] - clean["splits"][0]["top1"]) <= 1e-9
    with np.load(val) as z:  # rewritten with the right rows
        assert z["x"].shape[0] == 4


def test_linear_refuses_zero_batch_and_zero_epochs(tmp_path):
    root = tiny_root(tmp_path)
    for flag, msg in (("--batch-size", "--batch-size must be >= 1, got 0"),
                      ("--epochs", "--epochs must be >= 1, got 0")):
        proc = run_cli("-m", "eval.linear", "--pixels", "--root", root, flag, 0, check=False)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert msg in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("protocol,extra,message", [
    ("eval.knn", ["--temperature", "nan"], "--temperature nan"),
    ("eval.knn", ["--crop", "0"], "--crop 0"),
    ("eval.linear", ["--base-lr", "nan"], "--base-lr nan"),
    ("eval.knn", ["--json", "/proc/nope/r.json"], "--json"),
    ("eval.linear", ["--cache-dir", "/proc/nope"], "--cache-dir"),
])
def test_bad_eval_arguments_exit_2_before_any_work(tmp_path, protocol, extra, message):
    root = tiny_root(tmp_path)
    r = run_cli("-m", protocol, "--pixels", "--root", root, *extra, expect=2)
    assert message in r.stderr and "Traceback" not in r.stderr


def test_corrupt_linear_checkpoint_is_named_on_resume(tmp_path):
    root, out = tiny_root(tmp_path), tmp_path / "lin"
    out.mkdir()
    (out / "linear_last.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    r = run_cli("-m", "eval.linear", "--pixels", "--root", root, "--out", out, "--resume",
                "--epochs", 1, "--batch-size", 4, expect=2)
    assert "linear_last.pt: cannot resume" in r.stderr and "Traceback" not in r.stderr
