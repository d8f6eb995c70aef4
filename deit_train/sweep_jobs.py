"""A sweep's jobs (`deit-train -m ...`): every job that can finish does, and nothing says "done" when one did not.

- A job's error (a DeitTrainError or an unexpected one) is written to its directory as `failed.json` (the one-line
  message, the exit status it would have ended a single run with, the job's number and overrides), logged in one
  line, and the sweep goes on with the next job (record_failure). A failed job writes no metrics.json, so it never
  looks finished. A Ctrl-C or SIGTERM still ends the sweep.
- At the end, one line says how many jobs failed and which (by their overrides), and the sweep exits with the first
  failed job's status (SweepSummary.on_multirun_end; Hydra's callbacks are in conf/hydra/default.yaml). A search
  none of whose trials finished leaves no best parameters (Optuna's would be a failed trial's).
- A sweep into a directory that holds an earlier sweep (its multirun.yaml, a job's results or failed.json) is
  refused before anything is written there, unless it resumes (resume=true): Hydra would replace its multirun.yaml
  and each job would refuse its own directory (SweepSummary.on_multirun_start).
- The jobs a sweep was to run are its multirun.yaml's overrides, expanded as Hydra's basic sweeper does
  (expected_jobs): `deit-report` lists those that never ran as missing.
"""

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from deit_train.errors import describe_failure, end_child_processes
from deit_train.run_dir import earlier_results

log = logging.getLogger("deit_train")

FAILED_NAME = "failed.json"
OPTUNA_RESULTS = "optimization_results.yaml"  # hydra-optuna-sweeper's best parameters and value
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(error: BaseException, output_dir: Path, mode: str) -> float:
    """Log the job's error in one line and write it to the job's failed.json; returns the worst value for the
    sweep's direction (task.optimized_mode), which a sweeper takes as a trial to stay away from. (Optuna ends
    Hydra's sweep on a NaN, and on a study without one completed trial when every job returned None.) A job of a
    resumed sweep refused by its own directory's results (another seed, say) leaves them as they were and adds its
    failed.json beside them."""
    message, status = describe_failure(error)
    hydra = HydraConfig.get()
    overrides = [str(o) for o in hydra.overrides.task]
    log.error(
        "deit-train: error: sweep job %s failed (exit status %d; the sweep goes on): %s [its overrides: %s]",
        hydra.job.num,
        status,
        message,
        " ".join(overrides),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "job": hydra.job.num,
        "overrides": overrides,
        "message": message,
        "exit_status": status,
        "error": type(error).__name__,
    }
    staging = output_dir / f".{FAILED_NAME}.tmp"
    staging.write_text(json.dumps(record, indent=2) + "\n")
    staging.replace(output_dir / FAILED_NAME)
    end_child_processes()  # the failed job's data-loader workers
    return -math.inf if mode == "max" else math.inf


def clear_failure(output_dir: Path) -> None:
    """A job that finished now: an earlier try's failed.json no longer says anything true."""
    (output_dir / FAILED_NAME).unlink(missing_ok=True)


@dataclass
class Failure:
    directory: Path
    job: int | None
    overrides: list[str]
    message: str
    exit_status: int


def read_failure(directory: Path) -> Failure | None:
    """The job's failed.json, or None; a file that is not one is a failure without a message."""
    path = directory / FAILED_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return Failure(
            directory,
            record.get("job"),
            [str(o) for o in record.get("overrides") or []],
            str(record["message"]),
            int(record["exit_status"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return Failure(directory, None, [], f"{path} is not deit-train's failed.json", 1)


def failures(sweep_dir: Path) -> list[Failure]:
    found = [read_failure(path.parent) for path in sweep_dir.rglob(FAILED_NAME)]
    return sorted((f for f in found if f), key=lambda f: (f.job is None, f.job or 0, str(f.directory)))


def expected_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, as Hydra's basic sweeper expands the sweep's (None for another sweeper, e.g.
    Optuna, whose jobs are drawn as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra = config.hydra
    if OmegaConf.select(hydra, "sweeper._target_") != BASIC_SWEEPER:
        return None
    # as Hydra reads them: unresolved (an override may be an interpolation, e.g. +x=${loss.alpha})
    params = OmegaConf.to_container(OmegaConf.select(hydra, "sweeper.params") or OmegaConf.create(), resolve=False)
    task = OmegaConf.to_container(hydra.overrides.task, resolve=False)
    arguments = [f"{key}={value}" for key, value in params.items()] + [str(o) for o in task]
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def earlier_sweep(sweep_dir: Path) -> list[str]:
    """What an earlier sweep left in sweep_dir: its multirun.yaml, job directories with results or failed.json."""
    if not sweep_dir.is_dir():
        return []
    held = ["multirun.yaml"] if (sweep_dir / "multirun.yaml").is_file() else []
    held += [f"a run's {path.name}" for path in earlier_results(sweep_dir)]  # a run directory given as a sweep's
    jobs = {
        p.parent for marker in (".hydra", "checkpoints", "metrics.json", FAILED_NAME) for p in sweep_dir.rglob(marker)
    }
    held += [
        str(job.relative_to(sweep_dir))
        for job in sorted(jobs)
        if job != sweep_dir and (earlier_results(job) or (job / FAILED_NAME).is_file())
    ]
    return held


def end_sweep(message: str, status: int) -> None:
    """One line and the exit status, from the sweep's own process. (Not errors.fail: the launcher's worker processes,
    joblib's, are its children and end with it; and Hydra turns a callback's exceptions into warnings, never
    SystemExit.)"""
    print(f"deit-train: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def check_jobs(config: DictConfig) -> None:
    """Each job of a basic sweep checked by the config's own rules (Run.check_config: the schema's, the source's
    keys, the task's) before the first starts, composed as Hydra composes the job (its ${hydra:job.num} and output
    directory). A sweep none of whose jobs could run (+trainer.max_epoch=3 in all, a key Hydra cannot compose) is
    refused in one line with nothing written, where each job found it after a Slurm queue; one some of whose jobs
    are refused (a grid with combinations the rules refuse) runs the others, and says which will fail first. The
    rules that read data or hardware stay with each job, which runs them where it runs."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf import open_dict, read_write
    from omegaconf.errors import OmegaConfBaseException

    from deit_train.config import job_config, one_line
    from deit_train.errors import DeitTrainError
    from deit_train.run import Run

    jobs = expected_jobs(config) or []
    if len(jobs) > 50:
        log.info("checking the configs of the sweep's %d jobs before the first starts", len(jobs))
    refused, sweep_hydra = {}, HydraConfig.instance().cfg  # unset until Hydra runs a job
    try:
        for number, overrides in enumerate(jobs):
            try:
                job = compose(config.hydra.job.config_name, overrides, return_hydra_config=True)
                with read_write(job), open_dict(job):  # as Hydra's run_job sets them for job `number`
                    job.hydra.job.num = number
                    job.hydra.run.dir = str(Path(str(job.hydra.sweep.dir)) / str(job.hydra.sweep.subdir))
                    job.hydra.runtime.output_dir = job.hydra.run.dir
                HydraConfig.instance().set_config(job)
                Run(job_config(job), job=job.hydra).check_config()
            except DeitTrainError as error:
                refused[number] = f"sweep job {number} ({' '.join(overrides)}): {' '.join(str(error).split())}"
            except (HydraException, OmegaConfBaseException) as error:
                refused[number] = f"sweep job {number} ({' '.join(overrides)}): {one_line(error)}"
    finally:
        HydraConfig.instance().cfg = sweep_hydra  # as it was (Hydra's run_job restores it so too)
    if jobs and len(refused) == len(jobs):
        end_sweep(f"no job of the sweep can run; {refused[0]}. No job was started", 2)
    for line in refused.values():
        log.warning("deit-train: %s; it will fail, and the other jobs run", line)


class SweepSummary(Callback):
    """Refuses a sweep into an earlier sweep's directory, or one of whose jobs the config's rules refuse, before
    Hydra writes there; ends a sweep with one line and a non-zero exit status when a job failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        check_jobs(config)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            held = earlier_sweep(sweep_dir)
        except OSError as error:
            end_sweep(f"hydra.sweep.dir={sweep_dir} cannot be read ({error.strerror}): choose another folder", 2)
        if held and not (config.get("resume") or config.get("ckpt_path")):  # resuming: each job checks its own
            shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
            end_sweep(
                f"hydra.sweep.dir={sweep_dir} holds an earlier sweep ({shown}), which this sweep would "
                f"overwrite: resume=true continues its jobs, or give this sweep its own directory "
                f"(hydra.sweep.dir=...)",
                2,
            )

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            failed = failures(sweep_dir) if sweep_dir.is_dir() else []
            jobs = expected_jobs(config)
        except Exception as error:  # noqa: BLE001 (Hydra would turn it into a warning and exit 0)
            end_sweep(
                f"the sweep ended but its jobs' records in {sweep_dir} could not be read ({error}): "
                f"deit-report {sweep_dir} shows what finished",
                1,
            )
        total = (
            len(jobs)
            if jobs is not None
            else len({p.parent for p in sweep_dir.rglob(".hydra")} | {f.directory for f in failed})
        )
        if not failed:
            log.info("sweep: all %d jobs finished (%s)", total, sweep_dir)
            return
        common = set.intersection(*(set(job) for job in jobs)) if len(jobs or []) > 1 else set()  # one job: all
        listed = "; ".join(
            f"{f.directory.relative_to(sweep_dir)} ({' '.join(o for o in f.overrides if o not in common)}"
            f", exit {f.exit_status})"
            for f in failed
        )
        others = "The others finished"
        if len(failed) >= total:
            others = "None finished" + no_best_parameters(sweep_dir)
        end_sweep(
            f"{len(failed)} of {total} sweep jobs failed: {listed}. {others}; each failed job's "
            f"failed.json holds its error (deit-report {sweep_dir} lists them)",
            failed[0].exit_status,
        )


def no_best_parameters(sweep_dir: Path) -> str:
    """A search none of whose trials finished has no best parameters: Optuna's optimization_results.yaml would name
    a failed trial's (the worst value record_failure told it, best_value: -inf) and is removed; says so, else ""."""
    results = sweep_dir / OPTUNA_RESULTS
    if not results.is_file():
        return ""
    results.unlink()
    return f", so the search has no best parameters ({OPTUNA_RESULTS}, which named a failed trial's, removed)"
