"""train.py's command line: ``--resume`` never takes an override for its PATH."""
from helpers import load_script

train = load_script("train.py")
BASE = ["--config", "c.yaml", "--deepspeed_config", "d.json"]


def test_resume_followed_by_an_override():
    args = train.parse_args([*BASE, "--resume", "logging.folder=R", "meta.seed=3"])
    assert args.resume == "latest" and args.overrides == ["logging.folder=R", "meta.seed=3"]
    args = train.parse_args(["--resume", "logging.folder=R", *BASE])
    assert args.resume == "latest" and args.overrides == ["logging.folder=R"]


def test_resume_paths_and_auto_stay_paths():
    for value in ("auto", "runs/x/global_step30", "runs/x", "odd=name/global_step3"):
        args = train.parse_args([*BASE, "--resume", value, "logging.folder=R"])
        assert args.resume == value and args.overrides == ["logging.folder=R"]
    assert train.parse_args([*BASE, "--resume"]).resume == "latest"
    assert train.parse_args(BASE).resume is None
