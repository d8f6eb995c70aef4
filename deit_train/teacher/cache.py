"""Teacher outputs on the exact views the student sees, computed once and reused across runs (teacher.cache=DIR).

Precomputed teacher labels on fixed crops (FKD, Shen & Xing 2022) save the teacher's cost but teach the student
on views it never sees; Beyer et al. 2022 show distillation wants the teacher on exactly the student's view, Mixup
included. Training views are reproducible (data/views.py), so the teacher's output on every training batch is a
function of the configuration, and can be stored the first time and read afterwards.

Layout: DIR/<fingerprint>/epochNNNN-rankR-batchesB.safetensors, one file per epoch, rank and batch count (a run
limited to fewer batches keeps its own), written when the epoch's last batch is done (to a temporary name, then
renamed: a crash or a half-written file is never read as complete). The fingerprint hashes everything that decides
the teacher's input and output (fingerprint_inputs). Each file carries its fingerprint, batch count and a SHA-256 of
its tensors, and each batch the hash of its view keys, so a corrupt, truncated or foreign file is recomputed with a
warning, never served. Runs of a sweep may share DIR.

What is stored per sample (bytes per sample per epoch):
  hard            the teacher's argmax: int16 (2 B; int32 past 32767 classes)
  soft, full      the logits in fp16 (2 x classes B: 2,000 B for 1000 classes)
  soft, top-k     the k largest logits in fp16, their class indices in int16, and logsumexp(logits / tau) in
                  fp32 (4k + 4 B: 44 B for k = 10); the remaining probability mass is spread evenly over the
                  other classes.
A soft run with a cache trains on the stored (fp16 or top-k) teacher, the first run included, so the run that
fills the cache and the runs that read it are identical.
"""

import hashlib
import importlib.metadata
import json
import logging
import os
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from deit_train.data import noise
from deit_train.data.sources.base import DataSource
from deit_train.errors import DeitTrainError, StorageError
from deit_train.run_dir import writable
from deit_train.teacher.network import member_img_sizes, teacher_members

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: views keyed by their uint8 pixels and erasing draw (data/pixels.py)
FULL_LOGITS_UP_TO = 100  # classes; beyond, soft outputs are stored as top-k unless teacher.cache_topk says
VERSIONS_THAT_SHAPE_VIEWS = ("torch", "torchvision", "timm", "pillow")


@dataclass(frozen=True)
class Encoding:
    """How teacher logits are stored and turned back into logits for the loss."""

    distillation_type: str  # hard | soft
    num_classes: int
    topk: int | None = None  # soft only; None: full logits
    tau: float = 1.0  # soft top-k only: the temperature at which the rest of the mass is spread

    @classmethod
    def choose(cls, distillation_type: str, num_classes: int, topk: int | None, tau: float) -> "Encoding":
        if distillation_type == "hard":
            return cls("hard", num_classes)
        if topk is None:
            topk = None if num_classes <= FULL_LOGITS_UP_TO else 10
        if topk is not None and not 0 < topk < num_classes:  # teacher.cache_topk=0: full logits
            topk = None
        return cls("soft", num_classes, topk, tau if topk is not None else 1.0)

    def encode(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = logits.detach().float()
        if self.distillation_type == "hard":
            dtype = torch.int16 if self.num_classes <= torch.iinfo(torch.int16).max else torch.int32
            return {"labels": logits.argmax(dim=1).to(dtype)}
        if self.topk is None:
            return {"logits": logits.half()}
        values, indices = logits.topk(self.topk, dim=1)
        return {
            "values": values.half(),
            "indices": indices.to(torch.int16 if self.num_classes <= 32767 else torch.int32),
            "logsumexp": torch.logsumexp(logits / self.tau, dim=1),
        }

    def decode(self, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits the loss reads as the teacher's: the same argmax (hard), the same distribution at tau (soft), on
        the device the stored outputs are on."""
        if self.distillation_type == "hard":
            labels = stored["labels"].long()[:, None]  # one-hot by scatter: F.one_hot checks the range (a host sync)
            return torch.zeros(len(labels), self.num_classes, device=labels.device).scatter_(1, labels, 1.0)
        if self.topk is None:
            return stored["logits"].float()
        top_probs = torch.exp(stored["values"].float() / self.tau - stored["logsumexp"][:, None])
        rest = (1 - top_probs.sum(dim=1, keepdim=True)).clamp_min(1e-12) / (self.num_classes - self.topk)
        probs = rest.expand(-1, self.num_classes).clone()
        probs.scatter_(1, stored["indices"].long(), top_probs)
        return self.tau * probs.log()  # log_softmax(this / tau) = log(probs): the loss sees `probs`


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def samples_digest(samples: Dataset) -> str:
    """In-memory samples (a list of tuples of tensors) by their tensors."""
    return tensor_digest({f"{i}.{j}": t for i, sample in enumerate(samples) for j, t in enumerate(sample)})


def teacher_digest(members: nn.Module) -> str:
    """Everything of the teacher networks that decides their outputs: weights and buffers in the dtype they run in;
    the architecture, as the modules print (layer types, activations, norm eps) and as a transformers model's config
    says (hidden_act, layer_norm_eps, ...: config.json edited beside the same weights); and each network's input,
    its resolution and normalisation (a transformers teacher's image processor: size, mean, std, held as buffers
    that its state dict leaves out)."""
    state = members.state_dict()
    tensors = {f"state.{k}": v for k, v in state.items()}
    tensors.update({f"buffer.{k}": v for k, v in members.named_buffers() if k not in state})  # non-persistent ones
    sizes = [getattr(member, "img_size", None) for member in members.children()]
    configs = [
        module.config.to_json_string()
        for module in members.modules()
        if hasattr(getattr(module, "config", None), "to_json_string")
    ]
    architecture = hashlib.sha256(f"{members!r}\n{configs}".encode()).hexdigest()
    return f"{tensor_digest(tensors)}:{architecture}:{sizes}"


def fingerprint_inputs(settings: dict, world_size: int, data: str, teacher: nn.Module) -> dict:
    """Everything that decides the teacher's input (the views) and output on each training batch. Random erasing's
    noise is a function of the view's seed, the same on every device (data/noise.py): with erasing on, the
    generator's name is part of the views, the device is not."""
    erasing = bool(settings.get("augment", {}).get("reprob"))
    return {
        "format": CACHE_FORMAT,
        **settings,  # augment, image size, seed, batch, accumulation, precision, teacher name, encoding
        "erasing_noise": noise.GENERATOR if erasing else None,
        "world_size": world_size,
        "data": data,
        "teacher_networks": teacher_digest(teacher),
        "versions": {name: importlib.metadata.version(name) for name in VERSIONS_THAT_SHAPE_VIEWS},
    }


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as file:
        os.fsync(file.fileno())
    os.replace(tmp, path)  # concurrent writers of one sweep write the same content: the last rename wins


class TeacherCache:
    def __init__(self, directory: str | Path, inputs: dict, encoding: Encoding, rank: int) -> None:
        self.fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
        directory = Path(directory).expanduser()
        if directory.exists() and not directory.is_dir():
            raise DeitTrainError(f"teacher.cache={directory} is a file, not a folder: give a folder for the cache")
        self.root = directory / self.fingerprint
        # A cache shared read-only (filled once, then mounted so): its epochs for this run are read, the others
        # computed and not stored; a task that fills it was refused at its check (tasks/classify.py).
        self.writable = writable(self.root)
        try:
            if self.writable:
                self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(
                f"cannot make the teacher cache folder {self.root}: {error.strerror or error}; give "
                f"a writable teacher.cache"
            ) from error
        manifest = self.root / "fingerprint.json"
        if self.writable and not manifest.exists():  # what this cache is keyed by, for people
            tmp = manifest.with_name(f".fingerprint.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, manifest)
        self.encoding = encoding
        self.rank = rank
        # This epoch's file, when it is complete and valid: its outputs on the device, its batch keys on the host.
        self.stored: dict[str, torch.Tensor] | None = None
        self.stored_keys: list[int] = []
        self.computed: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}  # outputs on the device until end_epoch
        self.epoch, self.num_batches, self.served = 0, 0, 0

    def epoch_file(self, epoch: int) -> Path:
        """One file per epoch, rank and batch count: a run limited to fewer batches (limit_train_batches) keeps its
        own files beside the full epochs' instead of replacing them."""
        return self.root / f"epoch{epoch:04d}-rank{self.rank}-batches{self.num_batches}.safetensors"

    def start_epoch(self, epoch: int, num_batches: int, device: torch.device) -> None:
        """Read the epoch's file and copy its outputs to the device once: the steps then index them there, with no
        copy and no host sync per batch."""
        self.epoch, self.num_batches, self.served = epoch, num_batches, 0
        self.stored, self.stored_keys = self.read(self.epoch_file(epoch)), []
        if self.stored is not None:
            self.stored_keys = self.stored.pop("batch_keys").tolist()
            pin = device.type == "cuda"
            self.stored = {
                k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in self.stored.items()
            }
        self.computed = {}

    def read(self, path: Path) -> dict[str, torch.Tensor] | None:
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
            tensors = load_file(str(path))
            problem = None
            if metadata.get("fingerprint") != self.fingerprint:
                problem = "it belongs to another configuration"
            elif int(metadata.get("batches", -1)) != self.num_batches:
                problem = f"it holds {metadata.get('batches')} batches, this epoch has {self.num_batches}"
            elif metadata.get("sha256") != tensor_digest(tensors):
                problem = "its checksum does not match (corrupt)"
        except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as error:
            problem = f"it cannot be read (truncated or corrupt: {error})"
        if problem:
            warnings.warn(f"teacher cache {path}: {problem}; recomputing this epoch's teacher outputs", stacklevel=2)
            return None
        return tensors

    def teacher_logits(self, batch_idx: int, view_keys: torch.Tensor, compute: Callable[[], torch.Tensor]):
        """The teacher's logits for this batch: read, or computed by `compute` (and stored at the epoch's end).
        `view_keys` stay on the host (DeiTModule.transfer_batch_to_device): matching them is host work; reading
        and computing stay on the device, so a step makes no device-to-host copy."""
        key = batch_key(view_keys)
        if self.stored is not None:
            if self.stored_keys[batch_idx] == key:
                self.served += 1
                return self.encoding.decode({name: t[batch_idx] for name, t in self.stored.items()})
            warnings.warn(
                f"teacher cache {self.epoch_file(self.epoch)}: batch {batch_idx} holds other views than this run "
                f"draws (other samples, or the same samples with other pixels); recomputing from here on",
                stacklevel=2,
            )
            for earlier in range(batch_idx):  # those matched their views: keep them for the rewritten file
                outputs = {name: t[earlier] for name, t in self.stored.items()}
                self.computed[earlier] = (self.stored_keys[earlier], outputs)
            self.stored = None
        outputs = self.encoding.encode(compute())
        self.computed[batch_idx] = (key, outputs)
        return self.encoding.decode(outputs)

    def end_epoch(self) -> None:
        """Write the epoch's file if this epoch was computed in full (a run stopped mid-epoch writes nothing)."""
        log.info(
            "teacher cache, epoch %d, rank %d: %d batches read, %d computed",
            self.epoch,
            self.rank,
            self.served,
            self.num_batches - self.served,
        )
        if self.stored is not None or len(self.computed) != self.num_batches or not self.num_batches:
            return
        if not self.writable:
            self.computed = {}
            return
        order = [self.computed[i] for i in range(self.num_batches)]
        tensors = {"batch_keys": torch.tensor([key for key, _ in order], dtype=torch.int64)}
        for name in order[0][1]:  # one device-to-host copy per epoch
            tensors[name] = torch.stack([outputs[name] for _, outputs in order]).cpu()
        metadata = {
            "fingerprint": self.fingerprint,
            "batches": str(self.num_batches),
            "sha256": tensor_digest(tensors),
            "format": str(CACHE_FORMAT),
        }
        atomic_save(tensors, self.epoch_file(self.epoch), metadata)
        self.computed = {}


def batch_key(view_keys: torch.Tensor) -> int:
    """A 63-bit hash of a batch's view keys (sample, repeat, pixel checksum: data/views.py): which views, in which
    order, holding which pixels. The keys are on the host."""
    data = view_keys.detach().to(torch.int64).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1


@dataclass
class CacheSettings:
    """teacher.cache as the run configures it; opened once the trainer knows the world size and the data."""

    directory: str
    encoding: Encoding
    config: dict  # the configuration's share of the fingerprint (from_config)

    @classmethod
    def from_config(
        cls, cfg: DictConfig, num_classes: int, ensemble_tau: float | None, source: DataSource
    ) -> "CacheSettings":
        """Everything in the run config that decides the training views and the teacher's stored outputs;
        ensemble_tau: the temperature at which an ensemble averages its members (teacher.py), None for one. The data
        keys are the source's (a user's source need not list them in its yaml: its class has them)."""
        encoding = Encoding.choose(cfg.loss.distillation_type, num_classes, cfg.teacher.cache_topk, cfg.loss.tau)
        config = {
            "augment": OmegaConf.to_container(cfg.augment, resolve=True),
            "image_size": cfg.model.img_size,
            "seed": cfg.seed,
            "global_batch": source.batch_size,
            "accumulate": cfg.trainer.accumulate_grad_batches,
            "precision": str(cfg.trainer.precision),
            "skip_corrupt": source.skip_corrupt,
            "teacher": [member.name for member in teacher_members(cfg.teacher)],
            "teacher_img_size": member_img_sizes(cfg.teacher),
            "ensemble_tau": ensemble_tau,
            "encoding": asdict(encoding),
        }
        return cls(cfg.teacher.cache, encoding, config)

    def open(self, world_size: int, rank: int, data: str, networks: nn.Module, broadcast) -> TeacherCache:
        """The cache of this run: the configuration plus world size, training data, the teacher networks' weights
        (fingerprint_inputs). Rank 0 hashes the data's identity and the teacher;
        `broadcast` gives the others its result."""
        inputs = fingerprint_inputs(self.config, world_size, data, networks) if rank == 0 else None
        cache = TeacherCache(self.directory, broadcast(inputs, src=0), self.encoding, rank)
        log.info("teacher cache: %s", cache.root)
        return cache


class TeacherCacheCallback(L.Callback):
    """The cache's lifecycle in a run: opened on the teacher once the training data and world size are known, one
    file read or written per epoch and rank."""

    def __init__(self, settings: CacheSettings, teacher: nn.Module) -> None:
        self.settings = settings
        self.teacher = teacher

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The data's identity, as its source gives it (data/sources/); loaders given to fit without a data module
        # (scripts/benchmark.py): their in-memory samples.
        data = ""  # only the first rank's counts: it fingerprints, the others receive its result
        if trainer.global_rank == 0:
            module = trainer.datamodule
            data = module.identity() if module is not None else samples_digest(trainer.train_dataloader.dataset)
        self.teacher.cache = self.settings.open(
            trainer.world_size,
            trainer.global_rank,
            data,
            self.teacher.members,
            trainer.strategy.broadcast,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.teacher.cache.start_epoch(trainer.current_epoch, trainer.num_training_batches, pl_module.device)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.teacher.cache.end_epoch()
