"""Bad configs refused before any work (issue 13, defect 7): view sizes the patch cannot
tile, a mask that keeps no token, focal views not smaller than the random ones, and
DeepSpeed JSON that DeepSpeed would reject only after its engine starts (or silently
ignore: an unknown top-level key)."""
import json
import os

import pytest

from helpers import ROOT, run_cli
from msn_ds.config import ConfigError, load_config
from msn_ds.deepspeed_config import read_ds_config, resolve_ds_config

DEMO = os.path.join(ROOT, "configs", "demo_cpu.yaml")  # vit_pico_4, 32-px random views


@pytest.mark.parametrize("overrides,message", [
    (["data.patch_drop=0.99"], r"data\.patch_drop = 0\.99 keeps no patch of the 64 in a 32-px view"),
    (["data.focal_size=3"], r"data\.focal_size = 3 is smaller than the patch \(4 px\)"),
    (["meta.model_name=vit_pico_16", "data.rand_size=8"], r"data\.rand_size = 8 is smaller than the patch \(16 px\)"),
    (["data.focal_size=48"], r"data\.focal_size = 48 must be smaller than data\.rand_size = 32"),
    (["data.focal_size=32"], r"data\.focal_size = 32 must be smaller than data\.rand_size = 32"),
])
def test_view_geometry_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, overrides, check_paths=False)


def test_equal_sizes_allowed_without_focal_views():
    load_config(DEMO, ["data.focal_size=32", "data.focal_views=0"], check_paths=False)


@pytest.mark.parametrize("ds,message", [
    ({"zero_optimization": {"stage": 7}}, r"x\.json: zero_optimization\.stage: Input should be 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": 1, "reduce_bucket": 5}}, r"zero_optimization\.reduce_bucket: Extra inputs"),
    ({"bf16": {"enabled": True, "loss_scale": 2}}, r"bf16\.loss_scale: Extra inputs"),
    ({"zero_optimisation": {"stage": 1}}, r"unknown DeepSpeed key 'zero_optimisation' \(did you mean 'zero_optimization'\?\)"),
    ({"zero_optimization": 3}, r"x\.json: DeepSpeed rejects it"),
])
def test_deepspeed_config_refused(ds, message):
    cfg = load_config(DEMO, check_paths=False)
    with pytest.raises(ConfigError, match=message):
        resolve_ds_config(ds, cfg, 2, "x.json")


def test_shipped_deepspeed_configs_pass():
    cfg = load_config(DEMO, check_paths=False)
    for name in sorted(os.listdir(os.path.join(ROOT, "ds_configs"))):
        ds = read_ds_config(os.path.join(ROOT, "ds_configs", name))
        if "fp16" in name:
            ds.pop("fp16")  # DeepSpeed's CPU accelerator has no fp16 (refused separately)
        resolve_ds_config(ds, cfg, 2, name)


def test_ds_config_must_be_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"zero_optimization": {"stage": 1}}]))
    with pytest.raises(ConfigError, match=r"list\.json: must be a JSON object .* got a list"):
        read_ds_config(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("ds_text,overrides,message", [
    ('[{"zero_optimization": {"stage": 1}}]', [], "must be a JSON object"),
    ('{"zero_optimisation": {"stage": 3}}', [], "did you mean 'zero_optimization'"),
    ('{"zero_optimization": {"stage": 7}}', [], "zero_optimization.stage"),
    ('{}', ["data.patch_drop=0.999"], "data.patch_drop = 0.999 keeps no patch"),
])
def test_train_py_refuses_before_any_work(demo_root, tmp_path, ds_text, overrides, message):
    ds = tmp_path / "ds.json"
    ds.write_text(ds_text)
    run = tmp_path / "run"
    r = run_cli("train.py", "--config", DEMO, "--deepspeed_config", ds,
                f"data.root_path={demo_root}", f"logging.folder={run}", *overrides, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not run.exists()  # nothing written
