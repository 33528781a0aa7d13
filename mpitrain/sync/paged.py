"""Flat buffers whose memory can be handed back range by range (ZeRO-2's gradients, ZeRO-3's parameters).

    virtual:  | block L-1 | block L-2 | ... | block 0 | rest |     one anonymous mapping of n x itemsize
    resident:      ####                                           only the pages written since their
                                                                  last release(); the rest costs nothing

An anonymous ``mmap`` is reserved address space: a page takes memory when first written and gives
it back on ``release(lo, hi)`` (``madvise(MADV_DONTNEED)`` of the pages wholly inside the range;
they read as zeros afterwards). The model's views into the buffer stay valid, so a model writes and
reads its tensors as usual while a strategy decides which parts are resident. ``resident_bytes``
reads the mapping's RSS from /proc/self/smaps (the kernel's count, not ours).
"""

from __future__ import annotations

import mmap

import numpy as np

PAGE = mmap.PAGESIZE
_HAVE_MADVISE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")


class Paged:
    """``array``: a zeroed 1-D array of ``n`` x ``dtype`` in its own mapping."""

    def __init__(self, n: int, dtype):
        dtype = np.dtype(dtype)
        self.nbytes = int(n) * dtype.itemsize
        self._mm = mmap.mmap(-1, max(self.nbytes, PAGE))
        self.array = np.frombuffer(self._mm, dtype=dtype, count=int(n))
        self.addr = self.array.ctypes.data

    def release(self, lo: int, hi: int) -> None:
        """Give back the pages wholly inside elements ``[lo, hi)`` (their values become zeros)."""
        size = self.array.itemsize
        a = -(-lo * size // PAGE) * PAGE
        b = (hi * size // PAGE) * PAGE
        if b > a and _HAVE_MADVISE:
            self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)

    def release_all(self) -> None:
        self.release(0, self.array.size)

    def resident_bytes(self) -> int:
        """Bytes of this buffer in memory now (the kernel's RSS of the mapping; -1 where unknown)."""
        return resident_bytes(self.addr)


def resident_bytes(addr: int) -> int:
    """RSS in bytes of the mapping that starts at ``addr`` (Linux /proc/self/smaps; -1 elsewhere)."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and ":" not in head:
                    start = int(head.split("-")[0], 16)
                    inside = start == addr
                elif inside and line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def allocator(keep: list):
    """An ``alloc(n, dtype)`` for models.grads_allocator / params_allocator: each buffer a ``Paged``,
    appended to ``keep`` (so its owner can release ranges of it)."""
    def alloc(n, dtype):
        buf = Paged(n, dtype)
        keep.append(buf)
        return buf.array
    return alloc
