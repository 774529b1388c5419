"""scripts/bench_data.py: the yardstick row (``--loader plain``: stock torchvision, global
RNG) is printed beside ours in one table, with the ratio to it; no timing is asserted."""
import re

import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow  # launches processes


@pytest.mark.parametrize("loaders", ["plain,torch", "plain,torch,dali"])
def test_plain_row_beside_ours(tmp_path, loaders):
    if "dali" in loaders:
        pytest.importorskip("nvidia.dali")
    out = run_cli("scripts/bench_data.py", "--root", tmp_path / "synth", "--synthesize", 16,
                  "--loader", loaders, "--workers", 0, "--batch", 4, "--steps", 2,
                  "--rounds", 2, "--rand-size", 32, "--focal-size", 16, "--focal-views", 2,
                  timeout=300).stdout
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in
            [[k] for k in loaders.split(",")]]
    # one row per loader and round, then one median row each
    assert len(rows) == 3 * len(loaders.split(",")), out
    medians = {r[0]: " ".join(r) for r in rows if "med" in r}
    assert set(medians) == set(loaders.split(","))
    assert "1.00x plain" in medians["plain"]
    for kind in loaders.split(",")[1:]:
        assert re.search(r"\d+\.\d\dx plain \(CPU per image: \d+\.\d\dx less\)", medians[kind])
    for r in rows:
        assert r[5] == "32/16" and r[9] == "0"  # sizes, nothing skipped
