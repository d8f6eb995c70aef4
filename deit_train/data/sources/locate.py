"""What a user typed as a console tool's data (deit-eval DATA, deit-shard SRC), read as `deit-train` reads its data:
the `data` node `deit-train data=<option> data.<key>=...` composes (conf/data/<option>.yaml, its `_target_` and
values, with the path in the option's key), built by build_source. The tools then ask that source what they need
(`evaluation`, `stored_splits`: base.py) and never which source it is: a new kind of data a tool should read is a
line in `data_option`, and the methods on its source."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from deit_train.data.sources.base import DataSource, build_source
from deit_train.errors import DeitTrainError
from deit_train.targets import locate_class


def is_hf_dataset(path: Path) -> bool:
    """A save_to_disk folder, or a folder of Parquet/Arrow files."""
    return path.is_dir() and (
        any((path / name).exists() for name in ("dataset_dict.json", "state.json"))
        or any(path.glob("*.parquet"))
        or any(path.glob("*/*.parquet"))
        or any(path.glob("*.arrow"))
    )


def data_option(text: str) -> tuple[str, dict[str, str]] | None:
    """(the conf/data option, the key holding the path) for `text`: hf:NAME (a Hub name or a local path) and a local
    Hugging Face dataset are data=hf, any other folder data=imagefolder; None for a file or a path that is not
    there."""
    if text.startswith("hf:"):
        if not text[3:].strip():
            raise DeitTrainError(f"{text} names no dataset: hf:NAME (a Hub dataset) or hf:PATH (a local one)")
        return "hf", {"dataset": text[3:]}
    path = Path(text).expanduser()
    if is_hf_dataset(path):
        return "hf", {"dataset": str(path)}
    if path.is_dir():
        return "imagefolder", {"root": str(path)}
    return None


def data_node(text: str, **keys: object) -> DictConfig | None:
    """The `data` node `deit-train` composes for `text` (data_option), with those of `keys` that its source takes
    and that are given (not None): a tool's --label-column is a Hugging Face dataset's, not a folder's."""
    from deit_train.config import CONFIG_DIR

    found = data_option(text)
    if found is None:
        return None
    option, values = found
    node = OmegaConf.load(Path(CONFIG_DIR) / "data" / f"{option}.yaml")
    node.pop("defaults", None)  # the typed schema: build_source's dataclass
    takes = {field.name for field in dataclasses.fields(locate_class(node._target_))}
    node.merge_with({**values, **{key: value for key, value in keys.items() if value is not None and key in takes}})
    return node


def locate(text: str, **keys: object) -> DataSource | None:
    """The source of what the user typed (data_node), built and checked; None where it names no data."""
    node = data_node(text, **keys)
    return None if node is None else build_source(node)


@contextmanager
def in_the_tools_terms(argument: str) -> Iterator[None]:
    """The refusals of a source built from a tool's argument, in the tool's terms: the key deit-train's user would
    have typed (data.root=PATH, data.dataset=NAME) becomes the argument as the tool's user typed it (`argument` the
    words before it: "SRC " for deit-shard, "" for deit-eval's bare DATA)."""
    try:
        yield
    except DeitTrainError as error:
        message = re.sub(r"\bdata\.(?:root|dataset)=", argument, str(error))
        if message == str(error):
            raise
        raise type(error)(message) from error
