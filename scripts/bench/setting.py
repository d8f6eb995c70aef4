"""What every row gets: a Bench (the preset, one student and its batch, the device, the in-memory batches),
which composes deit-train's config from conf/ and runs deit-train's own objects on those batches."""

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from bench.presets import Preset
from bench.timing import Run, StepTimer, TimerCallback, free_memory
from deit_train.data.sources import build_source
from deit_train.data.views import TrainingViews
from deit_train.run import build_trainer
from deit_train.tasks.classify import cache_callbacks
from deit_train.train import CONFIG_DIR, check_config


@dataclass
class Bench:
    """What a row gets: the preset, one student and its batch, the device, the in-memory batches (images, labels,
    view keys) and a scratch directory holding the random teachers' checkpoints."""

    preset: Preset
    student: str
    batch: int
    device: torch.device
    tmp: Path
    batches: list = field(default_factory=list)
    runs: int = 0  # run directories made so far

    @property
    def class_names(self) -> list[str]:
        return [str(i) for i in range(self.preset.num_classes)]

    @property
    def timed_batches(self) -> list:
        """One epoch: warm-up, timed steps, and the step whose start ends the timing."""
        return self.batches[: self.preset.warmup + self.preset.steps + 1]

    def teacher_checkpoint(self, name: str, num_classes: int | None = None) -> Path:
        """A random `name` on `num_classes` classes (default: the preset's) as .safetensors, written once."""
        num_classes = num_classes or self.preset.num_classes
        path = self.tmp / f"teacher-{name}-{num_classes}.safetensors"
        if not path.exists():
            torch.manual_seed(0)
            network = timm.create_model(name, num_classes=num_classes)
            save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
        return path

    def config(
        self, teacher: str | None = None, loss: str = "hard_distill", cache: bool = False, compile: bool = False
    ) -> DictConfig:
        """deit-train's config for this setting, composed from conf/ into a fresh run directory."""
        preset, teacher = self.preset, teacher or self.preset.teacher
        self.runs += 1
        run_dir = self.tmp / f"run{self.runs}"
        teacher_overrides = ["teacher=none"]
        if loss != "ce":
            teacher_overrides = [
                "teacher=timm",
                f"teacher.name={teacher}",
                f"teacher.checkpoint={self.teacher_checkpoint(teacher)}",
            ]
            if cache:
                teacher_overrides.append(f"teacher.cache={self.tmp / 'teacher_cache'}")
        overrides = [
            f"model={self.student}",
            f"model.img_size={preset.img_size}",
            *preset.model_overrides,
            "model.drop_path_rate=0.0",
            f"loss={loss}",
            *teacher_overrides,
            "augment=none",
            "data=demo",  # the checks' and the data module's source; the timed steps read the in-memory batches
            f"data.batch_size={self.batch}",
            f"compile={compile}",
            f"trainer.accelerator={'gpu' if self.device.type == 'cuda' else 'cpu'}",
            "trainer.devices=1",
            f"trainer.precision={preset.precision}",
            "trainer.max_epochs=1",
            # one log step (and divergence check) in the timed steps; the app's default is every 50 steps
            f"trainer.log_every_n_steps={preset.steps}",
            "+trainer.limit_val_batches=0",  # in-memory training batches only
            "+trainer.enable_model_summary=false",  # printed once before the first step: no cost to a step
            f"paths.output_dir={run_dir}",
            f"paths.cache_dir={self.tmp}",
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=overrides)

    def deit_train(self, cfg: DictConfig) -> Run:
        """deit-train's own objects on the in-memory batches: the task's module, the trainer with the callbacks and
        loggers of the config groups (into cfg's run directory, removed afterwards) and the task's callbacks.

        Not train() itself, nor task.build(): both build the data module from cfg.data, and these rows feed
        the step batches already on the device. So the pieces task.build() returns are made one by one here:
        the module (Classify.build_module) and the teacher cache's callback (classify.cache_callbacks)."""
        task = check_config(cfg)  # the schema's and the task's rules, as train() checks them
        free_memory(self.device)
        torch.manual_seed(0)
        module = task.build_module(cfg, self.class_names)
        timer = StepTimer(self.preset.warmup, self.preset.steps, self.device)
        callbacks = cache_callbacks(cfg, module.teacher, module.num_classes, build_source(cfg.data))
        callbacks.append(TimerCallback(timer))
        output_dir = Path(cfg.paths.output_dir)
        trainer = build_trainer(cfg, output_dir, callbacks, module)
        try:
            trainer.fit(module, train_dataloaders=DataLoader(self.timed_batches, batch_size=None))
        finally:
            shutil.rmtree(output_dir, ignore_errors=True)
        return Run(self.preset.steps * self.batch / timer.seconds, timer.peak_mib, timer.warmup_seconds)


def make_batches(preset: Preset, batch: int, device: torch.device, count: int) -> list:
    """`count` training batches (data/views.py TrainingViews: images and labels on the device, view keys on the host
    as the app's loader gives them); the images cycle through 4 distinct tensors to bound memory, the labels and view
    keys are each step's own (the teacher cache keys batches by them)."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, 3, preset.img_size, preset.img_size)
    images = [torch.randn(shape, generator=generator).to(device) for _ in range(min(4, count))]
    batches = []
    for step in range(count):
        labels = torch.randint(0, preset.num_classes, (batch,), generator=generator).to(device)
        ids = torch.arange(batch) + step * batch
        # on the host, as the app's loader gives them
        view_keys = torch.stack([ids, torch.zeros_like(ids), ids % len(images)], 1)
        batches.append(TrainingViews(images[step % len(images)], labels, view_keys))
    return batches
