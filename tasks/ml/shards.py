"""Images stored as TFRecord shards: a few hundred objects for DVC instead of one per image.

``validate`` writes a dataset stored as shards (``datasets.<ds>.format``): the
accepted (``ok``) images of each split, in manifest order, as
``<split>-NNNNN-of-MMMMM.tfrecord`` files of about ``validate.shard_mb`` each.
Each record is one image file's bytes as they were in the archive (no
``tf.train.Example`` around them), so a record's sha256 is the manifest's. The
manifest gains three columns for these rows:

========  ==============================================================
shard     the shard's file name
offset    the record's byte offset in the shard (random access: Grad-CAM,
          the mistakes grid, an input example)
record    the record's position in the shard
========  ==============================================================

``index.json`` beside the shards lists them (split, records, bytes) with the
digest of the manifest's columns that locate the images (:func:`locator_digest`),
so a manifest and shards from different runs are refused. For a dataset stored as
files the folder holds only an index that says so.

Reading (:func:`shard_records`): every shard a split touches, several at once
(``interleave``), in their order, so the records come in manifest order.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import StageError

if TYPE_CHECKING:
    import pandas as pd
    import tensorflow as tf

INDEX = "index.json"
LOCATORS = ("shard", "offset", "record")
RECORD_OVERHEAD = 16
"""TFRecord framing: the length (8 bytes) and its CRC (4) before the data, its CRC (4) after."""
PARALLEL_READS = 4


def is_sharded(frame: pd.DataFrame) -> bool:
    """Whether the manifest's images are in shards (it has their locations)."""
    return "shard" in frame.columns and bool(frame["shard"].notna().any())


def write_shards(
    manifest: pd.DataFrame,
    read: Callable[[str], bytes],
    directory: Path,
    shard_bytes: int,
    splits: Sequence[str],
) -> pd.DataFrame:
    """Write the ``ok`` rows of each split as shards in ``directory``; the manifest with
    their locations (null for the other rows), and ``index.json``.

    ``read(path)`` gives a row's bytes; each is checked against the row's sha256,
    so a source that changed since it was inspected is refused.
    """
    import numpy as np
    import pandas as pd
    import tensorflow as tf

    located = {name: np.full(len(manifest), -1, dtype=np.int64) for name in ("offset", "record")}
    shard_of = np.full(len(manifest), None, dtype=object)
    shards: dict[str, dict[str, Any]] = {}
    for split in splits:
        usable = (manifest["split"] == split) & (manifest["status"] == "ok")
        ok = np.flatnonzero(usable.to_numpy())
        sizes = manifest["bytes"].to_numpy()[ok] + RECORD_OVERHEAD
        count = max(1, math.ceil(int(sizes.sum()) / shard_bytes)) if len(ok) else 0
        per = math.ceil(len(ok) / count) if count else 0
        for number, start in enumerate(range(0, len(ok), per)):
            name = f"{split}-{number:05d}-of-{count:05d}.tfrecord"
            offset = 0
            with tf.io.TFRecordWriter(str(directory / name)) as writer:
                for record, row in enumerate(ok[start : start + per]):
                    data = _checked(read, manifest, row)
                    writer.write(data)
                    shard_of[row], located["offset"][row], located["record"][row] = (
                        name, offset, record,
                    )  # fmt: skip
                    offset += len(data) + RECORD_OVERHEAD
            shards[name] = {"split": split, "records": min(per, len(ok) - start), "bytes": offset}
    manifest = manifest.copy()
    manifest["shard"] = pd.array(shard_of, dtype="string")
    for name, values in located.items():
        manifest[name] = pd.array(np.where(values < 0, None, values), dtype="Int64")
    digest = locator_digest(manifest)
    write_index(directory, {"format": "shards", "digest": digest, "shards": shards})
    return manifest


def _checked(read: Callable[[str], bytes], manifest: pd.DataFrame, row: int) -> bytes:
    path = manifest["path"].iat[row]
    data = read(path)
    if hashlib.sha256(data).hexdigest() != manifest["sha256"].iat[row]:
        raise StageError(
            f"{path} changed while validate read it (its sha256 differs from the one just "
            "checked); rerun download and validate"
        )
    return data


def write_index(directory: Path, index: dict[str, Any]) -> None:
    (Path(directory) / INDEX).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


def read_index(directory: Path) -> dict[str, Any]:
    """``index.json`` of a shards folder, or a StageError naming the fix."""
    path = Path(directory) / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise StageError(f"cannot read {path} ({error}); rerun validate") from None
    if not isinstance(index, dict) or index.get("format") not in ("files", "shards"):
        raise StageError(f"{path} is not a shards index; rerun validate")
    return index


def locator_digest(manifest: pd.DataFrame) -> str:
    """sha256 over what locates each image (path, content hash, split, shard, offset, record)."""
    import pandas as pd

    columns = ["path", "sha256", "split", *LOCATORS]
    hashed = pd.util.hash_pandas_object(manifest[columns], index=False)
    return hashlib.sha256(hashed.to_numpy().tobytes()).hexdigest()


def read_record(shard: Path, offset: int) -> bytes:
    """The record at byte ``offset`` of ``shard`` (one image file's bytes)."""
    with open(shard, "rb") as handle:
        handle.seek(offset)
        (length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(4, 1)
        data = handle.read(length)
    if len(data) != length:
        raise StageError(f"{shard} ends inside the record at {offset}; rerun validate")
    return data


def image_file(root: Path, row: Any) -> Any:
    """Something Pillow opens for one manifest row: the file under ``root``, or the record
    of its shard (``root``: the shards folder)."""
    import io

    shard = row.get("shard") if hasattr(row, "get") else None
    if isinstance(shard, str):
        return io.BytesIO(read_record(Path(root) / shard, int(row["offset"])))
    return Path(root) / row["path"]


def shard_records(root: Path, rows: pd.DataFrame) -> tf.data.Dataset:
    """The bytes of ``rows``' images, in their order, read from the shards under ``root``.

    Reads every shard the rows touch, ``PARALLEL_READS`` at a time, each in
    full and in order (``interleave`` with a block as long as the longest
    shard keeps the shards' order), and drops the records of other rows.
    """
    import numpy as np
    import tensorflow as tf

    index = read_index(root)
    shards, keep = _plan(index, rows, root)
    counts = [index["shards"][name]["records"] for name in shards]
    records = tf.data.Dataset.from_tensor_slices([str(Path(root) / name) for name in shards])
    records = records.interleave(
        lambda path: tf.data.TFRecordDataset(path, buffer_size=1 << 22),
        cycle_length=min(PARALLEL_READS, len(shards)),
        block_length=max(counts),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    flags = tf.data.Dataset.from_tensor_slices(np.concatenate(keep))
    both = tf.data.Dataset.zip(records, flags).filter(lambda _, wanted: wanted)
    return both.map(lambda data, _: data)


def _plan(index: dict[str, Any], rows: pd.DataFrame, root: Path) -> tuple[list[str], list[Any]]:
    """The shards ``rows`` touch, in order, and which records of each they want."""
    import numpy as np

    names = rows["shard"].to_numpy(dtype=object)
    positions = rows["record"].to_numpy(dtype=np.int64)
    if rows["shard"].isna().any():
        raise StageError(f"some rows have no shard in {root}; rerun validate")
    order = list(zip(names, positions, strict=True))
    if order != sorted(order):
        raise StageError("rows from shards must come in manifest order; read them unsorted")
    shards = list(dict.fromkeys(names))
    keep = []
    for name in shards:
        if name not in index["shards"] or not (Path(root) / name).is_file():
            raise StageError(f"shard {Path(root) / name} is missing; rerun validate")
        wanted = np.zeros(index["shards"][name]["records"], dtype=bool)
        wanted[positions[names == name]] = True
        keep.append(wanted)
    return shards, keep
