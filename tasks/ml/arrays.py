"""Per-image arrays computed once and read back every epoch, within a RAM budget.

Decoded images, backbone features and the activations at the fine-tune
boundary are all rows of fixed-shape arrays, one row per image. An
:class:`ArrayStore` writes them once to a folder (one flat file per column,
then ``meta.json`` as the commit point, the folder renamed into place), so a
killed writer leaves nothing that looks finished. Reading it back, the rows
are held in RAM when the :class:`Budget` has room for them, and otherwise
read from disk batch by batch (``os.pread``: the page cache serves repeated
reads, the process's own memory stays flat). Either way the batches are the
same: the row order comes from shuffling the row indices with the seed, so
a store read from disk trains exactly what one held in RAM trains.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.io import atomic_path, human_size

if TYPE_CHECKING:
    import numpy as np
    import tensorflow as tf

log = logging.getLogger(__name__)

_META = "meta.json"


@dataclass(frozen=True)
class Column:
    """One array per row: its dtype and shape (without the row axis)."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        import numpy as np

        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape, dtype=np.int64)))


class Budget:
    """Bytes of RAM the per-image caches of one process may hold; the rest stays on disk."""

    def __init__(self, nbytes: int) -> None:
        self.left = int(nbytes)

    def take(self, nbytes: int) -> bool:
        """Whether ``nbytes`` fit in what is left (taking them if so)."""
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True


class ArrayStore:
    """Rows of fixed-shape arrays in a folder, written once; the last column is the label."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.rows = int(meta["rows"])
        self.columns = [Column(c["dtype"], tuple(c["shape"])) for c in meta["columns"]]
        self.key = meta["key"]
        self._arrays: list[np.ndarray] | None = None

    @classmethod
    def open(cls, directory: Path, key: dict[str, Any]) -> ArrayStore | None:
        """The finished store in ``directory`` made for ``key``; None if there is none."""
        try:
            meta = json.loads((Path(directory) / _META).read_text())
        except (OSError, ValueError):
            return None
        if meta.get("key") != _canonical(key):
            log.info("the cache in %s was made from other inputs; it is rebuilt", directory)
            return None
        return cls(directory, meta)

    @classmethod
    def write(
        cls, directory: Path, batches: Iterable[Sequence[np.ndarray]], key: dict[str, Any]
    ) -> ArrayStore:
        """Write every batch's columns (each an array with the rows first) to ``directory``."""
        with StoreWriter(directory, key) as writer:
            for batch in batches:
                writer.append(batch)
        return writer.store

    @property
    def nbytes(self) -> int:
        return self.rows * sum(column.row_bytes for column in self.columns)

    def hold(self, budget: Budget) -> bool:
        """Load the rows into RAM if ``budget`` has room for them; whether it did."""
        import numpy as np

        if self._arrays is None and budget.take(self.nbytes):
            self._arrays = [
                np.fromfile(self.directory / f"{i}.bin", dtype=c.dtype).reshape(-1, *c.shape)
                for i, c in enumerate(self.columns)
            ]
        where = "RAM" if self._arrays is not None else "disk"
        log.info("%s: %d rows, %s, read from %s", self.directory, self.rows,
                 human_size(self.nbytes), where)  # fmt: skip
        return self._arrays is not None

    def read(self, indices: np.ndarray) -> list[np.ndarray]:
        """The rows at ``indices`` (in that order), one array per column."""
        import numpy as np

        if self._arrays is not None:
            return [array[indices] for array in self._arrays]
        out = []
        for i, column in enumerate(self.columns):
            size = column.row_bytes
            fd = os.open(self.directory / f"{i}.bin", os.O_RDONLY)
            try:
                if len(indices) and np.all(np.diff(indices) == 1):  # a run: one read
                    data = os.pread(fd, size * len(indices), int(indices[0]) * size)
                else:
                    data = b"".join(os.pread(fd, size, int(j) * size) for j in indices)
            finally:
                os.close(fd)
            out.append(np.frombuffer(data, dtype=column.dtype).reshape(-1, *column.shape))
        return out

    def dataset(self, batch_size: int, *, shuffle: bool, seed: int) -> tf.data.Dataset:
        """Batches of ``(x, label)`` (``x``: the one column, or a tuple of several),
        reshuffled each epoch (seeded) when ``shuffle``."""
        import numpy as np
        import tensorflow as tf

        dtypes = [tf.as_dtype(np.dtype(c.dtype)) for c in self.columns]

        def gather(indices: tf.Tensor) -> Any:
            arrays = tf.numpy_function(self.read, [indices], dtypes, stateful=False)
            for array, column in zip(arrays, self.columns, strict=True):
                array.set_shape((None, *column.shape))
            *x, y = arrays
            return (x[0] if len(x) == 1 else tuple(x)), y

        ds = tf.data.Dataset.range(self.rows)
        if shuffle:
            ds = ds.shuffle(self.rows, seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size).map(gather, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    def remove(self) -> None:
        """Delete the store (and its folder's parent, once empty)."""
        self._arrays = None
        shutil.rmtree(self.directory, ignore_errors=True)
        try:
            self.directory.parent.rmdir()
        except OSError:
            pass  # other stores are still there


class StoreWriter:
    """Writes an :class:`ArrayStore` batch by batch; it exists only once the block ends well."""

    def __init__(self, directory: Path, key: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.key = _canonical(key)
        self.rows = 0
        self._columns: list[Column] = []
        self._files: list[Any] = []
        self._store: ArrayStore | None = None

    def __enter__(self) -> StoreWriter:
        self._context = atomic_path(self.directory)
        self._tmp = self._context.__enter__()
        self._tmp.mkdir()
        return self

    def append(self, batch: Sequence[np.ndarray]) -> None:
        import numpy as np

        arrays = [np.ascontiguousarray(array) for array in batch]
        if len({len(array) for array in arrays}) != 1:
            lengths = [len(array) for array in arrays]
            raise ValueError(f"{self.directory}: a batch's columns have {lengths} rows; one each")
        if not self._files:
            self._columns = [Column(a.dtype.str, tuple(a.shape[1:])) for a in arrays]
            self._files = [open(self._tmp / f"{i}.bin", "wb") for i in range(len(arrays))]
        for handle, array in zip(self._files, arrays, strict=True):
            handle.write(array.tobytes())
        self.rows += len(arrays[0])

    def __exit__(self, *exc: Any) -> Any:
        for handle in self._files:
            handle.close()
        if exc[0] is None:
            meta = {
                "rows": self.rows,
                "columns": [{"dtype": c.dtype, "shape": list(c.shape)} for c in self._columns],
                "key": self.key,
            }
            (self._tmp / _META).write_text(json.dumps(meta, indent=1))
            self._store = ArrayStore(self.directory, meta)
        return self._context.__exit__(*exc)

    @property
    def store(self) -> ArrayStore:
        if self._store is None:
            raise RuntimeError(f"{self.directory} was not written to the end")
        return self._store


def _canonical(key: dict[str, Any]) -> Any:
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def free_bytes(directory: Path) -> int:
    """Free space on the filesystem that holds (or will hold) ``directory``."""
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def budget_bytes(setting: int | str) -> int:
    """``train.cache_budget_mb`` in bytes; ``auto``: a quarter of the memory this process
    may use (the container's cgroup limit where there is one, else the machine's)."""
    if setting != "auto":
        return int(setting) << 20
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            memory = min(memory, int(limit))
    except OSError:
        pass
    return memory // 4
