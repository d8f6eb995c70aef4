"""Numbers and file names the README and docs/ state, each against what produces it: the demo's time against its
table, the profiler's file against a profiled run, the data sources' num_workers against their configs."""

import re
from pathlib import Path

from omegaconf import OmegaConf

from deit_train.train import train

ROOT = Path(__file__).resolve().parents[1]


def test_the_readmes_demo_time_is_the_sum_of_its_tables_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install and first run", 1)[1].split("## Tests", 1)[0]
    seconds = [int(s) for s in re.findall(r"\| (\d+) s \|\n", section)]
    assert len(seconds) == 3, section  # teacher, student without and with distillation: what scripts/demo.py runs
    total = sum(seconds)
    assert f"about {round(total / 60)} minutes" in section
    assert f"took {total:,} s" in section


def test_the_profiler_writes_the_file_its_config_names(tiny_config):
    comment = (ROOT / "conf" / "debug" / "profiler.yaml").read_text()
    (named,) = re.findall(r"<run>/([\w.-]+\.txt)", comment)
    cfg = tiny_config("debug=profiler")
    train(cfg)
    assert (Path(cfg.paths.output_dir) / named).is_file()


def test_the_data_docs_state_each_sources_num_workers(tiny_config):
    text = " ".join((ROOT / "docs" / "data.md").read_text().split())
    assert "`num_workers` (default `auto`" in text
    for path in sorted((ROOT / "conf" / "data").glob("*.yaml")):
        workers = OmegaConf.load(path).get("num_workers", "auto")
        if workers != "auto":
            assert re.search(rf"`data={path.stem}`[^;)]*? sets? {workers}\b", text), (path.stem, workers)
