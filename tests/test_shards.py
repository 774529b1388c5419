"""WebDataset tar shards (data.shards): the same batches as the folder they were written from,
an offset index cached and rebuilt when its shard changes, corrupt images skipped and
counted by shard and key, bad shards and patterns refused before any work."""
import io
import json
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT, load_script, write_shards
from msn_ds.config import ConfigError, defaults, load_config
from msn_ds.data import shards as S
from msn_ds.data.loader import build_pretrain_data
from msn_ds.data.source import FolderSource

DEMO = os.path.join(ROOT, "configs", "demo_cpu.yaml")


def write_folder(root):
    """11 images in 3 classes, PNG and JPEG of several sizes, one truncated JPEG."""
    rng = np.random.default_rng(0)
    for i in range(11):
        d = root / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((rng.random((20 + i, 24, 3)) * 255).astype(np.uint8))
        img.save(d / f"img{i:02d}.{'jpg' if i % 2 else 'png'}", quality=90)
    bad = root / "c1" / "img07.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    return str(root)


def tar_member(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def loader_data(**kw):
    return {**defaults()["data"], "rand_size": 16, "focal_size": 8, "focal_views": 1,
            "num_workers": 0, **kw}


def epochs(data, n=2):
    """``n`` epochs of a PretrainData (or of a loader with ``set_epoch``)."""
    out = []
    for e in range(n):
        data.set_epoch(e)
        out += [([v.clone() for v in views], labels, skipped) for views, labels, skipped in data]
    return out


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for (v1, l1, s1), (v2, l2, s2) in zip(a, b, strict=True):
        assert torch.equal(l1, l2) and s1 == s2
        assert all(torch.equal(x, y) for x, y in zip(v1, v2, strict=True))


@pytest.fixture
def data(tmp_path):
    folder = write_folder(tmp_path / "train")
    pattern = write_shards(folder, tmp_path / "shards", shard_size=4)
    return folder, pattern


def test_shards_give_the_folders_batches(data):
    """Shards written in the folder's order: bit-identical views, labels and skip counts
    through the torch loader; the truncated JPEG is skipped, counted and named by shard
    and key."""
    folder, pattern = data
    assert pattern.endswith("train-{000000..000002}.tar")
    f = build_pretrain_data(loader_data(), folder, 4, 0, loader="torch")
    s = build_pretrain_data(loader_data(shards=pattern), "unused", 4, 0, loader="torch")
    assert len(s) == len(f) == 11 and s.name == pattern and f.name == folder
    assert [y for _, y in s.dataset.samples] == [y for _, y in f.dataset.samples]
    a, b = epochs(f), epochs(s)
    assert_same(a, b)
    assert sum(skipped for _, _, skipped in b) > 0
    assert s.count_unreadable() == f.count_unreadable() == 1
    assert s.unreadable() == [os.path.join(os.path.dirname(pattern), "train-000001.tar:000000006")]
    # a list of shards is the same as the pattern naming them
    listed = S.expand_shards(pattern)
    assert_same(a, epochs(build_pretrain_data(loader_data(shards=listed), "unused", 4, 0,
                                              loader="torch")))


def test_plain_tar_with_webdataset_naming(tmp_path):
    """Keys with folders and dots after the first, .cls optional (label 0), other members
    ignored, .jpeg/.png/.webp accepted; read by offset."""
    imgs = {}
    for k, fmt in (("a/x1", "PNG"), ("a/x2", "JPEG"), ("b/y.1", "WEBP")):
        buf = io.BytesIO()
        Image.new("RGB", (9, 7), (10, 200, 30)).save(buf, fmt)
        imgs[k] = buf.getvalue()
    path = tmp_path / "s-0.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        tar_member(tf, "a/x1.cls", b" 3\n")
        tar_member(tf, "a/x1.png", imgs["a/x1"])
        tar_member(tf, "a/x1.json", b"{}")
        tar_member(tf, "a/x2.jpeg", imgs["a/x2"])
        tar_member(tf, "b/y.1.webp", imgs["b/y.1"])  # key "b/y", extension "1.webp": no image
        tar_member(tf, "b/z.webp", imgs["b/y.1"])
    with pytest.raises(S.ShardError, match=r"sample 'b/y' has no image"):
        S.ShardSource(str(path))
    with tarfile.open(path, "w") as tf:
        tar_member(tf, "a/x1.cls", b" 3\n")
        tar_member(tf, "a/x1.png", imgs["a/x1"])
        tar_member(tf, "a/x2.JPEG", imgs["a/x2"])
        tar_member(tf, "b/z.webp", imgs["b/y.1"])
    src = S.ShardSource(str(path))
    assert [src.key(i).split(":")[-1] for i in range(3)] == ["a/x1", "a/x2", "b/z"]
    assert [src.label(i) for i in range(3)] == [3, 0, 0]
    assert src.read(0) == imgs["a/x1"] and src.open(2).size == (9, 7)


def test_index_cached_reused_and_rebuilt(data, tmp_path, monkeypatch):
    _, pattern = data
    shard = S.expand_shards(pattern)[0]
    scans = []
    real_scan = S.scan_shard
    monkeypatch.setattr(S, "scan_shard", lambda p: scans.append(p) or real_scan(p))
    S.ShardSource(shard)  # indexed on first use, not when written
    assert scans == [shard] and os.path.isfile(shard + S.INDEX_SUFFIX)
    S.ShardSource(shard)
    assert scans == [shard]  # reused
    with tarfile.open(shard, "a") as tf:  # the shard changed: one more sample
        buf = io.BytesIO()
        Image.new("RGB", (5, 5)).save(buf, "PNG")
        tar_member(tf, "extra.png", buf.getvalue())
    assert len(S.ShardSource(shard)) == 5 and scans == [shard, shard]
    # a folder where the index cannot be written: the fallback folder
    os.unlink(shard + S.INDEX_SUFFIX)
    os.mkdir(shard + S.INDEX_SUFFIX)  # stands for a read-only folder (tests may run as root)
    monkeypatch.setenv("MSN_DS_SHARD_INDEX", str(tmp_path / "fallback"))
    assert len(S.ShardSource(shard)) == 5 and len(scans) == 3
    assert len(os.listdir(tmp_path / "fallback")) == 1
    assert len(S.ShardSource(shard)) == 5 and len(scans) == 3  # found there next time
    with open(S.index_paths(shard)[1]) as f:
        assert json.load(f)["size"] == os.path.getsize(shard)


def test_brace_patterns():
    assert S.expand_braces("t-{08..11}.tar") == ["t-08.tar", "t-09.tar", "t-10.tar", "t-11.tar"]
    assert S.expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert S.expand_shards(["x.tar", "y-{1..2}.tar"]) == ["x.tar", "y-1.tar", "y-2.tar"]
    for bad, message in (("t-{0..3.tar", "unbalanced"), ("t-{5..3}.tar", "runs backwards"),
                         ("t-{abc}.tar", "neither a range"), (["a.tar", "a.tar"], "twice"),
                         ([], "no shard given")):
        with pytest.raises(S.ShardError, match=message):
            S.expand_shards(bad)


def broken_shards(tmp_path, good: bytes) -> dict:
    """Files that must be refused, with a word of the message that names why."""
    out = {}
    gz = tmp_path / "gz.tar"
    with tarfile.open(gz, "w:gz") as tf:
        tar_member(tf, "a.png", good)
    out[gz] = "not an uncompressed tar"
    cut = tmp_path / "cut.tar"
    with tarfile.open(cut, "w") as tf:
        tar_member(tf, "a.png", good)
        tar_member(tf, "b.png", good * 4)
    cut.write_bytes(cut.read_bytes()[:1536 + 10])  # inside b.png's data
    out[cut] = "truncated"
    garbage = tmp_path / "garbage.tar"
    with tarfile.open(garbage, "w") as tf:
        tar_member(tf, "a.png", good)
    raw = garbage.read_bytes()
    garbage.write_bytes(raw[:1536] + b"x" * 512 + raw[1536:])
    out[garbage] = "broken header"
    noimg = tmp_path / "noimg.tar"
    with tarfile.open(noimg, "w") as tf:
        tar_member(tf, "a.png", good)
        tar_member(tf, "b.cls", b"1")
    out[noimg] = "'b' has no image"
    cls = tmp_path / "cls.tar"
    with tarfile.open(cls, "w") as tf:
        tar_member(tf, "a.cls", b"dog")
        tar_member(tf, "a.png", good)
    out[cls] = "not an integer"
    text = tmp_path / "text.tar"
    text.write_text("hello")
    out[text] = "not an uncompressed tar"
    return out


def test_bad_shards_refused(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    for path, why in broken_shards(tmp_path, buf.getvalue()).items():
        with pytest.raises(S.ShardError, match=why) as e:
            S.ShardSource(str(path))
        assert str(path) in str(e.value)


@pytest.mark.parametrize("value,message", [
    ("{dir}/train-{{0..2}}.tar", "matches no file"),
    ("{dir}/train-{{000000..000003}}.tar", "1 of 4 shards not found, e.g. {dir}/train-000003.tar"),
    ("{dir}/train-{{0..2.tar", "unbalanced braces"),
])
def test_config_refuses_bad_shards_naming_the_value(data, value, message):
    folder, pattern = data
    d = os.path.dirname(pattern)
    value = value.format(dir=d)
    with pytest.raises(ConfigError, match="data.shards") as e:
        load_config(DEMO, [f"data.shards={value}"])
    assert message.format(dir=d) in str(e.value) and repr(value) in str(e.value)
    assert load_config(DEMO, [f"data.shards={pattern}", "data.root_path=/nowhere"])


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_train_py_exits_2_naming_the_shards(env, tmp_path, capsys):
    """train.py: a missing shard (config check) and an unreadable tar (found by indexing,
    before the process group) end with exit 2 and the reason, nothing written."""
    train = load_script("train.py")
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    run = tmp_path / "run"
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar" * 100)
    for value, message in ((str(tmp_path / "t-{0..1}.tar"), "matches no file"),
                           (str(bad), "not an uncompressed tar")):
        rc = train.main(["--config", DEMO, "--deepspeed_config", str(ds),
                         f"logging.folder={run}", "data.num_workers=0",
                         f"data.shards={value}"])
        err = capsys.readouterr().err
        assert rc == 2 and "data.shards" in err and message in err, err
        assert value in err and "Traceback" not in err
    assert not run.exists()


def test_webdataset_package_shards(tmp_path):
    """Shards written by the webdataset library itself, when it is installed."""
    wds = pytest.importorskip("webdataset")
    buf = io.BytesIO()
    Image.new("RGB", (6, 5), (1, 2, 3)).save(buf, "PNG")
    with wds.TarWriter(str(tmp_path / "w-0.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"s{i:03d}", "png": buf.getvalue(), "cls": i})
    src = S.ShardSource(str(tmp_path / "w-0.tar"))
    assert [src.label(i) for i in range(3)] == [0, 1, 2] and src.read(1) == buf.getvalue()


@pytest.mark.slow
def test_shards_in_loader_processes_and_dali(data):
    """Shards read in torch loader workers (forked) and in DALI's host workers (spawned,
    the source pickled) give the folder's batches, bit for bit per loader."""
    folder, pattern = data
    ref = epochs(build_pretrain_data(loader_data(num_workers=2), folder, 4, 0, loader="torch"))
    got = epochs(build_pretrain_data(loader_data(num_workers=2, shards=pattern), "unused", 4, 0,
                                     loader="torch"))
    assert_same(ref, got)
    pytest.importorskip("nvidia.dali")
    from msn_ds.data.dali import DaliMultiCropLoader
    from msn_ds.data.sampler import GlobalBatchSampler

    def dali(**kw):
        ds = build_pretrain_data(loader_data(**kw), folder, 4, 0, loader="torch").dataset
        it = DaliMultiCropLoader(ds, GlobalBatchSampler(len(ds), 4, seed=0), num_threads=1,
                                 host_workers=1, pipelines=1)
        try:
            return epochs(it), it.bad_files
        finally:
            it.close()

    (a, bad_a), (b, bad_b) = dali(), dali(shards=pattern)
    assert_same(a, b)
    assert [os.path.basename(p) for p in bad_a] == ["img07.jpg"]
    assert bad_b == [os.path.join(os.path.dirname(pattern), "train-000001.tar:000000006")]


def test_show_views_reads_the_shards_as_the_folder(data, tmp_path, capsys):
    """scripts/show_views.py through PretrainData.preview: the same grid from the folder and
    from its shards; a missing shard exits 2 naming it."""
    folder, pattern = data
    show = load_script("scripts/show_views.py")
    common = ["--config", DEMO, "--loader", "torch", "--samples", "3", "data.rand_size=16",
              "data.focal_size=8"]
    root = os.path.dirname(os.path.dirname(folder))
    sub = os.path.relpath(os.path.dirname(folder), root)
    assert show.main(common + [f"data.root_path={root}", f"data.image_folder={sub}",
                               "--out", str(tmp_path / "f.png")]) == 0
    assert show.main(common + [f"data.shards={pattern}", "--out", str(tmp_path / "s.png")]) == 0
    f, s = (np.asarray(Image.open(tmp_path / n)) for n in ("f.png", "s.png"))
    assert f.shape == s.shape and f.shape[0] > 3 * 16 and np.array_equal(f, s)
    capsys.readouterr()
    missing = pattern.replace("{000000..000002}", "{000000..000009}")
    assert show.main(common + [f"data.shards={missing}", "--out", str(tmp_path / "m.png")]) == 2
    assert "train-000003.tar" in capsys.readouterr().err


@pytest.mark.parametrize("writer", ["webdataset", "gnu tar"])
def test_shards_from_other_writers_give_the_folders_batches(data, tmp_path, writer):
    """Shards written from the folder, in its order, by the ``webdataset`` library's
    ShardWriter or by the ``tar`` command: the folder's batches, bit for bit."""
    folder, _ = data
    src = FolderSource(folder)
    out = tmp_path / "w"
    out.mkdir()
    samples = [(f"{i:06d}", src.key(i).rsplit(".", 1)[-1].lower(), src.read(i), src.label(i))
               for i in range(len(src))]
    if writer == "webdataset":
        wds = pytest.importorskip("webdataset")
        with wds.ShardWriter(str(out / "part-%06d.tar"), maxcount=4, verbose=0) as sink:
            for key, ext, data_, label in samples:
                sink.write({"__key__": key, ext: data_, "cls": label})
    else:
        tar = shutil.which("tar")
        if tar is None:
            pytest.skip("no tar command")
        stage = tmp_path / "stage"
        stage.mkdir()
        for s in range(0, len(samples), 4):
            names = []
            for key, ext, data_, label in samples[s:s + 4]:
                (stage / f"{key}.{ext}").write_bytes(data_)
                (stage / f"{key}.cls").write_text(str(label))
                names += [f"{key}.cls", f"{key}.{ext}"]
            subprocess.run([tar, "-cf", str(out / f"part-{s // 4:06d}.tar"), "-C", str(stage),
                            *names], check=True)
    pattern = str(out / "part-{000000..000002}.tar")
    f = build_pretrain_data(loader_data(), folder, 4, 0, loader="torch")
    s = build_pretrain_data(loader_data(shards=pattern), "unused", 4, 0, loader="torch")
    assert [y for _, y in s.dataset.samples] == [y for _, y in f.dataset.samples]
    assert_same(epochs(f), epochs(s))
    assert s.count_unreadable() == f.count_unreadable() == 1
