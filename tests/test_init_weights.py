"""``meta.init_weights``: a run starts both encoders from a weights file, ours or one
imported from Hugging Face transformers (whose file has no trained head), and a file that
does not fit the run is refused before any work."""
import pytest
import torch

from helpers import ROOT, run_cli
from msn_ds.config import ConfigError, load_config
from msn_ds.engine import build_models, check_init_weights
from msn_ds.io.weights import TARGET_PREFIX, encoder_metadata, read_weights, save_weights
from msn_ds.models import MSNEncoder

DEMO = str(ROOT / "configs" / "demo_cpu.yaml")  # vit_pico_4, 32 px, head 512 -> 128


def ours(path, hidden=512):
    torch.manual_seed(5)
    enc = MSNEncoder("vit_pico_4", img_size=32, hidden_dim=hidden, output_dim=128)
    save_weights(str(path), enc, None, encoder_metadata(enc, 32, hidden, 128, True))
    return enc


def test_both_encoders_start_from_the_file(tmp_path):
    enc = ours(tmp_path / "w.safetensors")
    cfg = load_config(DEMO, [f"meta.init_weights={tmp_path / 'w.safetensors'}"], check_paths=False)
    model, target = build_models(cfg)
    want = {**{f"backbone.{k}": v for k, v in enc.backbone.state_dict().items()},
            **{f"head.{k}": v for k, v in enc.head.state_dict().items()}}
    for module in (model.encoder, target):
        got = module.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_hf_import_gives_the_backbone_and_a_fresh_head(tmp_path):
    transformers = pytest.importorskip("transformers")
    from msn_ds.io.hf import import_folder

    torch.manual_seed(1)
    config = transformers.ViTMSNConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                       intermediate_size=512, image_size=32, patch_size=4,
                                       layer_norm_eps=1e-6)
    transformers.ViTMSNModel(config).save_pretrained(tmp_path / "hf")
    import_folder(str(tmp_path / "hf"), str(tmp_path / "w.safetensors"))
    tensors, meta = read_weights(str(tmp_path / "w.safetensors"))
    assert meta["head"] == "absent"
    cfg = load_config(DEMO, [f"meta.init_weights={tmp_path / 'w.safetensors'}"], check_paths=False)
    torch.manual_seed(0)
    fresh_head = MSNEncoder("vit_pico_4", img_size=32, hidden_dim=512, output_dim=128).head
    model, _ = build_models(cfg)
    backbone = model.encoder.backbone.state_dict()
    assert all(torch.equal(backbone[k[len(TARGET_PREFIX):]], v) for k, v in tensors.items()
               if k.startswith(TARGET_PREFIX))
    # the head is this run's own initialisation (seeded), not the file's placeholder
    assert torch.equal(model.encoder.head.fc1.weight, fresh_head.fc1.weight)


def test_position_embedding_resampled_to_the_run(tmp_path):
    enc = ours(tmp_path / "w.safetensors")
    cfg = load_config(DEMO, [f"meta.init_weights={tmp_path / 'w.safetensors'}",
                             "data.rand_size=48"], check_paths=False)
    model, _ = build_models(cfg)
    assert model.encoder.backbone.pos_embed.shape == (1, 1 + 12 * 12, 128)
    assert torch.equal(model.encoder.backbone.blocks[0].attn.qkv.weight,
                       enc.backbone.blocks[0].attn.qkv.weight)


def test_a_file_that_does_not_fit_is_refused(tmp_path):
    ours(tmp_path / "w.safetensors", hidden=64)
    cfg = load_config(DEMO, [f"meta.init_weights={tmp_path / 'w.safetensors'}"], check_paths=False)
    with pytest.raises(ConfigError, match=r"does not fit this run's ProjectionHead: size mismatch"):
        check_init_weights(cfg)
    cfg = load_config(DEMO, [f"meta.init_weights={tmp_path / 'w.safetensors'}",
                             "meta.model_name=vit_pico_8"], check_paths=False)
    with pytest.raises(ConfigError, match=r"holds vit_pico_4: patch 4, width 128, depth 4 "
                       r"\(patch_embed.proj.weight \[128, 3, 4, 4\]\); this run builds "
                       r"vit_pico_8: patch 8, width 128, depth 4 \(patch_embed.proj.weight "
                       r"\[128, 3, 8, 8\]\)"):
        check_init_weights(cfg)


def relative_distance(weights_file, state):
    """``|target - state| / |state|`` over the backbone tensors of a run's weights file."""
    tensors, _ = read_weights(str(weights_file))
    num = sum(((tensors[TARGET_PREFIX + k] - v.float()) ** 2).sum() for k, v in state.items())
    return (num / sum((v.float() ** 2).sum() for v in state.values())).sqrt().item()


@pytest.mark.slow
def test_train_py_starts_from_the_file_or_refuses_before_work(demo_root, tmp_path):
    """The demo model from a timm safetensors file and from a Hugging Face ViTModel folder:
    after one step the target encoder is within 1e-2 (relative) of the file; a file that
    does not fit exits 2 before any work."""
    from safetensors.torch import save_file
    from test_init_formats import hf_vit, timm_vit

    state = timm_vit(classes=10).state_dict()
    save_file(state, str(tmp_path / "timm.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    sources = [("timm", tmp_path / "timm.safetensors", state)]
    try:
        from msn_ds.io.hf import hf_to_timm

        hf = hf_vit(tmp_path)
        sources.append(("Hugging Face", tmp_path / "hf", hf_to_timm(
            {k: v for k, v in hf.state_dict().items() if not k.startswith("pooler.")}, "hf")))
    except pytest.skip.Exception:  # transformers not installed: the timm file only
        pass
    base = ["train.py", "--config", DEMO, "--deepspeed_config", "ds_configs/zero0_fp32.json",
            f"data.root_path={demo_root}", "criterion.batch_size=8", "data.num_workers=0"]
    for name, path, want in sources:
        run = tmp_path / f"run-{name.split()[0]}"
        proc = run_cli(*base, f"meta.init_weights={path}", f"logging.folder={run}",
                       "--max-steps", "1", timeout=600)
        assert f"is a {name} ViT's weights" in proc.stdout + proc.stderr
        assert relative_distance(run / "demo-target.safetensors", want) < 1e-2, name
    bad = run_cli(*base, f"meta.init_weights={tmp_path / 'timm.safetensors'}",
                  f"logging.folder={tmp_path / 'bad'}", "meta.model_name=vit_pico_8",
                  "--max-steps", "1", check=False, timeout=600)
    assert bad.returncode == 2 and "meta.init_weights" in bad.stderr
    assert "holds a timm ViT: patch 4" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
