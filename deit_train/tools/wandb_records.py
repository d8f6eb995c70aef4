"""The logged scalars of a W&B run from its own file (wandb/offline-run-*/run-*.wandb, or a synced run-*/), without
the network: what deit-report draws for a run that logged to W&B only.

The file is a LevelDB-style log (what wandb's former `sdk/internal/datastore.py` wrote and read; wandb 0.19+ writes
it from its Go core and no longer ships a Python reader): a 7-byte header (":W&B", magic 0xBEE1, version 0), then
32 KiB blocks of records, each `crc32c (4) | length (2, little-endian) | type (1)` and its payload, a record that
does not fit a block being split FIRST, MIDDLE..., LAST. Each payload is a `wandb.proto` Record; its `history`
records hold the rows Lightning's WandbLogger logged.
"""

import json
import struct
from collections.abc import Iterator
from pathlib import Path

from deit_train.errors import DeitTrainError

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")  # checksum, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(data: bytes) -> Iterator[bytes]:
    """The records' payloads, joined where a record was split over blocks; a record cut short by a run that is
    still writing ends the scan."""
    pos, parts = len(HEADER), []
    while pos + RECORD_HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER.size:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        payload = data[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + length]
        if len(payload) < length:
            return
        pos += RECORD_HEADER.size + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            parts = [payload]
        elif kind == MIDDLE:
            parts.append(payload)
        elif kind == LAST:
            yield b"".join([*parts, payload])
            parts = []


def history_rows(path: Path) -> Iterator[dict[str, float]]:
    """Each logged row of a W&B run file: metric name -> number (W&B's own `_step`, `_runtime`... left out)."""
    try:
        from wandb.proto import wandb_internal_pb2
    except ImportError as error:
        raise DeitTrainError(f"{path} is a W&B log: pip install wandb to read it") from error
    data = path.read_bytes()
    if not data.startswith(HEADER):
        raise DeitTrainError(f"{path} is not a W&B run file (no :W&B header): remove it, or the run's wandb/ folder")
    for payload in payloads(data):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except Exception as error:  # protobuf's DecodeError
            raise DeitTrainError(f"{path} holds a damaged record ({error}): remove it, or the run's wandb/") from error
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            name = item.key or "/".join(item.nested_key)
            try:
                value = json.loads(item.value_json)
            except ValueError:
                continue
            if not name.startswith("_") and isinstance(value, int | float) and not isinstance(value, bool):
                row[name] = float(value)
        yield row
