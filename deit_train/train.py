"""`deit-train` inside Hydra: each job of a sweep (-m), and each run the tests start in their process, is one Run
(run.py): checked, then claimed, built, fitted and recorded. A single run from the command line is checked before
Hydra creates anything and handed to Hydra's job as it is (cli.py)."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from deit_train.config import CONFIG_DIR, register_schemas
from deit_train.data.sources import DataSource
from deit_train.errors import debugging, error_boundary
from deit_train.run import Run, TrainRun
from deit_train.sweep_jobs import clear_failure, in_sweep, record_failure
from deit_train.tasks.task import Task

register_schemas()  # the typed schemas @hydra.main and the tests' compose use

__all__ = ["CONFIG_DIR", "Run", "TrainRun", "check_config", "main", "run_job", "train"]


def check_config(cfg: DictConfig) -> Task:
    """The checks of a run on `cfg` (Run.check), for the tests and tools that check a config without running it."""
    return Run(cfg).check()


def train(cfg: DictConfig, source: DataSource | None = None, job: DictConfig | None = None) -> TrainRun:
    """One run inside a Hydra job (a sweep's, or the tests'): check, then the rest. Raises DeitTrainError.
    `job`: the job's hydra node (Run)."""
    from deit_train.console import quiet_console

    quiet_console()
    run = Run(cfg, source, job)
    run.check()
    return run.execute()


def run_job(cfg: DictConfig, run: Run | None = None) -> float | None:
    """A Hydra job's body: the run (checked already where the command line checked it), its metrics for sweeps; a
    sweep job's error recorded in its directory while the sweep goes on (sweep_jobs.py)."""
    with error_boundary("deit-train"):  # a Ctrl-C or SIGTERM ends a sweep too
        try:
            # a run the command line checked keeps its config, with what the check decided (the precision)
            metrics = train(cfg, job=HydraConfig.get()).metrics if run is None else run.execute().metrics
        except Exception as error:
            if not in_sweep() or debugging():
                raise
            return record_failure(error, Path(cfg.paths.output_dir), cfg.task.optimized_mode)
    if in_sweep():
        clear_failure(Path(cfg.paths.output_dir))
    # The value sweeps optimise (hparams_search's direction follows task.optimized_mode).
    return metrics.get(cfg.task.optimized_metric)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra's entry for sweeps (-m) and its own flags: each job a run, checked in its job."""
    return run_job(cfg)
