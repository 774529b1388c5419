"""The target follows the fp32 master weights at every ZeRO stage in bf16 (2 processes, gloo):
its EMA equals a float64 EMA of the masters to 1e-6, it computes in bf16, a gated
(non-finite) step leaves it untouched, and the update's only traffic is the target's own
all-gather (ZeRO-1/2) or none (ZeRO-3, whose engine gathers on use)."""
import json

import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow  # launches processes


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_target_is_an_ema_of_the_fp32_masters(tmp_path, stage):
    run_cli("tests/dist_ema_master.py", stage, tmp_path, nproc=2)
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["worst"] < 1e-6, res  # fp32 EMA vs float64 EMA of the masters, 4 updates
        assert res["dtypes"] == ["torch.bfloat16"], res  # the target runs in bf16
        assert res["rounding"] == 0.0, res  # bf16 weights = the fp32 EMA rounded once
        if stage == 3:
            assert res["ema"] == "ShardedEMA" and res["per_update"] == [[]] * 4, res
            assert res["target_overlap_comm"] is False  # forced off for the EMA's writes
        else:
            assert res["ema"] == "PartitionedEMA", res
            gathers = {tuple(c) for c in res["per_update"]}
            # one all-gather per parameter group at ZeRO-1/2; ZeRO-0 holds whole masters
            assert gathers == ({()} if stage == 0 else
                               {("all_gather_into_tensor",) * len(res["per_update"][0])}), res
