"""Repeated augmentation: what each rank draws, for one and two ranks, and that Lightning keeps our sampler."""

from collections import Counter

import lightning as L
import pytest

from deit_train.data import DeiTDataModule
from deit_train.data.samplers import RepeatedAugmentationSampler

from .conftest import compose_config


def draws(size: int, repeats: int, world: int, epoch: int = 0, seed: int = 0) -> list[list[int]]:
    per_rank = []
    for rank in range(world):
        sampler = RepeatedAugmentationSampler(range(size), repeats=repeats, num_replicas=world, rank=rank, seed=seed)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    return per_rank


@pytest.mark.parametrize("size,repeats,world", [(100, 3, 1), (100, 3, 2), (99, 3, 3), (10, 3, 2), (8, 1, 2)])
def test_all_ranks_together_draw_each_image_repeats_times(size, repeats, world):
    per_rank = draws(size, repeats, world)
    per_rank_count = -(-size // world)  # ceil: no rounding down to 256 as in the official sampler
    assert [len(indices) for indices in per_rank] == [per_rank_count] * world
    counts = Counter(i for indices in per_rank for i in indices)
    total = per_rank_count * world
    # ceil(total / repeats) distinct images; every one `repeats` times but the last, cut by the epoch's end.
    assert len(counts) == -(-total // repeats)
    assert sorted(counts.values(), reverse=True)[: total // repeats] == [repeats] * (total // repeats)
    assert set(counts) <= set(range(size))


def test_without_repeats_a_short_last_round_wraps_around():
    per_rank = draws(7, repeats=1, world=2)
    counts = Counter(i for indices in per_rank for i in indices)
    assert [len(indices) for indices in per_rank] == [4, 4]
    assert set(counts) == set(range(7)) and sorted(counts.values()) == [1] * 6 + [2]


def test_copies_of_an_image_go_to_different_ranks():
    per_rank = draws(96, repeats=3, world=3)
    for indices in per_rank:  # with as many ranks as repeats, no rank sees the same image twice
        assert len(set(indices)) == len(indices)
    two_ranks = draws(96, repeats=3, world=2)
    both = set(two_ranks[0]) & set(two_ranks[1])
    assert both == set(two_ranks[0]) | set(two_ranks[1])  # with two ranks every image is on both


def test_order_is_deterministic_per_epoch_and_changes_between_epochs():
    assert draws(50, 3, 2, epoch=4) == draws(50, 3, 2, epoch=4)
    assert draws(50, 3, 2, epoch=4) != draws(50, 3, 2, epoch=5)
    assert draws(50, 3, 2, seed=1) != draws(50, 3, 2, seed=2)


def test_single_process_keeps_copies_together_for_batch_augmentation():
    (indices,) = draws(30, repeats=3, world=1)
    assert all(indices[k] == indices[k + 1] == indices[k + 2] for k in range(0, 30, 3))


@pytest.mark.parametrize("single_process,repeats,distinct", [(False, 1, 80), (True, 3, 27)])
def test_lightning_keeps_our_sampler_in_the_train_loader(single_process, repeats, distinct, tmp_path, cache_dir):
    """One process: repeated augmentation only with augment.repeated_aug_single_process=true (the official code
    repeats only when distributed); off, an epoch sees every one of the 80 images."""
    cfg = compose_config(
        [
            "experiment=demo",
            "data.image_size=16",
            "data.train_per_class=8",
            "data.val_per_class=4",
            "augment.repeated_aug=3",
            f"augment.repeated_aug_single_process={str(single_process).lower()}",
            "data.batch_size=8",
            "data.num_workers=0",
        ],
        tmp_path,
        cache_dir,
    )
    datamodule = DeiTDataModule(cfg.data, cfg.augment, img_size=16, seed=7)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, max_epochs=1)
    trainer.strategy.connect(L.LightningModule())
    datamodule.trainer = trainer
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert isinstance(loader.sampler, RepeatedAugmentationSampler)
    assert loader.sampler.seed == 7 and loader.sampler.repeats == repeats
    assert len(loader) == 80 // 8
    assert len({index for index, _epoch, _copy in loader.sampler}) == distinct  # ceil(80 / 3) with x3
