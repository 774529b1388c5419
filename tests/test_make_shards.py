"""scripts/make_shards.py writes a folder as tar shards holding the folder's samples in its
order (bytes verbatim, labels as .cls), atomically, refusing bad input with exit 2 and the
value named; scripts/check_dataset.py checks shards and names a bad sample shard.tar:key."""
import math
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from helpers import load_script
from msn_ds.data.probe import decode_rgb
from msn_ds.data.shards import INDEX_SUFFIX, ShardSource, expand_shards, write_shards
from msn_ds.data.source import FolderSource

make_shards = load_script("scripts/make_shards.py")
check_dataset = load_script("scripts/check_dataset.py")


def image(path, seed, fmt=None, size=16):
    g = np.random.default_rng(seed)
    Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        path, fmt, **({"quality": 90} if str(path).lower().endswith((".jpg", ".jpeg")) else {}))


def labelled_folder(root):
    """10 tiny images in 3 classes (one nested deeper): jpg, JPEG, png, webp and a bmp."""
    names = {"a": ["x0.jpg", "x1.png", "x2.JPEG"], "b": ["y0.webp", "y1.bmp", "sub/y2.png"],
             "c": ["z0.jpg", "z1.png", "z2.jpg", "z3.png"]}
    seed = 0
    for cls, files in names.items():
        for name in files:
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            image(path, seed)
            seed += 1
    return str(root)


def run(capsys, *argv):
    rc = make_shards.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def pattern_of(out):
    line = out.strip().splitlines()[-1]
    assert line.startswith('data.shards="') and line.endswith('"'), out
    return line[len('data.shards="'):-1]


@pytest.mark.parametrize("size", [3, 4, 100])
def test_round_trip_same_samples_in_the_folders_order(tmp_path, capsys, size):
    folder = labelled_folder(tmp_path / "train")
    out_dir = tmp_path / "shards"
    rc, out, err = run(capsys, folder, "--out", out_dir, "--shard-size", size)
    assert rc == 0, err
    pattern = pattern_of(out)
    src, back = FolderSource(folder), ShardSource(pattern)
    n = len(src)
    assert n == 10 and len(back) == n
    shards = expand_shards(pattern)
    assert len(shards) == math.ceil(n / size)
    assert pattern == os.path.join(str(out_dir),
                                   f"train-{{000000..{len(shards) - 1:06d}}}.tar")
    assert [back.label(i) for i in range(n)] == [src.label(i) for i in range(n)] == \
        [0] * 3 + [1] * 3 + [2] * 4
    for i in range(n):
        key = back.key(i).rsplit(":", 1)[1]
        assert key == f"{i:09d}"
        if src.key(i).endswith(".bmp"):  # not a WebDataset type: stored as PNG, same pixels
            assert back.read(i)[:8] == b"\x89PNG\r\n\x1a\n"
            assert back.open(i).tobytes() == src.open(i).tobytes()
        else:
            assert back.read(i) == src.read(i)
    # extensions kept, lower case; one .cls per sample; the index built beside each shard
    with tarfile.open(shards[0]) as tf:
        names = tf.getnames()
    assert names[:6] == ["000000000.jpg", "000000000.cls", "000000001.png", "000000001.cls",
                         "000000002.jpeg", "000000002.cls"]
    assert sorted(os.listdir(out_dir)) == sorted(
        [os.path.basename(s) for s in shards] + [os.path.basename(s) + INDEX_SUFFIX
                                                  for s in shards])
    assert "1 images converted to PNG" in out and "y1.bmp" in out


def test_flat_folder_unlabelled_and_prefix(tmp_path, capsys):
    root = tmp_path / "flat"
    (root / "deeper").mkdir(parents=True)
    for k in range(4):
        image(root / f"im{k}.png", k)
    image(root / "deeper" / "im9.jpg", 9)
    rc, out, err = run(capsys, root, "--out", tmp_path / "s", "--shard-size", 2,
                       "--prefix", "unl")
    assert rc == 0, err
    pattern = pattern_of(out)
    assert pattern.endswith("unl-{000000..000002}.tar") and "unlabelled" in out
    src, back = FolderSource(str(root)), ShardSource(pattern)
    assert [back.read(i) for i in range(5)] == [src.read(i) for i in range(5)]
    assert [back.label(i) for i in range(5)] == [src.label(i) for i in range(5)] == [0] * 5
    for shard in expand_shards(pattern):
        with tarfile.open(shard) as tf:
            assert not [m for m in tf.getnames() if m.endswith(".cls")]


def test_refusals_exit_2_naming_the_value(tmp_path, capsys):
    folder = labelled_folder(tmp_path / "train")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    cases = [
        ([tmp_path / "missing", "--out", tmp_path / "o1", "--shard-size", 4], "missing"),
        ([tmp_path / "empty", "--out", tmp_path / "o2", "--shard-size", 4], "empty"),
        ([folder, "--out", tmp_path / "o3", "--shard-size", 0], "--shard-size must be at "
                                                                "least 1, got 0"),
        ([folder, "--out", full, "--shard-size", 4], str(full)),
        ([folder, "--out", tmp_path / "a_file" / "sub", "--shard-size", 4], "a_file"),
        ([folder, "--out", tmp_path / "a_file", "--shard-size", 4], "a_file"),
    ]
    for argv, named in cases:
        rc, out, err = run(capsys, *argv)
        assert rc == 2, (argv, out, err)
        assert err.startswith("error: ") and named in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()
    assert os.listdir(full) == ["notes.txt"]


def test_overwrite_replaces_earlier_shards_only(tmp_path, capsys):
    folder = labelled_folder(tmp_path / "train")
    out_dir = tmp_path / "s"
    assert run(capsys, folder, "--out", out_dir, "--shard-size", 2)[0] == 0  # 5 shards
    (out_dir / "README").write_text("mine")
    rc, out, err = run(capsys, folder, "--out", out_dir, "--shard-size", 4)
    assert rc == 2 and "--overwrite" in err
    rc, out, err = run(capsys, folder, "--out", out_dir, "--shard-size", 4, "--overwrite")
    assert rc == 0, err
    assert sorted(os.listdir(out_dir)) == ["README"] + sorted(
        f"train-{s:06d}.tar{x}" for s in range(3) for x in ("", INDEX_SUFFIX))
    assert len(ShardSource(pattern_of(out))) == 10


def test_a_killed_run_leaves_whole_shards_only(tmp_path, monkeypatch):
    """Interrupted inside the third shard: the first two are complete under their names,
    nothing of the third (no final name, no temporary)."""
    folder = labelled_folder(tmp_path / "train")
    src = FolderSource(folder)
    real_read = src.read

    def read(i):
        if i == 7:
            raise KeyboardInterrupt
        return real_read(i)
    monkeypatch.setattr(src, "read", read)
    out_dir = tmp_path / "s"
    out_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        write_shards(src, str(out_dir), 3)
    assert sorted(os.listdir(out_dir)) == ["train-000000.tar", "train-000001.tar"]
    assert len(ShardSource(str(out_dir / "train-{000000..000001}.tar"))) == 6


def test_unreadable_files_keep_their_place(tmp_path, capsys):
    """A truncated JPEG is copied as it is, so the shards' samples stay the folder's and it
    is unreadable in both; check_dataset names it shard.tar:key, exit 1."""
    folder = labelled_folder(tmp_path / "train")
    bad = tmp_path / "train" / "c" / "z0.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    rc, out, err = run(capsys, folder, "--out", tmp_path / "s", "--shard-size", 4)
    assert rc == 0, err
    pattern = pattern_of(out)
    src, back = FolderSource(folder), ShardSource(pattern)
    i = [src.key(j) for j in range(len(src))].index(str(bad))
    assert i == 6 and back.read(i) == bad.read_bytes()
    with pytest.raises(Exception):
        decode_rgb(back.read(i))

    for argv in (["--shards", pattern], [pattern]):  # option, or auto-detected
        rc = check_dataset.main([*argv, "--workers", "1"])
        out, err = capsys.readouterr()
        assert rc == 1, err
        lines = [line.split("\t") for line in out.splitlines() if "\t" in line]
        assert [k for k, _ in lines] == [str(tmp_path / "s" / "train-000001.tar") +
                                         ":000000006"], out
        assert f"1 unreadable of 10 images in {pattern}" in out
    # the folder itself: the same finding, by path
    assert check_dataset.main([folder, "--workers", "1"]) == 1
    assert f"{bad}\t" in capsys.readouterr().out


def test_check_dataset_shards_refusals_and_clean(tmp_path, capsys):
    folder = labelled_folder(tmp_path / "train")
    assert run(capsys, folder, "--out", tmp_path / "s", "--shard-size", 4)[0] == 0
    pattern = str(tmp_path / "s" / "train-{000000..000002}.tar")
    assert check_dataset.main(["--shards", pattern, "--workers", "1", "--fast"]) == 0
    assert "0 unreadable of 10 images" in capsys.readouterr().out
    missing = str(tmp_path / "s" / "train-{000000..000009}.tar")
    assert check_dataset.main(["--shards", missing, "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "7 of 10 shards not found" in err
    # a shard cut inside a member: refused as training refuses it
    cut = tmp_path / "cut.tar"
    data = (tmp_path / "s" / "train-000000.tar").read_bytes()
    cut.write_bytes(data[:600])  # inside the first image
    assert check_dataset.main([str(cut), "--workers", "1"]) == 2
    assert "cut.tar" in capsys.readouterr().err
    assert check_dataset.main([folder, "--shards", pattern]) == 2
    assert "not both" in capsys.readouterr().err


def test_check_dataset_flat_folder(tmp_path, capsys):
    root = tmp_path / "flat"
    root.mkdir()
    for k in range(3):
        image(root / f"im{k}.png", k)
    (root / "broken.png").write_bytes(b"not a png")
    assert check_dataset.main([str(root), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"{root / 'broken.png'}\t" in out and "1 unreadable of 4 images" in out
    (tmp_path / "nothing").mkdir()
    assert check_dataset.main([str(tmp_path / "nothing"), "--workers", "1"]) == 2
    assert "nothing" in capsys.readouterr().err


def test_bench_shards_written_by_make_shards(tmp_path):
    """bench_data's --shards writes the folder with make_shards' writer (a temporary
    folder): the same samples."""
    bench_data = load_script("scripts/bench_data.py")
    folder = labelled_folder(tmp_path / "train")
    tmp, pattern = bench_data.write_bench_shards(folder, 4)
    try:
        src, back = FolderSource(folder), ShardSource(pattern)
        assert len(expand_shards(pattern)) == 3
        assert [back.label(i) for i in range(10)] == [src.label(i) for i in range(10)]
    finally:
        import shutil
        shutil.rmtree(tmp)
