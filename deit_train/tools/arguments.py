"""Checks the console scripts (deit-eval, deit-predict, deit-export, deit-report) make of their arguments before any
work, so that a bad number or an output path that cannot be written is refused at once, not after a long run."""

import argparse
import os
from pathlib import Path

from deit_train.errors import DeitTrainError, fail


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose refusals are one line like every other error (usage with --help)."""

    def error(self, message: str) -> None:
        fail(self.prog, f"{message} (usage: {self.prog} --help)", 2)


def at_least(low: int):
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    return parse


def existing_model(source: str) -> None:
    """MODEL (a deit-train .ckpt or a deit-export directory) is there, checked before the tool imports torch and the
    models to load it (load_trained_model checks it again, for a caller of its own)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DeitTrainError(f"{path} does not exist: pass a deit-train .ckpt or a deit-export directory")


def writable_file(path: Path, flag: str, overwrite: bool = True) -> None:
    """`path` can be written as a file: its folder exists and is writable, it is not a folder itself (and does not
    exist yet, unless `overwrite`)."""
    path = path.expanduser()
    if path.is_dir():
        raise DeitTrainError(f"{flag} {path} is a folder: give a file name, e.g. {path / 'result.json'}")
    if path.exists() and not overwrite:
        raise DeitTrainError(f"{flag} {path} exists: remove it or give another name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise DeitTrainError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise DeitTrainError(f"{flag} {path}: the folder {folder} is not writable")


def new_output_dir(path: Path, flag: str) -> None:
    """`path` can become an output folder: it does not exist or is an empty folder, and its parent is writable."""
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        raise DeitTrainError(f"{flag} {path} is a file: give a folder to write into")
    if path.is_dir() and any(path.iterdir()):
        raise DeitTrainError(
            f"{flag} {path} is a folder that is not empty: give a new or empty folder (nothing in it is overwritten)"
        )
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise DeitTrainError(f"{flag} {path}: {parent} is not writable")


def write_text(path: Path, text: str) -> None:
    """Write beside the target, then rename: an interrupted write never leaves half a file."""
    path = path.expanduser()
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    staging.replace(path)
