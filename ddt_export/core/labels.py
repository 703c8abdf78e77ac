"""A run's class labels without holding them: memory does not grow with the number of samples. Torch-free.

A `generate --num 100000000` run has 1e8 labels: as an int64 array that is 800 MB before the first sample, and a
copy of it for every hash or check. `Labels` is the same sequence stated by its source instead:

    Labels(np.array([3, 5]), 100_000_000)        # the --class list (or 0..C-1) cycled: 3, 5, 3, 5, ...
    Labels(np.load(file, mmap_mode="r"), n)     # a --labels .npy: rows read from the file when asked

Slices are int64 arrays (`labels[start:stop]`, what a chunk reads), `blocks()` walks the sequence in bounded
pieces (checks, the run record's hash, the npz's `arr_1`), `array()` materializes it (small requests: the server,
validate, calibrate).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np

BLOCK = 1 << 16  # labels per block when walking the sequence (512 KiB of int64)


@dataclass(frozen=True, eq=False)
class Labels:
    """`num` labels: `base` cycled (`base[i % len(base)]`); a file's rows are `base` itself, num == len(base)."""

    base: np.ndarray  # (k,) integers, k >= 1; may be a read-only memory map
    num: int

    def __post_init__(self):
        assert self.base.ndim == 1 and len(self.base) >= 1 and self.num >= 0, (self.base.shape, self.num)

    @staticmethod
    def of(array) -> "Labels":
        """An explicit (num,) array of labels."""
        a = np.asarray(array)
        return Labels(a if len(a) else np.zeros(1, np.int64), len(a))

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.num)
            if step != 1:
                return self.array()[key]
            k = len(self.base)
            if k >= stop:  # a file's rows, or a cycle not yet wrapped
                return np.asarray(self.base[start:stop], np.int64)
            return np.asarray(self.base, np.int64)[np.arange(start, stop) % k]
        i = int(key)
        if not -self.num <= i < self.num:
            raise IndexError(f"label {i} of {self.num}")
        return int(self.base[(i % self.num) % len(self.base)])

    def blocks(self, size: int = BLOCK) -> Iterator[np.ndarray]:
        """The labels in order, `size` at a time (int64)."""
        for lo in range(0, self.num, size):
            yield self[lo:min(lo + size, self.num)]

    def array(self) -> np.ndarray:
        """(num,) int64, materialized."""
        return np.concatenate(list(self.blocks())) if self.num else np.zeros(0, np.int64)

    def bad(self, num_classes: int) -> int | None:
        """The first label outside [0, num_classes), or None."""
        seen = self.base if len(self.base) <= self.num else self.base[:self.num]
        for lo in range(0, len(seen), BLOCK):
            part = np.asarray(seen[lo:lo + BLOCK])
            out = part[(part < 0) | (part >= num_classes)]
            if out.size:
                return int(out[0])
        return None

    def digest(self) -> str:
        """sha256 of the labels as contiguous int64 bytes (the array's `tobytes()`), computed block by block."""
        h = hashlib.sha256()
        for block in self.blocks():
            h.update(np.ascontiguousarray(block, np.int64).data)
        return h.hexdigest()
