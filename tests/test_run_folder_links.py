"""A run folder's files are never written through a link, never name a path, never resume
another folder's checkpoint, and --overwrite moves only a run (issue 22, items 3, 5 and 9).

In-process: a planted ``.lock`` link is refused (both lock kinds), ``<tag>-config.yaml`` and
``metrics.jsonl`` links are replaced with the target untouched, a ``logging.write_tag`` that
is a path is refused, a ``latest`` pointing outside its folder is refused, a ZeRO stage
change is refused before anything is built, and ``--overwrite`` refuses a folder holding
anything but a run's files. One slow test runs the same through train.py."""
import glob
import os

import pytest
import torch
import yaml

from helpers import ROOT, run_cli
from msn_ds.config import ConfigError, dump, load_config
from msn_ds.io.atomic import open_append
from msn_ds.io.checkpoint import MODEL_STATES, find_checkpoint, plan_resume
from msn_ds.io.safe_load import CheckpointError
from msn_ds.monitor.progress import Monitor
from msn_ds.run_folder import LOCK_NAME, RunFolderError, RunLock, claim, write_run_file

DEMO = os.path.join(ROOT, "configs", "demo_cpu.yaml")
PRECIOUS = "precious: must survive\n"


def precious(tmp_path, name="target.txt"):
    """A file outside the run folder that a planted link points to."""
    path = tmp_path / name
    path.write_text(PRECIOUS)
    return path


def untouched(path) -> bool:
    return path.read_text() == PRECIOUS


# ---------------------------------------------------------------- item 3: planted links
@pytest.mark.parametrize("method", ["fcntl", "pidfile"])
@pytest.mark.parametrize("dangling", [False, True])
def test_lock_link_refused(tmp_path, method, dangling):
    """Defect: a ``.lock`` link truncated its target. Now the lock is refused, naming the
    link and its target; the target (or, dangling, its absence) is unchanged."""
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "nothing-here" if dangling else precious(tmp_path)
    (run / LOCK_NAME).symlink_to(target)
    with pytest.raises(RunFolderError, match=rf"{run}/\.lock is a symbolic link \(to {target}\)"):
        RunLock(str(run), method).acquire()
    assert not target.exists() if dangling else untouched(target)
    assert os.path.islink(run / LOCK_NAME)  # left for the user to look at


def test_config_link_replaced_not_written_through(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    target = precious(tmp_path)
    (run / "demo-config.yaml").symlink_to(target)
    write_run_file(str(run / "demo-config.yaml"), "meta: {}\n")
    assert untouched(target)
    assert not os.path.islink(run / "demo-config.yaml")
    assert (run / "demo-config.yaml").read_text() == "meta: {}\n"


def test_metrics_link_replaced_not_appended_to(tmp_path, caplog):
    """The monitor's ``metrics.jsonl`` appends used to follow a planted link."""
    run = tmp_path / "run"
    run.mkdir()
    target = precious(tmp_path)
    (run / "metrics.jsonl").symlink_to(target)
    monitor = Monitor(str(run), total_steps=2, global_batch=4, log_every=1, tensorboard=False)
    monitor.update({"loss": torch.tensor(1.5)})
    monitor.log(1, 0, {"lr": 1e-3, "wd": 0.04, "momentum": 0.99, "T": 0.25})
    monitor.log_eval(1, {"knn_top1": 50.0, "knn_top5": 90.0, "knn_seconds": 0.1})
    assert untouched(target)
    assert not os.path.islink(run / "metrics.jsonl")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and '"loss": 1.5' in rows[0]
    assert f"was a symbolic link (to {target})" in caplog.text
    with open_append(str(run / "metrics.jsonl")) as f:  # a plain file: appended to
        f.write("x\n")
    assert (run / "metrics.jsonl").read_text().endswith("x\n")


@pytest.mark.parametrize("tag", ["../../x", "a/b", "/abs", "..", ".hidden", "", "a b", "x\0y",
                                 '"demo\\n"'])  # YAML's escape: a trailing newline
def test_write_tag_must_be_a_plain_name(tag):
    with pytest.raises(ConfigError, match=r"logging\.write_tag = .* must be a plain file name"):
        load_config(DEMO, [f"logging.write_tag={tag}"], check_paths=False)


@pytest.mark.parametrize("tag", ["demo", "msn-experiment-1", "vit_b16.run2", "a+b"])
def test_write_tag_plain_names_accepted(tag):
    assert load_config(DEMO, [f"logging.write_tag={tag}"],
                       check_paths=False)["logging"]["write_tag"] == tag


def fake_run(folder, *steps):
    """Checkpoint folders that find_checkpoint counts as complete."""
    for step in steps:
        (folder / f"global_step{step}").mkdir(parents=True)
        (folder / f"global_step{step}" / MODEL_STATES).write_bytes(b"")
    return folder


def test_latest_pointing_outside_refused(tmp_path):
    """Defect: ``latest`` naming another folder's checkpoint resumed that run silently."""
    a, b = fake_run(tmp_path / "A", 1, 2), fake_run(tmp_path / "B", 1, 5)
    (b / "latest").write_text("global_step5")
    pointer = a / "latest"
    for value in ("../B/global_step5", str(b / "global_step5")):
        pointer.write_text(value)
        with pytest.raises(CheckpointError, match=rf"{pointer} = '{value}' points outside {a}"):
            find_checkpoint(str(a))
    pointer.unlink()
    pointer.symlink_to(b / "latest")
    with pytest.raises(CheckpointError, match=rf"it is a symbolic link to {b}/latest"):
        find_checkpoint(str(a))
    pointer.unlink()
    os.symlink(b / "global_step5", a / "global_step9")  # a checkpoint folder linked in
    pointer.write_text("global_step9")
    with pytest.raises(CheckpointError, match="points outside"):
        find_checkpoint(str(a))
    for value, want in (("global_step1", "global_step1"), ("../A/global_step1", None),
                        ("garbage\0", "global_step2"), ("", "global_step2")):
        pointer.write_text(value)  # inside the folder, or damaged: the newest of its own
        assert find_checkpoint(str(a)) == (str(a), want or value)


# ---------------------------------------------------- item 5: ZeRO stage, before anything
def fake_checkpoint(folder, cfg, stage):
    """A model-states file as DeepSpeed writes it: our client state and its ds_config."""
    (folder / "global_step2").mkdir(parents=True)
    torch.save({"msn": {"config": dump(cfg), "world_size": 1, "step": 2},
                "ds_config": {"zero_optimization": {"stage": stage}}},
               folder / "global_step2" / MODEL_STATES)
    (folder / "latest").write_text("global_step2")
    return folder


@pytest.mark.parametrize("saved,now", [(1, 0), (0, 1), (1, 3), (3, 2)])
def test_stage_change_refused_at_plan(tmp_path, saved, now):
    """Defect: a ZeRO-1 checkpoint resumed with a ZeRO-0 JSON failed inside DeepSpeed
    (``AttributeError: 'NoneType' object has no attribute 'copy'``) after the folder was
    written. The plan, made before the engine, now names both stages."""
    cfg = load_config(DEMO, check_paths=False)
    run = fake_checkpoint(tmp_path / "run", cfg, saved)
    with pytest.raises(CheckpointError, match=rf"saved with ZeRO stage {saved}, this run's "
                                              rf"DeepSpeed config asks for ZeRO stage {now}"):
        plan_resume(str(run), cfg, 1, {"zero_optimization": {"stage": now}})


def test_same_stage_passes_the_check(tmp_path):
    cfg = load_config(DEMO, check_paths=False)
    run = fake_checkpoint(tmp_path / "run", cfg, 0)
    assert plan_resume(str(run), cfg, 1, {}).tag == "global_step2"


# -------------------------------------------------- item 9: --overwrite moves only a run
def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    """Defect: ``logging.folder=. --overwrite`` moved every file of the folder (a repository)
    into ``<folder>.old-<time>/``. A folder holding anything a run does not write is left
    alone, even beside a run's files, and the lock is released."""
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "train.py").write_text("print()\n")
    fake_run(repo, 3)
    (repo / "latest").write_text("global_step3")
    before = sorted(os.listdir(repo))
    with pytest.raises(RunFolderError, match=r"--overwrite: logging\.folder .*repo holds files "
                                             r"that no run writes \(\.git, train\.py\)"):
        claim(str(repo), None, overwrite=True)
    assert sorted(os.listdir(repo)) == before and not glob.glob(str(repo) + ".old-*")


def test_overwrite_moves_a_run_folder(tmp_path):
    run = fake_run(tmp_path / "run", 2, 4)
    names = ["latest", "metrics.jsonl", "demo-config.yaml", "demo-target.safetensors",
             "zero_to_fp32.py", "demo-target.safetensors.123.0a1b2c3d.tmp"]
    for name in names:
        (run / name).write_text("x")
    (run / "tb").mkdir()
    (run / "global_step6.partial").mkdir()
    out = claim(str(run), None, overwrite=True)
    try:
        (old,) = glob.glob(str(run) + ".old-*")
        assert sorted(os.listdir(old)) == sorted(names + ["tb", "global_step2", "global_step4",
                                                          "global_step6.partial"])
        assert os.listdir(run) == [LOCK_NAME]
    finally:
        out.release()


# ------------------------------------------------------------ the same through train.py
def snapshot(folder) -> dict:
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            out[os.path.relpath(path, folder)] = (os.path.islink(path),
                                                  open(path, "rb").read()
                                                  if not os.path.islink(path) else b"")
    return out


def train_args(demo_root, folder, steps, ds, *extra):
    return ["train.py", "--config", "configs/demo_cpu.yaml", "--deepspeed_config",
            f"ds_configs/{ds}", "--max-steps", str(steps), f"data.root_path={demo_root}",
            f"logging.folder={folder}", "criterion.batch_size=8", "data.num_workers=0",
            "logging.log_every=1", "logging.tensorboard=false", *extra]


def refused(r, *phrases):
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for phrase in phrases:
        assert phrase in r.stderr, (phrase, r.stderr[-3000:])


@pytest.mark.slow
def test_train_py_links_stage_and_overwrite(demo_root, tmp_path):
    """One ZeRO-1 step with planted ``demo-config.yaml`` and ``metrics.jsonl`` links leaves
    their targets untouched; its resume with a ZeRO-0 JSON (and another lr) is refused
    naming both stages, the folder byte for byte as it was; a planted ``.lock`` link is
    refused; ``--overwrite`` in a folder that is not a run moves nothing."""
    run = tmp_path / "run"
    run.mkdir()
    config_target, metrics_target = precious(tmp_path, "a.txt"), precious(tmp_path, "b.txt")
    (run / "demo-config.yaml").symlink_to(config_target)
    (run / "metrics.jsonl").symlink_to(metrics_target)
    r = run_cli(*train_args(demo_root, run, 1, "zero1_fp32.json"))
    assert untouched(config_target) and untouched(metrics_target)
    assert not any(os.path.islink(run / n) for n in ("demo-config.yaml", "metrics.jsonl"))
    saved = yaml.safe_load((run / "demo-config.yaml").read_text())
    assert saved["meta"]["model_name"] == "vit_pico_4"
    assert '"step": 1' in (run / "metrics.jsonl").read_text()
    assert f"was a symbolic link (to {metrics_target})" in r.stderr

    before = snapshot(run)
    r = run_cli(*train_args(demo_root, run, 2, "zero0_fp32.json", "optimization.lr=0.5",
                            "logging.tensorboard=true"), "--resume", check=False)
    refused(r, "saved with ZeRO stage 1, this run's DeepSpeed config asks for ZeRO stage 0")
    assert snapshot(run) == before and not (run / "tb").exists()

    (run / LOCK_NAME).symlink_to(config_target)
    refused(run_cli(*train_args(demo_root, run, 2, "zero1_fp32.json"), "--resume", check=False),
            f"{run}/.lock is a symbolic link (to {config_target})")
    assert untouched(config_target)

    notrun = tmp_path / "notrun"
    notrun.mkdir()
    (notrun / "notes.txt").write_text("mine\n")
    refused(run_cli(*train_args(demo_root, notrun, 1, "zero0_fp32.json"), "--overwrite",
                    check=False), "holds files that no run writes (notes.txt)")
    assert os.listdir(notrun) == ["notes.txt"] and not glob.glob(str(notrun) + ".old-*")
