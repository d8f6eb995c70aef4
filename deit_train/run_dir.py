"""The run directory's one owner (NeMo's exp_manager, in small): who may write into it, what a run resumes from,
which changes a resumed run accepts, and the files it writes besides the trainer's.

- A lock (`.deit-train.lock`, an flock held by the run's first process) makes a second run into a busy directory
  fail in one line naming the other process. The kernel releases the lock of a killed run, so a stale lock is
  simply taken over (and the log says whose it was).
- Hydra's own `.hydra/` files are written here, once the lock is held and the config passed its checks
  (hydra.output_subdir is null in conf/hydra/default.yaml), so a refused run changes nothing of an earlier one.
- Nothing finished is ever overwritten: a directory holding an earlier run's results (any checkpoint, metrics.json,
  a log with values) is only continued from a checkpoint whose config matches, or refused in one line naming the
  fix; never trained again from scratch in place (refuse_overwrite).
- `resume=true` continues from checkpoints/last.ckpt; on a finished run whose config matches it says so and
  changes nothing. The new config is compared with the checkpoint's: what changes what is trained is refused with
  the list of differences, what may change (RESUMABLE_CHANGES) is applied and logged.
- A run that fails before it trained anything removes what it created there, and nothing else (RunDirectory).
"""

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from deit_train.cluster import requeued_checkpoint, slurm_restart_count
from deit_train.errors import DeitTrainError, RunDirectoryBusy, StorageError

log = logging.getLogger("deit_train")

LOCK_NAME = ".deit-train.lock"

# The config's keys sorted once by what a change does to a run that resumes (check_resume). A key ending in "." is a
# prefix. Any key in neither tuple nor the data source's reading_keys changes what is trained (architecture, classes,
# data content, views, loss, seed, the optimizer itself, the EMA) and is refused on resume, with the differences.
#
# | kind                         | on resume            | keys                                                     |
# |------------------------------|----------------------|----------------------------------------------------------|
# | the schedule and optimizer's | applied, logged      | max_epochs, lr, lr_batch_ref, weight_decay, warm-up,     |
# | hyper-parameters             | (tasks/module.py)    | min_lr, gradient clipping                                |
# | how the run runs             | accepted             | devices, precision, logging, checks' switches, paths,    |
# |                              |                      | starting weights; the data's reading_keys (its source's: |
# |                              |                      | workers, limits, a folder moved; data/sources/base.py)   |
# | what is trained              | refused              | everything else                                          |
APPLIED_ON_RESUME = (
    "trainer.max_epochs",  # train longer (or stop sooner): the schedule is the new one's (logged)
    "optim.lr",
    "optim.lr_batch_ref",
    "optim.weight_decay",
    "optim.warmup_epochs",
    "optim.warmup_lr",
    "optim.min_lr",
    "trainer.gradient_clip_val",  # the advice after a divergence
)
HOW_IT_RUNS = (
    "trainer.precision",  # the advice after a divergence
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.accelerator",
    "trainer.sync_batchnorm",
    "trainer.log_every_n_steps",
    "trainer.check_val_every_n_epoch",
    "trainer.limit_",
    "trainer.enable_",
    "trainer.profiler",
    "trainer.plugins",
    "trainer.default_root_dir",
    "trainer.num_sanity_val_steps",
    "trainer.deterministic",
    "trainer.benchmark",
    "model.init",  # starting weights: a resumed run has its own
    "model.init_unchecked_order",
    "model.init_class_map",
    "model.pretrained",
    "teacher.pretrained",
    "teacher.unchecked_order",  # a check's switch
    "teacher.keep_for_metrics",
    "teacher.cache",
    "compile",
    "logger.",
    "callbacks.",
    "paths.",
    "debug",
    "resume",
    "ckpt_path",
    "required",
)
RESUMABLE_CHANGES = APPLIED_ON_RESUME + HOW_IT_RUNS


def is_launch_leader() -> bool:
    """Whether this process is the run's first (global rank 0), known from the launcher's variables before the
    trainer starts: torchrun's RANK, Slurm's SLURM_PROCID, Lightning's NODE_RANK / LOCAL_RANK for the processes it
    starts itself."""
    if "RANK" in os.environ:
        return os.environ["RANK"] == "0"
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return os.environ.get("SLURM_PROCID", "0") == "0"
    return os.environ.get("NODE_RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


class RunLock:
    """An exclusive flock on DIR/.deit-train.lock, holding the owner's pid, host and start time."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self.owner(file)
            file.close()
            raise busy(self.path.parent, owner) from None
        except OSError as error:
            file.close()
            raise no_locks(self.path.parent, error) from None
        previous = self.owner(file)
        if previous:
            log.info("run directory: took over the lock of a run that ended without releasing it (%s)", previous)
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        self.file = file

    @staticmethod
    def owner(file) -> str:
        file.seek(0)
        return file.read().strip()

    def release(self) -> None:
        if self.file is not None:
            self.file.seek(0)
            self.file.truncate()
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None

    def check_free(self) -> None:
        """Refuse at once when another run holds the lock (the console script, before Hydra writes anything);
        writes nothing."""
        if not self.path.is_file():
            return
        with open(self.path) as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise busy(self.path.parent, self.owner(file)) from None
            except OSError as error:
                raise no_locks(self.path.parent, error) from None
            fcntl.flock(file, fcntl.LOCK_UN)


def busy(directory: Path, owner: str) -> RunDirectoryBusy:
    return RunDirectoryBusy(
        f"{directory} is in use by another deit-train run ({owner}). Wait for it to end, or "
        f"give this run its own directory (hydra.run.dir=...)"
    )


def no_locks(directory: Path, error: OSError) -> DeitTrainError:
    """A filesystem mounted without flock (NFS without lockd, Lustre without -o flock) answers ENOSYS, ENOLCK or
    EOPNOTSUPP: without a lock two runs could write one directory, so the run is refused, naming what works."""
    return DeitTrainError(
        f"{directory}: its filesystem does not support file locks ({error.strerror}), which keep two runs out of one "
        f"directory. Put the run directory on a filesystem that has them (hydra.run.dir=..., e.g. on local disk or "
        f"a Lustre mount with -o flock)"
    )


def last_checkpoint(output_dir: Path) -> Path:
    return output_dir / "checkpoints" / "last.ckpt"


def resume_from(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint to continue from: ckpt_path, or this run's last.ckpt if there is one and resume=true or Slurm
    requeued the job (which runs again in the same directory)."""
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path).expanduser()
        if not path.is_file():
            what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
            raise DeitTrainError(
                f"ckpt_path={cfg.ckpt_path} {what}: pass a deit-train .ckpt (e.g. <run>/checkpoints/last.ckpt)"
            )
        return str(path)
    if requeued := requeued_checkpoint(output_dir):
        return requeued
    last = last_checkpoint(output_dir)
    if cfg.resume and last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    if cfg.resume:
        log.info("resume=true but %s does not exist yet: starting from scratch", last)
    return None


def check_writable(output_dir: Path, key: str = "hydra.run.dir") -> None:
    """A folder the run will write (the run directory before Hydra makes it, teacher.cache), or the folder it will
    be made in, can be written."""
    existing = nearest_existing(output_dir)
    if not existing.is_dir():
        raise DeitTrainError(f"{key}={output_dir}: {existing} is a file, not a folder; choose another path")
    if not writable(output_dir):
        raise StorageError(
            f"{key}={output_dir}: {existing} cannot be written (read-only or no permission); choose a writable path"
        )


def nearest_existing(path: Path) -> Path:
    """path, or the nearest of its parents that exists: where making it would start."""
    return next(p for p in (path, *path.parents) if p.exists())


def writable(folder: Path) -> bool:
    """Whether folder can be written, or made and then written (its nearest existing parent can be)."""
    return os.access(nearest_existing(folder), os.W_OK | os.X_OK)


def earlier_results(output_dir: Path) -> list[Path]:
    """What an earlier run left in output_dir that a new start would overwrite or mix with its own: any checkpoint,
    metrics.json, a CSV or TensorBoard log holding logged values. (.hydra/, train.log, the lock and a sweep job's
    failed.json are not results: they are rewritten by every start.)"""
    checkpoints = output_dir / "checkpoints"
    found = (
        sorted(p for p in checkpoints.rglob("*") if p.is_file() and not p.name.startswith("."))
        if (checkpoints.is_dir())
        else []
    )
    if (output_dir / "metrics.json").is_file():
        found.append(output_dir / "metrics.json")
    found += [p for p in sorted(output_dir.glob("csv/version_*/metrics.csv")) if csv_has_rows(p)]
    found += [p for p in sorted(output_dir.glob("tensorboard/version_*/events.out.tfevents.*")) if has_scalars(p)]
    return found


def csv_has_rows(path: Path) -> bool:
    """A CSV logger's metrics.csv holding a logged value (more than its header)."""
    with open(path, "rb") as file:
        return len([line for line, _ in zip(file, range(2), strict=False) if line.strip()]) > 1


def has_scalars(event_file: Path) -> bool:
    """A TensorBoard event file holding a logged scalar (Lightning's hp_metric placeholder aside); a file that
    cannot be read counts as holding one (never assume a log is empty)."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        for event in EventFileLoader(str(event_file)).Load():
            if event.HasField("summary") and any(v.tag != "hp_metric" for v in event.summary.value):
                return True
        return False
    except Exception:  # noqa: BLE001 (no tensorboard, or a damaged file: treat it as results)
        return event_file.stat().st_size > 0


def shown(paths: list[Path], output_dir: Path) -> str:
    """The files as a user finds them: checkpoints and metrics.json by name, logs by their path in the run."""
    near = (output_dir, output_dir / "checkpoints")
    return ", ".join(p.name if p.parent in near else str(p.relative_to(output_dir)) for p in paths)


def refuse_overwrite(cfg: DictConfig, output_dir: Path) -> None:
    """Nothing finished is ever overwritten: a directory holding an earlier run's results (earlier_results) is only
    continued from a checkpoint whose config matches (check_resume), never trained again from scratch in place.
    - resume=true (or a Slurm requeue) continues from its checkpoints/last.ckpt (compared in train());
    - ckpt_path=... continues from that checkpoint, if the directory's own run has the same config;
    - anything else is refused, naming the files and the fix (its best.ckpt as ckpt_path, or a new directory).
    A new or empty directory may start fresh, resume=true or not."""
    held = earlier_results(output_dir)
    if not held:
        return
    last, names = last_checkpoint(output_dir), shown(held, output_dir)
    own_checkpoints = [p for p in held if p.parent == output_dir / "checkpoints"]
    requeued = slurm_restart_count() > 0
    if cfg.ckpt_path:
        check_directory_matches(cfg, output_dir, own_checkpoints, names)
        return
    if last.is_file() and (cfg.resume or requeued):
        return
    if last.is_file():
        raise DeitTrainError(
            f"{output_dir} holds an earlier run ({names}), which a new run would overwrite: "
            f"resume=true continues it, or give this run its own directory (hydra.run.dir=...)"
        )
    if all(p.parent.parent.name in ("csv", "tensorboard") for p in held):
        # Logs and no checkpoint: a start stopped (Ctrl-C, SIGKILL, the OOM killer, a requeue, a full disk) before
        # its first epoch ended. Nothing trained is lost by starting again; the loggers write a new version.
        log.info("%s holds logs of a start that saved no checkpoint (%s): starting it again", output_dir, names)
        return
    starting = "resume=true" if cfg.resume else "a new run"
    if own_checkpoints:
        pick = next((p for p in own_checkpoints if p.name == "best.ckpt"), own_checkpoints[-1])
        fix = f"continue it from its {pick.name} with ckpt_path={pick}"
    else:
        fix = "it has no checkpoint to continue from; remove those files to start it again there"
    raise DeitTrainError(
        f"{output_dir} holds an earlier run ({names}) but no checkpoints/last.ckpt; {starting} "
        f"would train it again from scratch over them: {fix}, or give this run its own directory "
        f"(hydra.run.dir=...)"
    )


def check_directory_matches(cfg: DictConfig, output_dir: Path, own_checkpoints: list[Path], names: str) -> None:
    """ckpt_path=... into a directory holding results: its own run must be the one continued (the same config,
    check_resume). Its own checkpoint as ckpt_path is compared by train() itself."""
    wanted = Path(cfg.ckpt_path).expanduser().resolve()
    if any(p.resolve() == wanted for p in own_checkpoints):
        return
    if not own_checkpoints:
        raise DeitTrainError(
            f"{output_dir} holds an earlier run ({names}) and no checkpoint of its own; continuing "
            f"ckpt_path={cfg.ckpt_path} there would overwrite it: give this run its own directory "
            f"(hydra.run.dir=...)"
        )
    from deit_train.models.checkpoints import read_run_checkpoint

    last = last_checkpoint(output_dir)
    stored = read_run_checkpoint(last if last in own_checkpoints else own_checkpoints[0], "resume=true")
    check_resume(cfg, stored.config, None, None, log_changes=False, stored_files=stored.weights_files)


def finished_metrics(cfg: DictConfig, output_dir: Path) -> dict | None:
    """The results of this directory's finished run, when resume=true has nothing left to do: its metrics.json
    exists and its last checkpoint ended the last of trainer.max_epochs. The config is compared first, as a resume
    would: a finished run asked to go on with another seed (say) is refused, not reported as finished."""
    metrics, last = output_dir / "metrics.json", last_checkpoint(output_dir)
    if not (cfg.resume and not cfg.ckpt_path and metrics.is_file() and last.is_file()):
        return None
    from deit_train.models.checkpoints import read_run_checkpoint

    stored = read_run_checkpoint(last, "resume=true")
    if stored.epoch is None or stored.epoch + 1 < cfg.trainer.max_epochs:
        return None
    check_resume(cfg, stored.config, None, None, log_changes=False, stored_files=stored.weights_files)
    from deit_train.metric_units import last_epoch_metrics

    return last_epoch_metrics(json.loads(metrics.read_text()))


def flatten(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        items = {}
        for key, value in node.items():
            items.update(flatten(value, f"{prefix}{key}."))
        return items or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def reading_keys(cfg: DictConfig) -> tuple[str, ...]:
    """The data keys a resume may change: those the source data._target_ names (DataSource.reading_keys)."""
    from deit_train.data.sources.base import DataSource
    from deit_train.targets import locate_class

    source = locate_class(OmegaConf.select(cfg, "data._target_", default=""))
    if source is None or not issubclass(source, DataSource):  # no source: build_source names the problem
        return ()
    return tuple(f"data.{key}" for key in source.reading_keys)


def check_resume(
    cfg: DictConfig,
    stored_config: dict | None,
    stored_classes: list[str] | None,
    class_names: list[str] | None,
    log_changes: bool = True,
    stored_files: dict[str, str] | None = None,
) -> None:
    """Refuse a resume whose config changes what is trained; log the changes it applies (log_changes). A weights
    file named at another path (model.init, teacher.checkpoint, a member's) is the same when its bytes are those the
    run recorded (stored_files: weights_files at the run's start): moved storage is no change."""
    if stored_classes is not None and class_names is not None and list(stored_classes) != list(class_names):
        raise DeitTrainError(
            f"resume: the data's classes ({len(class_names)}: {class_names[:4]}...) are not the checkpoint's "
            f"({len(stored_classes)}: {list(stored_classes)[:4]}...): the heads would read the wrong labels. Resume "
            f"on the same data, or start a new run from it with model.init=<checkpoint> (heads reset)"
        )
    if not stored_config:
        return
    new, old = flatten(OmegaConf.to_container(cfg, resolve=True)), flatten(stored_config)
    changed = sorted(key for key in new.keys() & old.keys() if new[key] != old[key])
    changed += sorted((new.keys() ^ old.keys()) - {""})
    resumable = [key for key in changed if key.startswith(RESUMABLE_CHANGES + reading_keys(cfg))]
    refused = [key for key in changed if key not in resumable]
    moved = [key for key in refused if key in (stored_files or {}) and file_digest(new.get(key)) == stored_files[key]]
    refused = [key for key in refused if key not in moved]
    for key in moved if log_changes else []:
        log.info("resume: %s moved %s -> %s, the same bytes (applied)", key, old.get(key), new.get(key))
    if refused:
        listed = ", ".join(f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}" for key in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise DeitTrainError(
            f"resume: {len(refused)} change(s) to what the run trains: {listed}{more}. Resume with the run's own "
            f"values (they are in its .hydra/config.yaml), or start a new run from its weights with "
            f"model.init=<checkpoint>. Changes a resumed run accepts: max_epochs, the learning rate and its schedule, "
            f"weight decay, clipping, precision, devices, workers, loggers and callbacks"
        )
    for key in resumable if log_changes else []:
        if key.startswith(APPLIED_ON_RESUME) or key.startswith(("trainer.precision", "trainer.devices", "data.")):
            log.info("resume: %s changed %s -> %s (applied)", key, old.get(key, "(unset)"), new.get(key, "(unset)"))


WEIGHTS_FILE_KEYS = re.compile(r"(model\.init|teacher\.checkpoint|teacher\.members\.\d+\.checkpoint)")


def weights_files(config: dict) -> dict[str, str]:
    """The sha256 of each local weights file a run config names (model.init, teacher.checkpoint, each member's), by
    key: what a resume compares where a path changed (check_resume). Folders and Hub ids are compared by name."""
    flat = flatten(config)
    return {
        key: digest
        for key, value in flat.items()
        if WEIGHTS_FILE_KEYS.fullmatch(key) and (digest := file_digest(value))
    }


def file_digest(value: object) -> str | None:
    """The sha256 of the file `value` names; None for anything else (unset, a folder, a Hub id, unreadable)."""
    if not isinstance(value, str) or not value:
        return None
    path = Path(value).expanduser()
    try:
        if not path.is_file():
            return None
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError:
        return None


def write_config(cfg: DictConfig, output_dir: Path) -> None:
    """The composed config and the overrides, where Hydra would have written them (.hydra/)."""
    if not HydraConfig.initialized():
        return
    hydra_dir = output_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    hydra = HydraConfig.get()
    for name, node in (
        ("config.yaml", cfg),
        ("hydra.yaml", OmegaConf.create({"hydra": hydra})),
        ("overrides.yaml", hydra.overrides.task),
    ):
        staging = hydra_dir / f".{name}.tmp"
        staging.write_text(OmegaConf.to_yaml(node))
        staging.replace(hydra_dir / name)


def write_metrics(metrics: dict, output_dir: Path) -> None:
    """metrics.json (results.py: metrics_record)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / ".metrics.json.tmp"
    staging.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    staging.replace(output_dir / "metrics.json")


class RunDirectory:
    """The run directory's one owner for a run (the module docstring): asked before anything is written (check),
    then claimed by the run's first process (claim), written through (config, metrics) and released. What this run
    created in it is recorded when it is claimed, and a run that fails before training removes that and nothing
    else: a directory that existed keeps every file it held (a user's notes, the job's own slurm-<id>.log)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock = RunLock(self.path)
        self.existed: set[Path] | None = None  # what was there when the run claimed it; None: not claimed

    def check(self, cfg: DictConfig) -> dict | None:
        """Before anything is written (the command line): a finished run's metrics when resume=true has nothing
        left to do, else None once the directory can take this run (free, nothing of an earlier run overwritten,
        writable: checked only where something will be written)."""
        self.record_what_exists()
        if (finished := finished_metrics(cfg, self.path)) is not None:
            return finished
        check_writable(self.path)
        self.lock.check_free()
        refuse_overwrite(cfg, self.path)
        return None

    def make(self) -> None:
        """The directory itself (Hydra's job would make it): a path that cannot be made (a read-only or pseudo
        filesystem) is refused naming hydra.run.dir."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DeitTrainError(
                f"hydra.run.dir={self.path} cannot be made ({error.strerror}): choose a writable path"
            ) from error

    def claim(self, cfg: DictConfig) -> dict | None:
        """Take the directory for this run: the lock, and the earlier run's results checked (refuse_overwrite).
        Returns the metrics of a finished run that resume=true leaves as it is."""
        if self.existed is None:  # a sweep's job: Hydra made the job's directory and train.log; they stay
            self.record_what_exists()
        self.lock.acquire()
        refuse_overwrite(cfg, self.path)
        return finished_metrics(cfg, self.path)

    def record_what_exists(self) -> None:
        """What the directory holds before this run writes anything (or, where it does not exist, which of the
        folders above it do): what a failed start leaves as it found it."""
        if self.path.is_dir():
            self.existed = {self.path, *self.path.rglob("*"), *self.path.parents}
        else:
            self.existed = {p for p in self.path.parents if p.exists()}

    def release(self, trained: bool) -> None:
        """Unlock; a run that failed before it trained removes what it created, and only that."""
        self.lock.release()
        if trained or self.existed is None or not self.path.exists():
            return
        made = sorted((p for p in {*self.path.rglob("*"), self.path} if p not in self.existed), reverse=True)
        for path in made:  # deepest first: a folder after what it holds
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
        for parent in self.path.parents:  # the folders made to hold it, up to the first that existed
            if parent in self.existed or any(parent.iterdir()):
                break
            parent.rmdir()

    def write_config(self, cfg: DictConfig) -> None:
        write_config(cfg, self.path)

    def write_metrics(self, metrics: dict[str, float]) -> None:
        write_metrics(metrics, self.path)
