"""``scripts/make_demo_data.py --long-tail ALPHA``: digit c keeps round(n (c+1)^-ALPHA) of
its training images, deterministically, from the balanced split's training images; val/ is
the balanced split's. In process."""
import json

import numpy as np
import pytest

from helpers import load_script

demo = load_script("scripts/make_demo_data.py")


def files(folder):
    return {(p.parent.name, p.name) for p in folder.glob("*/*.png")}


def test_long_tail_rows_counts_and_determinism():
    labels = np.repeat(np.arange(10), 50)
    rows = np.arange(0, 500, 2)  # 25 training rows per digit
    kept = demo.long_tail_rows(rows, labels, 1.0, seed=0)
    per = np.bincount(labels[kept], minlength=10)
    assert per.tolist() == [max(1, round(25 / (c + 1))) for c in range(10)]
    assert set(kept) <= set(rows)
    assert np.array_equal(kept, demo.long_tail_rows(rows, labels, 1.0, seed=0))
    assert not np.array_equal(kept, demo.long_tail_rows(rows, labels, 1.0, seed=1))
    tail = demo.long_tail_rows(rows, labels, 20.0, seed=0)  # a steep tail keeps one each
    assert np.bincount(labels[tail], minlength=10).tolist() == [25] + [1] * 9


def test_make_demo_data_long_tail(tmp_path, capsys):
    out = tmp_path / "mnist_lt"
    assert demo.main(["--out", str(out), "--long-tail", "1"]) == 0
    want = [round(400 / (c + 1)) for c in range(10)]  # 400 training images per digit
    assert [len(list((out / "train" / str(c)).glob("*.png"))) for c in range(10)] == want
    assert [len(list((out / "val" / str(c)).glob("*.png"))) for c in range(10)] == [100] * 10
    marker = json.loads((out / demo.MARKER).read_text())
    assert marker["long_tail"] == 1.0 and list(marker["train_per_class"].values()) == want
    assert f"{sum(want)} train / 1000 val" in capsys.readouterr().out
    # the balanced split's val, and training images from its training split
    images, labels = demo.load_mnist()
    split = demo.split_rows(labels, 0.2, 0)
    assert files(out / "val") == {(str(labels[r]), f"{r:05d}.png") for r in split["val"]}
    assert files(out / "train") <= {(str(labels[r]), f"{r:05d}.png") for r in split["train"]}
    # a rerun with the same options does nothing; other options, or none, stop
    assert demo.main(["--out", str(out), "--long-tail", "1.0"]) == 0
    assert "already complete" in capsys.readouterr().out
    for other in (["--long-tail", "0.5"], []):
        with pytest.raises(SystemExit, match="another split"):
            demo.main(["--out", str(out), *other])


@pytest.mark.parametrize("bad", ["-1", "nan", "101"])
def test_bad_alpha_exits_2(tmp_path, bad):
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(tmp_path / "x"), "--long-tail", bad])
    assert e.value.code == 2 and not (tmp_path / "x").exists()
