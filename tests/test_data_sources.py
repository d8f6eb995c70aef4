"""data=hf and data=webdataset on real files the tests write (datasets' save_to_disk and Parquet, deit-shard's shards
and webdataset's own ShardWriter): each trains, resumes, fills and reads the teacher cache, and validates exactly
under 2-process DDP; deit-shard reads back what it wrote. No network."""

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from deit_train.data import DeiTDataModule
from deit_train.data.sources import build_source
from deit_train.errors import DeitTrainError
from deit_train.models.trained_model import load_trained_model
from deit_train.tools.evaluate import evaluate, open_eval_folder
from deit_train.tools.shard import main as deit_shard
from deit_train.train import train

from .conftest import compose_config, hard_distill_from, last_epoch, same
from .test_ddp import DDP, run_ok
from .test_teacher_cache import assert_same_weights, student_weights, teacher_calls  # noqa: F401 (a fixture)

datasets = pytest.importorskip("datasets")
wds = pytest.importorskip("webdataset")


def folder_split(root: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    """The ImageFolder's files and labels in its own order (sorted by class, then file)."""
    classes = sorted(p.name for p in (root / "train").iterdir())
    files = sorted((root / split).glob("*/*"))
    return files, [classes.index(f.parent.name) for f in files], classes


@pytest.fixture(scope="module")
def hf_copies(demo_data, tmp_path_factory) -> dict[str, Path]:
    """The demo ImageFolder as a Hugging Face dataset, rows in the ImageFolder's order: save_to_disk and Parquet."""
    root = tmp_path_factory.mktemp("hf")
    splits = {}
    for split, name in (("train", "train"), ("val", "validation")):
        files, labels, classes = folder_split(demo_data, split)
        features = datasets.Features({"label": datasets.ClassLabel(names=classes), "image": datasets.Image()})
        rows = {"label": labels, "image": [{"bytes": f.read_bytes(), "path": None} for f in files]}
        splits[name] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(root / "disk"))
    (root / "parquet").mkdir()
    for name, table in splits.items():
        table.to_parquet(str(root / "parquet" / f"{name}.parquet"))
    return {"disk": root / "disk", "parquet": root / "parquet"}


@pytest.fixture(scope="module")
def shards(demo_data, tmp_path_factory) -> Path:
    """deit-shard's shards of the demo set: 80 training samples in 5 shards of 16, 40 validation in 16, 16, 8."""
    out = tmp_path_factory.mktemp("shards") / "demo"
    deit_shard([str(demo_data), str(out), "--shard-samples", "16"])
    return out


def shard_overrides(out: Path, *extra: str) -> list[str]:
    info = json.loads((out / "_info.json").read_text())
    last = {split: len(entry["filenames"]) - 1 for split, entry in info["splits"].items()}
    return [
        "data=webdataset",
        f"data.train='{out}/train-{{000000..{last['train']:06d}}}.tar'",
        f"data.val='{out}/val-{{000000..{last['val']:06d}}}.tar'",
        *extra,
    ]


@pytest.fixture(autouse=True)
def private_datasets_cache(monkeypatch, tmp_path):
    """load_dataset's Arrow cache of Parquet files in the test's folder, not the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


@pytest.fixture
def hf_cache(tmp_path) -> str:
    return f"data.cache_dir={tmp_path / 'hf_cache'}"  # load_dataset's Arrow cache of the Parquet files


@pytest.mark.parametrize("kind", ["disk", "parquet"])
def test_an_hf_dataset_trains_exactly_as_the_same_images_in_an_imagefolder(tiny_config, hf_copies, hf_cache, kind):
    """Same rows in the same order, views keyed by row: bit-identical weights and validation."""
    folder = tiny_config("augment.reprob=0.25", run="folder")
    hf = tiny_config("data=hf", f"data.dataset={hf_copies[kind]}", hf_cache, "augment.reprob=0.25", run=kind)
    folder_run, hf_run = train(folder), train(hf)
    assert hf_run.datamodule.class_names == folder_run.datamodule.class_names
    assert_same_weights(student_weights(folder), student_weights(hf))
    assert hf_run.metrics == folder_run.metrics


def test_hf_columns_splits_and_classes_come_from_the_features(tiny_config, hf_copies, demo_data):
    cfg = tiny_config("data=hf", f"data.dataset={hf_copies['disk']}")
    datamodule = DeiTDataModule(cfg.data, cfg.augment, cfg.model.img_size)
    datamodule.setup()
    assert datamodule.class_names == folder_split(demo_data, "train")[2]  # the ClassLabel's names
    assert (datamodule.val_set.image_column, datamodule.val_set.label_column) == ("image", "label")
    assert datamodule.val_set.root.endswith("[validation]")  # data.val_split=null found 'validation'
    for key, value, message in [
        ("data.val_split", "test", "has no split for data.val_split=test"),
        ("data.image_column", "pixels", "has no column pixels"),
        ("data.image_column", "label", "column 'label' holds ClassLabel.*not images"),  # the columns swapped
        ("data.label_column", "image", "column 'image' holds Image.*not class labels"),
        ("data.dataset", "/no/such/dataset", "data.dataset=/no/such/dataset"),
    ]:
        bad = tiny_config("data=hf", f"data.dataset={hf_copies['disk']}", f"{key}={value}")
        with pytest.raises(DeitTrainError, match=message):
            DeiTDataModule(bad.data, bad.augment, bad.model.img_size).setup()


def test_hf_images_decode_as_the_files_do_and_a_corrupt_row_is_named(tiny_config, hf_copies, demo_data, tmp_path):
    from deit_train.data.hf_images import HFImages
    from deit_train.data.sources.hf import open_splits

    table = open_splits(str(hf_copies["disk"]))["validation"]
    images = HFImages(table, "image", "label", "demo[validation]")
    files, labels, _ = folder_split(demo_data, "val")
    for index in (0, len(files) - 1):
        image, label = images[index]
        assert label == labels[index]
        assert image.tobytes() == Image.open(files[index]).convert("RGB").tobytes()
    broken = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not a jpeg", "path": None}], "label": [0]}, features=table.features
    )
    with pytest.raises(DeitTrainError, match=r"corrupt image broken\[0\]: not an image file"):
        HFImages(broken, "image", "label", "broken")[0]
    assert HFImages(broken, "image", "label", "broken").unreadable(full=False, max_pixels=None) == [
        ("broken[0]", "not an image file Pillow can read")
    ]


def test_a_missing_extra_is_one_line_naming_it(tiny_config, hf_copies, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    cfg = tiny_config("data=hf", f"data.dataset={hf_copies['disk']}-other")
    with pytest.raises(DeitTrainError, match=r"data=hf needs the datasets package: pip install 'deit-train\[hf\]'"):
        _ = DeiTDataModule(cfg.data, cfg.augment, cfg.model.img_size).class_names


def test_deit_shard_reads_back_the_same_images_and_labels(shards, demo_data):
    """Independently of deit-shard's own check: every shard read with tarfile, against the source files."""
    import tarfile

    info = json.loads((shards / "_info.json").read_text())
    assert info["classes"] == folder_split(demo_data, "train")[2]
    for split in ("train", "val"):
        files, labels, _ = folder_split(demo_data, split)
        entry = info["splits"][split]
        assert entry["num_samples"] == sum(entry["shard_lengths"]) == len(files)
        found = {}
        for name in entry["filenames"]:
            with tarfile.open(shards / name) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            assert len(members) == 2 * entry["shard_lengths"][entry["filenames"].index(name)]
            for member, data in members.items():
                key, ext = member.split(".", 1)
                found.setdefault(key, {})[ext] = data
        expected = {f"{split}-{i:08d}": (f.read_bytes(), labels[i]) for i, f in enumerate(files)}
        assert {key: (s["png"], int(s["cls"])) for key, s in found.items()} == expected
    train_order = [key for name in info["splits"]["train"]["filenames"] for key in tar_keys(shards / name)]
    assert train_order != sorted(train_order)  # shuffled by --seed


def test_deit_shard_writes_an_hf_dataset_as_its_rows(hf_copies, tmp_path):
    deit_shard([str(hf_copies["parquet"]), str(tmp_path / "out"), "--no-verify"])
    table = datasets.load_from_disk(str(hf_copies["disk"]))["validation"].cast_column(
        "image", datasets.Image(decode=False)
    )
    rows = {f"val-{i:08d}": (row["image"]["bytes"], row["label"]) for i, row in enumerate(table)}
    found = {
        s["__key__"]: (s["png"], int(s["cls"]))
        for s in wds.WebDataset(str(tmp_path / "out" / "val-000000.tar"), shardshuffle=False, empty_check=False)
    }
    assert found == rows


def tar_keys(path: Path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))


def test_deit_shard_resize_re_encodes_the_short_side(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "val"):
        for name, size in (("wide", (120, 60)), ("small", (20, 30))):
            (src / split / "a").mkdir(parents=True, exist_ok=True)
            (src / split / "b").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, (200, 10, 10)).save(src / split / "a" / f"{name}.png")
            Image.new("RGB", size, (10, 10, 200)).save(src / split / "b" / f"{name}.png")
    deit_shard([str(src), str(tmp_path / "out"), "--resize", "32"])
    sizes = {}
    for sample in wds.WebDataset(str(tmp_path / "out" / "val-000000.tar"), shardshuffle=False, empty_check=False):
        ext = next(k for k in sample if not k.startswith("__") and k != "cls")
        sizes[sample["__key__"]] = (ext, Image.open(io.BytesIO(sample[ext])).size)
    # files in order a/small, a/wide, b/small, b/wide: the wide ones become 64x32 JPEGs, the small stay PNGs
    assert sizes == {
        "val-00000000": ("png", (20, 30)),
        "val-00000001": ("jpg", (64, 32)),
        "val-00000002": ("png", (20, 30)),
        "val-00000003": ("jpg", (64, 32)),
    }
    with pytest.raises(SystemExit) as exit_info:
        deit_shard([str(src), str(tmp_path / "out")])  # not empty
    assert exit_info.value.code == 2


def test_deit_shard_refuses_an_unreadable_image_before_writing(tmp_path, capsys):
    src = tmp_path / "src"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (src / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(src / split / label / "x.png")
    whole = (src / "train" / "b" / "x.png").read_bytes()
    (src / "train" / "b" / "cut.png").write_bytes(whole[: len(whole) // 2])  # a valid header, half the data
    with pytest.raises(SystemExit) as exit_info:
        deit_shard([str(src), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "1 of 3 image files" in error and "cut.png" in error, error
    assert not list((tmp_path / "out").glob("*.tar"))


def streams(shards: Path, world_size: int, workers: int, batch: int = 8, epoch: int = 0, seed: int = 0, **cfg):
    """Every (rank, worker) slot's training samples of one epoch, as {slot: [(key, image, label)]}."""
    from deit_train.data.transforms import train_transform
    from tests.conftest import compose_config

    config = compose_config(["experiment=demo", "model.img_size=16", *shard_overrides(shards)], shards / "x", shards)
    for key, value in cfg.items():
        config.data[key] = value
    split = build_source(config.data).split("train", train_transform(config.augment, 16))
    out = {}
    for rank in range(world_size):
        stream = split.stream(world_size, rank, batch, workers, seed, repeats=1)
        stream.epoch = epoch
        for worker in range(workers):
            out[rank, worker] = [(int(k[0]), image, label) for image, label, k in stream.training(worker, workers)]
    return out


@pytest.fixture(scope="module")
def even_shards(demo_data, tmp_path_factory) -> Path:
    """80 training samples in 8 shards of 10: 2 for each of 2 ranks x 2 workers."""
    out = tmp_path_factory.mktemp("shards") / "even"
    deit_shard([str(demo_data), str(out), "--shard-samples", "10"])
    return out


def test_a_shard_epoch_is_fixed_reproducible_and_each_view_keyed_by_its_sample(even_shards):
    two = streams(even_shards, world_size=2, workers=2, batch=8)
    # 80 samples / 2 ranks = 40 per rank = 5 batches of 8, cut to 4 (2 per worker): 16 samples of each slot's 20
    assert {slot: len(samples) for slot, samples in two.items()} == dict.fromkeys(two, 16)
    keys = [key for samples in two.values() for key, _, _ in samples]
    assert len(set(keys)) == len(keys)  # nobody reads a sample twice within the epoch
    again = streams(even_shards, world_size=2, workers=2, batch=8)
    assert all(same(a[1], b[1]) for slot in two for a, b in zip(two[slot], again[slot], strict=True))
    other_epoch = streams(even_shards, world_size=2, workers=2, batch=8, epoch=1)
    assert [k for k, _, _ in other_epoch[0, 0]] != [k for k, _, _ in two[0, 0]]
    # One process with one worker reads all 80: each sample the 2 x 2 run read has the same view there.
    one = {key: image for key, image, _ in streams(even_shards, world_size=1, workers=1, batch=8)[0, 0]}
    assert len(one) == 80 and all(same(one[key], image) for samples in two.values() for key, image, _ in samples)


def test_the_shard_loader_keeps_its_workers_across_epochs_and_reads_each_epochs_order(even_shards):
    """The training loader's workers persist (no restart and re-import per epoch) and still read each epoch's own
    shard order: the keys of epochs 0 and 1 equal the streams read directly for those epochs."""
    from deit_train.data.shards import ShardLoader
    from deit_train.data.transforms import train_transform
    from tests.conftest import compose_config

    config = compose_config(
        ["experiment=demo", "model.img_size=16", *shard_overrides(even_shards)], even_shards / "x", even_shards
    )
    stream = (
        build_source(config.data).split("train", train_transform(config.augment, 16)).stream(1, 0, 8, 2, 0, repeats=1)
    )
    epoch = {"now": 0}
    loader = ShardLoader(stream, epoch=lambda: epoch["now"], batch_size=8, drop_last=True, num_workers=2)
    assert loader.persistent_workers
    read, pids = {}, []
    for now in (0, 1):
        epoch["now"] = now
        read[now] = [int(k) for batch in iter(loader) for k in batch.view_keys[:, 0]]  # TrainingViews, as map-style
        pids.append([worker.pid for worker in loader._iterator._workers])
    assert pids[0] == pids[1]  # the same worker processes
    for now in (0, 1):  # each worker's batches in turn, as the loader takes them
        direct = streams(even_shards, world_size=1, workers=2, batch=8, epoch=now)
        chunks = [[key for key, _, _ in direct[0, w]][i : i + 8] for w in (0, 1) for i in (0, 8, 16, 24, 32)]
        expected = [key for i in range(5) for w in (0, 1) for key in chunks[w * 5 + i]]
        assert read[now] == expected
    assert read[0] != read[1]


def test_a_slot_whose_shards_run_short_reads_them_again(shards):
    """5 shards of 16 over 4 slots: the slots with one shard (16 samples) read it again for their 20."""
    two = streams(shards, world_size=2, workers=2, batch=8)
    for samples in two.values():
        assert len(samples) == 16 and len({key for key, _, _ in samples}) == 16
    one_worker = streams(shards, world_size=2, workers=1, batch=8)  # rank 0: 3 shards (48), rank 1: 2 (32)
    distinct = {slot: len({key for key, _, _ in s}) for slot, s in one_worker.items()}
    assert [len(s) for s in one_worker.values()] == [40, 40]  # the same epoch on every rank
    assert distinct[0, 0] == 40 and 16 < distinct[1, 0] <= 32  # rank 1 reads some of its 32 twice


def test_shard_validation_reads_every_sample_once_over_ranks_and_workers(shards, demo_data):
    from deit_train.data.transforms import eval_transform
    from tests.conftest import compose_config

    config = compose_config(["experiment=demo", "model.img_size=16", *shard_overrides(shards)], shards / "x", shards)
    split = build_source(config.data).split("val", eval_transform(config.augment, 16))
    labels = []
    for rank in range(2):
        stream = split.stream(2, rank, 8, 2, 0, 1)
        for worker in range(2):
            labels += [label for _, label in stream.validation(worker, 2)]
    assert sorted(labels) == sorted(folder_split(demo_data, "val")[1])  # 40: each once


def test_a_pattern_naming_shards_that_are_not_there_names_them(shards):
    from deit_train.data.transforms import eval_transform
    from tests.conftest import compose_config

    pattern = f"data.val='{shards}/val-{{000000..000009}}.tar'"  # 3 shards were written
    config = compose_config(
        ["experiment=demo", "model.img_size=16", *shard_overrides(shards), pattern], shards / "x", shards
    )
    with pytest.raises(DeitTrainError, match="7 of its 10 shards are not files .*val-000003.tar"):
        build_source(config.data).split("val", eval_transform(config.augment, 16))


def test_too_few_shards_for_the_workers_is_one_line(shards):
    with pytest.raises(DeitTrainError, match="has 5 shard.s. for 2 device.s. x 3 data-loader worker"):
        streams(shards, world_size=2, workers=3)


def damaged_copy(shards: Path, tmp_path: Path, damage) -> Path:
    """The shards copied, with the first validation shard passed through damage(bytes) -> bytes."""
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(shards, copy)
    first = copy / "val-000000.tar"
    first.write_bytes(damage(first.read_bytes()))
    return copy


def validation_labels(shards: Path) -> list[int]:
    from deit_train.data.transforms import eval_transform
    from tests.conftest import compose_config

    config = compose_config(["experiment=demo", "model.img_size=16", *shard_overrides(shards)], shards / "x", shards)
    stream = build_source(config.data).split("val", eval_transform(config.augment, 16)).stream(1, 0, 8, 1, 0, 1)
    return [label for _, label in stream.validation(0, 1)]


def test_a_truncated_shard_or_a_label_outside_the_classes_is_named(shards, tmp_path):
    from deit_train.errors import DataError

    cut = damaged_copy(shards, tmp_path / "cut", lambda data: data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match="val-000000.tar cannot be read as a tar file .*write it again"):
        validation_labels(cut)
    import tarfile

    relabelled = damaged_copy(shards, tmp_path / "label", lambda data: data)

    with tarfile.open(relabelled / "val-000000.tar") as archive:  # rewrite the first sample's .cls as 99
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(relabelled / "val-000000.tar", "w") as archive:
        first_cls = next(m.name for m, _ in members if m.name.endswith(".cls"))
        for member, data in members:
            data = b"99" if member.name == first_cls else data
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    with pytest.raises(DataError, match="has label 99, outside the 10 classes of the shards' _info.json"):
        validation_labels(relabelled)


@pytest.mark.slow
def test_shards_train_resume_at_an_epoch_boundary_as_an_uninterrupted_run(tiny_config, shards):
    straight = tiny_config(*shard_overrides(shards), "trainer.max_epochs=2", "data.num_workers=2", run="straight")
    first = tiny_config(*shard_overrides(shards), "trainer.max_epochs=1", "data.num_workers=2", run="resumed")
    resumed = tiny_config(
        *shard_overrides(shards), "trainer.max_epochs=2", "data.num_workers=2", "resume=true", run="resumed"
    )
    train(straight)
    train(first)
    train(resumed)
    assert_same_weights(student_weights(straight), student_weights(resumed))


def test_shards_written_by_webdataset_itself_train_with_train_samples(tiny_config, demo_data, tmp_path):
    out = tmp_path / "wds"
    out.mkdir()
    classes = folder_split(demo_data, "train")[2]
    for split in ("train", "val"):
        files, labels, _ = folder_split(demo_data, split)
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=20, verbose=0) as writer:
            for i, (file, label) in enumerate(zip(files, labels, strict=True)):
                writer.write({"__key__": f"{file.parent.name}_{file.stem}_{i}", "png": file.read_bytes(), "cls": label})
    (out / "_info.json").write_text(json.dumps({"classes": classes}))  # no lengths: data.train_samples says
    overrides = [
        "data=webdataset",
        f"data.train='{out}/train-{{000000..000003}}.tar'",
        f"data.val='{out}/val-{{000000..000001}}.tar'",
    ]
    with pytest.raises(DeitTrainError, match="set data.train_samples=N"):
        train(tiny_config(*overrides, run="unknown"))
    run = train(tiny_config(*overrides, "data.train_samples=80", run="wds"))
    assert run.trainer.num_training_batches == 5 and run.datamodule.class_names == classes


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hf", "shards"])
def test_the_teacher_cache_fills_and_serves_runs_on_hf_data_and_shards(
    tiny_config,
    hf_copies,
    shards,
    random_teacher_checkpoint,
    tmp_path,
    teacher_calls,  # noqa: F811 (the fixture imported above)
    source,
):
    data = (
        shard_overrides(shards, "data.num_workers=2")
        if source == "shards"
        else ["data=hf", f"data.dataset={hf_copies['disk']}"]
    )
    distill = [
        *hard_distill_from(random_teacher_checkpoint),
        f"teacher.cache={tmp_path / 'cache'}",
        "trainer.max_epochs=2",
        *data,
    ]
    filled = tiny_config(*distill, run="fill")
    batches = train(filled).trainer.num_training_batches
    assert batches == (4 if source == "shards" else 5)  # 80 / 16, for shards cut to a multiple of the 2 workers
    assert teacher_calls["train"] == 2 * batches  # 2 epochs, all computed
    read = tiny_config(*distill, run="read")
    train(read)
    assert teacher_calls["train"] == 2 * batches  # none more: every batch from the cache
    assert_same_weights(student_weights(filled), student_weights(read))


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hf", "shards"])
def test_two_processes_validate_every_image_once_and_resume(tmp_path, cache_dir, demo_data, hf_copies, shards, source):
    """2-process DDP, 2 epochs then resumed for a third; val/acc1 equals deit-eval's in one process on the same
    images (40 in 3 shards of 16, 16 and 8 for the shards: ranks read 24 and 16)."""
    from .conftest import TINY_RUN, TINY_VIT

    data = (
        shard_overrides(shards)
        if source == "shards"
        else ["data=hf", f"data.dataset={hf_copies['disk']}", f"data.cache_dir={tmp_path / 'hf_cache'}"]
    )
    run_dir = tmp_path / "run"
    common = [*DDP, *data, "data.batch_size=16", "data.num_workers=1", "augment.repeated_aug=2", "resume=true"]
    run_ok(*common, "trainer.max_epochs=2", run_dir=run_dir, cache_dir=cache_dir, base=[*TINY_RUN, *TINY_VIT])
    output = run_ok(*common, "trainer.max_epochs=3", run_dir=run_dir, cache_dir=cache_dir, base=[*TINY_RUN, *TINY_VIT])
    assert "resuming from" in output
    metrics = last_epoch(run_dir)
    trained = load_trained_model(run_dir / "checkpoints" / "last.ckpt")
    eval_data = hf_copies["disk"] if source == "hf" else demo_data  # the shards hold the demo set's files
    single = evaluate(trained, open_eval_folder(eval_data, "val", trained), batch_size=7, num_workers=0)
    assert single["images"] == 40
    assert metrics["val/acc1_percent"] == pytest.approx(single["heads"]["average"]["top1"], abs=1e-5)


def test_deit_eval_on_an_hf_split_scores_as_on_the_imagefolder(tiny_config, hf_copies, demo_data):
    """Parquet files, a save_to_disk folder and hf:PATH (data=hf's data.dataset, which deit-eval did not take)."""
    cfg = tiny_config(run="model")
    train(cfg)
    trained = load_trained_model(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    on_folder = evaluate(trained, open_eval_folder(demo_data, "val", trained), num_workers=0)
    for data in (hf_copies["parquet"], hf_copies["disk"], f"hf:{hf_copies['disk']}"):
        on_hf = evaluate(trained, open_eval_folder(data, "val", trained), num_workers=0)
        assert on_hf["images"] == on_folder["images"] == 40
        assert on_hf["heads"] == on_folder["heads"]
    with pytest.raises(DeitTrainError, match="has no split 'tset': its splits are \\['train', 'validation'\\]"):
        open_eval_folder(hf_copies["parquet"], "tset", trained)  # not the validation split, silently


def test_a_tool_reads_a_path_as_deit_train_reads_it(hf_copies, demo_data, tmp_path):
    """deit-eval's DATA and deit-shard's SRC are built as the source `deit-train data=<option> data.<key>=PATH`
    builds: the same class with the same keys. A tool's --label-column is data.label_column where the source has
    one (a folder has none)."""
    from deit_train.data.sources.locate import locate

    def composed(*overrides: str):
        return build_source(compose_config(list(overrides), tmp_path / "run", tmp_path).data)

    disk, parquet = hf_copies["disk"], hf_copies["parquet"]
    assert locate(str(demo_data)) == composed("data=imagefolder", f"data.root={demo_data}")
    assert locate(f"{demo_data}/val") == composed("data=imagefolder", f"data.root={demo_data}/val")
    assert locate(str(disk)) == composed("data=hf", f"data.dataset={disk}")
    assert locate(str(parquet)) == composed("data=hf", f"data.dataset={parquet}")
    assert locate(f"hf:{parquet}") == composed("data=hf", f"data.dataset={parquet}")
    assert locate(str(disk), label_column="label", image_column=None) == composed(
        "data=hf", f"data.dataset={disk}", "data.label_column=label"
    )
    assert locate(str(demo_data), label_column="label") == composed("data=imagefolder", f"data.root={demo_data}")
    assert locate(str(tmp_path / "missing")) is None
    assert locate(str(parquet / "train.parquet")) is None  # a file: no tool reads one as its data


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_stored_image_reads_rotated_by_its_exif_orientation_as_pillow_rotates_it(orientation, tmp_path):
    """read_rgb (files, HF bytes, shard samples) transposes in place; the reference is Pillow's copying
    exif_transpose."""
    from PIL import ImageOps

    from deit_train.data.images import read_rgb

    pixels = torch.arange(24 * 16 * 3, dtype=torch.uint8).reshape(16, 24, 3).numpy()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    for source in (path, io.BytesIO(path.read_bytes())):
        image = read_rgb(source, max_pixels=None)
        assert image.size == expected.size and image.tobytes() == expected.tobytes()
    assert (expected.size == (16, 24)) == (orientation in (6, 8))


def demo_as_hf(demo_data: Path, out: Path, splits: dict[str, str], labels=None, integer: bool = False) -> Path:
    """The demo ImageFolder as a save_to_disk dataset with the splits {name: folder split}; `labels(split name, row
    labels)` changes the labels (-1: unlabelled); `integer`: a plain integer column instead of a ClassLabel."""
    tables = {}
    for name, split in splits.items():
        files, row_labels, classes = folder_split(demo_data, split)
        row_labels = labels(name, row_labels) if labels else row_labels
        label_type = datasets.Value("int64") if integer else datasets.ClassLabel(names=classes)
        features = datasets.Features({"label": label_type, "image": datasets.Image()})
        rows = {"label": row_labels, "image": [{"bytes": f.read_bytes(), "path": None} for f in files]}
        tables[name] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(tables).save_to_disk(str(out))
    return out


def test_unlabelled_rows_are_refused_or_skipped_and_counted(tiny_config, demo_data, tmp_path, caplog):
    """Rows labelled -1 (datasets' mark of a row without a label) ended training in "a bug"; now one line, or left
    out with data.unlabelled=skip, counted."""
    two_unlabelled = lambda name, labels: [-1, -1, *labels[2:]] if name == "train" else labels  # noqa: E731
    data = demo_as_hf(demo_data, tmp_path / "some", {"train": "train", "validation": "val"}, two_unlabelled)
    with pytest.raises(
        DeitTrainError,
        match=r"\[train\]: 2 of its 80 rows are unlabelled \(label -1, datasets' mark "
        r"of a row without a label\): set data.unlabelled=skip to leave them out",
    ):
        train(tiny_config("data=hf", f"data.dataset={data}", run="refused"))
    run = train(tiny_config("data=hf", f"data.dataset={data}", "data.unlabelled=skip", run="skipped"))
    assert len(run.datamodule.train_set) == 78 and "2 of its 80 rows are unlabelled (label -1): left out" in caplog.text
    assert run.datamodule.train_set.targets == folder_split(demo_data, "train")[1][2:]
    # data.val_split=null picks 'test', a Hub-style unlabelled split: said, with a fix the tool has
    test_unlabelled = lambda name, labels: [-1] * len(labels) if name == "test" else labels  # noqa: E731
    data = demo_as_hf(demo_data, tmp_path / "test", {"train": "train", "test": "val"}, test_unlabelled)
    with pytest.raises(DeitTrainError) as refused:
        train(tiny_config("data=hf", f"data.dataset={data}", run="unlabelled"))
    assert "[test] is unlabelled (all 40 rows have label -1" in str(refused.value)
    assert "Make a validation split from it (datasets' dataset['train'].train_test_split" in str(refused.value)


def test_integer_labels_train_and_evaluate_alike_and_an_empty_class_is_named(
    tiny_config, demo_data, tmp_path, caplog, capsys
):
    """1-based integer labels: class "0" has no rows (warned, by name); deit-eval reads the integer column training
    read (--label-column), scores what the run measured, and leaves unlabelled rows out with a warning."""
    one_based = lambda name, labels: [label + 1 for label in labels]  # noqa: E731
    data = demo_as_hf(demo_data, tmp_path / "int", {"train": "train", "validation": "val"}, one_based, integer=True)
    run = train(tiny_config("data=hf", f"data.dataset={data}", "data.label_column=label", run="int"))
    assert run.datamodule.class_names == [str(i) for i in range(11)]
    assert "its integer labels run 0..10 but 1 class(es) have no training rows (0; 1-based labels?)" in caplog.text
    checkpoint = Path(run.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    from deit_train.tools.evaluate import main as deit_eval

    with pytest.raises(SystemExit) as refused:
        deit_eval([str(checkpoint), str(data)])
    assert (
        refused.value.code == 2
        and "Name the label column: --label-column=COLUMN (integer labels: --label-column=label)"
        in capsys.readouterr().err
    )
    trained = load_trained_model(checkpoint)
    result = evaluate(trained, open_eval_folder(data, "val", trained, label_column="label"), num_workers=0)
    assert result["images"] == 40
    assert result["heads"]["average"]["top1"] / 100 == pytest.approx(run.metrics["val/acc1"], abs=1e-6)
    # some rows unlabelled: left out of the scores, with a warning; all unlabelled: said, no score
    three = lambda name, labels: [-1, -1, -1, *[label + 1 for label in labels[3:]]]  # noqa: E731
    partly = demo_as_hf(demo_data, tmp_path / "partly", {"validation": "val"}, three, integer=True)
    assert (
        evaluate(trained, open_eval_folder(partly, "val", trained, label_column="label"), num_workers=0)["images"] == 37
    )
    none = demo_as_hf(demo_data, tmp_path / "none", {"test": "val"}, lambda n, labels: [-1] * len(labels), integer=True)
    with pytest.raises(DeitTrainError, match=r"\[test\] is unlabelled \(all 40 rows have label -1.*deit-predict"):
        open_eval_folder(none, "test", trained, label_column="label")
    # deit-eval's default --split val on a dataset with no validation split: said as the option the user has
    train_only = demo_as_hf(demo_data, tmp_path / "train_only", {"train": "train"}, one_based, integer=True)
    with pytest.raises(DeitTrainError) as refused:
        open_eval_folder(train_only, "val", trained, label_column="label")
    assert str(refused.value) == (
        f"{train_only} has no validation split (validation, val, valid, test): its splits are ['train']; "
        "pass --split NAME"
    )


def test_each_message_names_an_option_its_tool_has(tiny_config, demo_data, shards, tmp_path, capsys):
    only_train = demo_as_hf(demo_data, tmp_path / "only_train", {"train": "train"})
    cfg = tiny_config("data=hf", f"data.dataset={only_train}")
    with pytest.raises(DeitTrainError) as refused:
        build_source(cfg.data).class_names()
    assert "its splits: train. Make a validation split from it" in str(refused.value)
    assert "Set data.val_split" not in str(refused.value)  # no other split to set it to
    assert deit_shard_error([str(only_train), str(tmp_path / "out")], capsys).count("split=") == 0
    # a label column of strings, just set: how to encode it, not "Set data.label_column"
    named = datasets.Dataset.from_dict(
        {"name": ["a", "b"], "image": [{"bytes": b"", "path": None}] * 2},
        features=datasets.Features({"name": datasets.Value("string"), "image": datasets.Image()}),
    )
    datasets.DatasetDict({"train": named, "validation": named}).save_to_disk(str(tmp_path / "strings"))
    cfg = tiny_config("data=hf", f"data.dataset={tmp_path / 'strings'}", "data.label_column=name")
    with pytest.raises(
        DeitTrainError,
        match=r"column 'name' holds Value\('string'\), not class labels \(ClassLabel or "
        r"integers\): encode it as class labels \(datasets' "
        r"dataset.class_encode_column\('name'\)",
    ):
        build_source(cfg.data).class_names()
    # deit-shard writes labelled rows only
    unlabelled = demo_as_hf(
        demo_data,
        tmp_path / "unlabelled",
        {"train": "train", "validation": "val"},
        lambda name, labels: [-1, *labels[1:]],
    )
    assert (
        "[train]: 1 of its 80 rows are unlabelled (label -1, datasets' mark of a row without a label): leave them "
        "out (datasets' dataset.filter(lambda row: row['label'] >= 0))"
        in deit_shard_error([str(unlabelled), str(tmp_path / "o2")], capsys)
    )
    # validation shards that are the training shards
    overrides = shard_overrides(shards)
    cfg = tiny_config(*overrides[:2], overrides[1].replace("data.train=", "data.val="))
    with pytest.raises(
        DeitTrainError,
        match=r"data.val=.* names the training shards \(all 5 of its shards are in "
        r"data.train\): val/acc1 would score images the student trained on",
    ):
        build_source(cfg.data).split("val", None)


def deit_shard_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        deit_shard(argv)
    assert exit.value.code == 2
    return capsys.readouterr().err


def test_the_overrides_deit_shard_prints_run_as_typed(demo_data, tmp_path, capsys):
    """deit-shard's printed `data.train=...`/`data.val=...`, split as a shell splits them, reach the config as the
    brace patterns of the shards written (unquoted the shell expands the braces; in the shell's quotes alone Hydra's
    parser refuses the braces)."""
    import shlex

    from deit_train.cli import refuse_bad_command_line

    out = tmp_path / "shards"
    deit_shard([str(demo_data), str(out), "--shard-samples", "16"])
    lines = capsys.readouterr().out.splitlines()
    printed = [line.split("shards: ", 1)[1] for line in lines if "shards: " in line]
    overrides = [word for line in printed for word in shlex.split(line)]
    assert [o.split("=", 1)[0] for o in overrides] == ["data.train", "data.val"]
    # composes and checks, the batch against the shards included (80 images: a batch of 16 fits)
    refuse_bad_command_line(["experiment=demo", "data=webdataset", "data.batch_size=16", *overrides])
    cfg = compose_config(["data=webdataset", *overrides], tmp_path / "run", tmp_path / "cache")
    assert cfg.data.train == f"{out}/train-{{000000..000004}}.tar"
    assert cfg.data.val == f"{out}/val-{{000000..000002}}.tar"


def test_the_order_check_s_sample_of_class_ordered_shards_covers_every_class(shards, demo_data, tmp_path):
    """deit-shard keeps the class order: the first 20 validation samples of the stream are 5 of the 10 classes. The
    sample the checks before training read (labels.py) has 2 of each, the images those of their labels."""
    cfg = compose_config(shard_overrides(shards, "data.num_workers=0"), tmp_path / "run", demo_data.parent)
    datamodule = DeiTDataModule(cfg.data, cfg.augment, cfg.model.img_size, seed=0)
    batches = datamodule.validation_sample(20, batch_size=8)
    labels = torch.cat([labels for _, labels in batches])
    assert sorted(labels.tolist()) == sorted(list(range(10)) * 2)
    # each image is its label's: nearest to an ImageFolder image of that class (the shards' are re-encoded)
    folder_cfg = compose_config(["data=imagefolder", f"data.root={demo_data}"], tmp_path / "f", demo_data.parent)
    folder = DeiTDataModule(folder_cfg.data, cfg.augment, cfg.model.img_size, seed=0)
    reference = folder.validation_sample(40)
    images, targets = torch.cat([b[0] for b in reference]).float(), torch.cat([b[1] for b in reference])
    for sampled, labels in batches:
        nearest = torch.cdist(sampled.float().flatten(1), images.flatten(1)).argmin(dim=1)
        assert torch.equal(targets[nearest], labels)


def test_a_split_a_tool_reads_by_name_is_named_when_it_is_missing():
    """deit-shard reads an HF dataset's train split by name (no option chooses it): a dataset without one is named
    with the split it lacks and the fix, not as an option "None=train" with advice for a missing validation split."""
    from deit_train.data.sources.hf import pick_split

    with pytest.raises(DeitTrainError) as refused:
        pick_split({"validation": None}, "train", None, "pq")
    assert str(refused.value) == "pq has no train split; its splits: validation. Save the dataset with a train split"
    with pytest.raises(DeitTrainError, match=r"^pq has no validation split \(validation, val, valid, test\)"):
        pick_split({"train": None}, None, None, "pq")


def test_a_tools_refusal_names_its_argument_not_deit_trains_key(tmp_path):
    """deit-shard SRC and deit-eval DATA build the source deit-train would (locate.py); its refusals name what the
    tool's user typed (SRC PATH), not the data.root=/data.dataset= key they never typed."""
    from deit_train.tools.shard import open_source

    (tmp_path / "flat" / "a").mkdir(parents=True)
    with pytest.raises(DeitTrainError) as refused:
        open_source(str(tmp_path / "flat"))
    assert str(refused.value).startswith(f"SRC {tmp_path / 'flat'} has no train/ folder")
    with pytest.raises(DeitTrainError, match=r"^hf: names no dataset: hf:NAME"):
        open_source("hf:")
