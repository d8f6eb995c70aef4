"""A split of a Hugging Face dataset as a map-style dataset of (transform(image), label), its image column decoded
here (data/sources/hf.py: the source that opens the dataset and its splits)."""

import io

from PIL import Image
from torch.utils.data import Dataset

from deit_train.data.extras import datasets_module
from deit_train.data.images import READ_ERRORS, EncodedImage, open_image, read_rgb, reason
from deit_train.errors import DataError


class HFImages(Dataset):
    """One split as (transform(image), label) by row; `table` is the datasets.Dataset, its image column undecoded."""

    def __init__(
        self,
        table,
        image_column: str,
        label_column: str,
        name: str,
        transform=None,
        max_pixels: int | None = Image.MAX_IMAGE_PIXELS,
        decode: str = "exact",
    ) -> None:
        datasets = datasets_module()
        table = table.select_columns([image_column, label_column])
        if isinstance(table.features[image_column], datasets.Image):
            table = table.cast_column(image_column, datasets.Image(decode=False))  # its bytes: we decode
        self.table, self.image_column, self.label_column = table, image_column, label_column
        self.root = name  # how messages name it (SkipCorrupt, deit-eval)
        self.transform, self.max_pixels, self.reduced = transform, max_pixels, decode == "reduced"
        self.label_map: dict[int, int] | None = None  # deit-eval: the dataset's labels to the model's

    def __len__(self) -> int:
        return len(self.table)

    def source(self, stored) -> io.BytesIO | str:
        """The stored image as a file: its bytes, or the path the column holds where it has no bytes."""
        if isinstance(stored, dict):
            return io.BytesIO(stored["bytes"]) if stored.get("bytes") is not None else stored["path"]
        return io.BytesIO(stored)

    def decode(self, stored, index: int) -> Image.Image | EncodedImage:
        """The row's image decoded, or for data.decode=reduced read and checked, decoded by the transform."""
        try:
            if stored is None:
                raise ValueError("no image in this row")
            if self.reduced:
                return open_image(self.source(stored), self.max_pixels, name=f"{self.root}[{index}]")
            return read_rgb(self.source(stored), self.max_pixels)
        except READ_ERRORS as error:
            raise DataError(
                f"corrupt image {self.root}[{index}]: {reason(error)}. Replace it in the dataset, or set "
                f"data.skip_corrupt=true to skip such images with a warning."
            ) from error

    def __getitem__(self, index: int):
        row = self.table[index]
        image, label = self.decode(row[self.image_column], index), int(row[self.label_column])
        if self.label_map is not None:
            label = self.label_map[label]
        return (self.transform(image) if self.transform is not None else image), label

    @property
    def targets(self) -> list[int]:
        return list(self.table[self.label_column])

    def fingerprint(self) -> str:
        """datasets' own fingerprint of the table (its files and every transform applied), for the teacher cache."""
        return f"hf\t{self.table._fingerprint}\t{len(self)}\t{self.image_column}\t{self.label_column}"

    def unreadable(self, full: bool, max_pixels: int | None) -> list[tuple[str, str]]:
        """data.scan for images stored in the dataset: (row, problem) of each that cannot be read."""
        problems = []
        for index, stored in enumerate(self.table[self.image_column]):
            try:
                read_rgb(self.source(stored), max_pixels, decode=full)
            except READ_ERRORS as error:
                problems.append((f"{self.root}[{index}]", reason(error)))
        return problems
