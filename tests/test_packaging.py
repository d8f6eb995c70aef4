"""The wheel carries every config, and an installed (non-editable) package finds them from any directory."""

import subprocess
import sys
import zipfile
from pathlib import Path

from deit_train.train import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_yaml_and_composes_from_elsewhere(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("deit_train-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"deit_train/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert expected and expected <= names, sorted(expected - names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import deit_train.train as t; from hydra import compose, initialize_config_dir; "
        f"assert t.CONFIG_DIR.startswith(r'{site}'), t.CONFIG_DIR; "
        "initialize_config_dir(config_dir=t.CONFIG_DIR, version_base='1.3'); "
        "cfg = compose('train', overrides=['model=deit_base', 'loss=hard_distill', 'teacher=regnety_160']); "
        "print(cfg.model.embed_dim, cfg.loss.alpha, cfg.teacher.name)"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["768", "0.5", "regnety_160.deit_in1k"]


def test_config_dir_is_the_packaged_conf():
    assert Path(CONFIG_DIR, "train.yaml").is_file()
