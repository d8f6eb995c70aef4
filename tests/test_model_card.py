"""deit-export's model card (README.md) and its push to a Hub: the card's header read back by huggingface_hub, its
numbers against deit-eval's on best.ckpt, and a push received by a Hub on 127.0.0.1 (tests/hub_server.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from deit_train.models.trained_model import load_trained_model
from deit_train.tools.evaluate import evaluate, open_eval_folder
from deit_train.tools.export import export
from deit_train.train import train

from .conftest import TINY, compose_config
from .hub_server import LocalHub


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir) -> Path:
    """A tiny run of three epochs: best.ckpt and last.ckpt may hold different epochs."""
    run_dir = tmp_path_factory.mktemp("card") / "run"
    train(compose_config([*TINY, "trainer.max_epochs=3"], run_dir, cache_dir))
    return run_dir


def export_tool(*args, **env) -> subprocess.CompletedProcess:
    code = "from deit_train.tools.export import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_the_card_opens_with_the_hub_header_and_holds_best_ckpts_numbers(run_dir, demo_data, tmp_path):
    out = export(run_dir / "checkpoints" / "best.ckpt", tmp_path / "exported", license="apache-2.0")
    card = ModelCard.load(out / "README.md")  # huggingface_hub's own reader of the header
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: transformers\n")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-classification"
    assert card.data.license == "apache-2.0" and "deit-train" in card.data.tags
    assert card.data.base_model is None  # the run started from random weights
    # the model-index numbers are what deit-eval measures for best.ckpt, outside Lightning
    trained = load_trained_model(run_dir / "checkpoints" / "best.ckpt")
    measured = evaluate(trained, open_eval_folder(demo_data, "val", trained), batch_size=7, num_workers=0)
    results = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert results == {
        "top-1 (%)": pytest.approx(measured["heads"]["average"]["top1"], abs=0.005),
        "top-5 (%)": pytest.approx(measured["heads"]["average"]["top5"], abs=0.005),
    }
    best_epoch = json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"]["epoch"]
    assert f"best.ckpt, epoch {best_epoch}" in card.text
    assert f"| top-1, class head | {measured['heads']['class']['top1']:.2f} |" in card.text
    assert all(f"`{name}`" in card.text for name in trained.class_names)
    for library in ("DeiTForImageClassificationWithTeacher.from_pretrained", "timm.create_model", "deit-train"):
        assert library in card.text


def test_the_timm_export_claims_no_imagenet_weights(run_dir, tmp_path):
    out = export(run_dir / "checkpoints" / "last.ckpt", tmp_path / "exported")
    pretrained_cfg = json.loads((out / "timm" / "config.json").read_text())["pretrained_cfg"]
    assert not {"tag", "license", "hf_hub_id"} & set(pretrained_cfg)
    assert pretrained_cfg["input_size"] == [3, 16, 16]  # what describes the input stays
    last = json.loads((run_dir / "metrics.json").read_text())["last_epoch"]
    assert f"last epoch, epoch {last['epoch']}" in (out / "README.md").read_text()


@pytest.mark.slow
def test_push_to_hub_uploads_the_export_and_its_card(run_dir, tmp_path):
    with LocalHub() as hub:
        result = export_tool(
            run_dir / "checkpoints" / "best.ckpt",
            tmp_path / "exported",
            "--push-to-hub",
            "me/deit-tiny",
            "--private",
            HF_ENDPOINT=hub.url,
            HF_HUB_OFFLINE="0",
            HF_TOKEN="hf_local_test",
        )
    assert result.returncode == 0, result.stderr
    repo = hub.repos["me/deit-tiny"]
    local = {
        str(p.relative_to(tmp_path / "exported")): p.read_bytes()
        for p in (tmp_path / "exported").rglob("*")
        if p.is_file()
    }
    assert repo["private"] and repo["files"] == local  # every file of the export, byte for byte
    readme = repo["files"]["README.md"].decode()
    assert 'from_pretrained("me/deit-tiny", subfolder="transformers")' in readme
    assert 'snapshot_download("me/deit-tiny")' in readme


@pytest.mark.slow
@pytest.mark.parametrize(
    "env,named",
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "x"}, "the upload failed"),
    ],
)
def test_a_push_that_cannot_happen_ends_in_one_line_and_keeps_the_export(run_dir, tmp_path, env, named):
    result = export_tool(run_dir / "checkpoints" / "last.ckpt", tmp_path / "out", "--push-to-hub", "me/x", **env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert named in lines[-1] and "the export is in" in lines[-1], lines[-1]
    assert (tmp_path / "out" / "README.md").is_file()


def test_help_offers_the_hub_push(capsys):
    from deit_train.tools.export import main

    with pytest.raises(SystemExit) as exit_status:
        main(["--help"])
    shown = capsys.readouterr().out
    assert exit_status.value.code == 0 and "--push-to-hub OWNER/NAME" in shown and "--private" in shown


def cached_hub_repo(cache: Path, repo_id: str, folder: Path) -> Path:
    """`folder` as huggingface_hub's cache holds a downloaded repo (models--OWNER--NAME/refs/main, snapshots/SHA)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_a_hub_id_is_taken_where_a_checkpoint_path_is(run_dir, tmp_path, monkeypatch):
    """model.init / teacher.checkpoint=OWNER/NAME: huggingface_hub's snapshot of the repo (here its cache, offline);
    a deit-export repo gives its transformers/ folder. One not in the cache while offline: one line."""
    from huggingface_hub import constants

    from deit_train.errors import DeitTrainError
    from deit_train.models.checkpoints import load_weights

    exported = export(run_dir / "checkpoints" / "best.ckpt", tmp_path / "exported")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = cached_hub_repo(tmp_path / "hub", "me/deit-tiny", exported)
    from_hub, local = load_weights("me/deit-tiny", "model.init"), load_weights(exported / "transformers")
    assert from_hub.class_names == local.class_names and from_hub.state.keys() == local.state.keys()
    assert all(from_hub.state[k].equal(local.state[k]) for k in local.state)
    assert (snapshot / "transformers" / "config.json").is_file()
    with pytest.raises(DeitTrainError, match=r"^model.init=me/absent: no such local path, and .* HF_HUB_OFFLINE"):
        load_weights("me/absent", "model.init")
