"""Reproducible views and the teacher cache (teacher.cache=DIR): a run reading the cache trains exactly as one
running the teacher, and nothing stale or broken is ever served."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deit_train.data import DeiTDataModule
from deit_train.teacher import Encoding, Teacher
from deit_train.train import train

from .conftest import hard_distill_from, same, save_safetensors


def student_weights(cfg) -> dict[str, torch.Tensor]:
    state = torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.fixture
def teacher_calls(monkeypatch):
    """How often the teacher ran on training batches (the module in train mode) and on validation batches."""
    calls = {"train": 0, "val": 0}
    original = Teacher.run_networks

    def counting(self, images):
        calls["train" if torch.is_grad_enabled() else "val"] += 1  # Lightning validates without grad
        return original(self, images)

    monkeypatch.setattr(Teacher, "run_networks", counting)
    return calls


@pytest.fixture
def distill(tiny_config, random_teacher_checkpoint, tmp_path):
    """distill(*overrides, run=...): a tiny hard-distillation run with Mixup/CutMix, repeated augmentation and
    random erasing: every random choice a view has."""

    def make(*overrides, run, loss="hard_distill"):
        return tiny_config(
            f"loss={loss}",
            "teacher=timm",
            "teacher.name=resnet10t",
            f"teacher.checkpoint={random_teacher_checkpoint}",
            "teacher.unchecked_order=true",
            "augment.mixup=0.8",
            "augment.cutmix=1.0",
            "augment.repeated_aug=2",
            "augment.repeated_aug_single_process=true",  # copies in one batch: keys must still match
            "augment.reprob=0.25",
            "trainer.max_epochs=2",
            *overrides,
            run=run,
        )

    return make


def test_training_batches_are_bit_identical_whatever_the_number_of_workers(distill):
    batches = []
    for workers in (0, 2):
        cfg = distill(f"data.num_workers={workers}", run=f"w{workers}")
        datamodule = DeiTDataModule(cfg.data, cfg.augment, cfg.model.img_size, seed=cfg.seed)
        datamodule.setup()
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(1)
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) > 1
    for ours, theirs in zip(*batches, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            assert same(a, b)
    # and each view key (index, repeat) appears once: the two copies of an image are two different views
    keys = torch.cat([batch.view_keys for batch in batches[0]])  # data/views.py TrainingViews
    assert len({tuple(k.tolist()) for k in keys}) == len(keys)


@pytest.mark.parametrize("loss", ["hard_distill", "soft_distill"])
def test_a_run_reading_the_cache_trains_exactly_as_the_run_that_filled_it(distill, tmp_path, teacher_calls, loss):
    cache = f"teacher.cache={tmp_path / 'cache'}"
    filled = distill(cache, run="fill", loss=loss)
    train(filled)
    assert teacher_calls["train"] == 2 * 5  # 2 epochs of 5 batches, all computed
    read = distill(cache, "data.num_workers=2", run="read", loss=loss)
    train(read)
    assert teacher_calls["train"] == 10  # none more: every training batch came from the cache
    assert_same_weights(student_weights(filled), student_weights(read))
    if loss == "hard_distill":  # the argmax is stored exactly: the same as a run without any cache
        online = distill(run="online", loss=loss)
        train(online)
        assert_same_weights(student_weights(online), student_weights(read))


@pytest.mark.parametrize(
    "change",
    [
        "seed=1",
        "augment.reprob=0.5",
        "data.batch_size=8",
        "trainer.precision=bf16-mixed",
        "teacher.checkpoint=OTHER",
    ],
)
def test_any_fingerprint_change_recomputes(distill, tmp_path, teacher_calls, change):
    cache = tmp_path / "cache"
    train(distill(f"teacher.cache={cache}", "trainer.max_epochs=1", run="first"))
    computed = teacher_calls["train"]
    if change == "teacher.checkpoint=OTHER":
        torch.manual_seed(1)
        save_safetensors(timm.create_model("resnet10t", num_classes=10), tmp_path / "other.safetensors")
        change = f"teacher.checkpoint={tmp_path / 'other.safetensors'}"
    train(distill(f"teacher.cache={cache}", "trainer.max_epochs=1", change, run="second"))
    assert teacher_calls["train"] > computed  # the teacher ran again
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2  # under a second fingerprint


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte"])
def test_a_corrupt_or_truncated_cache_file_is_recomputed_with_a_warning(distill, tmp_path, teacher_calls, damage):
    cache = tmp_path / "cache"
    first = distill(f"teacher.cache={cache}", "trainer.max_epochs=1", run="first")
    train(first)
    (epoch_file,) = cache.glob("*/epoch0000-rank0-batches5.safetensors")
    data = bytearray(epoch_file.read_bytes())
    epoch_file.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.warns(UserWarning, match="teacher cache .*recomputing"):
        second = distill(f"teacher.cache={cache}", "trainer.max_epochs=1", run="second")
        train(second)
    assert teacher_calls["train"] == 2 * 5
    assert_same_weights(student_weights(first), student_weights(second))
    third = distill(f"teacher.cache={cache}", "trainer.max_epochs=1", run="third")
    train(third)  # the rewritten file is whole again
    assert teacher_calls["train"] == 2 * 5


def test_task_teacher_cache_fills_the_cache_for_the_students_of_a_sweep(distill, tmp_path, teacher_calls):
    cache = f"teacher.cache={tmp_path / 'cache'}"
    train(distill(cache, "task=teacher_cache", run="fill"))
    assert teacher_calls == {"train": 10, "val": 0}
    assert not (tmp_path / "fill" / "checkpoints").exists()
    for lr in ("1e-3", "2e-3"):  # two students of a sweep: only the teacher's validation passes remain
        train(distill(cache, f"optim.lr={lr}", run=f"student{lr}"))
    assert teacher_calls["train"] == 10


@pytest.mark.parametrize("classes,topk,bytes_per_sample", [(10, None, 2), (10, 0, 2 * 10), (1000, None, 4 * 10 + 4)])
def test_bytes_per_sample_as_documented(classes, topk, bytes_per_sample):
    """hard: int16 argmax; soft: fp16 logits up to 100 classes; top-10 (fp16 value, int16 index) + fp32 lse."""
    kind = "hard" if topk is None and classes == 10 else "soft"
    encoding = Encoding.choose(kind, classes, topk, tau=3.0)
    stored = encoding.encode(torch.randn(4, classes))
    assert sum(t.element_size() * t[0].numel() for t in stored.values()) == bytes_per_sample


def test_encodings_keep_what_each_loss_reads():
    logits = torch.randn(64, 1000) * 3
    hard = Encoding.choose("hard", 1000, None, 1.0)
    assert torch.equal(hard.decode(hard.encode(logits)).argmax(1), logits.argmax(1))
    full = Encoding.choose("soft", 50, None, 3.0)
    torch.testing.assert_close(full.decode(full.encode(logits[:, :50])), logits[:, :50].half().float())
    tau = 3.0
    topk = Encoding.choose("soft", 1000, 10, tau)
    decoded = F.softmax(topk.decode(topk.encode(logits)) / tau, dim=1)
    exact = F.softmax(logits / tau, dim=1)
    top = exact.topk(10, dim=1).indices
    torch.testing.assert_close(decoded.gather(1, top), exact.gather(1, top), rtol=2e-3, atol=1e-6)
    rest = torch.ones_like(exact, dtype=torch.bool).scatter_(1, top, False)
    expected_rest = (1 - exact.gather(1, top).sum(1, keepdim=True)) / 990
    torch.testing.assert_close(decoded[rest].view(64, 990), expected_rest.expand(64, 990), rtol=2e-3, atol=1e-7)
    torch.testing.assert_close(decoded.sum(1), torch.ones(64), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_two_ranks_fill_the_cache_and_two_ranks_read_it(tmp_path, cache_dir, random_teacher_checkpoint):
    from .test_cli import run_cli

    distill = [
        *hard_distill_from(random_teacher_checkpoint),
        "augment.mixup=0.8",
        "augment.cutmix=1.0",
        f"teacher.cache={tmp_path / 'cache'}",
        "trainer=ddp_cpu",
        "trainer.devices=2",
    ]
    fill = run_cli(*distill, "task=teacher_cache", "hydra.run.dir=fill", tmp_path=tmp_path, cache_dir=cache_dir)
    assert fill.returncode == 0, fill.stdout + fill.stderr
    files = sorted(p.name for p in tmp_path.glob("cache/*/epoch*"))
    assert files == ["epoch0000-rank0-batches5.safetensors", "epoch0000-rank1-batches5.safetensors"]
    read = run_cli(*distill, "hydra.run.dir=read", tmp_path=tmp_path, cache_dir=cache_dir)
    output = read.stdout + read.stderr
    assert read.returncode == 0, output
    for rank in (0, 1):  # 80 images, global batch 16: 5 batches of 8 per rank
        assert f"epoch 0, rank {rank}: 5 batches read, 0 computed" in output


HOST_READS = {"cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__"}


def host_reads(fn, host_tensors):
    """The calls in fn() that read a tensor back to the host (each a stream sync on a GPU), on tensors other than
    `host_tensors` (the view keys, which never leave the host)."""
    from torch.overrides import TorchFunctionMode

    allowed = {t.untyped_storage().data_ptr() for t in host_tensors}
    reads = []

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            first = args[0] if args else None
            moves_to_cpu = name == "to" and any(str(a) == "cpu" for a in (*args[1:], *(kwargs or {}).values()))
            if (
                (name in HOST_READS or moves_to_cpu)
                and isinstance(first, torch.Tensor)
                and first.untyped_storage().data_ptr() not in allowed
            ):
                reads.append(name)
            return func(*args, **(kwargs or {}))

    with Reads():
        result = fn()
    return result, reads


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_the_cached_step_reads_nothing_back_to_the_host(tmp_path, kind):
    """tests/test_gpu.py checks this with CUDA's sync detector; here the calls that would sync are counted: the
    step computes, stores and reads the teacher's outputs (1000 classes: soft is top-k) without any."""
    from deit_train.teacher.cache import TeacherCache

    encoding = Encoding.choose(kind, num_classes=1000, topk=None, tau=2.0)
    logits = [torch.randn(8, 1000) for _ in range(3)]
    keys = [torch.arange(24).view(8, 3) + 24 * i for i in range(3)]
    cache = TeacherCache(tmp_path, {"test": kind}, encoding, rank=0)
    results = []
    for _ in range(2):  # the run that computes, then a run that reads
        cache.start_epoch(0, num_batches=3, device=torch.device("cpu"))
        for i in range(3):
            got, reads = host_reads(lambda i=i: cache.teacher_logits(i, keys[i], lambda: logits[i]), keys)
            assert reads == [], reads
            results.append(got)
        cache.end_epoch()
    for computed, read in zip(results[:3], results[3:], strict=True):
        assert torch.equal(computed, read)


@pytest.mark.slow
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edit=st.sampled_from(["none", "pixels", "pixels", "other_root"]),
    image=st.integers(0, 79),
    value=st.integers(0, 255),
)
def test_a_run_with_the_cache_trains_as_one_without_it_whatever_was_edited(
    tiny_config, random_teacher_checkpoint, demo_data, teacher_calls, edit, image, value
):
    """The cache is filled, then the images are edited in place (same names, same sizes: a block of pixels painted),
    or the run points data.root at a copy with one image edited: the run reading the cache ends with exactly the
    weights of a run without a cache on the edited data (the edited views are taught anew: their keys hold a
    checksum of their pixels); with nothing edited, every batch is read."""
    import shutil
    import tempfile
    from pathlib import Path

    from PIL import Image

    work = Path(tempfile.mkdtemp())
    root = work / "data"
    shutil.copytree(demo_data, root)
    for path in root.rglob("*.png"):  # stored uncompressed: an edit keeps the file's size, as in the red team's case
        Image.open(path).save(path, compress_level=0)
    distill = [
        "loss=hard_distill",
        "teacher=timm",
        "teacher.name=resnet10t",
        "teacher.unchecked_order=true",
        f"teacher.checkpoint={random_teacher_checkpoint}",
        "augment.mixup=0.8",
        "augment.reprob=0.25",
        "data=imagefolder",
        "model.img_size=16",
        "data.batch_size=16",
    ]
    cache = f"teacher.cache={work / 'cache'}"

    def run(*overrides, name):
        cfg = tiny_config(*distill, *overrides, run=str(work / name), data=[])
        train(cfg)
        return student_weights(cfg)

    run(cache, f"data.root={root}", name="fill")
    if edit == "other_root":
        root = work / "copy"
        shutil.copytree(work / "data", root)
    if edit != "none":
        path = sorted((root / "train").rglob("*.png"))[image]
        size = path.stat().st_size
        picture = Image.open(path).convert("RGB")
        picture.paste((value, 255 - value, value // 2), (0, 0, 10, 10))
        picture.save(path, compress_level=0)
        assert path.stat().st_size == size
    calls = teacher_calls["train"]
    cached = run(cache, f"data.root={root}", name="cached")
    if edit == "none":
        assert teacher_calls["train"] == calls  # every batch read
    fresh = run(f"data.root={root}", name="fresh")
    assert_same_weights(cached, fresh)


def test_the_teacher_is_keyed_by_what_it_sees_not_only_its_weights():
    """A transformers teacher whose image processor changed (mean/std, size) has the same weights but other outputs:
    its normalisation and resolution are part of the cache's key."""
    from deit_train.teacher.cache import teacher_digest

    network = timm.create_model("resnet10t", num_classes=3)
    digests = set()
    for mean, size in [((0.485, 0.456, 0.406), None), ((0.5, 0.5, 0.5), None), ((0.5, 0.5, 0.5), 24)]:
        network.pretrained_cfg = {**network.pretrained_cfg, "mean": mean, "std": (0.5, 0.5, 0.5)}
        digests.add(teacher_digest(Teacher(network, img_sizes=[size]).members))
    assert len(digests) == 3


@pytest.mark.parametrize("under", ["", "sub"])
def test_a_cache_path_that_is_a_file_is_refused_before_the_run_writes_anything(distill, tmp_path, under):
    """teacher.cache naming a file, or a folder under one: one line from the config check (which deit-train runs
    before Hydra makes the run directory), and from the cache itself; it ended as a bug, then wrote the run's files."""
    from deit_train.errors import DeitTrainError
    from deit_train.teacher.cache import TeacherCache
    from deit_train.train import check_config

    (tmp_path / "file").write_text("not a folder")
    path = tmp_path / "file" / under if under else tmp_path / "file"
    with pytest.raises(DeitTrainError, match=f"teacher.cache={path}: {tmp_path / 'file'} is a file, not a folder"):
        check_config(distill(f"teacher.cache={path}", run="run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(DeitTrainError, match="is a file, not a folder"):
        TeacherCache(tmp_path / "file", {}, Encoding.choose("hard", 10, None, 1.0), rank=0)


def test_a_transformers_teacher_is_keyed_by_its_config_not_only_its_weights():
    """config.json edited beside the same weights (hidden_act, layer_norm_eps) changes the outputs: the cache's key
    changes with it (it served the old outputs)."""
    from transformers import ViTConfig, ViTForImageClassification

    from deit_train.teacher.cache import teacher_digest

    config = dict(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    torch.manual_seed(0)
    network = ViTForImageClassification(ViTConfig(**config))
    edited = ViTForImageClassification(ViTConfig(**config, hidden_act="relu", layer_norm_eps=0.1))
    edited.load_state_dict(network.state_dict())
    digests = {teacher_digest(torch.nn.ModuleList([model])) for model in (network, edited)}
    assert len(digests) == 2


def test_a_run_limited_to_fewer_batches_keeps_the_full_epochs_files(distill, tmp_path, teacher_calls):
    """A debug run with limit_train_batches into a sweep's cache keeps its own files beside the full epochs' (it
    replaced them, and the next full run computed everything again)."""
    cache = f"teacher.cache={tmp_path / 'cache'}"
    train(distill(cache, "trainer.max_epochs=1", run="full"))
    train(distill(cache, "trainer.max_epochs=1", "+trainer.limit_train_batches=2", run="limited"))
    computed = teacher_calls["train"]
    train(distill(cache, "trainer.max_epochs=1", run="again"))
    assert teacher_calls["train"] == computed  # every batch of the full epoch read
    names = sorted(p.name for p in (tmp_path / "cache").glob("*/epoch*"))
    assert names == ["epoch0000-rank0-batches2.safetensors", "epoch0000-rank0-batches5.safetensors"]


def test_the_erasing_noises_generator_not_the_device_is_part_of_the_fingerprint():
    """The erased rectangles' noise is a function of each view's seed, the same bits on every device
    (data/noise.py; tests/test_pixels.py): with erasing on, the fingerprint names the generator, so another generator
    is another cache; it names no device, so a cache filled on one GPU model or CPU serves another."""
    from deit_train.data import noise
    from deit_train.teacher.cache import fingerprint_inputs

    teacher = torch.nn.Linear(2, 2)
    for reprob, named in ((0.25, True), (0.0, False)):
        inputs = fingerprint_inputs({"augment": {"reprob": reprob}}, 1, "data", teacher)
        assert (inputs["erasing_noise"] == noise.GENERATOR) is named, reprob
        assert torch.backends.cpu.get_cpu_capability() not in json.dumps(inputs)


@pytest.fixture
def read_only_view(tmp_path):
    """read_only_view(folder): the folder bind-mounted read-only (a shared data set's storage); skipped where this
    machine cannot mount (not root, or no mount permission)."""
    import shutil
    import subprocess

    mounted = []

    def make(folder):
        view = tmp_path / f"ro-{folder.name}"
        view.mkdir()
        steps = (["mount", "--bind", str(folder), str(view)], ["mount", "-o", "remount,ro,bind", str(view)])
        for step in steps:
            if shutil.which("mount") is None or subprocess.run(step, capture_output=True).returncode != 0:
                pytest.skip("cannot bind-mount a folder read-only here")
            mounted.append(view) if step is steps[0] else None
        return view

    yield make
    for view in mounted:
        subprocess.run(["umount", "--lazy", str(view)], capture_output=True)  # files may still be mapped


def test_a_cache_on_read_only_storage_is_read_and_not_written(distill, tmp_path, teacher_calls, read_only_view, caplog):
    """A cache filled once and mounted read-only: a run on the same views reads every epoch (the teacher never runs
    on training batches) and trains as the run that filled it; another seed computes its own outputs, stores none,
    and trains. Before, any read-only teacher.cache was refused. task=teacher_cache, whose product is the cache, is
    still refused there."""
    from deit_train.errors import StorageError

    cache = tmp_path / "cache"
    filled = distill(f"teacher.cache={cache}", run="fill")
    train(filled)
    assert teacher_calls["train"] == 10
    shared = read_only_view(cache)
    files = sorted(p.relative_to(shared) for p in shared.rglob("*"))
    read = distill(f"teacher.cache={shared}", run="read")
    train(read)
    assert teacher_calls["train"] == 10 and "cannot be written: its epochs for this run are read" in caplog.text
    assert_same_weights(student_weights(filled), student_weights(read))
    train(distill(f"teacher.cache={shared}", "seed=1", run="other_seed"))
    assert teacher_calls["train"] == 20
    assert sorted(p.relative_to(shared) for p in shared.rglob("*")) == files
    with pytest.raises(StorageError, match=r"cannot be written \(read-only or no permission\)"):
        train(distill(f"teacher.cache={shared}", "task=teacher_cache", run="fill_again"))
