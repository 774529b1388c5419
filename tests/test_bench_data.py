"""scripts/bench_data.py: the yardstick row (``--loader plain``: stock torchvision, global
RNG) is printed beside ours in one table, with the ratio to it, and with ``--shards`` ours
read the same images from tar shards too (a ``source`` column); no timing is asserted."""
import re

import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow  # launches processes


@pytest.mark.parametrize("loaders, shards", [("plain,torch", False), ("plain,torch,dali", False),
                                             ("plain,torch", True)])
def test_plain_row_beside_ours(tmp_path, loaders, shards):
    if "dali" in loaders:
        pytest.importorskip("nvidia.dali")
    out = run_cli("scripts/bench_data.py", "--root", tmp_path / "synth", "--synthesize", 16,
                  "--loader", loaders, "--workers", 0, "--batch", 4, "--steps", 2,
                  "--rounds", 2, "--rand-size", 32, "--focal-size", 16, "--focal-views", 2,
                  *(["--shards", "--shard-size", 5] if shards else []), timeout=300).stdout
    kinds = loaders.split(",")
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in [[k] for k in kinds]]
    # one row per loader (and source) and round, then one median row each
    benches = [(k, "folder") for k in kinds] + [(k, "shards") for k in kinds[1:] if shards]
    assert len(rows) == 3 * len(benches), out
    medians = {(r[0], r[1]): " ".join(r) for r in rows if "med" in r}
    assert set(medians) == set(benches)
    assert "1.00x plain" in medians["plain", "folder"]
    for bench in benches[1:]:
        assert re.search(r"\d+\.\d\dx plain \(CPU per image: \d+\.\d\dx less\)", medians[bench])
    for r in rows:
        assert r[6] == "32/16" and r[10] == "0"  # sizes, nothing skipped
    if shards:
        assert "16 images in" in out and "16 in the shards" in out
