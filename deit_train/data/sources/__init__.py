"""Where the images come from: one object per kind of data, chosen by conf/data/<name>.yaml's `_target_`
(base.py says what a source answers). Registered here, each gives its yaml a typed schema, `<name>_schema`."""

from deit_train.data.sources.base import DataSource, LoaderPlan, build_source, register
from deit_train.data.sources.cifar import CIFAR10Source, CIFAR100Source
from deit_train.data.sources.demo import DemoSource
from deit_train.data.sources.hf import HFSource
from deit_train.data.sources.imagefolder import ImageFolderSource
from deit_train.data.sources.webdataset import ShardSource

register("demo", DemoSource)
register("imagefolder", ImageFolderSource)
register("cifar10", CIFAR10Source)
register("cifar100", CIFAR100Source)
register("hf", HFSource)
register("webdataset", ShardSource)

__all__ = ["DataSource", "LoaderPlan", "build_source", "register"]
