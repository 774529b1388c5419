"""Hugging Face transformers export and import (msn_ds.io.hf; scripts/export_hf.py and
scripts/import_hf.py are its command lines).

Everything is built locally: random msn_ds encoders and random ``ViTMSNModel``s, saved and
loaded from tmp folders; nothing is downloaded. Every parameter is randomised (LayerNorm
weights and biases included), so a swapped or mis-split tensor changes the features.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, ViTMSNConfig, ViTMSNModel

from helpers import cpu_env, load_script, run_cli, write_folder
from msn_ds.data import IMAGENET_STD, eval_transform
from msn_ds.io import hf
from msn_ds.io.weights import (TARGET_PREFIX, encoder_metadata, load_encoder, read_weights,
                               save_weights)
from msn_ds.models import MSNEncoder

pytestmark = pytest.mark.slow  # launches processes

ROOT = Path(__file__).resolve().parents[1]
export_cli = load_script("scripts/export_hf.py")  # the command lines, for their exit statuses
import_cli = load_script("scripts/import_hf.py")

ARCH = "vit_pico_16"  # 4 blocks, width 128, patch 16: a 224-px model that runs in milliseconds
FEATURE_TOL = 1e-4
ONE_STEP = 1 / (255 * min(IMAGENET_STD))  # one 8-bit level after normalisation


def random_encoder(arch=ARCH, img_size=224, seed=0) -> MSNEncoder:
    torch.manual_seed(seed)
    enc = MSNEncoder(arch, img_size=img_size, hidden_dim=64, output_dim=32).eval()
    with torch.no_grad():
        for p in enc.parameters():  # LayerNorms and biases too (init makes them 1 and 0)
            p.add_(torch.randn_like(p) * 0.05)
    return enc


def save(enc: MSNEncoder, path, img_size=224, **extra) -> str:
    save_weights(str(path), enc, None, {**encoder_metadata(enc, img_size, 64, 32, True), **extra})
    return str(path)


def fixed_images(n=4, seed=0) -> list:
    """Smooth RGB images of different sizes (low-frequency noise upsampled)."""
    g = np.random.default_rng(seed)
    sizes = [(320, 240), (500, 375), (224, 224), (256, 300)]
    return [Image.fromarray(g.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8))
            .resize((w, h), Image.BICUBIC) for w, h in sizes[:n]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Our random encoder, its weights file and its export (through the CLI)."""
    d = tmp_path_factory.mktemp("hf")
    enc = random_encoder()
    weights = save(enc, d / "w.safetensors", step="1234", epoch="7")
    run_cli("scripts/export_hf.py", weights, "--out", d / "hf")
    return enc, weights, d / "hf"


def test_export_loads_strict_with_equal_features(exported):
    enc, _, folder = exported
    assert {"model.safetensors", "config.json", "preprocessor_config.json",
            "README.md"} <= set(os.listdir(folder))
    model, info = ViTMSNModel.from_pretrained(folder, output_loading_info=True)
    model.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert model.config.layer_norm_eps == 1e-6 and model.config.hidden_act == "gelu"
    x = torch.stack([eval_transform(224, 256)(im) for im in fixed_images()])
    with torch.no_grad():
        ours = enc.forward_features(x)
        theirs = model(pixel_values=x).last_hidden_state[:, 0]
        assert (ours - theirs).abs().max().item() < FEATURE_TOL
        # other sizes: both resample the position embedding bicubically (no anti-aliasing,
        # grid floored): 160 -> 10x10, 100 -> 6x6 (a size the patch does not divide)
        for size in (160, 100):
            xs = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")
            ours = enc.forward_features(xs)
            theirs = model(pixel_values=xs, interpolate_pos_encoding=True).last_hidden_state[:, 0]
            assert (ours - theirs).abs().max().item() < FEATURE_TOL, size


def test_image_processor_is_our_eval_transform(exported):
    _, _, folder = exported
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    assert cfg["size"] == {"shortest_edge": 256}
    assert cfg["crop_size"] == {"height": 224, "width": 224}
    processor = AutoImageProcessor.from_pretrained(folder)
    for image in fixed_images(2):
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        ours = eval_transform(224, 256)(image)
        diff = (theirs - ours).abs()
        # the torchvision backend resizes uint8 tensors: rounding moves a few pixels by one
        # 8-bit level (measured: max 0.0175 = one level, mean ~3e-5)
        assert diff.max().item() <= ONE_STEP + 1e-5 and diff.mean().item() < 1e-3


def test_round_trip_is_bit_identical_and_evaluations_work(exported, tmp_path):
    enc, weights, folder = exported
    back = tmp_path / "back.safetensors"
    run_cli("scripts/import_hf.py", folder, "--out", back)
    before, _ = read_weights(weights)
    after, meta = read_weights(str(back))
    keys = sorted(k for k in before if k.startswith(TARGET_PREFIX))
    assert keys == sorted(k for k in after if k.startswith(TARGET_PREFIX))
    for k in keys:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    assert meta["arch"] == ARCH and meta["img_size"] == "224" and meta["head"] == "absent"
    loaded, _ = load_encoder(str(back))  # the evaluations' loader: head placeholder present
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), enc.forward_features(x))
    data = tmp_path / "data"
    write_folder(data / "train", {"a": 4, "b": 4})
    write_folder(data / "val", {"a": 2, "b": 2}, seed=1)
    from eval.knn import main as knn_main  # in-process: the import CLI above is the real one

    assert knn_main(["--weights", str(back), "--root", str(data), "--k", "3", "--crop", "32",
                     "--resize", "36", "--json", str(tmp_path / "knn.json")]) == 0
    result = json.loads((tmp_path / "knn.json").read_text())
    assert result["arch"] == ARCH and 0 <= result["top1"] <= 100


def test_hf_model_imports_and_exports_back_unchanged(tmp_path):
    """A ViTMSNModel saved by transformers itself (its key layout, its init) -> ours -> HF:
    the same tensors, and the imported file's features equal the HF model's."""
    torch.manual_seed(1)
    config = ViTMSNConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=512, image_size=64, patch_size=8, layer_norm_eps=1e-6)
    model = ViTMSNModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "src")
    hf.import_folder(str(tmp_path / "src"), str(tmp_path / "ours.safetensors"))
    enc, meta = load_encoder(str(tmp_path / "ours.safetensors"))
    assert meta["arch"] == "vit_pico_8" and meta["img_size"] == "64"
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        diff = (enc.forward_features(x) - model(pixel_values=x).last_hidden_state[:, 0]).abs()
    assert diff.max().item() < FEATURE_TOL
    hf.export(str(tmp_path / "ours.safetensors"), str(tmp_path / "again"))
    again = ViTMSNModel.from_pretrained(tmp_path / "again")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_import_reads_hub_variants(tmp_path, exported):
    """``vit.``-prefixed keys with a classifier (ViTMSNForImageClassification) in a
    pytorch_model.bin, as some hub folders hold: the classifier is ignored."""
    _, weights, folder = exported
    state = load_file(str(folder / "model.safetensors"))
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text((folder / "config.json").read_text())
    blob = {"vit." + k: v for k, v in state.items()}
    blob["classifier.weight"], blob["classifier.bias"] = torch.zeros(10, 128), torch.zeros(10)
    torch.save(blob, src / "pytorch_model.bin")
    hf.import_folder(str(src), str(tmp_path / "w.safetensors"))
    before, _ = read_weights(weights)
    after, _ = read_weights(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(TARGET_PREFIX))


def _bad_folder(tmp_path, folder, edit_config=None, edit_state=None):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (bad / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(folder / "model.safetensors"))
    if edit_state:
        edit_state(state)
    save_file(state, str(bad / "model.safetensors"))
    return bad


def test_bad_input_exits_2_naming_the_problem(tmp_path, exported, capsys):
    _, _, folder = exported
    # a real process once: message on stderr, exit 2, no traceback
    proc = run_cli("scripts/import_hf.py", tmp_path / "missing", "--out",
                   tmp_path / "x.safetensors", check=False)
    assert proc.returncode == 2 and "missing: not a folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    cases = [
        (dict(edit_config=lambda c: c.update(layer_norm_eps=1e-12)),
         r"config\.json: layer_norm_eps=1e-12"),
        (dict(edit_config=lambda c: c.update(model_type="vit")), r"model_type is 'vit'"),
        (dict(edit_config=lambda c: c.update(hidden_size=96, intermediate_size=384)),
         r"hidden_size/.* = 96/4/4 is no msn_ds ViT size"),
        (dict(edit_state=lambda s: s.update({"encoder.layer.0.extra.weight": torch.zeros(1)})),
         r"unexpected tensor 'encoder\.layer\.0\.extra\.weight'"),
        (dict(edit_state=lambda s: s.pop("encoder.layer.3.attention.attention.key.bias")),
         r"layer 3 lacks attention\.attention\.key\.bias"),
        (dict(edit_state=lambda s: s.pop("layernorm.bias")), r"Missing key.*norm\.bias"),
    ]
    for i, (edit, pattern) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        bad = _bad_folder(tmp_path / str(i), folder, **edit)
        assert import_cli.main([str(bad), "--out", str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err
        assert re.search(pattern, err), (pattern, err)
    assert not (tmp_path / "x.safetensors").exists()
    # export: a results file for other weights is refused (traceability by sha256)
    res = tmp_path / "knn.json"
    res.write_text(json.dumps({"protocol": "knn", "top1": 50.0, "weights_sha256": "0" * 16}))
    assert export_cli.main([str(exported[1]), "--out", str(tmp_path / "o"), "--eval",
                            str(res)]) == 2
    assert "results are for weights 0000000000000000" in capsys.readouterr().err
    assert export_cli.main([str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "weights file not found" in capsys.readouterr().err


def test_model_card_has_arch_epochs_results_and_license(tmp_path, exported):
    _, weights, _ = exported
    from eval.report import sha256_file

    sha = sha256_file(weights)
    res = tmp_path / "fewshot.json"
    res.write_text(json.dumps({"protocol": "logistic", "representation": "before_norm",
                               "lambd": 0.0025, "weights_sha256": sha, "root": "/data/in1k",
                               "groups": {"5imgs_class": {"mean": 62.8, "std": 0.31,
                                                          "splits": 3}}}))
    assert export_cli.main([weights, "--out", str(tmp_path / "o"), "--eval", str(res),
                           "--license", "cc-by-nc-4.0", "--dataset", "ImageNet-1K"]) == 0
    card = (tmp_path / "o" / "README.md").read_text()
    for text in ("license: cc-by-nc-4.0", "vit_pico_16", "patch 16", "ImageNet-1K",
                 "| epochs | 7 |", "| training step | 1234 |", "5imgs_class", "62.80 ± 0.31",
                 f"sha256 {sha}"):
        assert text in card, text


def snippet(readme: str, name: str) -> list[tuple[str, str]]:
    m = re.search(rf"<!-- snippet:{name} -->(.*?)<!-- /snippet -->", readme, re.S)
    assert m, f"docs/weights.md has no <!-- snippet:{name} --> ... <!-- /snippet --> block"
    return re.findall(r"```(\w+)\n(.*?)```", m.group(1), re.S)


def test_readme_snippets_run(tmp_path):
    """docs/weights.md's timm and transformers snippets, run as written on a random ViT-S/16
    weights file (only the file and folder names are substituted)."""
    readme = Path(os.environ.get("MSN_DS_README", ROOT / "docs" / "weights.md")).read_text()
    enc = random_encoder("vit_small_16", seed=2)
    weights = save(enc, tmp_path / "vits16.safetensors")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = enc.forward_features(x)

    def subst(code: str) -> str:
        return code.replace("vits16.safetensors", weights).replace("vit-msn-s16/",
                                                                   str(tmp_path / "hf") + "/")

    timm_blocks = snippet(readme, "timm")
    assert [lang for lang, _ in timm_blocks] == ["python"]
    ns = {}
    exec(subst(timm_blocks[0][1]), ns)  # noqa: S102
    with torch.no_grad():
        assert (ns["model"](x) - want).abs().max().item() < 1e-5
    assert ns["features"].shape == (2, 384)

    blocks = snippet(readme, "transformers")
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    for line in subst(blocks[0][1]).strip().splitlines():
        proc = subprocess.run(line, shell=True, cwd=ROOT, capture_output=True, text=True,
                              env=cpu_env(PATH=os.path.dirname(sys.executable) + os.pathsep
                                          + os.environ["PATH"]), timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    ns = {}
    exec(subst(blocks[1][1]), ns)  # noqa: S102
    assert ns["features"].shape == (1, 384)
    with torch.no_grad():
        theirs = ns["model"](pixel_values=x).last_hidden_state[:, 0]
    assert (theirs - want).abs().max().item() < FEATURE_TOL
